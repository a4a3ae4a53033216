"""
The speed layer: modules swapped in for phi.py's plain nn.Linear after loading (gpt-fast's quantize.py pattern).

speed_up(model) turns every nn.Linear into a FastLinear (same parameters) where the CPU kernels below measure faster;
quantize_int8(model) / quantize_int4(model) turn them into Int8Linear / Int4Linear. generate.load, train.py and
bench.py apply them; phi.py never sees them. The CPU kernels are kept where they were measured faster than nn.Linear
(docs/benchmarks.md):
- matvec: a batch-1 Linear inside the compiled decode step as multiply-and-sum, which inductor compiles into one
  streaming pass over the weights (a GEMM library called with one row reads them at about half the bandwidth);
- oneDNN for fp32 matmuls instead of MKL, which nn.Linear calls: MKL dispatches on the CPU vendor and takes slower
  code paths on AMD (1.2x slower at 512 rows, 1.5-2.7x at 1-8 rows on an AMD EPYC);
- bf16: decoding's few rows through the operator phi_cpu::matvec_bf16 (bf16_decoding), prompts in fp32 on a CPU
  without bf16 instructions (BF16_NATIVE);
- FastAttention: a decode step's attention in one operator call, phi_cpu::decode_attention;
- FastBlock: an eager decode step's block in fewer Python calls (the kernel's Linears called as operators; with
  int8/int4 Linears the whole block is one, phi_cpu::decode_block).
They were measured faster on AMD EPYC; on an Intel Xeon with AMX the compiled matvec step was slower than the eager
one and MKL is Intel's own: there nn.Linear stays (CPU_KERNELS; PHI_CPU_KERNELS=0/1 overrides the rule).

int8 and int4 weights multiply on x86-64 CPUs with AVX2 through Q8_SOURCE, small C++ operators built at first use:
integer products summed in int32, the activations rounded per block of 32 (to int16 for int8 weights, in llama.cpp's
q8_0 blocks; to int8 for int4), decoding at 2-2.7x PyTorch's int8 and int4 kernels, which widen every weight to
float, and prompts without expanding the weights (AMD EPYC; by the CPU_KERNELS rule, q8_on). weight_only=True keeps
PyTorch's kernels (activations not rounded), as does a CPU the rule leaves out, one without AVX2, or a machine
without a C++ compiler.
"""

import functools
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import phi


def cpu_info(key: str) -> str:  # the first CPU's /proc/cpuinfo field (vendor_id, flags, ...), "" where none
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f if line.split(":")[0].strip() == key), "")
    except OSError:
        return ""


def cpu_vendor() -> str:
    return cpu_info("vendor_id")


CPU_KERNELS = {"0": False, "1": True}.get(os.environ.get("PHI_CPU_KERNELS", ""), cpu_vendor() == "AuthenticAMD")
CPU_FLAGS = set(cpu_info("flags").split())  # (avx2, avx512_vnni, ...: the instructions the kernels may use)


def one_row_compiled(x) -> bool:  # one row (batch-1 decoding) on the CPU inside torch.compile: see matvec
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]


def bf16_halves(t):
    """bf16 (..., 2m) -> two fp32 (..., m) of alternate columns: a bf16 is an fp32's top half, so of an int32 pair one
    is the low half shifted up, one the high half masked (one op per two numbers; .float() takes two each)."""
    i = t.view(torch.int32)
    return (i << 16).view(torch.float32), (i & -65536).view(torch.float32)


# matvec widens bf16 in pairs from this many weights on, where the CPU has AVX-512: with AVX2 only, inductor does not
# vectorize the int32 shifts, and the pairs ran a compiled 160m bf16 step 3.2x slower (AMD EPYC Zen 3: 63 ms vs 19.8)
PAIRS_MIN_WEIGHTS = 2**20 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else math.inf


