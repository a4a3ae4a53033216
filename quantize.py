"""
The speed layer: modules swapped in for phi.py's plain nn.Linear after loading (gpt-fast's quantize.py pattern).

speed_up(model) turns every nn.Linear into a FastLinear (same parameters) where the CPU kernels below measure faster;
quantize_int8(model) / quantize_int4(model) turn them into Int8Linear / Int4Linear. generate.load, train.py and
bench.py apply them; phi.py never sees them. The CPU kernels are kept where they were measured faster than nn.Linear
(docs/benchmarks.md):
- matvec: a batch-1 Linear inside the compiled decode step as multiply-and-sum, which inductor compiles into one
  streaming pass over the weights (a GEMM library called with one row reads them at about half the bandwidth);
- oneDNN for fp32 matmuls instead of MKL, which nn.Linear calls: MKL dispatches on the CPU vendor and takes slower
  code paths on AMD (1.2x slower at 512 rows, 1.5-2.7x at 1-8 rows on an AMD EPYC).
Both were measured faster on AMD EPYC; on an Intel Xeon with AMX the compiled matvec step was slower than the eager
one and MKL is Intel's own: there nn.Linear stays (CPU_KERNELS; PHI_CPU_KERNELS=0/1 overrides the rule).
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


CPU_KERNELS = {"0": False, "1": True}.get(os.environ.get("PHI_CPU_KERNELS", ""), cpu_vendor() == "AuthenticAMD")


def one_row_compiled(x) -> bool:  # one row (batch-1 decoding) on the CPU inside torch.compile: see matvec
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]


def bf16_halves(t):
    """bf16 (..., 2m) -> two fp32 (..., m) of alternate columns: a bf16 is an fp32's top half, so of an int32 pair one
    is the low half shifted up, one the high half masked (one op per two numbers; .float() takes two each)."""
    i = t.view(torch.int32)
    return (i << 16).view(torch.float32), (i & -65536).view(torch.float32)


PAIRS_MIN_WEIGHTS = 2**20  # matvec widens bf16 in pairs from this many weights on


def matvec(x, weight, scale=None):
    """x (..., in), one row, times weight (out, in).T as multiply-and-sum in fp32 (scale: int8's per-channel (out,)).
    Inductor compiles it into one pass over the weight; rows > 4096 in equal chunks (summed faster). bf16 from 1M
    weights widens in int32 pairs (one by one, 1.4b ran out of compute at ~35 GB/s of weights); below, the pairs'
    two views, Python calls in inductor's wrapper, cost more than they save."""
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


def linear(x, weight, bias=None):  # x @ weight.T + bias; oneDNN: fp32 on the CPU, not autocast (F.linear's bf16)
    onednn = x.dtype == torch.float32 and x.device.type == "cpu" and weight.numel() >= ONEDNN_MIN_WEIGHTS
    return (onednn_linear if onednn and not torch.is_autocast_enabled("cpu") else F.linear)(x, weight, bias)


class FastLinear(nn.Linear):
    """nn.Linear, with matvec for one row in the compiled CPU decode step, and oneDNN for other fp32 CPU products."""

    def forward(self, x):
        if one_row_compiled(x):
            y = matvec(x, self.weight)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)


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
        f.weight, f.bias = lin.weight, lin.bias
        return f

    return swap_linears(model, lambda lin: lin if isinstance(lin, FastLinear) else fast(lin))


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8 with one scale per output channel (symmetric: w ≈ q * scale, q in
    -127..127): decoding reads 1 byte per weight instead of 2 (bf16) or 4 (fp32). Activations keep their dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.cpu_kernels = isinstance(linear, FastLinear)  # speed_up ran: matvec and oneDNN here too

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if self.cpu_kernels and one_row_compiled(x) and x.dtype == torch.float32:
            y = matvec(x, self.weight, self.scale)  # (with bf16 x inductor's loop is not vectorized: 3x slower)
        elif x.device.type == "cpu" and rows <= 8 and x.shape[-1] % 16 == 0:
            # decoding: PyTorch's CPU kernel multiplies bf16 activations by the int8 weights without expanding them
            # (it crashes unless in_features % 16 == 0, true of every Phi); expanding them would move 2-4x the bytes.
            xb, s = x.reshape(rows, -1).to(torch.bfloat16), self.scale.to(torch.bfloat16)
            y = int8_mm(xb, self.weight, s).view(*x.shape[:-1], -1).to(x.dtype)
        else:  # a prompt, or another device: the weights expanded, multiplied as FastLinear does (fp32: oneDNN)
            y = (linear if self.cpu_kernels else F.linear)(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


# PyTorch's int8-weight kernel as a custom op: torch.compile keeps it as it is (it fails to lower the bare call, and
# its own bf16 product with the weights expanded ran the compiled batch-8 step at half the eager speed).
@torch.library.custom_op("phi_speed::int8_mm", mutates_args=())
def int8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x, weight, scale)  # x (rows, in) bf16 @ weight (out, in) int8 .T * scale (out,)


