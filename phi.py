"""
The whole Microsoft Phi family in one file: phi-1, phi-1.5, phi-2, Phi-3/3.5 mini and medium (4k and 128k LongRoPE),
Phi-4 and Phi-4-mini. Numerically identical to Hugging Face transformers, small enough to read in one sitting.

There are only two architectures, and one code path with a few named switches covers both:

    phi  (phi-1/1.5/2)                         phi3 (Phi-3, Phi-3.5, Phi-4, Phi-4-mini)
    parallel block: x + attn(ln(x)) + mlp(ln(x)) sequential block: x += attn(norm1(x)); x += mlp(norm2(x))
    LayerNorm, biases everywhere                RMSNorm, no biases
    MLP: fc2(gelu_tanh(fc1(x)))                 MLP: down(silu(gate(x)) * up(x)), gate/up fused in one matrix
    q, k, v stored apart (we fuse them)         q, k, v fused (qkv_proj), GQA on Phi-3-medium/Phi-4/Phi-4-mini
    partial rotary (first 32 dims of a head)    full rotary; Phi-4-mini partial (0.75); LongRoPE on 128k models
    lm_head with bias                           lm_head without bias, tied to the embedding on Phi-4-mini

References:
1) transformers models/phi/modeling_phi.py and models/phi3/modeling_phi3.py (5.x), and 4.42's Phi-3 rotary classes
2) Microsoft's original remote code (modeling_mixformer_sequential.py, modeling_phi.py "phi-msft"), for legacy names
3) nanoGPT (style), gpt-fast (KV cache, loading on the meta device)

This file reads local checkpoint directories only; the Hub and tokenizers live in generate.py.
"""

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F

SUPPORTED = "phi, phi-msft, mixformer-sequential (phi-1, phi-1.5, phi-2) and phi3 (Phi-3, Phi-3.5, Phi-4, Phi-4-mini)"
NOT_YET = {"phi3small": "Phi-3-small", "phimoe": "Phi-3.5-MoE", "phi3v": "Phi-3-vision", "phi4mm": "Phi-4-multimodal"}