def matvec(x, weight, scale=None):
    """x (..., in), one row, times weight (out, in).T as multiply-and-sum in fp32 (scale: int8's per-channel (out,)).
    Inductor compiles it into one pass over the weight; rows > 4096 in equal chunks (summed faster). bf16 from 1M
    weights widens in int32 pairs where the CPU has AVX-512 (PAIRS_MIN_WEIGHTS; one by one, 1.4b ran out of compute
    at ~35 GB/s of weights); below, the pairs' two views, Python calls in inductor's wrapper, cost more than they
    save."""
    N, K = weight.shape
    n = next((n for n in range(1, K + 1) if K % n == 0 and K // n <= 4096), 1)
    w, xs = weight.view(N, n, K // n), x.reshape(n, K // n)
    if weight.dtype == x.dtype == torch.bfloat16 and K % (2 * n) == 0 and N * K >= PAIRS_MIN_WEIGHTS:
        (w0, w1), (x0, x1) = bf16_halves(w), bf16_halves(xs)
        y = (w0 * x0 + w1 * x1).sum(-1).sum(-1)  # (out,)
    else:
        y = (w.float() * xs.float()).sum(-1).sum(-1)
    return (y if scale is None else y * scale.float()).to(x.dtype).view(*x.shape[:-1], -1)


# A custom op, so that autograd and torch.compile see one opaque matmul; it costs ~20 us more per call than F.linear,
# more than it saves below ~1M weights (ONEDNN_MIN_WEIGHTS).
@torch.library.custom_op("phi_speed::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # x @ weight.T + bias


def _onednn_linear_backward(ctx, dy):  # dy (..., out)
    x, weight = ctx.saved_tensors
    dx = onednn_linear(dy, weight.t(), None) if ctx.needs_input_grad[0] else None
    dy, x = dy.flatten(0, -2), x.flatten(0, -2)  # the weight's gradient: MKL is as fast at it
    return dx, dy.t() @ x if ctx.needs_input_grad[1] else None, dy.sum(0) if ctx.needs_input_grad[2] else None


onednn_linear.register_fake(lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))
onednn_linear.register_autograd(
    _onednn_linear_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs[:2])
)
ONEDNN_MIN_WEIGHTS = 2**20 if torch.backends.mkldnn.is_available() else math.inf  # math.inf: F.linear always


# A CPU without bf16 dot products (AVX-512 BF16, AMX) multiplies bf16 matrices far slower than fp32 ones: on an AMD
# EPYC Zen 3 (AVX2) a 512 x 768 by 768 x 3072 product took 138 ms in bf16, 18 ms in fp32 with the weights widened
# for the call (8192 x 2048: 863 and 163 ms). Widening pays from ~64 rows (16: 4.3 ms and 1.4; one row: 0.3 and 0.9).
BF16_NATIVE = bool({"avx512_bf16", "amx_bf16"} & CPU_FLAGS)
WIDEN_MIN_ROWS = 64


def linear(x, weight, bias=None):  # x @ weight.T + bias; oneDNN: fp32 on the CPU, not autocast (F.linear's bf16)
    widen = x.dtype == torch.bfloat16 and not BF16_NATIVE and not torch.compiler.is_compiling()  # (compiled: decoding)
    if widen and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        if x.numel() >= WIDEN_MIN_ROWS * x.shape[-1]:  # a prompt: in fp32, rounded to bf16 once
            return linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    onednn = x.dtype == torch.float32 and x.device.type == "cpu" and weight.numel() >= ONEDNN_MIN_WEIGHTS
    return (onednn_linear if onednn and not torch.is_autocast_enabled("cpu") else F.linear)(x, weight, bias)


def bf16_decoding(x, weight) -> bool:
    """Does a bf16 product take the operator phi_cpu::matvec_bf16: bf16 weights on the CPU, a few rows (eager: up to
    8; a compiled step, whose rows are its batch, any), with gradients off (decoding: not a compiled training step's
    thousands of rows). (FastLinear asks where q8_kernel built.)
    It reads the weights at 1.2-2x the speed of the bf16 GEMM and of inductor's matvec (AMD EPYC Zen 3: 8192 x
    2048 from L3, one row, 26.6 GB/s against 16.6 and 13.3; a 0.5b token's 33 Linears from memory: 19.7-22 GB/s)."""
    if weight.dtype != torch.bfloat16 or x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    fits = weight.shape[0] % 4 == 0 and weight.shape[1] % 8 == 0  # (the operator's out % 4, in % 8)
    return (torch.compiler.is_compiling() or x.numel() <= 8 * x.shape[-1]) and fits


class FastLinear(nn.Linear):
    """nn.Linear, with the bf16 operator for decoding (bf16_decoding), matvec for one row in the compiled CPU decode
    step, and oneDNN for other fp32 CPU products."""

    kernel = False  # the CPU operators are built (speed_up sets it: q8_kernel)

    def forward(self, x):
        if self.one_call(x):
            return self.product(x)
        if one_row_compiled(x):
            y = matvec(x, self.weight)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)

    def one_call(self, x) -> bool:
        """bf16 decoding (bf16_decoding) with fp32 or bf16 x: the operator, the bias in (product); inside a compiled
        step too, with x as it is. (Widened to fp32 there, x was not rounded to bf16 where inductor fused the op that
        made it, computing in fp32: that kept it off the operator's bf16 pairs, AVX512_BF16.)"""
        return self.kernel and x.dtype in (torch.float32, torch.bfloat16) and bf16_decoding(x, self.weight)

    def product(self, x):  # (one_call(x))
        return torch.ops.phi_cpu.matvec_bf16(x.contiguous(), self.weight, self.bias)


class FastAttention(phi.Attention):
    """phi.Attention, with a decode step's attention (one query per row and head) in the CPU operator
    phi_cpu::decode_attention (Q8_SOURCE): one call instead of ~10 small ops, reading only the slots the mask
    allows (the compiled step's masks cover every slot of the cache), softmax in fp32 as phi.py's. In an eager
    decode step (generate.decode_step's) rotary and the cache write are one call too (phi_cpu::rotary_cache,
    for ~25 small ops: what a small model's token is made of)."""

    def forward(self, x, a: phi.AttentionInputs):
        return self.decode(x, a) if self.fused(x, a) else super().forward(x, a)

    def fused(self, x, a) -> bool:  # (eager: a compiled step keeps phi.py's ops, which inductor fuses)
        plain = self.grouped or self.qk_layernorm or self.sparse or a.flash or a.cache is None or a.mask is None
        if plain or x.shape[1] != 1 or not isinstance(a.at, torch.Tensor) or torch.compiler.is_compiling():
            return False
        return self.decodes(x, a.cache.k[self.layer]) and a.cos.dtype == x.dtype

    def decode(self, x, a):  # where fused(x, a): phi.Attention's forward in two operators and the two Linears
        k, v = a.cache.k[self.layer], a.cache.v[self.layer]
        q = torch.ops.phi_cpu.rotary_cache(product(self.qkv, x), a.cos, a.sin, k, v, a.at, self.n_head)
        y = torch.ops.phi_cpu.decode_attention(q, k, v, a.mask, self.scale or self.head_dim**-0.5)
        return product(self.out, y.view(x.shape[0], 1, -1))

    def decodes(self, q, k) -> bool:  # (the operators' dtypes and head sizes; a cache narrower: see cache_dtype)
        fits = k.dtype == q.dtype or (q.dtype == torch.float32 and k.dtype in (torch.bfloat16, torch.float16))
        fits = fits and q.dtype in (torch.float32, torch.bfloat16)
        return q8_takes(q) and fits and self.head_dim % 8 == 0 and self.head_dim <= 256

    def decode_attention(self, q, k, v, mask):
        if self.decodes(q, k):
            return torch.ops.phi_cpu.decode_attention(q.contiguous(), k, v, mask, self.scale or self.head_dim**-0.5)
        return super().decode_attention(q, k, v, mask)


class FastBlock(phi.Block):
    """phi.Block, with an eager decode step's block (where its FastAttention fuses, its MLP is a plain phi.MLP, not
    training, no forward hooks on the attention or MLP, nor global ones) in fewer Python calls: the dropouts
    (identity) skipped, the MLP's forward inline, the kernel's Linears called as operators (product), the residuals
    added in place in phi.Block's order (the same numbers). A small model's token is made of such calls: each
    nn.Module call or attribute costs microseconds here (AMD EPYC Zen 3: ~12 us of a Linear's ~22 us at 128 wide).
    Where its four Linears are int8/int4 on the kernel, the whole block is one operator call (one_call)."""

    def forward(self, x, a: phi.AttentionInputs):
        if not self.lean(x, a):
            return super().forward(x, a)
        if (act := self.one_call(x)) is not None:
            return self.decode_block(x, a, act)
        h = self.norm1(x)
        y = self.attn.decode(h, a).add_(x)  # x + attention, then (parallel) + mlp(h)
        if self.parallel:
            return y.add_(self.mlp_out(h))
        return self.mlp_out(self.norm2(y)).add_(y)

    def lean(self, x, a) -> bool:
        attn, mlp = self.attn, self.mlp
        plain = type(mlp) is phi.MLP and mlp.act is not phi.gegelu and not self.training
        hooks = hooked(attn) or hooked(mlp)
        return plain and not hooks and isinstance(attn, FastAttention) and attn.fused(x, a)

    def one_call(self, x) -> int | None:
        """The block in one operator call (phi_cpu::decode_block, Q8_SOURCE): where its four Linears are int8/int4 on
        the kernel without hooks, x is fp32, its norms LayerNorm or RMSNorm and its activation gelu (tanh) or silu:
        that activation's code, else None."""
        attn, mlp, norms = self.attn, self.mlp, [self.norm1] + ([] if self.parallel else [self.norm2])
        linears = (attn.qkv, attn.out, mlp.fc1, mlp.fc2)
        if x.dtype != torch.float32 or not all(type(n) in (nn.LayerNorm, phi.RMSNorm) for n in norms):
            return None
        if not all(isinstance(lin, (Int8Linear, Int4Linear)) and lin.q8 and not hooked(lin) for lin in linears):
            return None
        tanh = isinstance(mlp.act, functools.partial) and mlp.act.func is F.gelu and mlp.act.keywords == TANH
        return 0 if tanh else 1 if mlp.act is F.silu else None  # (phi.gelu_tanh, copied with the model, is another)

    def decode_block(self, x, a, act):  # (one_call(x): act)
        none, attn, mlp = x.new_empty(0), self.attn, self.mlp
        p = [self.norm1.weight, getattr(self.norm1, "bias", None)]
        p += [none, none] if self.parallel else [self.norm2.weight, getattr(self.norm2, "bias", None)]
        for lin in (attn.qkv, attn.out, mlp.fc1, mlp.fc2):
            scales = lin.scale if isinstance(lin, Int8Linear) else lin.scales
            p += [lin.weight, scales, getattr(lin, "lows", None), lin.bias]
        k, v, scale = a.cache.k[attn.layer], a.cache.v[attn.layer], attn.scale or attn.head_dim**-0.5
        p = [none if t is None else t for t in p]
        eps = self.norm1.eps
        return torch.ops.phi_cpu.decode_block(x, p, a.cos, a.sin, k, v, a.at, a.mask, attn.n_head, scale, eps, act)

    def mlp_out(self, h):  # phi.MLP.forward (not gegelu's)
        mlp = self.mlp
        u = product(mlp.fc1, h)
        if mlp.glu:
            gate, up = u.chunk(2, dim=-1)
            return product(mlp.fc2, up * mlp.act(gate))
        return product(mlp.fc2, mlp.act(u))


TANH = {"approximate": "tanh"}
GLOBAL_HOOKS = (torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks)


def hooked(module: nn.Module) -> bool:  # forward hooks on module, or global ones (a direct call would skip them)
    return bool(module._forward_hooks or module._forward_pre_hooks or GLOBAL_HOOKS[0] or GLOBAL_HOOKS[1])


def product(linear, x):
    """linear(x) in an eager decode step (FastBlock, FastAttention.decode): the operator of an Int8Linear or
    Int4Linear (where the kernel takes x: its layout, fp32 x) or of a bf16 FastLinear (one_call) called directly where
    the Linear has no hooks, else the module."""
    direct = isinstance(linear, (Int8Linear, Int4Linear)) and linear.q8 and x.dtype == torch.float32
    direct = direct or (isinstance(linear, FastLinear) and linear.one_call(x))
    return linear.product(x) if direct and not hooked(linear) else linear(x)


def huge_pages():
    """Let PyTorch back its large CPU allocations (the weights, the caches) with 2 MB pages: THP_MEM_ALLOC_ENABLE,
    which it reads at its first allocation (a value the user set stands; after that, no effect). Decoding streams
    every weight once a token; in fewer pages the TLB misses less: an AMD EPYC Zen 4 read a 0.5b model's bf16
    Linears 4-13% faster (one row, alternating processes), one 8192 x 2048 Linear on one thread 14-34%."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def swap_linears(model: nn.Module, make, skip=()):
    """Replace every nn.Linear child of model (but those named in skip) by make(linear), in place."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(module, name, make(child))
    return model


def speed_up(model: nn.Module, cpu_kernels: bool | None = None):
    """Swap the CPU kernels into a model on the CPU (FastLinear, sharing each nn.Linear's parameters: tied weights
    stay tied, and the state dict keeps its names) where the CPU kind measured faster with them: CPU_KERNELS, or
    cpu_kernels if given. A model on another device is left as it is."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not on_cpu or not (CPU_KERNELS if cpu_kernels is None else cpu_kernels):
        return model

    def fast(lin):
        f = FastLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        f.weight, f.bias, f.kernel = lin.weight, lin.bias, q8_kernel()
        return f

    if q8_kernel():  # (a subclass adding no state: the module keeps its parameters and names)
        for m in model.modules():
            if type(m) is phi.Attention:
                m.__class__ = FastAttention
            if type(m) is phi.Block:
                m.__class__ = FastBlock
    return swap_linears(model, lambda lin: lin if isinstance(lin, FastLinear) else fast(lin))


# The integer kernel (C++, AVX2 intrinsics, OpenMP: torch's own libgomp serves it), an operator of torch's
# stable C ABI (torch/csrc/stable: a few C headers, ~5 s to build, where the full extension headers take ~1 minute
# and torch's builder needs ninja): eager calls cost one dispatch (~10 us), and torch.compile calls it as any aten op.
Q8_SOURCE = r"""
// Integer products on x86-64 with AVX2 (and AVX-512 VNNI's multiply-adds where built with them), as the operator
// phi_cpu::linear: int8 weights (llama.cpp's q8_0: an fp16 scale per block of 32) times activations rounded to int16
// per block of 32; int4 weights times int8 activations.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <type_traits>
#include <vector>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

static inline float hsum(__m256 a) {  // the sum of a register's 8 lanes
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// A row x (K,) -> q (K,) int8 (Q) or int16 and d (K/32,) per block of 32: x ~ q * d, d = max|x| / 127 (int8) or
// 32767, q = x / d halved to even (as torch.round; 0 where d is); xs (K/G,): the sums of the rounded x per group of
// G columns (int4's minimums).
template <typename Q>
static void quantize_row(const float* x, int64_t K, int64_t G, Q* q, float* d, float* xs) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const float top = sizeof(Q) == 1 ? 127.f : 32767.f;
  for (int64_t g = 0; g < K / G; g++) xs[g] = 0.f;
  for (int64_t b = 0; b < K / 32; b++) {
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++)
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    d[b] = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))) / top;
    const __m256 dv = _mm256_set1_ps(d[b]);
    __m256i r[4];
    __m256 sum = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
      __m256 t = d[b] > 0.f ? _mm256_round_ps(_mm256_div_ps(v[i], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                            : _mm256_setzero_ps();
      sum = _mm256_add_ps(sum, t);
      r[i] = _mm256_cvtps_epi32(t);
    }
    // int32 -> int8 or int16 (packs interleave 128-bit lanes; the permutes put the 32 back in order)
    const __m256i p0 = _mm256_packs_epi32(r[0], r[1]), p1 = _mm256_packs_epi32(r[2], r[3]);
    if (sizeof(Q) == 1) {
      const __m256i p = _mm256_packs_epi16(p0, p1);
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      _mm256_storeu_si256((__m256i*)(q + 32 * b), _mm256_permutevar8x32_epi32(p, order));
    } else {
      _mm256_storeu_si256((__m256i*)(q + 32 * b), _mm256_permute4x64_epi64(p0, 0xD8));
      _mm256_storeu_si256((__m256i*)(q + 32 * b + 16), _mm256_permute4x64_epi64(p1, 0xD8));
    }
    xs[32 * b / G] += hsum(sum) * d[b];
  }
}