int8_mm.register_fake(lambda x, weight, scale: x.new_empty(x.shape[0], weight.shape[0]))


NOT_QUANTIZED = ("score", "router")  # a classifier's score; a MoE router (a small matrix whose rounding would move
# near-ties between experts: llama.cpp keeps it unquantized too)


def quantize_int8(model: nn.Module):
    """Replace every Linear of the blocks (experts included, not a MoE router) and the lm_head (not a classifier's
    score) by an Int8Linear, in place."""
    return swap_linears(model, Int8Linear, skip=NOT_QUANTIZED)


class Int4Linear(nn.Module):
    """A Linear whose weight is stored as 4-bit numbers in groups of `group` input columns, each group with a bf16
    scale and zero point (gpt-fast's scheme: w ≈ (q - 8) * scale + zero, q in 0..15, asymmetric per group), packed
    for PyTorch's int4 kernel of the weight's device (CPU; CUDA: tinygemm, bf16 tensor cores, its own tile layout),
    which multiplies bf16 activations by them without expanding the weight: half a byte per weight (plus 4 bytes a
    group)."""

    def __init__(self, linear: nn.Linear, group: int):
        super().__init__()
        w = linear.weight.detach().float()
        out_features, in_features = w.shape
        g = w.reshape(out_features, in_features // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo).clamp(min=1e-6) / 15
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).flatten(1)  # (out, in)
        if w.is_cuda:  # from two 4-bit numbers a byte (the even column high), into tiles of 16 x inner_k_tiles
            tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.register_buffer("weight", packed)
        zeros = lo + 8 * scale  # (the kernel computes (q - 8) * scale + zero)
        sz = torch.stack([scale, zeros], -1).transpose(0, 1).contiguous()  # (in / group, out, 2)
        self.register_buffer("scales_and_zeros", sz.bfloat16())
        self.bias, self.group, self.in_features = linear.bias, group, in_features

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (the kernel needs it contiguous)
        mm = torch.ops.aten._weight_int4pack_mm if rows.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(rows, self.weight, self.group, self.scales_and_zeros)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_int4(model: nn.Module, group: int = 128):
    """Replace the blocks' and the lm_head's Linears by Int4Linear (groups of `group` columns, or the largest of 128,
    64, 32 that divides a Linear's inputs; a Linear none divides stays as it is), in place. CPU or CUDA (the CUDA
    kernel also wants outputs in multiples of 8)."""
    if next(model.parameters()).device.type not in ("cpu", "cuda"):
        raise ValueError("int4 weights need the CPU or CUDA (PyTorch's int4 kernels)")

    def int4(linear):
        fits = [g for g in (group, 64, 32) if linear.in_features % g == 0]
        fits = fits if linear.weight.device.type == "cpu" or linear.out_features % 8 == 0 else []
        return Int4Linear(linear, fits[0]) if fits else linear

    return swap_linears(model, int4, skip=NOT_QUANTIZED)