# -----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class PhiConfig:
    model_type: str = "phi"              # "phi" (parallel block) or "phi3" (sequential); legacy types parse to "phi"
    vocab_size: int = 51200              # phi: 50295 tokens padded to 51200; Phi-3: 32064; Phi-4: 100352
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 32        # < num_attention_heads: grouped-query attention (GQA)
    head_dim: int = 64
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0   # rotate only the first int(head_dim * this) dims of each head
    rope_scaling: dict | None = None     # {"type": "longrope"|"su"|"yarn", "short_factor": [..], "long_factor": [..]}
    original_max_position_embeddings: int | None = None  # context the model was pre-trained on (LongRoPE switch)
    sliding_window: int | None = None    # a query sees itself and the sliding_window - 1 keys before it
    norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    qk_layernorm: bool = False           # phi only: LayerNorm over each head of q and k, before rotary
    tie_word_embeddings: bool = False    # lm_head shares the embedding matrix (Phi-4-mini)
    embd_pdrop: float = 0.0              # dropouts, used only in training
    resid_pdrop: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float | None = None  # token classification head (None: 0.1, as transformers)
    initializer_range: float = 0.02
    num_labels: int = 2                  # classification heads
    problem_type: str | None = None      # regression | single_label_classification | multi_label_classification
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None       # dtype the checkpoint was stored in

    # The switches between the two architectures. They always change together in the real models.
    @property
    def parallel_block(self): return self.model_type == "phi"   # attention and MLP read the same LayerNorm output

    @property
    def bias(self): return self.model_type == "phi"             # biases in every Linear (and lm_head)

    @property
    def glu(self): return self.model_type == "phi3"             # SwiGLU MLP with fused gate/up projection

    @property
    def rotary_dim(self): return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "PhiConfig":
        """Parse a Hugging Face config.json dict: phi, phi3, and the legacy phi-msft / mixformer-sequential."""
        mt = d.get("model_type")
        if mt is None:
            raise ValueError(f"{source}: no 'model_type' key; supported: {SUPPORTED}")
        if mt in NOT_YET:
            raise ValueError(f"{source}: model_type '{mt}' ({NOT_YET[mt]}) is not supported yet; supported: {SUPPORTED}")

        def need(key):
            if d.get(key) is None:
                raise ValueError(f"{source}: required key '{key}' is missing (model_type '{mt}')")
            return d[key]

        # transformers 5.x writes rope settings into "rope_parameters" instead of rope_theta/rope_scaling
        rp = d.get("rope_parameters") or {}
        common = dict(vocab_size=need("vocab_size"), bos_token_id=d.get("bos_token_id"),
                      eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
                      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), torch_dtype=d.get("torch_dtype"),
                      initializer_range=d.get("initializer_range", 0.02), problem_type=d.get("problem_type"),
                      num_labels=len(d["id2label"]) if d.get("id2label") else d.get("num_labels", 2),
                      classifier_dropout=d.get("classifier_dropout"))
        if mt in ("phi-msft", "mixformer-sequential"):
            # Microsoft's remote-code formats (phi-1/1.5/2 before January 2024); the weights keep their own names
            block = (d.get("architecture") or {}).get("block_cls", "parallel")
            if block != "parallel":
                raise ValueError(f"{source}: architecture.block_cls '{block}' is not supported (only 'parallel')")
            C, H = need("n_embd"), need("n_head")
            multiple = d.get("pad_vocab_size_multiple", 64)   # the remote code rounds the vocab up to this
            common["vocab_size"] = math.ceil(common["vocab_size"] / multiple) * multiple
            return cls(model_type="phi", hidden_size=C, intermediate_size=d.get("n_inner") or 4 * C,
                       num_hidden_layers=need("n_layer"), num_attention_heads=H,
                       num_key_value_heads=d.get("n_head_kv") or H, head_dim=C // H,
                       max_position_embeddings=d.get("n_positions", 2048),
                       partial_rotary_factor=min(d.get("rotary_dim") or 32, C // H) / (C // H),
                       norm_eps=d.get("layer_norm_epsilon", 1e-5), hidden_act=d.get("activation_function", "gelu_new"),
                       embd_pdrop=d.get("embd_pdrop", 0.0), resid_pdrop=d.get("resid_pdrop", 0.0),
                       attention_dropout=d.get("attn_pdrop", 0.0), **common)
        if mt not in ("phi", "phi3"):
            raise ValueError(f"{source}: unknown model_type '{mt}'; supported: {SUPPORTED}")

        C, H = need("hidden_size"), need("num_attention_heads")
        cfg = cls(model_type=mt, hidden_size=C, intermediate_size=need("intermediate_size"),
                  num_hidden_layers=need("num_hidden_layers"), num_attention_heads=H,
                  num_key_value_heads=d.get("num_key_value_heads") or H, head_dim=d.get("head_dim") or C // H,
                  max_position_embeddings=d.get("max_position_embeddings", 2048 if mt == "phi" else 4096),
                  rope_theta=float(d.get("rope_theta", rp.get("rope_theta", 10000.0))),
                  partial_rotary_factor=d.get("partial_rotary_factor",
                                              rp.get("partial_rotary_factor", 0.5 if mt == "phi" else 1.0)),
                  hidden_act=d.get("hidden_act", "gelu_new" if mt == "phi" else "silu"),
                  norm_eps=d.get("layer_norm_eps" if mt == "phi" else "rms_norm_eps", 1e-5),
                  qk_layernorm=bool(d.get("qk_layernorm", False)), sliding_window=d.get("sliding_window"),
                  embd_pdrop=d.get("embd_pdrop", 0.0), resid_pdrop=d.get("resid_pdrop", 0.0),
                  attention_dropout=d.get("attention_dropout", 0.0), **common)
        if cfg.qk_layernorm and mt != "phi":
            raise ValueError(f"{source}: qk_layernorm is a phi option, not {mt}")
        if C % H or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"{source}: hidden_size {C} / num_attention_heads {H} / num_key_value_heads "
                             f"{cfg.num_key_value_heads} do not divide evenly")
        rs = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        rope_type = rs and (rs.get("type") or rs.get("rope_type"))
        if rope_type and rope_type != "default":
            if mt != "phi3" or rope_type not in ("su", "longrope", "yarn"):
                raise ValueError(f"{source}: rope_scaling type '{rope_type}' is not supported for {mt} "
                                 f"(supported: su, longrope, yarn on phi3)")
            for key in ("short_factor", "long_factor"):
                got = rs.get(key)
                if not isinstance(got, list) or len(got) != cfg.rotary_dim // 2:
                    raise ValueError(f"{source}: rope_scaling.{key} must be a list of {cfg.rotary_dim // 2} numbers "
                                     f"(rotary dim {cfg.rotary_dim} / 2), got {got if got is None else len(got)}")
            cfg.rope_scaling = {"type": rope_type, "short_factor": rs["short_factor"], "long_factor": rs["long_factor"]}
            for key in ("factor", "attention_factor"):   # optional overrides that transformers 5.x reads
                if rs.get(key) is not None:
                    cfg.rope_scaling[key] = rs[key]
            o = d.get("original_max_position_embeddings", rs.get("original_max_position_embeddings"))
            if o is None:
                raise ValueError(f"{source}: required key 'original_max_position_embeddings' is missing "
                                 f"(needed by rope_scaling '{rope_type}')")
            cfg.original_max_position_embeddings = o
        elif mt == "phi3":
            cfg.original_max_position_embeddings = d.get("original_max_position_embeddings")
        return cfg

    def to_hf(self) -> dict:
        """A config.json dict (current layout) that transformers' AutoConfig and our from_hf both read."""
        d = dict(model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                 max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
                 partial_rotary_factor=self.partial_rotary_factor, hidden_act=self.hidden_act,
                 tie_word_embeddings=self.tie_word_embeddings, embd_pdrop=self.embd_pdrop,
                 resid_pdrop=self.resid_pdrop, attention_dropout=self.attention_dropout,
                 initializer_range=self.initializer_range, bos_token_id=self.bos_token_id,
                 eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, problem_type=self.problem_type,
                 id2label={str(i): f"LABEL_{i}" for i in range(self.num_labels)}, torch_dtype=self.torch_dtype)
        if self.classifier_dropout is not None:
            d["classifier_dropout"] = self.classifier_dropout
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        if self.model_type == "phi":
            d.update(layer_norm_eps=self.norm_eps, qk_layernorm=self.qk_layernorm, rope_scaling=None)
        else:
            d.update(rms_norm_eps=self.norm_eps, sliding_window=self.sliding_window, rope_scaling=self.rope_scaling,
                     original_max_position_embeddings=self.original_max_position_embeddings
                     or self.max_position_embeddings)
        return d


# -----------------------------------------------------------------------------------------------------------------
# Rotary position embeddings