static inline __m256i four(const int8_t* q) {  // 4 bytes of a rounded row into each 32-bit lane
  int32_t v;
  memcpy(&v, q, 4);
  return _mm256_set1_epi32(v);
}
static inline __m256i four(const int16_t* q) {  // 4 int16 of a rounded row into each 64-bit lane
  int64_t v;
  memcpy(&v, q, 8);
  return _mm256_set1_epi64x(v);
}

// int8 register of a tile (32 bytes) -> int16, each half sign-extended in one op: lo holds columns 0, 1 | 2, 3, hi
// 4, 5 | 6, 7
static inline void widen(const uint8_t* w, __m256i& lo, __m256i& hi) {
  lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)w));
  hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + 16)));
}

// 8 output columns (a tile) for R rows at once: lane c of each 32-byte weight register holds column c's weights,
// so a register's products are the 8 columns' partial dot products side by side (llama.cpp's repacked "8x8" q4_0),
// with no horizontal sums; each register is loaded and widened once for all R rows. Per block of 32 columns:
// int8: 8 registers, register j's lane c = W[c][4j .. 4j + 3], widened to int16 (widen) and multiplied by the
// rows' int16 q, madd summing pairs into int32 (|w q| * 32 < 2^31), hadd the pairs; int4: 4 registers, register
// j's lane c byte i = W[c][8j + i] low, W[c][8j + 4 + i] high (0..15), times int8 q (maddubs: eight sum into int16
// below 2^15), madd summing into int32 (VNNI: vpdpwssd and vpdpbusd multiply and add into int32 at once). s (and
// lo): (K/G, 8) fp16, the tile's scales (and minimums) per group of G columns (int8: G = 32): y = sum_b d_b s_g
// (w_b . q_b), plus for int4 sum_g lo_g xs_g, plus the tile's 8 biases where bias is given.
// ahead (the first rows' pass over a tile): the weights AHEAD bytes on are prefetched, this tile's and then the next's
// (a thread's tiles are contiguous). AMD EPYC Zen 3, a model's Linears from memory, one row: 8-19% faster at 1024-1536
// bytes (160m int8 9.16 -> 8.45 ms, int4 5.79 -> 4.96; 0.5b int8 30.7 -> 27.4), 2048 less, none or 512 no faster.
constexpr int64_t AHEAD = 1280;
template <int R, int BITS, bool WIDE>
static void tile(const uint8_t* w, const int16_t* w16, const uint16_t* s, const uint16_t* lo, const void* qv,
                 const float* d, const float* xs, const float* bias, int64_t K, int64_t G, float* y, int64_t N,
                 bool ahead) {
  typedef typename std::conditional<BITS == 8, int16_t, int8_t>::type Q;
  const Q* q = (const Q*)qv;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[R], sg = _mm256_setzero_ps();
  for (int r = 0; r < R; r++) acc[r] = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const int shift = BITS == 8 || G == 32 ? 0 : G == 64 ? 1 : 2;  // (blocks of 32 per group: 1 << shift)
  for (int64_t b = 0; b < K / 32; b++) {
    for (int i = 0; ahead && i < BITS / 2; i++)  // (a block's BITS * 32 bytes: BITS / 2 cache lines)
      _mm_prefetch((const char*)w + BITS * 32 * b + AHEAD + 64 * i, _MM_HINT_T0);
    if ((b & ((1 << shift) - 1)) == 0) {  // a group's scales (and minimums times the group's sums of x)
      const int64_t g = b >> shift;
      sg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + 8 * g)));
      if (BITS == 4) {
        const __m256 lg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(lo + 8 * g)));
        for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(lg, _mm256_set1_ps(xs[r * K / G + g]), acc[r]);
      }
    }
    __m256i p[R];
    for (int r = 0; r < R; r++) p[r] = _mm256_setzero_si256();
    if (BITS == 8) {
      __m256i p2[R];  // (p: columns 0, 1 | 2, 3, p2: 4, 5 | 6, 7, two lanes of pair sums each; hadd: 0, 1, 4, 5 |
      for (int r = 0; r < R; r++) p2[r] = _mm256_setzero_si256();  // 2, 3, 6, 7, the permute puts them in order)
      for (int j = 0; j < 8; j++) {
        __m256i lo4, hi4;  // columns 0, 1 | 2, 3 and 4, 5 | 6, 7 as int16 (widen's)
        if (WIDE)
          lo4 = _mm256_loadu_si256((const __m256i*)(w16 + 256 * b + 32 * j)),
          hi4 = _mm256_loadu_si256((const __m256i*)(w16 + 256 * b + 32 * j + 16));
        else
          widen(w + 256 * b + 32 * j, lo4, hi4);
        for (int r = 0; r < R; r++) {
          const __m256i qr = four(q + r * K + 32 * b + 4 * j);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
          p[r] = _mm256_dpwssd_epi32(p[r], lo4, qr), p2[r] = _mm256_dpwssd_epi32(p2[r], hi4, qr);
#else
          p[r] = _mm256_add_epi32(p[r], _mm256_madd_epi16(lo4, qr));
          p2[r] = _mm256_add_epi32(p2[r], _mm256_madd_epi16(hi4, qr));
#endif
        }
      }
      for (int r = 0; r < R; r++) p[r] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(p[r], p2[r]), 0xD8);
    } else {
      for (int j = 0; j < 4; j++) {
        const __m256i wj = _mm256_loadu_si256((const __m256i*)(w + 128 * b + 32 * j));
        const __m256i l = _mm256_and_si256(wj, low4), h = _mm256_and_si256(_mm256_srli_epi16(wj, 4), low4);
        for (int r = 0; r < R; r++) {
          const Q* qr = q + r * K + 32 * b + 8 * j;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
          p[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(p[r], l, four(qr)), h, four(qr + 4));
#else
          p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(l, four(qr)));
          p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(h, four(qr + 4)));
#endif
        }
      }
#if !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
      for (int r = 0; r < R; r++) p[r] = _mm256_madd_epi16(p[r], ones);
#endif
    }
    for (int r = 0; r < R; r++)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[r]), _mm256_mul_ps(sg, _mm256_set1_ps(d[r * K / 32 + b])), acc[r]);
  }
  for (int r = 0; r < R; r++) _mm256_storeu_ps(y + r * N, acc[r]);
}

// Tile t (columns 8t .. 8t + 7) for rows m .. m + R - 1 (R <= 4: the 4 accumulators, the sums and the weights fit
// the 16 registers, nearly); w16: the tile's int8 weights widened to int16 (WIDE).
template <int BITS, bool WIDE>
static void tiles(int64_t t, int64_t m, int64_t R, const uint8_t* W, const int16_t* w16, const uint16_t* s,
                  const uint16_t* lo, const void* q, const float* d, const float* xs, const float* bias, int64_t N,
                  int64_t K, int64_t G, float* y) {
  const uint8_t* w = W + 8 * t * K * BITS / 8;
  const uint16_t *st = s + 8 * t * K / G, *lt = BITS == 8 ? lo : lo + 8 * t * K / G;
  const void* qm = (const char*)q + m * K * (BITS == 8 ? 2 : 1);
  const float *dm = d + m * K / 32, *xm = xs + m * K / G;
  const float *bt = bias ? bias + 8 * t : nullptr;
  float* ym = y + m * N + 8 * t;
  const bool ahead = !WIDE && m == 0;  // (a prompt's widened weights are in L2 already)
  switch (R) {
    case 1: tile<1, BITS, WIDE>(w, w16, st, lt, qm, dm, xm, bt, K, G, ym, N, ahead); break;
    case 2: tile<2, BITS, WIDE>(w, w16, st, lt, qm, dm, xm, bt, K, G, ym, N, ahead); break;
    case 3: tile<3, BITS, WIDE>(w, w16, st, lt, qm, dm, xm, bt, K, G, ym, N, ahead); break;
    default: tile<4, BITS, WIDE>(w, w16, st, lt, qm, dm, xm, bt, K, G, ym, N, ahead);
  }
}