class Rotary:
    """cos/sin tables for rotary embeddings: plain, partial, and Phi-3's LongRoPE ("su"/"longrope") and YaRN.

    A plain object, not an nn.Module: its tensors stay fp32 when the model is cast to bf16/fp16 (transformers also
    computes the angles in fp32: bf16 positions and frequencies lose precision at long context).
    LongRoPE divides each frequency by a per-dimension factor: `short_factor` while the sequence fits the original
    context, `long_factor` once max(position_ids) + 1 > original_max_position_embeddings (transformers' rule), and
    multiplies cos and sin by a constant that depends only on the config:
        su / longrope: sqrt(1 + ln(s) / ln(original))    yarn: 0.1 ln(s) + 1      with s = max_positions / original
    """

    def __init__(self, cfg: PhiConfig):
        d = cfg.rotary_dim
        exponent = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d   # (d/2,), never on meta
        rs = cfg.rope_scaling
        self.original = cfg.original_max_position_embeddings
        self.scale, self.inv_freq_long = 1.0, None
        if rs is None:
            self.inv_freq = 1.0 / (cfg.rope_theta ** exponent)
            return
        s = rs.get("factor") or cfg.max_position_embeddings / self.original
        if rs.get("attention_factor") is not None:
            self.scale = rs["attention_factor"]
        elif s > 1.0:
            self.scale = 0.1 * math.log(s) + 1.0 if rs["type"] == "yarn" else math.sqrt(1 + math.log(s) / math.log(self.original))
        # the factor divides the frequency, i.e. stretches the wavelength of each dimension
        self.inv_freq = 1.0 / (torch.tensor(rs["short_factor"], dtype=torch.float32, device="cpu") * cfg.rope_theta ** exponent)
        self.inv_freq_long = 1.0 / (torch.tensor(rs["long_factor"], dtype=torch.float32, device="cpu") * cfg.rope_theta ** exponent)

    def use_long(self, position_ids) -> bool:
        return self.inv_freq_long is not None and int(position_ids.max()) + 1 > self.original

    def __call__(self, position_ids, dtype, long=False):
        """position_ids (B, T) -> cos, sin (B, 1, T, rotary_dim) in `dtype`, computed in fp32."""
        if self.inv_freq.device != position_ids.device:       # built on the CPU: follow the model's device once
            self.inv_freq, self.inv_freq_long = (f if f is None else f.to(position_ids.device)
                                                 for f in (self.inv_freq, self.inv_freq_long))
        inv_freq = self.inv_freq_long if long else self.inv_freq
        with torch.autocast(position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq              # (B, T, d/2)
            emb = torch.cat((freqs, freqs), dim=-1)                         # (B, T, d): half-split layout, not interleaved
            cos, sin = emb.cos() * self.scale, emb.sin() * self.scale
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rotary(x, cos, sin):
    """Rotate the first cos.shape[-1] dims of each head of x (B, H, T, hd); the rest pass through (partial rotary).
    Half-split ("GPT-NeoX") layout: dim i pairs with dim i + d/2, as in transformers' rotate_half."""
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


# -----------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values of every layer (gpt-fast style), filled left to right.

    k, v: one (B, n_kv_head, max_len, head_dim) tensor per layer (a compiled step writes these in place; it would
    copy a slice of one big tensor). For each slot it also keeps whether it is a real token (left padding is not),
    its position id and its token id: a LongRoPE model that crosses its original context re-runs everything cached
    with the long factors, as transformers' generate does (see PhiModel.forward). How many slots are filled lives in
    a device tensor, `slot`: a decode step never reads it on the host, so torch.compile compiles it once."""

    def __init__(self, cfg: PhiConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)   # slots filled so far
        self.slots = torch.arange(max_len, device=device)              # (S,) slot indices, for the decode mask
        if self.slot.is_cuda:    # fixed addresses: a decode step captured as a CUDA graph writes them in place
            for t in self.k + self.v + [self.valid, self.pos, self.ids, self.slot, self.slots]:
                torch._dynamo.mark_static_address(t, guard=False)    # guard=False: a new cache is no recompile
        self.padded = False      # some slot holds padding: attention needs an explicit mask
        self.long = False        # keys were rotated with LongRoPE's long factors

    def append(self, ids, valid, pos, start: int):
        """Prompt: reserve slots start .. start+T-1 for tokens ids/valid/pos (B, T)."""
        T = ids.shape[1]
        if start + T > self.ids.shape[1]:
            raise ValueError(f"KV cache full: {start} + {T} tokens > max_len {self.ids.shape[1]}")
        s = slice(start, start + T)
        self.ids[:, s], self.valid[:, s], self.pos[:, s] = ids, valid, pos
        self.slot.fill_(start + T)

    def append_one(self, ids):
        """Decode: the next slot for one token per row, ids (B, 1). Returns the slot (1,) and positions (B, 1)."""
        at = self.slot.view(1).clone()                 # (a copy: the view would move with slot += 1)
        pos = torch.where(at > 0, self.pos.index_select(1, (at - 1).clamp(min=0)) + 1, 0)     # (B, 1)
        self.ids.index_copy_(1, at, ids)
        self.pos.index_copy_(1, at, pos)
        self.valid.index_fill_(1, at, True)
        self.slot += 1
        return at, pos

    def update(self, layer: int, k, v, at):
        """Write this layer's new k, v (B, n_kv, T, hd) at slot `at`; return the keys and values to attend to. A
        prompt (`at` an int) gets the filled slots; a decode token (`at` a (1,) tensor) gets all max_len slots, the
        unfilled ones hidden by its mask."""
        if isinstance(at, int):
            self.k[layer][:, :, at:at + k.shape[2]] = k
            self.v[layer][:, :, at:at + k.shape[2]] = v
            return self.k[layer][:, :, :at + k.shape[2]], self.v[layer][:, :, :at + k.shape[2]]
        self.k[layer].index_copy_(2, at, k)
        self.v[layer].index_copy_(2, at, v)
        return self.k[layer], self.v[layer]


# -----------------------------------------------------------------------------------------------------------------
# The model


class RMSNorm(nn.Module):
    """Phi-3's norm: computed in fp32, cast back to the input dtype *before* the weight multiply (as transformers)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def make_norm(cfg, dim):
    return RMSNorm(dim, cfg.norm_eps) if cfg.model_type == "phi3" else nn.LayerNorm(dim, eps=cfg.norm_eps)


gelu_tanh = partial(F.gelu, approximate="tanh")     # transformers' "gelu_new" (phi), up to float rounding
ACTIVATIONS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "gelu_fast": gelu_tanh, "gelu": F.gelu,
               "silu": F.silu, "relu": F.relu}