// y (M, N) fp32 = x (M, K) fp32 @ W.T (+ bias (N,)), x rounded per block of 32 first (int16 for int8 weights,
// int8 for int4). W in tiles of 8 columns (N % 8 == 0): bits 8: int8 (N, K), s (N, K/32) fp16; bits 4: (N, K/2), s
// and lo (N, K/G) fp16 (the layouts of tile). K % 64 == 0; G (int4) 32, 64 or 128, dividing K. Each thread takes 2
// tiles at a time, whose weights (16 K bytes; 32 K widened) stay in L2 while every 4 rows pass.
static void linear_q8(const float* x, int64_t M, const uint8_t* W, const uint16_t* s, const uint16_t* lo,
                      const float* bias, int64_t N, int64_t K, int64_t G, int bits, float* y) {
  const int64_t qb = bits == 8 ? 2 : 1;  // bytes per rounded x
  char* q = (char*)malloc(M * K * qb + M * (K / 32 + K / G) * sizeof(float));
  float *d = (float*)(q + M * K * qb), *xs = d + M * K / 32;
  const int threads = torch::stable::get_num_threads();  // (torch's setting, whichever thread calls)
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 8)
  for (int64_t m = 0; m < M; m++)
    if (bits == 8)
      quantize_row(x + m * K, K, G, (int16_t*)q + m * K, d + m * K / 32, xs + m * K / G);
    else
      quantize_row(x + m * K, K, G, (int8_t*)q + m * K, d + m * K / 32, xs + m * K / G);
  // A prompt's int8 weights are widened to int16 once per tile (into w16, L2) for all its rows; decoding's few rows
  // widen them in registers.
  const bool wide = bits == 8 && M > 8;
#pragma omp parallel num_threads(threads)
  {
    int16_t* w16 = wide ? (int16_t*)malloc(2 * 8 * K * sizeof(int16_t)) : nullptr;
#pragma omp for schedule(static)
    for (int64_t t0 = 0; t0 < N / 8; t0 += 2) {
      for (int64_t t = t0; wide && t < t0 + 2 && t < N / 8; t++)
        for (int64_t i = 0; i < K / 4; i++) {  // (register i: 4 weights of each of the 8 columns)
          __m256i l, h;
          widen(W + 8 * t * K + 32 * i, l, h);
          _mm256_storeu_si256((__m256i*)(w16 + (t - t0) * 8 * K + 32 * i), l);
          _mm256_storeu_si256((__m256i*)(w16 + (t - t0) * 8 * K + 32 * i + 16), h);
        }
      for (int64_t m = 0; m < M; m += 4) {
        const int64_t R = M - m < 4 ? M - m : 4;
        for (int64_t t = t0; t < t0 + 2 && t < N / 8; t++)
          if (wide)
            tiles<8, true>(t, m, R, W, w16 + (t - t0) * 8 * K, s, lo, q, d, xs, bias, N, K, G, y);
          else if (bits == 8)
            tiles<8, false>(t, m, R, W, nullptr, s, lo, q, d, xs, bias, N, K, G, y);
          else
            tiles<4, false>(t, m, R, W, nullptr, s, lo, q, d, xs, bias, N, K, G, y);
      }
    }
    free(w16);
  }
  free(q);
}

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

static Tensor rows_of(const Tensor& x, int64_t N) {  // a new tensor in x's dtype: (x's leading dimensions..., N)
  std::vector<int64_t> shape;
  for (int64_t i = 0; i < x.dim() - 1; i++) shape.push_back(x.size(i));
  shape.push_back(N);
  return torch::stable::new_empty(x, shape);
}

// The operator: x (..., K) fp32 -> y (..., N) fp32 (+ bias (N,) fp32); int8 weight (N, K) and scales, or (lows
// given) int4's layout. (One call with the bias in: a decode step's Linear costs its dispatch, ~10 us, and no more.)
Tensor linear(Tensor x, Tensor weight, Tensor scales, std::optional<Tensor> lows, int64_t group,
              std::optional<Tensor> bias) {
  const int bits = lows.has_value() ? 4 : 8;
  STD_TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == ScalarType::Float && x.is_contiguous(), "x: (..., in) fp32");
  const int64_t K = x.size(x.dim() - 1), M = K ? x.numel() / K : 0, N = weight.size(0), G = bits == 8 ? 32 : group;
  STD_TORCH_CHECK(weight.scalar_type() == (bits == 8 ? ScalarType::Char : ScalarType::Byte) &&
                      weight.is_contiguous() && weight.size(1) * 8 / bits == K && N % 8 == 0,
                  "weight: int8 (out, in), or uint8 (out, in / 2) with lows; out % 8 == 0");
  STD_TORCH_CHECK(K % 64 == 0 && (G == 32 || G == 64 || G == 128) && K % G == 0, "in % 64, group 32/64/128");
  for (const Tensor& t : {scales, lows.value_or(scales)})
    STD_TORCH_CHECK(t.scalar_type() == ScalarType::Half && t.is_contiguous() && t.numel() == N * K / G,
                    "scales, lows: fp16 (out, in / group)");
  if (bias.has_value())
    STD_TORCH_CHECK(bias->scalar_type() == ScalarType::Float && bias->is_contiguous() && bias->numel() == N,
                    "bias: fp32 (out,)");
  Tensor y = rows_of(x, N);
  linear_q8((const float*)x.data_ptr(), M, (const uint8_t*)weight.data_ptr(), (const uint16_t*)scales.data_ptr(),
            bits == 4 ? (const uint16_t*)lows->data_ptr() : nullptr,
            bias.has_value() ? (const float*)bias->data_ptr() : nullptr, N, K, G, bits, (float*)y.data_ptr());
  return y;
}

// Attention for one query per row and head (a decode step) over S cached slots: y = softmax(scale q.k_s over the
// slots the mask allows) . v_s, all in fp32 (Q, q's and y's type: float, or bf16 as uint16_t: an fp32's top half; E,
// the cache's: float, bf16 or fp16, half). q, y (B, H, hd) contiguous; k, v (B, KV, S, hd) and mask (B, 1 | H, S) by
// their strides (st: k's, v's, mask's for row, head, slot), so a slice of the cache needs no copy; query head h reads
// key head h / (H / KV) (GQA). Slots the mask hides are not read: a cache's empty slots cost nothing. No slot
// allowed: NaN, as a softmax of only -inf.
struct half {  // IEEE fp16 (torch.float16): a KV cache narrower than an fp32 model's (see cache_dtype)
  uint16_t bits;
};
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline __m256 load8(const half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline void store(float* p, float x) { *p = x; }
static inline void store(uint16_t* p, float x) {  // fp32 -> bf16, to nearest even (as torch; NaN stays NaN)
  uint32_t u;
  memcpy(&u, &x, 4);
  *p = (uint16_t)(x != x ? 0x7FC0 : (u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
static inline void store(half* p, float x) { p->bits = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }  // (as torch)
static inline float get(const float* p) { return *p; }
static inline float get(const uint16_t* p) {
  const uint32_t u = (uint32_t)*p << 16;
  float x;
  memcpy(&x, &u, 4);
  return x;
}
static inline float get(const half* p) { return _cvtsh_ss(p->bits); }

template <typename Q, typename E>
static void attend(const Q* q, const E* k, const E* v, const bool* mask, int64_t B, int64_t H, int64_t KV, int64_t S,
                   int64_t hd, const int64_t (*st)[3], float scale, Q* y) {
  const int threads = torch::stable::get_num_threads();
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (B * H * S * hd >= 65536)
  for (int64_t b = 0; b < B; b++)
    for (int64_t h = 0; h < H; h++) {
      const int64_t j = h / (H / KV);
      const E *kh = k + b * st[0][0] + j * st[0][1], *vh = v + b * st[1][0] + j * st[1][1];
      const bool* m = mask + b * st[2][0] + h * st[2][1];
      float* p = (float*)malloc(S * sizeof(float));
      __m256 qv[32], o[32];  // hd <= 256
      for (int64_t i = 0; i < hd / 8; i++) qv[i] = load8(q + (b * H + h) * hd + 8 * i), o[i] = _mm256_setzero_ps();
      float top = -INFINITY, sum = 0.f;
      for (int64_t s = 0; s < S; s++) {  // the scores
        if (!m[s * st[2][2]]) continue;
        const E* ks = kh + s * st[0][2];
        __m256 a = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();  // (two chains of fma: half the latency)
        for (int64_t i = 0; i + 1 < hd / 8; i += 2) {
          a = _mm256_fmadd_ps(qv[i], load8(ks + 8 * i), a);
          a2 = _mm256_fmadd_ps(qv[i + 1], load8(ks + 8 * i + 8), a2);
        }
        if (hd / 8 % 2) a = _mm256_fmadd_ps(qv[hd / 8 - 1], load8(ks + hd - 8), a);
        p[s] = hsum(_mm256_add_ps(a, a2)) * scale;
        top = p[s] > top ? p[s] : top;
      }
      for (int64_t s = 0; s < S; s++) {  // exp(score - max), times the values
        if (!m[s * st[2][2]]) continue;
        const float e = expf(p[s] - top);
        sum += e;
        for (int64_t i = 0; i < hd / 8; i++)
          o[i] = _mm256_fmadd_ps(_mm256_set1_ps(e), load8(vh + s * st[1][2] + 8 * i), o[i]);
      }
      free(p);
      float out[256];
      for (int64_t i = 0; i < hd / 8; i++) _mm256_storeu_ps(out + 8 * i, o[i]);
      for (int64_t i = 0; i < hd; i++) store(y + (b * H + h) * hd + i, out[i] / sum);
    }
}

// Calls f with null pointers of the C++ types of an operator's activations and of its KV cache (the dtypes dt and
// ct, checked by the caller: ct is dt, or for fp32 activations bf16 or fp16): float or uint16_t (bf16); float,
// uint16_t (bf16) or half.
template <typename F>
static void with_types(ScalarType dt, ScalarType ct, F f) {
  if (dt == ScalarType::BFloat16)
    f((uint16_t*)nullptr, (uint16_t*)nullptr);
  else if (ct == ScalarType::Float)
    f((float*)nullptr, (float*)nullptr);
  else if (ct == ScalarType::BFloat16)
    f((float*)nullptr, (uint16_t*)nullptr);
  else
    f((float*)nullptr, (half*)nullptr);
}
static bool cache_of(ScalarType dt, ScalarType ct) {  // a KV cache's dtype the operators take beside activations'
  return ct == dt || (dt == ScalarType::Float && (ct == ScalarType::BFloat16 || ct == ScalarType::Half));
}

// The operator: q (B, H, 1, hd), k and v (B, KV, S, hd) in q's dtype or narrower (cache_of), mask bool (B, 1 | H, 1,
// S) -> y (B, H, 1, hd) in q's dtype.
Tensor decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, double scale) {
  const auto dt = q.scalar_type(), ct = k.scalar_type();
  STD_TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.is_contiguous(), "q: (rows, heads, 1, head_dim) contiguous");
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3), KV = k.dim() == 4 ? k.size(1) : 0;
  const int64_t S = k.dim() == 4 ? k.size(2) : 0;
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16, "q: float32 or bfloat16");
  STD_TORCH_CHECK(hd % 8 == 0 && hd <= 256, "head_dim: a multiple of 8, at most 256");
  for (const Tensor& t : {k, v})
    STD_TORCH_CHECK(t.scalar_type() == ct && cache_of(dt, ct) && t.dim() == 4 && t.size(0) == B && t.size(1) == KV &&
                        t.size(2) == S && t.size(3) == hd && t.stride(3) == 1 && KV > 0 && H % KV == 0,
                    "k, v: (rows, kv_heads, slots, head_dim), one dtype: q's, or bfloat16 or float16 for float32 q; "
                    "kv_heads dividing heads");
  STD_TORCH_CHECK(mask.scalar_type() == ScalarType::Bool && mask.dim() == 4 && mask.size(0) == B &&
                      (mask.size(1) == 1 || mask.size(1) == H) && mask.size(2) == 1 && mask.size(3) == S,
                  "mask: bool (rows, 1 or heads, 1, slots)");
  const int64_t st[3][3] = {{k.stride(0), k.stride(1), k.stride(2)},
                            {v.stride(0), v.stride(1), v.stride(2)},
                            {mask.stride(0), mask.size(1) == 1 ? 0 : mask.stride(1), mask.stride(3)}};
  Tensor y = torch::stable::new_empty(q, {B, H, 1, hd});
  with_types(dt, ct, [&](auto* x, auto* c) {
    using X = std::remove_pointer_t<decltype(x)>;
    using C = std::remove_pointer_t<decltype(c)>;
    attend((const X*)q.data_ptr(), (const C*)k.data_ptr(), (const C*)v.data_ptr(), (const bool*)mask.data_ptr(), B, H,
           KV, S, hd, st, (float)scale, (X*)y.data_ptr());
  });
  return y;
}

// Rotary and the KV cache write of a decode step (one new token per row) in one call, for FastAttention: qkv (B, 1,
// (H + 2 KV) hd) is phi.Attention's qkv Linear (the H heads' queries, then the keys, then the values); cos and sin
// (B, 1, 1, d). Each query and key head rotated as phi.apply_rotary does (dim i < d / 2 pairs with i + d / 2: x cos
// + rotate_half(x) sin; dims from d on pass; in bf16 each product and the sum rounded, as its ops round; in fp32 up
// to the last bit, where the compiler fuses a product and the sum into one FMA); the keys
// and values written into slot `slot` of k_cache and v_cache (B, KV, S, hd); the queries into q (B, H, 1, hd).
template <typename E>
static inline float in(float x) {  // x rounded to E's precision
  E e;
  store(&e, x);
  return get(&e);
}
template <typename E>
static void rotate(const E* x, const E* cos, const E* sin, int64_t d, int64_t hd, E* out) {
  for (int64_t i = 0; i < d; i++) {
    const float r = i < d / 2 ? -get(x + i + d / 2) : get(x + i - d / 2);
    store(out + i, in<E>(get(x + i) * get(cos + i)) + in<E>(r * get(sin + i)));
  }
  memcpy(out + d, x + d, (hd - d) * sizeof(E));
}
template <typename X, typename E>
static void rotate_and_cache(const X* qkv, const X* cos, const X* sin, E* kc, E* vc, X* q, int64_t B, int64_t H,
                             int64_t KV, int64_t S, int64_t hd, int64_t d, int64_t slot) {
  X k[256];  // a key rotated in X, then rounded to the cache's E (as phi.KVCache.update's copy)
  for (int64_t b = 0; b < B; b++) {
    const X *x = qkv + b * (H + 2 * KV) * hd, *c = cos + b * d, *s = sin + b * d;
    for (int64_t h = 0; h < H; h++) rotate(x + h * hd, c, s, d, hd, q + (b * H + h) * hd);
    for (int64_t j = 0; j < KV; j++) {
      E *kj = kc + ((b * KV + j) * S + slot) * hd, *vj = vc + ((b * KV + j) * S + slot) * hd;
      rotate(x + (H + j) * hd, c, s, d, hd, k);
      for (int64_t i = 0; i < hd; i++) store(kj + i, get(k + i)), store(vj + i, get(x + (H + KV + j) * hd + i));
    }
  }
}

// The operator: qkv (B, 1, (H + 2 KV) hd), cos, sin (B, 1, 1, d) in one dtype (fp32 or bf16), the caches (B, KV, S,
// hd) in that dtype or narrower (cache_of), all contiguous, at (1,) the slot -> the rotated queries (B, H, 1, hd);
// the caches written.
Tensor rotary_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor k_cache, Tensor v_cache, Tensor at, int64_t heads) {
  const auto dt = qkv.scalar_type(), ct = k_cache.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16, "qkv: float32 or bfloat16");
  STD_TORCH_CHECK(k_cache.dim() == 4, "k_cache: (rows, kv_heads, slots, head_dim)");
  const int64_t B = k_cache.size(0), KV = k_cache.size(1), S = k_cache.size(2), hd = k_cache.size(3), H = heads;
  const int64_t d = cos.dim() ? cos.size(cos.dim() - 1) : 0;
  for (const Tensor& t : {k_cache, v_cache})
    STD_TORCH_CHECK(t.scalar_type() == ct && cache_of(dt, ct) && t.is_contiguous() && t.dim() == 4 && t.size(0) == B &&
                        t.size(1) == KV && t.size(2) == S && t.size(3) == hd,
                    "k_cache, v_cache: (rows, kv_heads, slots, head_dim) contiguous, one dtype: qkv's, or bfloat16 or "
                    "float16 for float32 qkv");
  STD_TORCH_CHECK(qkv.is_contiguous() && qkv.numel() == B * (H + 2 * KV) * hd,
                  "qkv: (rows, 1, (heads + 2 kv_heads) head_dim) contiguous");
  for (const Tensor& t : {cos, sin})
    STD_TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous() && t.numel() == B * d && d % 2 == 0 && d <= hd,
                    "cos, sin: (rows, 1, 1, rotary_dim) in qkv's dtype, rotary_dim even, at most head_dim");
  STD_TORCH_CHECK(at.scalar_type() == ScalarType::Long && at.numel() == 1, "at: one slot, int64");
  const int64_t slot = *(const int64_t*)at.data_ptr();
  STD_TORCH_CHECK(slot >= 0 && slot < S, "at: a slot of the cache");
  Tensor q = torch::stable::new_empty(qkv, {B, H, 1, hd});
  with_types(dt, ct, [&](auto* x, auto* c) {
    using X = std::remove_pointer_t<decltype(x)>;
    using C = std::remove_pointer_t<decltype(c)>;
    rotate_and_cache((const X*)qkv.data_ptr(), (const X*)cos.data_ptr(), (const X*)sin.data_ptr(),
                     (C*)k_cache.data_ptr(), (C*)v_cache.data_ptr(), (X*)q.data_ptr(), B, H, KV, S, hd, d, slot);
  });
  return q;
}