_flash = None   # flash_attn.flash_attn_func once imported (see Phi.set_attention)


def one_row_compiled(x) -> bool:     # one row (batch-1 decoding) on the CPU inside torch.compile: see matvec
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]  # eager: 1 test


def bf16_halves(t):
    """bf16 (..., 2m) -> two fp32 (..., m) of alternate columns: a bf16 is an fp32's top half, so of an int32 pair one is
    the low half shifted up, one the high half masked (one op per two numbers; .float() takes two each)."""
    i = t.view(torch.int32)
    return (i << 16).view(torch.float32), (i & -65536).view(torch.float32)


PAIRS_MIN_WEIGHTS = 2**20     # matvec widens bf16 in pairs from this many weights on


def matvec(x, weight, scale=None):
    """x (..., in), one row, times weight (out, in).T as multiply-and-sum in fp32 (scale: int8's per-channel (out,)).
    Inductor compiles it into one pass over the weight (CPU GEMM with one row reads at half the bandwidth); rows > 4096
    in equal chunks (summed faster). bf16 from 1M weights widens in int32 pairs (one by one, 1.4b ran out of compute at
    ~35 GB/s of weights); below, the pairs' two views, Python calls in inductor's wrapper, cost more than they save."""
    N, K = weight.shape
    n = next((n for n in range(1, K + 1) if K % n == 0 and K // n <= 4096), 1)
    w, xs = weight.view(N, n, K // n), x.reshape(n, K // n)
    if weight.dtype == x.dtype == torch.bfloat16 and K % (2 * n) == 0 and N * K >= PAIRS_MIN_WEIGHTS:
        (w0, w1), (x0, x1) = bf16_halves(w), bf16_halves(xs)
        y = (w0 * x0 + w1 * x1).sum(-1).sum(-1)                      # (out,)
    else:
        y = (w.float() * xs.float()).sum(-1).sum(-1)
    return (y if scale is None else y * scale.float()).to(x.dtype).view(*x.shape[:-1], -1)


# fp32 matmuls on the CPU go to oneDNN (the library PyTorch already uses for bf16) instead of MKL, nn.Linear's: on
# this AMD EPYC, MKL is 1.2x slower at 512 rows (a prompt), 1.5-2.7x at 1-8 rows (decoding). A custom op, so that
# autograd and torch.compile see one opaque matmul; it costs ~20 us more per call, more than it saves below ~1M weights.
@torch.library.custom_op("phi::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")     # x @ weight.T + bias


def _onednn_linear_backward(ctx, dy):                               # dy (..., out)
    x, weight = ctx.saved_tensors
    dx = onednn_linear(dy, weight.t(), None) if ctx.needs_input_grad[0] else None
    dy, x = dy.flatten(0, -2), x.flatten(0, -2)                     # the weight's gradient: MKL is as fast at it
    return dx, dy.t() @ x if ctx.needs_input_grad[1] else None, dy.sum(0) if ctx.needs_input_grad[2] else None


onednn_linear.register_fake(lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))
onednn_linear.register_autograd(_onednn_linear_backward, setup_context=lambda ctx, inputs, output:
                                ctx.save_for_backward(*inputs[:2]))
ONEDNN_MIN_WEIGHTS = 2**20 if torch.backends.mkldnn.is_available() else math.inf   # math.inf: MKL always


def linear(x, weight, bias=None):     # x @ weight.T + bias; oneDNN: fp32 on the CPU, not autocast (F.linear's bf16)
    onednn = x.dtype == torch.float32 and x.device.type == "cpu" and weight.numel() >= ONEDNN_MIN_WEIGHTS
    return (onednn_linear if onednn and not torch.is_autocast_enabled("cpu") else F.linear)(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear, with matvec for one row in the compiled CPU decode step, and oneDNN for other fp32 CPU products."""

    def forward(self, x):
        if one_row_compiled(x):
            y = matvec(x, self.weight)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        self.qkv = Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.bias)    # q, k, v in one matmul
        self.out = Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.bias)
        if cfg.qk_layernorm:
            self.q_norm, self.k_norm = [nn.LayerNorm(self.head_dim, eps=cfg.norm_eps) for _ in range(2)]
        self.qk_layernorm, self.window, self.dropout = cfg.qk_layernorm, cfg.sliding_window, cfg.attention_dropout

    def forward(self, x, cos, sin, mask, layer, cache=None, flash=False, at=0):
        """x (B, T, C); mask: a bool (B, 1, T, S) tensor of the keys each query may see, "causal" or None (all);
        at: the cache slot of the first token (see KVCache.update)."""
        B, T, _ = x.shape
        causal, mask = (True, None) if isinstance(mask, str) else (False, mask)
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H | KV | KV, T, hd)
        if self.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, at)                          # (B, KV, S, hd), S = cached + T
        dropout = self.dropout if self.training else 0.0
        if flash:
            # flash-attn wants (B, T, H, hd) and aligns the causal mask bottom-right, so a decode step's single query
            # sees every cached key. window (w - 1, 0): w keys including the query itself, the same rule as the mask.
            window = (self.window - 1, 0) if self.window else (-1, -1)
            y = _flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout,
                       causal=causal, window_size=window).transpose(1, 2)
        elif T == 1 and mask is not None:
            # one query per row (a decode step): two small matmuls beat SDPA's masked kernel here. Query heads are
            # grouped by the KV head they share (GQA) instead of repeating k and v; softmax in fp32.
            G = self.n_head // self.n_kv_head
            att = (q.view(B, self.n_kv_head, G, self.head_dim) @ k.transpose(-1, -2)) * self.head_dim ** -0.5
            att = att.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(v.dtype)  # (B, KV, G, S)
            y = (att @ v).view(B, self.n_head, 1, self.head_dim)
        else:
            # phi-2's raw q·k can exceed fp16's 65504 (transformers#28163: an explicit fp16 q @ k.T overflows). SDPA's
            # kernels scale before the product and accumulate in fp32, so no upcast is needed here (tested).
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        # phi: fc1 -> gelu -> fc2.  phi3: fc1 holds [gate; up] (gate_up_proj), fc2 is down_proj.
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size * (2 if cfg.glu else 1), bias=cfg.bias)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.bias)
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act '{cfg.hidden_act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
        self.act, self.glu = ACTIVATIONS[cfg.hidden_act], cfg.glu

    def forward(self, x):
        h = self.fc1(x)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)       # first half is the gate
            return self.fc2(up * self.act(gate))
        return self.fc2(self.act(h))


class Block(nn.Module):
    """
    parallel_block (phi):            sequential (phi3):
        x ─┬─ norm1 ─┬─ attn ─┐         x ─┬─ norm1 ─ attn ─(+)─┬─ norm2 ─ mlp ─(+)─>
           │         └─ mlp ──(+)─>        └────────────────────┘└─────────────────┘
           └───────────────────┘
    """

    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.norm1, self.attn, self.mlp = make_norm(cfg, cfg.hidden_size), Attention(cfg), MLP(cfg)
        self.parallel = cfg.parallel_block
        if not self.parallel:
            self.norm2 = make_norm(cfg, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x, *attn_args):
        h = self.norm1(x)
        a = self.drop(self.attn(h, *attn_args))
        if self.parallel:
            return x + a + self.drop(self.mlp(h))
        x = x + a
        return x + self.drop(self.mlp(self.norm2(x)))


class PhiModel(nn.Module):
    """The trunk: embedding, blocks, final norm. forward() returns hidden states (B, T, C); the heads below add a
    last Linear. Loading and saving in Hugging Face layout live here too, so every head has them."""

    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.rotary = Rotary(cfg)
        self.attn_impl = "sdpa"
        self.gradient_checkpointing = False   # training: recompute each block in backward instead of storing it

    def _init_weights(self, m):
        # transformers' init: N(0, initializer_range) for Linear and Embedding, zero biases, norms at identity
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def set_attention(self, impl: str):
        """"sdpa" (default, any device) or "flash" (flash-attn 2, CUDA with fp16/bf16 only; else one line + SDPA)."""
        global _flash
        if impl not in ("sdpa", "flash"):
            raise ValueError(f"attention implementation '{impl}' is unknown (use 'sdpa' or 'flash')")
        w = self.embed.weight
        if impl == "flash":
            why = None
            if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
                why = f"it needs CUDA and float16/bfloat16, the model is on {w.device.type} in {w.dtype}"
            elif _flash is None:
                try:
                    from flash_attn import flash_attn_func
                    _flash = flash_attn_func
                except ImportError as e:
                    why = f"flash_attn cannot be imported ({e})"
            if why:
                print(f"flash-attn not used: {why}; using SDPA", file=sys.stderr)
                impl = "sdpa"
        self.attn_impl = impl
        return self

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        """input_ids (B, T) -> hidden states (B, T, C).

        attention_mask (B, T) of 1/0 marks real tokens (left padding allowed); position ids then count real tokens
        only, so a padded row gives the same result as the row alone (what transformers' generate does; a bare
        transformers forward would count the pads). With a KVCache, the tokens are appended to it.
        """
        B, T = input_ids.shape
        if cache is not None and T == 1 and attention_mask is None and position_ids is None and self.can_decode_step(cache):
            return self.decode_step(input_ids, cache)
        dev = input_ids.device
        valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        start = 0 if cache is None else int(cache.slot)
        if position_ids is None:
            offset = 0 if start == 0 else cache.pos[:, start - 1:start] + 1                  # (B, 1)
            position_ids = (offset + valid.long().cumsum(-1) - 1).clamp(min=0)               # (B, T)
        long = self.rotary.use_long(position_ids)
        if cache is not None and start > 0 and long and not cache.long:
            # LongRoPE crossing its original context: the cached keys were rotated with the short factors, and every
            # later layer saw them. Re-run the cached tokens with the long factors, as transformers' generate does
            # (transformers#33129: without this, generation turns to garbage past the original context).
            old = slice(0, start)
            cache.slot.zero_()
            cache.long, cache.padded = True, False
            return PhiModel.forward(self, torch.cat((cache.ids[:, old], input_ids), 1),
                                    torch.cat((cache.valid[:, old], valid), 1),
                                    torch.cat((cache.pos[:, old], position_ids), 1), cache)[:, -T:]
        if cache is not None:
            cache.append(input_ids, valid, position_ids, start)
            cache.long = long
            cache.padded |= attention_mask is not None and not bool(valid.all())
            key_valid, padded = cache.valid[:, :start + T], cache.padded
        else:
            key_valid, padded = valid, attention_mask is not None and not bool(valid.all())
        S = start + T
        window = self.config.sliding_window
        flash = self.attn_impl == "flash" and not padded    # flash-attn takes no mask: padded batches use SDPA
        # The attention mask: "causal" and None let SDPA/flash skip building one; else a bool (B, 1, T, S) tensor.
        if flash or (not padded and (window is None or S <= window) and (start == 0 or T == 1)):
            mask = "causal" if T > 1 else None
        else:
            q_idx = torch.arange(start, S, device=dev)[:, None]                              # (T, 1) cache slots
            k_idx = torch.arange(S, device=dev)[None, :]                                     # (1, S)
            allowed = k_idx <= q_idx                                                         # causal
            if window is not None:
                allowed = allowed & (k_idx > q_idx - window)                                 # w keys incl. itself
            allowed = allowed[None] & key_valid[:, None, :]                                  # (B, T, S) no pads
            mask = (allowed | (k_idx == q_idx))[:, None]   # a pad query sees itself: no empty softmax row (NaN)
        cos, sin = self.rotary(position_ids, self.embed.weight.dtype, long)
        return self.blocks(self.drop(self.embed(input_ids)), cos, sin, mask, cache, flash, start)

    def can_decode_step(self, cache: KVCache) -> bool:
        """Can a one-token decode on this cache take decode_step (what torch.compile traces)? Not with flash-attn, nor
        while a LongRoPE model can still cross its original context (a cache no longer than that never does)."""
        return self.attn_impl == "sdpa" and (self.rotary.inv_freq_long is None or cache.long
                                             or cache.ids.shape[1] <= self.rotary.original)

    def decode_step(self, input_ids, cache: KVCache):
        """One new token per row, (B, 1) -> hidden states (B, 1, C), with shapes that do not depend on how full the
        cache is: it attends over all max_len slots under a mask, and reads the fill level only on the device.
        This is the step that `torch.compile` compiles once (gpt-fast's decode_one_token)."""
        at, pos = cache.append_one(input_ids)                                                # (1,), (B, 1)
        allowed = cache.valid & (cache.slots <= at)                                          # (B, S)
        if self.config.sliding_window is not None:
            allowed = allowed & (cache.slots > at - self.config.sliding_window)
        cos, sin = self.rotary(pos, self.embed.weight.dtype, cache.long)
        return self.blocks(self.embed(input_ids), cos, sin, allowed[:, None, None, :], cache, False, at)

    def blocks(self, x, cos, sin, mask, cache, flash, at):
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, i, cache, flash, at, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, i, cache, flash, at)
        return self.norm(x)

    # -------------------------------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_config(cls, cfg: PhiConfig, dtype=torch.float32, device="cpu"):
        """A freshly initialised model (transformers' init), for training from scratch."""
        with torch.device(device):
            model = cls(cfg)
        model.apply(model._init_weights)
        model.tie_weights()
        return model.to(dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", attn="sdpa", **config_overrides):
        """Load a Hugging Face model directory (config.json + safetensors, sharded or not, or pytorch_model*.bin).

        The model is built on the meta device and each tensor is read and cast straight into its slot, so peak
        memory stays near one copy of the weights in `dtype`. Names are mapped from the checkpoint's layout
        (current phi/phi3, or legacy phi-msft / mixformer-sequential), which is detected from its tensor names.
        """
        path = Path(path)
        cfg = PhiConfig.from_hf(_read_json(path / "config.json"), str(path / "config.json"))
        cfg = dataclasses.replace(cfg, **config_overrides)      # e.g. num_labels for a new classification head
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to(dtype).to_empty(device=device)    # allocates, no init work
        model.tie_weights()
        model.load_hf_weights(path)
        return model.eval().set_attention(attn)

    def tie_weights(self):
        if self.config.tie_word_embeddings and hasattr(self, "lm_head"):
            self.lm_head.weight = self.embed.weight

    def hf_names(self, layout: str) -> dict:
        """Our parameter name -> tuple of the checkpoint names it is made of (q/k/v concatenated for phi)."""
        table, L, names = HF_LAYOUTS[layout], self.config.num_hidden_layers, {}
        for name in self.state_dict():
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            module, _, param = name.rpartition(".")
            m = re.match(r"layers\.(\d+)\.(.+)", module)
            key, i = (f"layers.{{i}}.{m[2]}", int(m[1])) if m else (module, 0)
            src = table.get(key, key)
            srcs = src if isinstance(src, tuple) else (src,)
            names[name] = tuple(s.format(i=i, j=i + 1, last=L + 1) + "." + param for s in srcs)
        return names

    @torch.no_grad()
    def load_hf_weights(self, path):
        path = Path(path)
        files = _checkpoint_files(path)
        where = {k: f for f in map(CheckpointFile, files) for k in f.keys()}   # checkpoint name -> file
        buf = bytearray(min(2**26, max(f.nbytes(k) for k, f in where.items())))  # one 64 MB staging buffer
        # transformers 4.x named the token-classification head "classifier", 5.x "score"
        renamed = {"score" + k[10:]: k for k in where if k.startswith("classifier.") and "score" + k[10:] not in where}
        layout = next((lay for lay, probe in LAYOUT_PROBES.items() if probe in where), self.config.model_type)
        ours, used = self.state_dict(), set()
        for our, srcs in self.hf_names(layout).items():
            srcs = tuple(renamed.get(s, s) for s in srcs)
            missing = [s for s in srcs if s not in where]
            if missing and our.startswith("score."):
                # a classification head absent from a causal-LM checkpoint starts fresh (transformers does the same)
                print(f"{path}: no '{missing[0]}' in the checkpoint: new {our} initialised", file=sys.stderr)
                self._init_weights(self.get_submodule(our.rpartition(".")[0]))
                continue
            if missing:
                raise ValueError(f"{path}: tensor '{missing[0]}' is missing from the checkpoint "
                                 f"(needed for {our}, expected shape {list(ours[our].shape)}; layout '{layout}')")
            shapes = [where[s].shape(s) for s in srcs]          # several: q, k, v stacked along dim 0
            got = [sum(s[0] for s in shapes), *shapes[0][1:]] if all(s[1:] == shapes[0][1:] for s in shapes) else shapes
            if got != list(ours[our].shape):
                raise ValueError(f"{where[srcs[0]].path}: tensor '{'+'.join(srcs)}' has shape {got}, "
                                 f"expected {list(ours[our].shape)} from config.json")
            row = 0
            for s, shape in zip(srcs, shapes):
                where[s].copy_into(s, ours[our][row:row + shape[0]], buf)     # cast to our dtype/device here
                row += shape[0]
                used.add(s)
        heads = ("lm_head", "score", "classifier")   # another task's head: ignored, as transformers does
        extra = [k for k in where if k not in used and not k.endswith("rotary_emb.inv_freq")
                 and not (k.split(".")[0] in heads and layout in ("phi", "phi3"))
                 and not (k == "lm_head.weight" and self.config.tie_word_embeddings)]
        if extra:
            raise ValueError(f"{where[extra[0]].path}: unexpected tensor '{extra[0]}' (not part of this {self.config.model_type} "
                             f"model, layout '{layout}'; {len(extra)} unexpected in all)")

    def save_pretrained(self, path, max_shard_size: int = 5 * 2**30):
        """Write config.json + model.safetensors (or model-0000i-of-0000n.safetensors + index above
        max_shard_size bytes) in the current Hugging Face layout, which transformers' from_pretrained loads."""
        from safetensors.torch import save_file
        ours = self.state_dict()
        if any(t.dtype == torch.int8 for t in ours.values()):          # generate.quantize_int8 ran
            raise ValueError("an int8-quantized model is not saved: save the original, quantize after loading")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_hf()
        cfg["architectures"] = [("Phi3" if self.config.model_type == "phi3" else "Phi") + type(self).hf_suffix]
        cfg["torch_dtype"] = str(self.embed.weight.dtype).removeprefix("torch.")
        tensors = {}
        for our, srcs in self.hf_names(self.config.model_type).items():
            t = ours[our].detach().cpu()
            parts = t.split(self.layers[0].attn.sizes) if len(srcs) == 3 else (t,)
            tensors.update({s: p.contiguous() for s, p in zip(srcs, parts)})
        shards, size = [{}], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
            old.unlink()   # stale shards of an earlier save would otherwise mix with these
        if len(shards) == 1:
            save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, path / fname, metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (path / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (path / "config.json").write_text(json.dumps(cfg, indent=2))


# Where each of our modules lives in a checkpoint, per layout; ".weight"/".bias" follow. {i} is our layer index; {j}
# = i + 1 and {last} = n_layer + 1 in mixformer-sequential, whose layers.0 is the embedding and layers.{last} the
# head. A tuple means our tensor is those tensors concatenated along dim 0: phi stores q, k, v apart, we fuse them.
# Modules not listed keep their names: the task heads lm_head and score.
HF_LAYOUTS = {
    "phi": {                                   # PhiForCausalLM, transformers >= 4.37 (phi-1, phi-1.5, phi-2 today)
        "embed": "model.embed_tokens",
        "layers.{i}.norm1": "model.layers.{i}.input_layernorm",
        "layers.{i}.attn.qkv": ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                                "model.layers.{i}.self_attn.v_proj"),
        "layers.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_layernorm",
        "layers.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_layernorm",
        "layers.{i}.attn.out": "model.layers.{i}.self_attn.dense",
        "layers.{i}.mlp.fc1": "model.layers.{i}.mlp.fc1", "layers.{i}.mlp.fc2": "model.layers.{i}.mlp.fc2",
        "norm": "model.final_layernorm",
    },
    "phi3": {                                  # Phi3ForCausalLM: Phi-3, Phi-3.5, Phi-4, Phi-4-mini
        "embed": "model.embed_tokens",
        "layers.{i}.norm1": "model.layers.{i}.input_layernorm",
        "layers.{i}.attn.qkv": "model.layers.{i}.self_attn.qkv_proj",
        "layers.{i}.attn.out": "model.layers.{i}.self_attn.o_proj",
        "layers.{i}.norm2": "model.layers.{i}.post_attention_layernorm",
        "layers.{i}.mlp.fc1": "model.layers.{i}.mlp.gate_up_proj",
        "layers.{i}.mlp.fc2": "model.layers.{i}.mlp.down_proj",
        "norm": "model.norm",
    },
    "phi-msft": {                              # Microsoft's remote code, December 2023
        "embed": "transformer.embd.wte",
        "layers.{i}.norm1": "transformer.h.{i}.ln",
        "layers.{i}.attn.qkv": "transformer.h.{i}.mixer.Wqkv",      # already [q; k; v]
        "layers.{i}.attn.out": "transformer.h.{i}.mixer.out_proj",
        "layers.{i}.mlp.fc1": "transformer.h.{i}.mlp.fc1", "layers.{i}.mlp.fc2": "transformer.h.{i}.mlp.fc2",
        "norm": "lm_head.ln", "lm_head": "lm_head.linear",
    },
    "mixformer-sequential": {                  # Microsoft's remote code, 2023 (phi-1, first phi-1.5 and phi-2)
        "embed": "layers.0.wte",
        "layers.{i}.norm1": "layers.{j}.ln",
        "layers.{i}.attn.qkv": "layers.{j}.mixer.Wqkv",
        "layers.{i}.attn.out": "layers.{j}.mixer.out_proj",
        "layers.{i}.mlp.fc1": "layers.{j}.mlp.fc1", "layers.{i}.mlp.fc2": "layers.{j}.mlp.fc2",
        "norm": "layers.{last}.ln", "lm_head": "layers.{last}.linear",
    },
}
LAYOUT_PROBES = {"phi-msft": "transformer.embd.wte.weight", "mixformer-sequential": "layers.0.wte.weight"}


def _read_json(p: Path):
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def _checkpoint_files(path: Path):
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            files = sorted(set(_read_json(path / index)["weight_map"].values()))
            for f in files:
                if not (path / f).is_file():
                    raise FileNotFoundError(f"{path / index} lists {f}, which is not in {path}")
            return [path / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                            f"or pytorch_model.bin.index.json")


class CheckpointFile:
    """One weights file. safetensors are read tensor by tensor with plain file reads into one reused buffer (safetensors'
    safe_open memory-maps the file, and every page it touches then counts toward our memory: a second copy).
    Old .bin files go through torch.load(mmap=True, weights_only=True), which never runs pickled code.
    safetensors format: 8-byte little-endian header size, JSON header {name: {dtype, shape, data_offsets}}, data."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path):
        self.path, self.state, self.index = path, None, {}
        if path.suffix != ".safetensors":
            self.state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            return
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, t in header.items():      # name -> (dtype, shape, file offset, byte count)
            start, end = t["data_offsets"]
            self.index[name] = (self.DTYPES[t["dtype"]], t["shape"], 8 + n + start, end - start)

    def keys(self):
        return self.state.keys() if self.state is not None else self.index.keys()

    def shape(self, name):
        return list(self.state[name].shape) if self.state is not None else self.index[name][1]

    def nbytes(self, name):
        return 0 if self.state is not None else self.index[name][3]

    def copy_into(self, name, dest, buf: bytearray):
        """Copy tensor `name` into dest (same shape), casting to dest's dtype and device. safetensors data comes in
        chunks of whole rows that fit buf, so even a 500 MB embedding needs no temporary copy of its own."""
        if self.state is not None:
            return dest.copy_(self.state[name])
        dtype, shape, offset, n = self.index[name]
        rows = shape[0] if shape else 1
        row_bytes = n // max(rows, 1)
        step = max(1, len(buf) // max(row_bytes, 1))
        with open(self.path, "rb") as f:
            f.seek(offset)
            for r in range(0, rows if n else 0, step):
                k = min(step, rows - r) * row_bytes
                f.readinto(memoryview(buf)[:k])
                chunk = torch.frombuffer(buf, dtype=dtype, count=k // dtype.itemsize)
                dest.view(-1, *shape[1:])[r:r + k // row_bytes].copy_(chunk.view(-1, *shape[1:]))


# -----------------------------------------------------------------------------------------------------------------
# Heads


class Phi(PhiModel):
    """Causal language model: PhiForCausalLM / Phi3ForCausalLM."""

    hf_suffix = "ForCausalLM"      # architectures: PhiForCausalLM / Phi3ForCausalLM

    def __init__(self, cfg: PhiConfig):
        super().__init__(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.bias)
        self.tie_weights()

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, cache=None):
        """Returns logits (B, T, vocab); with labels (B, T), returns (logits, loss): labels are shifted inside
        (position t predicts labels[t + 1]) and -100 is ignored, as in transformers."""
        logits = self.lm_head(super().forward(input_ids, attention_mask, position_ids, cache))
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return logits, loss


class PhiForSequenceClassification(PhiModel):
    """One score per sequence, read at the last non-pad token (the rightmost token != pad_token_id, so both left
    and right padding work), as transformers' *ForSequenceClassification."""

    hf_suffix = "ForSequenceClassification"

    def __init__(self, cfg: PhiConfig):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None):
        """Returns scores (B, num_labels); with labels, (scores, loss): MSE for regression (num_labels 1 or
        problem_type), cross-entropy for integer labels, BCE-with-logits for float multi-label targets."""
        logits = self.score(super().forward(input_ids, attention_mask, position_ids))    # (B, T, num_labels)
        B, T = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if B != 1:
                raise ValueError("sequence classification of a batch needs pad_token_id in config.json")
            last = torch.full((1,), T - 1, device=input_ids.device)
        else:
            idx = torch.arange(T, device=input_ids.device)
            last = (idx * (input_ids != pad)).argmax(-1)                                  # rightmost non-pad
        scores = logits[torch.arange(B, device=input_ids.device), last]                   # (B, num_labels)
        if labels is None:
            return scores
        n, kind = self.config.num_labels, self.config.problem_type
        if kind is None:
            kind = ("regression" if n == 1 else "single_label_classification"
                    if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
        if kind == "regression":
            loss = F.mse_loss(scores.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(scores, labels)
        elif kind == "single_label_classification":
            loss = F.cross_entropy(scores.view(-1, n), labels.view(-1), ignore_index=-100)
        else:
            loss = F.binary_cross_entropy_with_logits(scores, labels)
        return scores, loss


class PhiForTokenClassification(PhiModel):
    """One score per token: dropout + Linear on the hidden states, as transformers' *ForTokenClassification.
    The Linear is "score" as in transformers 5 (4.x called it "classifier": such checkpoints load too)."""

    hf_suffix = "ForTokenClassification"

    def __init__(self, cfg: PhiConfig):
        super().__init__(cfg)
        self.dropout = nn.Dropout(0.1 if cfg.classifier_dropout is None else cfg.classifier_dropout)
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None):
        """Returns scores (B, T, num_labels); with labels (B, T), (scores, loss), cross-entropy ignoring -100."""
        scores = self.score(self.dropout(super().forward(input_ids, attention_mask, position_ids)))
        if labels is None:
            return scores
        return scores, F.cross_entropy(scores.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