// C columns n .. n + C - 1 of y = x @ W.T (+ bias) for bf16 W: each weight widened in a register (a shift), the C
// columns' weights in L1 while the M rows pass. With ahead, the next C columns' rows (contiguous) are prefetched
// meanwhile, two cache lines per 8 weights of the C columns: the whole next block while this one is read. X: x's and
// y's type (float, or bf16 as uint16_t); with a bias (bf16) the product is rounded to y's type, then the bias is
// added and the sum rounded, as a Linear's ops round them (y.to(x.dtype) + bias; in<X>, get: rotate's helpers).
template <int C, typename X>
static void columns(const X* x, const uint16_t* w, const uint16_t* bias, X* y, int64_t n, int64_t M, int64_t N,
                    int64_t K, bool ahead) {
  const char* next = (const char*)(w + (n + C) * K);
  float b[C] = {};  // the bias as fp32
  for (int c = 0; bias && c < C; c++) b[c] = get(bias + n + c);
  for (int64_t m = 0; m < M; m++) {
    __m256 a[C];
    for (int c = 0; c < C; c++) a[c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      if (ahead && m == 0)
        for (int i = 0; i < C / 4; i++) _mm_prefetch(next + (k / 8 * (C / 4) + i) * 64, _MM_HINT_T0);
      const __m256 xv = load8(x + m * K + k);
      for (int c = 0; c < C; c++) a[c] = _mm256_fmadd_ps(load8(w + (n + c) * K + k), xv, a[c]);
    }
    for (int c = 0; c < C; c++) store(y + m * N + n + c, bias ? in<X>(hsum(a[c])) + b[c] : hsum(a[c]));
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// One row of W times one of x, both bf16, in AVX-512 BF16's vdpbf16ps: 32 products a register (exact in fp32),
// each pair summed into an fp32 lane, 4 registers at a time; the last 8 to 24 columns by a masked load. Each lane's
// sum in fp32 as the fma path's, denormals (below 1e-38) read as zero. One instruction per 32 weights (the fma path
// takes 12): the core keeps more of the row's loads in flight, which is what a memory-bound product runs on.
static float dot_bf16(const uint16_t* x, const uint16_t* w, int64_t K) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 128 <= K; k += 128)
    for (int c = 0; c < 4; c++)
      a[c] = _mm512_dpbf16_ps(a[c], (__m512bh)_mm512_loadu_si512(w + k + 32 * c),
                              (__m512bh)_mm512_loadu_si512(x + k + 32 * c));
  for (; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? ~0u : (1u << (K - k)) - 1;
    a[0] = _mm512_dpbf16_ps(a[0], (__m512bh)_mm512_maskz_loadu_epi16(m, w + k),
                            (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
}

// x's n numbers as bf16: a bf16 x itself; an fp32 x whose every number is a bf16 (a bf16 activation widened, as the
// compiled step's) copied into buf; else nullptr (the fma path, whose products of any fp32 are exact).
static const uint16_t* as_bf16(const uint16_t* x, int64_t n, std::vector<uint16_t>& buf) { return x; }
static const uint16_t* as_bf16(const float* x, int64_t n, std::vector<uint16_t>& buf) {
  buf.resize(n);
  for (int64_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, x + i, 4);
    if (u & 0xFFFF) return nullptr;
    buf[i] = (uint16_t)(u >> 16);
  }
  return buf.data();
}
#endif

// y (..., N) = x (..., K) @ W.T (+ bias (N,) bf16) for bf16 weights W (N, K) and a few rows (decoding), x and y fp32 or
// bf16 (x's dtype; computed in fp32). N % 4 == 0, K % 8 == 0. One call for a Linear: on an AMD EPYC Zen 3 x's cast,
// y's and the bias add took ~5 of 160m's ~18 ms of bf16 Linears a token.
// With AVX-512 BF16 (and x's numbers bf16), a row of W at a time (dot_bf16; each thread's rows are one stream of
// memory): an AMD EPYC Zen 4 read a 0.5b model's Linears (2 threads, one row) at 92-98% of a plain read's bandwidth,
// 1.15-1.27x the fma path's. Else 8 columns at a time, then 4, each weight widened in a register (a shift) and
// multiplied in fp32 (fma). Measured on an AMD EPYC Zen 3: 8 columns read 5-13% faster than 4 (12 and 16 no faster);
// rows shorter than 1024 (2 KB) stream at only 12-13 GB/s, the next 8 columns prefetched 16-18 GB/s, where at
// K >= 1536 prefetching cost 5-10% (the hardware's streams ramp up).
template <typename X>
static void matvec(const X* x, const uint16_t* w, const uint16_t* bias, X* y, int64_t M, int64_t N, int64_t K) {
  const int threads = torch::stable::get_num_threads();
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  std::vector<uint16_t> buf;
  if (const uint16_t* xb = as_bf16(x, M * K, buf)) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
      for (int64_t m = 0; m < M; m++) {
        const float v = dot_bf16(xb + m * K, w + n * K, K);
        store(y + m * N + n, bias ? in<X>(v) + get(bias + n) : v);
      }
    return;
  }
#endif
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; n += 8)
    if (n + 8 <= N)
      columns<8>(x, w, bias, y, n, M, N, K, K < 1024 && n + 16 <= N);
    else
      columns<4>(x, w, bias, y, n, M, N, K, false);
}

Tensor matvec_bf16(Tensor x, Tensor weight, std::optional<Tensor> bias) {
  const auto dt = x.scalar_type();
  STD_TORCH_CHECK(x.dim() >= 1 && (dt == ScalarType::Float || dt == ScalarType::BFloat16) && x.is_contiguous(),
                  "x: (..., in) fp32 or bf16, contiguous");
  const int64_t K = x.size(x.dim() - 1), M = K ? x.numel() / K : 0, N = weight.size(0);
  STD_TORCH_CHECK(weight.scalar_type() == ScalarType::BFloat16 && weight.is_contiguous() && weight.size(1) == K &&
                      N % 4 == 0 && K % 8 == 0,
                  "weight: bf16 (out, in), out % 4 == 0, in % 8 == 0");
  if (bias.has_value())
    STD_TORCH_CHECK(bias->scalar_type() == ScalarType::BFloat16 && bias->is_contiguous() && bias->numel() == N,
                    "bias: bf16 (out,)");
  Tensor y = rows_of(x, N);
  const uint16_t *wp = (const uint16_t*)weight.data_ptr(), *bp = bias ? (const uint16_t*)bias->data_ptr() : nullptr;
  if (dt == ScalarType::Float)
    matvec((const float*)x.data_ptr(), wp, bp, (float*)y.data_ptr(), M, N, K);
  else
    matvec((const uint16_t*)x.data_ptr(), wp, bp, (uint16_t*)y.data_ptr(), M, N, K);
  return y;
}

// An eager decode step's whole block in one call, for FastBlock where its four Linears are int8/int4 on this kernel
// and x is fp32 (B, 1, C): a small model's token is ~10 operator calls a block, each some microseconds of Python and
// dispatch, and slower still with the caches full of the weights just streamed. phi.Block's order: h = norm1(x); a =
// x + out(attention(rotary(qkv(h)))), the key and value written into the cache (rotary_cache, decode_attention); then
// a + mlp(h) (parallel: phi-1/1.5/2) or mlp(norm2(a)) + a, mlp(h) = fc2(act(fc1(h))) (or with glu, fc1's halves:
// up * act(gate)). p: the norms' weights and biases (norm2's, and RMSNorm's biases, empty), then per Linear its
// weight, scales, lows (int4's; empty for int8) and bias (or empty): qkv, out, fc1, fc2. act: 0 gelu (tanh), 1 silu.
struct Q8 {  // a Linear on the kernel, as linear() takes it
  const uint8_t* w;
  const uint16_t *s, *lo;
  const float* bias;
  int64_t N, K, G;
  int bits;
};
static Q8 q8_of(const std::vector<Tensor>& p, size_t i) {
  const Tensor &w = p[4 + 4 * i], &s = p[5 + 4 * i], &lo = p[6 + 4 * i], &b = p[7 + 4 * i];
  const int bits = lo.numel() ? 4 : 8;
  const int64_t N = w.dim() == 2 ? w.size(0) : 0, K = N ? w.size(1) * 8 / bits : 0;
  const int64_t G = bits == 8 ? 32 : s.numel() ? N * K / s.numel() : 0;
  const bool fp16 = s.scalar_type() == ScalarType::Half && (bits == 8 || lo.scalar_type() == ScalarType::Half);
  STD_TORCH_CHECK(w.scalar_type() == (bits == 8 ? ScalarType::Char : ScalarType::Byte) && w.is_contiguous() &&
                      N % 8 == 0 && K % 64 == 0 && (G == 32 || G == 64 || G == 128) && K % G == 0 && fp16 &&
                      s.is_contiguous() && s.numel() == N * K / G && (bits == 8 || lo.numel() == s.numel()) &&
                      (!b.numel() || (b.scalar_type() == ScalarType::Float && b.numel() == N)),
                  "p: a Linear's weight, scales, lows, bias as linear() takes them");
  const uint16_t* lows = bits == 4 ? (const uint16_t*)lo.data_ptr() : nullptr;
  const float* bias = b.numel() ? (const float*)b.data_ptr() : nullptr;
  return {(const uint8_t*)w.data_ptr(), (const uint16_t*)s.data_ptr(), lows, bias, N, K, G, bits};
}
static std::vector<float> apply(const Q8& l, const float* x, int64_t M) {
  std::vector<float> y(M * l.N);
  linear_q8(x, M, l.w, l.s, l.lo, l.bias, l.N, l.K, l.G, l.bits, y.data());
  return y;
}
// Rows of C: LayerNorm ((x - mean) / sqrt(var + eps) w + b, b given) or RMSNorm (x / sqrt(mean(x^2) + eps) w),
// the sums in double.
static std::vector<float> normed(const float* x, int64_t M, int64_t C, const Tensor& w, const Tensor& b, double eps) {
  std::vector<float> y(M * C);
  const float *g = (const float*)w.data_ptr(), *bb = b.numel() ? (const float*)b.data_ptr() : nullptr;
  for (int64_t m = 0; m < M; m++) {
    const float* r = x + m * C;
    double mean = 0, var = 0;
    for (int64_t i = 0; bb && i < C; i++) mean += r[i];
    mean /= C;
    for (int64_t i = 0; i < C; i++) var += (r[i] - mean) * (r[i] - mean);
    const float mu = (float)mean, inv = (float)(1 / sqrt(var / C + eps));
    for (int64_t i = 0; i < C; i++) y[m * C + i] = (r[i] - mu) * inv * g[i] + (bb ? bb[i] : 0.f);
  }
  return y;
}
static inline __m256 exp8(__m256 x) {  // e^x as Cephes' expf: 2^n e^r, |r| <= ln 2 / 2, a degree-7 polynomial
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
// gelu (tanh): z (1 + tanh(u)) / 2, u = sqrt(2 / pi) (z + 0.044715 z^3), tanh(u) = 1 - 2 / (e^2u + 1); or silu:
// z / (1 + e^-z).
static inline __m256 activation(__m256 z, int64_t act) {
  const __m256 one = _mm256_set1_ps(1.f);
  if (act == 1) return _mm256_div_ps(z, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
  const __m256 z3 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), z), _mm256_mul_ps(z, z));
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608f), _mm256_add_ps(z, z3));
  const __m256 e = exp8(_mm256_add_ps(u, u));
  const __m256 tanh = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, one)));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), z), _mm256_add_ps(one, tanh));
}
static std::vector<float> mlp(const Q8& fc1, const Q8& fc2, const float* h, int64_t M, int64_t act) {
  const std::vector<float> u = apply(fc1, h, M);
  const int64_t I = fc2.K, glu = fc1.N == 2 * I;  // (I % 64 == 0: q8_of)
  std::vector<float> g(M * I);
  for (int64_t m = 0; m < M; m++)
    for (int64_t i = 0; i < I; i += 8) {
      const float* r = u.data() + m * fc1.N;
      const __m256 a = activation(_mm256_loadu_ps(r + i), act);
      _mm256_storeu_ps(g.data() + m * I + i, glu ? _mm256_mul_ps(_mm256_loadu_ps(r + I + i), a) : a);
    }
  return apply(fc2, g.data(), M);
}

Tensor decode_block(Tensor x, std::vector<Tensor> p, Tensor cos, Tensor sin, Tensor k_cache, Tensor v_cache, Tensor at,
                    Tensor mask, int64_t heads, double scale, double eps, int64_t act) {
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float && x.is_contiguous() && x.dim() == 3 && x.size(1) == 1,
                  "x: fp32 (rows, 1, hidden)");
  STD_TORCH_CHECK(p.size() == 20 && (act == 0 || act == 1), "p: 4 norm tensors, then 4 per Linear; act: 0 or 1");
  const int64_t B = x.size(0), C = x.size(2);
  STD_TORCH_CHECK(p[0].numel(), "p: norm1's weight");
  for (int i = 0; i < 4; i++)
    STD_TORCH_CHECK(!p[i].numel() || (p[i].scalar_type() == ScalarType::Float && p[i].numel() == C),
                    "p: the norms' weights and biases fp32 (hidden,)");
  const Q8 qkv = q8_of(p, 0), out = q8_of(p, 1), fc1 = q8_of(p, 2), fc2 = q8_of(p, 3);
  STD_TORCH_CHECK(qkv.K == C && out.N == C && fc1.K == C && fc2.N == C && (fc1.N == fc2.K || fc1.N == 2 * fc2.K),
                  "p: the Linears' shapes (qkv, out, fc1, fc2)");
  const float* xp = (const float*)x.data_ptr();
  const std::vector<float> h = normed(xp, B, C, p[0], p[1], eps);
  Tensor t = torch::stable::new_empty(x, {B, 1, qkv.N});
  linear_q8(h.data(), B, qkv.w, qkv.s, qkv.lo, qkv.bias, qkv.N, qkv.K, qkv.G, qkv.bits, (float*)t.data_ptr());
  Tensor y = decode_attention(rotary_cache(t, cos, sin, k_cache, v_cache, at, heads), k_cache, v_cache, mask, scale);
  STD_TORCH_CHECK(y.numel() == B * out.K, "p: out's inputs (heads x head_dim)");
  std::vector<float> a = apply(out, (const float*)y.data_ptr(), B);
  for (int64_t i = 0; i < B * C; i++) a[i] += xp[i];
  const bool parallel = !p[2].numel();
  const std::vector<float> h2 = parallel ? std::vector<float>() : normed(a.data(), B, C, p[2], p[3], eps);
  const std::vector<float> m = mlp(fc1, fc2, parallel ? h.data() : h2.data(), B, act);
  Tensor z = torch::stable::new_empty(x, {B, 1, C});
  float* zp = (float*)z.data_ptr();
  for (int64_t i = 0; i < B * C; i++) zp[i] = a[i] + m[i];
  return z;
}

STABLE_TORCH_LIBRARY(phi_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor scales, Tensor? lows, int group, Tensor? bias=None) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("matvec_bf16(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("rotary_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor at, "
        "int heads) -> Tensor");
  m.def("decode_block(Tensor x, Tensor[] p, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor at, "
        "Tensor mask, int heads, float scale, float eps, int act) -> Tensor");
}
STABLE_TORCH_LIBRARY_IMPL(phi_cpu, CPU, m) {
  m.impl("linear", TORCH_BOX(&linear));
  m.impl("decode_attention", TORCH_BOX(&decode_attention));
  m.impl("matvec_bf16", TORCH_BOX(&matvec_bf16));
  m.impl("rotary_cache", TORCH_BOX(&rotary_cache));
  m.impl("decode_block", TORCH_BOX(&decode_block));
}
"""


# Where the CPU has AVX-512 VNNI (AMD Zen 4; Intel Xeon since Cascade Lake) the kernel's multiply-adds into int32 are
# one instruction (vpdpwssd, vpdpbusd) where AVX2 takes two, the same sums in the same order: a prompt's products,
# which are bound by them, ran 1.4x (int8) and 1.6x (int4) faster on an AMD EPYC Zen 4; decoding's, bound by memory,
# no faster.
AVX512_VNNI = ["-mavx512vnni", "-mavx512vl"] if {"avx512_vnni", "avx512vl"} <= CPU_FLAGS else []
# Where it has AVX-512 BF16 (AMD Zen 4; Intel Xeon since Cooper Lake) bf16 decoding multiplies bf16 pairs in one
# instruction (vdpbf16ps; matvec_bf16's dot_bf16): a 0.5b model's bf16 Linears read 1.15-1.27x faster on a Zen 4.
AVX512_BF16 = ["-mavx512f", "-mavx512bw", "-mavx512bf16"] if {"avx512_bf16", "avx512bw"} <= CPU_FLAGS else []


@functools.cache
def q8_kernel() -> bool:
    """Is the operator phi_cpu::linear (Q8_SOURCE) loaded? It is compiled at first use into ~/.cache/phi (once per
    machine, torch and source; with AVX512_VNNI and AVX512_BF16 where the CPU has them); False where it cannot run:
    not x86-64 with AVX2, or it does not build (no compiler: $CXX, else c++; one line on stderr)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return False
    torch_dir = Path(torch.__file__).parent
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", f"-I{torch_dir / 'include'}"]
    flags += AVX512_VNNI + AVX512_BF16
    flags += [f"-L{torch_dir / 'lib'}", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    key = hashlib.sha256((Q8_SOURCE + " ".join(flags) + torch.__version__).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi"
    lib = cache / f"q8-{key}.so"
    try:
        if not lib.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                (Path(tmp) / "q8.cpp").write_text(Q8_SOURCE)
                cmd = [os.environ.get("CXX", "c++"), str(Path(tmp) / "q8.cpp"), *flags, "-o", str(Path(tmp) / "q8.so")]
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                os.replace(Path(tmp) / "q8.so", lib)  # whole or not at all, should processes build it at once
        torch.ops.load_library(lib)
    except (OSError, subprocess.CalledProcessError) as e:
        why = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        print(
            f"quantize.py: the int8 CPU kernel did not build ({why}); PyTorch's int8/int4 kernels instead",
            file=sys.stderr,
        )
        return False
    torch.library.register_fake("phi_cpu::linear")(
        lambda x, weight, scales, lows, group, bias: x.new_empty(*x.shape[:-1], weight.shape[0])
    )
    torch.library.register_fake("phi_cpu::decode_attention")(lambda q, k, v, mask, scale: torch.empty_like(q))
    torch.library.register_fake("phi_cpu::matvec_bf16")(
        lambda x, weight, bias=None: x.new_empty(*x.shape[:-1], weight.shape[0])
    )
    torch.library.register_fake("phi_cpu::rotary_cache")(
        lambda qkv, cos, sin, k, v, at, heads: qkv.new_empty(k.shape[0], heads, 1, k.shape[3])
    )
    return True


def q8_on() -> bool:
    """Do int8/int4 weights take the kernel (and rounded activations)? Where the CPU kernels' rule holds (CPU_KERNELS:
    measured faster on AMD EPYC; not yet measured elsewhere) and the kernel builds."""
    return CPU_KERNELS and q8_kernel()


def q8_fits(linear: nn.Linear) -> bool:  # the kernel takes in % 64 == 0 and out % 8 == 0 (every Phi's) on the CPU
    return (
        linear.weight.device.type == "cpu" and linear.in_features % 64 == 0 and linear.out_features % 8 == 0 and q8_on()
    )


def tiled(t: torch.Tensor, width: int) -> torch.Tensor:
    """t (out, n) in the kernel's tiles of 8 rows (output columns): (out / 8, n / width, 8, width), each row's `width`
    numbers side by side with the next 7 rows' (a weight register's lanes), as (out, n) again."""
    return t.view(len(t) // 8, 8, -1, width).transpose(1, 2).reshape(t.shape)


def untiled(t: torch.Tensor, width: int) -> torch.Tensor:  # tiled's inverse
    return t.view(len(t) // 8, -1, 8, width).transpose(1, 2).reshape(t.shape)


def q8_linear(x, weight, scales, lows=None, group=32, bias=None):
    """x (..., in) @ W.T + bias, in x's dtype, through the kernel: int8 W (out, in) times fp16 scales (out, in / 32),
    or (lows given) 4-bit W (out, in / 2) * scales + lows per group of `group` columns (Int4Linear's layout). The
    kernel computes in fp32: an fp32 x (a decode step's, on the CPU) is one call, which is all its overhead."""
    fp32 = bias is None or bias.dtype == torch.float32
    if x.dtype == torch.float32 and x.is_contiguous() and scales.dtype == torch.float16 and fp32:
        return torch.ops.phi_cpu.linear.default(x, weight, scales, lows, group, bias)
    if scales.dtype != torch.float16:  # (should model.to(dtype) have run)
        scales, lows = scales.half(), None if lows is None else lows.half()
    b = None if bias is None else bias.float()
    return torch.ops.phi_cpu.linear.default(x.float().contiguous(), weight, scales, lows, group, b).to(x.dtype)


INT16 = 32767  # (int8 weights' activations: rounded to int16)


def rounded(x, levels=127):
    """x (..., in) as fp32 with each block of 32 rounded as the kernel rounds it (to an integer times max|block| /
    levels: 127 for int4's int8 activations, INT16 for int8's), for the products that do not go through it
    (autograd, other devices), which then multiply in fp32 as it does: every path of a Linear computes the same
    function, whatever x's dtype (up to fp32 reordering, which can move a value across a rounding boundary).
    Gradients pass through the rounding unchanged."""
    xf = x.float()
    b = xf.unflatten(-1, (-1, 32))
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / levels  # (x / d, as the kernel: levels / amax would be levels * (1 / amax), rounded differently)
    r = (torch.round(torch.where(d > 0, b / d, 0)) * d).flatten(-2)
    return xf + (r - xf).detach() if x.requires_grad else r


def q8_takes(x) -> bool:  # any number of rows on the CPU, but not under autograd (the kernel has no backward)
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8 (symmetric: w ≈ q * scale, q in -127..127): decoding reads 1 byte per
    weight instead of 2 (bf16) or 4 (fp32). On the CPU where q8_on(), unless weight_only, it is llama.cpp's q8_0: an
    fp16 scale per block of 32 weights, the activations rounded to int16 per block of 32 (q8_linear; under autograd
    `rounded` and the weights expanded). llama.cpp rounds them to int8, which moved 2-3 of 50 greedy continuations
    from fp32's (KL 2.1e-5; int16: 5.7e-6) for prompts 1.01-1.14x faster. Weights and scales are in the kernel's
    tiles of 8 output columns (`tiled`; as (out, in) fp32: `dequantized`). Else one scale per output channel,
    activations in their dtype (PyTorch's int8 kernel)."""

    def __init__(self, linear: nn.Linear, weight_only: bool = False):
        super().__init__()
        w = linear.weight.detach().float()
        self.q8 = not weight_only and q8_fits(linear)
        blocks = w.view(len(w), -1, 32) if self.q8 else w[:, None]  # (out, in / 32 or 1, 32 or in)
        scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        scale = scale.half().float().clamp(min=2**-24) if self.q8 else scale  # (the scale the kernel reads)
        weight, scale = torch.round(blocks / scale).clamp(-127, 127).to(torch.int8).view_as(w), scale.flatten(1)
        if self.q8:  # (out, in) in tiles of 4 bytes, the scales (out, in / 32) in tiles of 1
            self.register_buffer("weight", tiled(weight, 4))
            self.register_buffer("scale", tiled(scale.half(), 1))
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("scale", scale.squeeze(1).to(linear.weight.dtype))  # per channel (out,)
        self.bias = linear.bias
        self.cpu_kernels = isinstance(linear, FastLinear)  # speed_up ran: matvec and oneDNN here too

    def forward(self, x):
        if self.q8 and q8_takes(x):
            return self.product(x)
        rows = x.numel() // x.shape[-1]
        if self.q8:  # autograd, another device: the same product with the weights expanded
            y = (linear if self.cpu_kernels else F.linear)(rounded(x, INT16), self.dequantized()).to(x.dtype)
        elif self.cpu_kernels and one_row_compiled(x) and x.dtype == torch.float32:
            y = matvec(x, self.weight, self.scale)  # (with bf16 x inductor's loop is not vectorized: 3x slower)
        elif x.device.type == "cpu" and rows <= 8 and x.shape[-1] % 16 == 0:
            # decoding: PyTorch's CPU kernel multiplies bf16 activations by the int8 weights without expanding them
            # (it crashes unless in_features % 16 == 0, true of every Phi); expanding them would move 2-4x the bytes.
            xb, s = x.reshape(rows, -1).to(torch.bfloat16), self.scale.to(torch.bfloat16)
            y = int8_mm(xb, self.weight, s).view(*x.shape[:-1], -1).to(x.dtype)
        else:  # a prompt, or another device: the weights expanded, multiplied as FastLinear does (fp32: oneDNN)
            y = (linear if self.cpu_kernels else F.linear)(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def product(self, x):  # (q8, and q8_takes(x))
        return q8_linear(x, self.weight, self.scale, bias=self.bias)

    def dequantized(self) -> torch.Tensor:  # the kernel's weight (q8) as fp32 (out, in)
        w = untiled(self.weight, 4).float().view(len(self.weight), -1, 32)
        return (w * untiled(self.scale, 1).float()[..., None]).flatten(1)


# PyTorch's int8-weight kernel as a custom op: torch.compile keeps it as it is (it fails to lower the bare call, and
# its own bf16 product with the weights expanded ran the compiled batch-8 step at half the eager speed).
@torch.library.custom_op("phi_speed::int8_mm", mutates_args=())
def int8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x, weight, scale)  # x (rows, in) bf16 @ weight (out, in) int8 .T * scale (out,)


int8_mm.register_fake(lambda x, weight, scale: x.new_empty(x.shape[0], weight.shape[0]))


NOT_QUANTIZED = ("score", "router")  # a classifier's score; a MoE router (a small matrix whose rounding would move
# near-ties between experts: llama.cpp keeps it unquantized too)


def quantize_int8(model: nn.Module, weight_only: bool = False):
    """Replace every Linear of the blocks (experts included, not a MoE router) and the lm_head (not a classifier's
    score) by an Int8Linear, in place (weight_only: activations never rounded)."""
    return swap_linears(model, lambda linear: Int8Linear(linear, weight_only), skip=NOT_QUANTIZED)


class Int4Linear(nn.Module):
    """A Linear whose weight is stored as 4-bit numbers in groups of `group` input columns (gpt-fast's scheme:
    w ≈ q * scale + min per group, q in 0..15, asymmetric): half a byte per weight (plus 4 bytes a group).
    On the CPU where q8_on() (unless weight_only) they are packed for q8_linear, which rounds activations to int8:
    per 8 columns 4 bytes, columns 0-3 in the low nibbles and 4-7 in the high, fp16 scales and minimums (out, in /
    group), all in the kernel's tiles of 8 output columns (`tiled`); under autograd the weights are dequantized.
    Else for PyTorch's int4 kernel of the weight's device (CPU; CUDA: tinygemm, bf16 tensor cores, its own tile
    layout), bf16 activations times the 4-bit weights."""

    def __init__(self, linear: nn.Linear, group: int, weight_only: bool = False):
        super().__init__()
        w = linear.weight.detach().float()
        out_features, in_features = w.shape
        g = w.reshape(out_features, in_features // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo).clamp(min=1e-6) / 15
        self.q8 = not weight_only and q8_fits(linear)
        if self.q8:  # the kernel's fp16 numbers
            lo, scale = lo.half().float(), scale.half().float()
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).flatten(1)  # (out, in)
        self.bias, self.group, self.in_features = linear.bias, group, in_features
        if self.q8:  # per 8 columns, byte i: column i low, column 4 + i high; in tiles of 4 bytes (see Q8_SOURCE)
            eights = q.to(torch.uint8).view(out_features, -1, 2, 4)
            self.register_buffer("weight", tiled((eights[:, :, 0] | eights[:, :, 1] << 4).flatten(1), 4))
            self.register_buffer("scales", tiled(scale.half(), 1))
            self.register_buffer("lows", tiled(lo.half(), 1))
            return
        if w.is_cuda:  # from two 4-bit numbers a byte (the even column high), into tiles of 16 x inner_k_tiles
            tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.register_buffer("weight", packed)
        zeros = lo + 8 * scale  # (the kernel computes (q - 8) * scale + zero)
        sz = torch.stack([scale, zeros], -1).transpose(0, 1).contiguous()  # (in / group, out, 2)
        self.register_buffer("scales_and_zeros", sz.bfloat16())

    def forward(self, x):
        if self.q8 and q8_takes(x):
            return self.product(x)
        if self.q8:
            y = self.expanded(x)
        else:
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (the kernel wants it contiguous)
            mm = torch.ops.aten._weight_int4pack_mm if rows.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
            y = mm(rows, self.weight, self.group, self.scales_and_zeros).view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def product(self, x):  # (q8, and q8_takes(x))
        return q8_linear(x, self.weight, self.scales, self.lows, self.group, self.bias)

    def expanded(self, x):  # the kernel's product through a GEMM of the weights dequantized (autograd, other devices)
        fours = untiled(self.weight, 4).view(len(self.weight), -1, 1, 4)
        q = torch.cat([fours & 15, fours >> 4], 2).view(len(self.weight), -1, self.group).float()
        lows, scales = untiled(self.lows, 1).float()[..., None], untiled(self.scales, 1).float()[..., None]
        return linear(rounded(x), torch.addcmul(lows, q, scales).flatten(1)).to(x.dtype)  # q * s + lo


def quantize_int4(model: nn.Module, group: int = 128, weight_only: bool = False):
    """Replace the blocks' and the lm_head's Linears by Int4Linear (groups of `group` columns, or the largest of 128,
    64, 32 that divides a Linear's inputs; a Linear none divides stays as it is), in place. CPU or CUDA (the CUDA
    kernel also wants outputs in multiples of 8). weight_only: activations never rounded."""
    if next(model.parameters()).device.type not in ("cpu", "cuda"):
        raise ValueError("int4 weights need the CPU or CUDA (PyTorch's int4 kernels)")

    def int4(linear):
        fits = [g for g in (group, 64, 32) if linear.in_features % g == 0]
        fits = fits if linear.weight.device.type == "cpu" or linear.out_features % 8 == 0 else []
        return Int4Linear(linear, fits[0], weight_only) if fits else linear

    return swap_linears(model, int4, skip=NOT_QUANTIZED)


def cache_dtype(model: nn.Module) -> torch.dtype:
    """The dtype for a model's KV cache: fp16 for an fp32 model whose int8/int4 Linears take the kernel (q8), as
    llama.cpp keeps its cache beside q8_0 and q4_0 weights; else the model's own. A decode step reads the whole cache
    once a token, and in fp32 it is a small model's second stream after the weights (160m, 192 slots: ~12 MB beside
    int4's ~70 MB). The operators read and write fp16 directly; phi.py's other attention paths widen it."""
    dtype = next(model.parameters()).dtype
    ints = any(isinstance(m, (Int8Linear, Int4Linear)) and m.q8 for m in model.modules())
    return torch.float16 if dtype == torch.float32 and ints else dtype
