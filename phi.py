"""
The whole Microsoft Phi family in one file: phi-1, phi-1.5, phi-2, Phi-3/3.5 mini and medium (4k and 128k LongRoPE),
Phi-3-small, Phi-3.5-MoE, Phi-4 and Phi-4-mini. Numerically identical to Hugging Face transformers (Phi-3-small,
which it lacks: to mlx-lm), small enough to read at once.

There are only two block shapes, and one code path with a few named switches covers them:

    phi  (phi-1/1.5/2)                         phi3 (Phi-3, Phi-3.5, Phi-4, Phi-4-mini)
    parallel block: x + attn(ln(x)) + mlp(ln(x)) sequential block: x += attn(norm1(x)); x += mlp(norm2(x))
    LayerNorm, biases everywhere                RMSNorm, no biases
    MLP: fc2(gelu_tanh(fc1(x)))                 MLP: down(silu(gate(x)) * up(x)), gate/up fused in one matrix
    q, k, v stored apart (we fuse them)         q, k, v fused (qkv_proj), GQA on Phi-3-medium/Phi-4/Phi-4-mini
    partial rotary (first 32 dims of a head)    full rotary; Phi-4-mini partial (0.75); LongRoPE on 128k models
    lm_head with bias                           lm_head without bias, tied to the embedding on Phi-4-mini
phimoe (Phi-3.5-MoE) is phi3 with LayerNorm, q/k/v apart and with biases, a bias in lm_head, and for its MLP a sparse
mixture of SwiGLU experts: a router sends each token to 2 of them (sparsemixer, not Mixtral's softmax + top-k).
phi3small (Phi-3-small) is phi3 with LayerNorm and biases, q/k/v fused head-major per KV group, a gegelu MLP, muP
multipliers (embeddings, attention scale, logits), tied embeddings, and block-sparse attention on every other layer.

The model only, on plain nn.Linear; it reads local checkpoint directories. Tokenizers live in tokenizer.py, the speed
layer (quantization, CPU kernels) in quantize.py, the Hub, sampling and the compiled decode step in generate.py.
References: 1) transformers' models/phi, phi3, phimoe (5.x) and 4.42's Phi-3 rotary classes 2) Microsoft's remote code
(modeling_mixformer_sequential, "phi-msft" modeling_phi, modeling_phimoe, modeling_phi3_small) 3) nanoGPT (style),
gpt-fast (KV cache, meta-device loading)
"""

import dataclasses
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open

SUPPORTED = "phi, phi-msft, mixformer-sequential (phi-1/1.5/2), phi3 (Phi-3/3.5, Phi-4/4-mini), phi3small, phimoe"
NOT_YET = {"phi3v": "Phi-3-vision", "phi4mm": "Phi-4-multimodal"}
LEGACY = ("phi-msft", "mixformer-sequential")  # Microsoft's remote-code configs (phi-1/1.5/2 before January 2024)
MOE_KEYS = "num_local_experts num_experts_per_tok router_jitter_noise input_jitter_noise attention_bias lm_head_bias"
SMALL_DUMMY_IDS = [100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100352)]  # its unused token ids

# -----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class PhiConfig:
    model_type: str = "phi"  # "phi" (parallel block), "phi3" or "phimoe" (sequential); legacy types parse to "phi"
    vocab_size: int = 51200  # phi: 50295 tokens padded to 51200; Phi-3: 32064; Phi-4: 100352
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # < num_attention_heads: grouped-query attention (GQA)
    head_dim: int = 64
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # rotate only the first int(head_dim * this) dims of each head
    rope_scaling: dict | None = None  # {"type": "longrope"|"su"|"yarn", "short_factor": [..], "long_factor": [..]}
    original_max_position_embeddings: int | None = None  # context the model was pre-trained on (LongRoPE switch)
    sliding_window: int | None = None  # a query sees itself and the sliding_window - 1 keys before it
    norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    qk_layernorm: bool = False  # phi only: LayerNorm over each head of q and k, before rotary
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (Phi-4-mini)
    embd_pdrop: float = 0.0  # dropouts, used only in training
    resid_pdrop: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float | None = None  # token classification head (None: 0.1, as transformers)
    initializer_range: float = 0.02
    num_labels: int = 2  # classification heads
    problem_type: str | None = None  # regression | single_label_classification | multi_label_classification
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was stored in
    num_local_experts: int = 0  # phimoe: SwiGLU experts per layer, of which a router picks 2 per token
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01  # phimoe: sparsemixer's threshold (see sparsemixer)
    input_jitter_noise: float = 0.0  # phimoe, training: the MoE input is multiplied by U(1 - this, 1 + this)
    attention_bias: bool = False  # phimoe: biases in q/k/v/o (phi always has them, phi3 never)
    lm_head_bias: bool = False  # phimoe: a bias in lm_head (as phi)
    dense_attention_every_n_layers: int = 1  # phi3small: layer i is dense when (i + 1) % this == 0, else block-sparse
    blocksparse_block_size: int = 64  # phi3small's block-sparse layers see keys in blocks of this many positions:
    blocksparse_num_local_blocks: int = 16  # the last (this) blocks up to the query's own,
    blocksparse_vert_stride: int = 8  # and before them every (this)-th block,
    blocksparse_homo_head_pattern: bool = False  # the same ones for every head (else shifted from head to head)
    gegelu_limit: float = 20.0  # phi3small's MLP clamps its inputs to this
    mup_embedding_multiplier: float = 1.0  # phi3small's muP: embeddings x this,
    mup_width_multiplier: float = 1.0  # logits / this,
    mup_attn_multiplier: float = 1.0  # attention scale mup_attn_multiplier / head_dim (not 1 / sqrt(head_dim))
    mup_use_scaling: bool = False  # when this is set
    rope_position_scale: float = 1.0  # phi3small: positions x this before rotary

    # The switches between the architectures. They always change together in the real models.
    parallel_block = property(lambda self: self.model_type == "phi")  # attention and MLP read one LayerNorm output
    glu = property(lambda self: self.model_type != "phi")  # gated MLPs (fused gate/up); else gelu
    moe = property(lambda self: self.model_type == "phimoe")  # a sparse mixture of SwiGLU experts as the MLP
    small = property(lambda self: self.model_type == "phi3small")  # gegelu, muP, and block-sparse layers:
    block_sparse = property(lambda self: self.small and self.dense_attention_every_n_layers > 1)
    mlp_bias = property(lambda self: self.model_type in ("phi", "phi3small"))
    attn_bias = property(lambda self: self.mlp_bias or (self.moe and self.attention_bias))
    head_bias = property(lambda self: self.model_type == "phi" or (self.moe and self.lm_head_bias))
    rotary_dim = property(lambda self: int(self.head_dim * self.partial_rotary_factor))

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "PhiConfig":
        """Parse a Hugging Face config.json dict: phi, phi3, phimoe, and the legacy phi-msft / mixformer-sequential."""
        mt = d.get("model_type")
        if mt not in ("phi", "phi3", "phimoe", "phi3small", *LEGACY):
            raise ValueError(f"{source}: {_unsupported(mt)}; supported: {SUPPORTED}")
        if mt in LEGACY:
            d, mt = _from_legacy(d, source), "phi"
        if mt == "phi3small":  # its own names for three common settings; tied embeddings, always
            d = {SMALL_NAMES.get(k, k): v for k, v in d.items()} | {"tie_word_embeddings": True}
        if d.get("qk_layernorm") and mt != "phi":
            raise ValueError(f"{source}: qk_layernorm is a phi option, not {mt}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") + (
            SMALL_KEYS if mt == "phi3small" else ()
        ):
            _need(d, key, source)
        C, H, phi, moe = d["hidden_size"], d["num_attention_heads"], mt == "phi", mt == "phimoe"
        rp = d.get("rope_parameters") or {}  # transformers 5.x writes rope_theta etc. here
        kw = {
            # transformers' defaults (PhiConfig / Phi3Config / PhimoeConfig) where they differ from ours
            "max_position_embeddings": 2048 if phi else 131072 if moe else 4096,
            "hidden_act": "gelu_new" if phi else "gegelu" if mt == "phi3small" else "silu",
            "rope_theta": float(rp.get("rope_theta", 1e6 if moe else 10000.0)),
            "num_local_experts": 16 if moe else 0,
            "partial_rotary_factor": rp.get("partial_rotary_factor", 0.5 if phi else 1.0),
            # every key named as one of our fields, as it is
            **{f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None},
            "model_type": mt,
            "num_key_value_heads": d.get("num_key_value_heads") or H,
            "head_dim": d.get("head_dim") or C // H,
            "norm_eps": d.get("rms_norm_eps" if mt in ("phi3", "phimoe") else "layer_norm_eps", 1e-5),
            "num_labels": len(d["id2label"]) if d.get("id2label") else d.get("num_labels", 2),
            "rope_scaling": None,  # parsed below
        }
        cfg = cls(**kw)
        if moe and cfg.num_experts_per_tok != 2:  # transformers' sparsemixer picks two, whatever the config says
            raise ValueError(f"{source}: num_experts_per_tok {cfg.num_experts_per_tok}: phimoe routes to 2 experts")
        if (n := cfg.dense_attention_every_n_layers) < 1:
            raise ValueError(f"{source}: dense_attention_every_n_layers must be >= 1, got {n}")
        if C % H or H % (KV := cfg.num_key_value_heads):
            raise ValueError(
                f"{source}: hidden_size {C} / num_attention_heads {H} / num_key_value_heads {KV} do not divide evenly"
            )
        _parse_rope_scaling(cfg, d, source)
        return cfg

    def to_hf(self) -> dict:
        """A config.json dict (current layout) that transformers' AutoConfig and our from_hf both read."""
        skip = ["norm_eps", "num_labels", *([] if self.moe else MOE_KEYS.split()), *([] if self.small else SMALL_KEYS)]
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}  # (copies: the caller may change it)
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        if self.head_dim == self.hidden_size // self.num_attention_heads:
            del d["head_dim"]
        if self.classifier_dropout is None:
            del d["classifier_dropout"]
        if self.model_type == "phi":
            for key in ("rope_scaling", "original_max_position_embeddings", "sliding_window"):
                del d[key]
            return dict(d, layer_norm_eps=self.norm_eps)
        del d["qk_layernorm"]
        original = self.original_max_position_embeddings or self.max_position_embeddings
        if self.rope_scaling:  # transformers 5 knows "su" as "longrope" (the same formula); phimoe reads original here
            rs = d["rope_scaling"] = dict(self.rope_scaling, type=self.rope_scaling["type"].replace("su", "longrope"))
            rs.update({"original_max_position_embeddings": original} if self.moe else {})
        if self.small:
            d = {({v: k for k, v in SMALL_NAMES.items()}).get(k, k): v for k, v in d.items()}
            return dict(d, layer_norm_epsilon=self.norm_eps, original_max_position_embeddings=original)
        return dict(d, rms_norm_eps=self.norm_eps, original_max_position_embeddings=original)


def _unsupported(mt) -> str:
    if mt is None:
        return "no 'model_type' key"
    return f"model_type '{mt}' ({NOT_YET[mt]}) is not supported yet" if mt in NOT_YET else f"unknown model_type '{mt}'"


def _need(d: dict, key: str, source: str):
    if d.get(key) is None:
        raise ValueError(f"{source}: required key '{key}' is missing (model_type '{d['model_type']}')")
    return d[key]


# Microsoft's remote-code configs give the same phi model's settings GPT-2's names
# fmt: off
LEGACY_KEYS = {"n_embd": "hidden_size", "n_inner": "intermediate_size", "n_layer": "num_hidden_layers",
               "n_head": "num_attention_heads", "n_head_kv": "num_key_value_heads", "n_positions": "max_position_embeddings",
               "layer_norm_epsilon": "layer_norm_eps", "activation_function": "hidden_act", "attn_pdrop": "attention_dropout"}
# Phi-3-small's config.json: its own names for three common settings, and its settings (all required there)
SMALL_NAMES = {"ff_intermediate_size": "intermediate_size", "rope_embedding_base": "rope_theta",
               "layer_norm_epsilon": "layer_norm_eps"}
# fmt: on
SMALL_KEYS = tuple(f.name for f in dataclasses.fields(PhiConfig))[-11:]  # (PhiConfig's last 11 fields)


def _from_legacy(d: dict, source: str) -> dict:
    """A phi-msft / mixformer-sequential config.json as the current phi layout."""
    block = (d.get("architecture") or {}).get("block_cls", "parallel")
    if block != "parallel":
        raise ValueError(f"{source}: architecture.block_cls '{block}' is not supported (only 'parallel')")
    C, H, _ = (_need(d, key, source) for key in ("n_embd", "n_head", "n_layer"))
    multiple = d.get("pad_vocab_size_multiple", 64)  # the remote code rounds the vocab up to this
    return {LEGACY_KEYS.get(k, k): v for k, v in d.items()} | dict(
        vocab_size=math.ceil(_need(d, "vocab_size", source) / multiple) * multiple,
        intermediate_size=d.get("n_inner") or 4 * C,
        partial_rotary_factor=min(d.get("rotary_dim") or 32, C // H) / (C // H),
    )


def _parse_rope_scaling(cfg: PhiConfig, d: dict, source: str):
    """Phi-3's rope_scaling: LongRoPE ("su" in the first 128k revisions, then "longrope") or YaRN."""
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    kind, mt = rs and (rs.get("type") or rs.get("rope_type")), cfg.model_type
    if mt != "phi":
        original = d.get("original_max_position_embeddings", (rs or {}).get("original_max_position_embeddings"))
        cfg.original_max_position_embeddings = original
    if not kind or kind == "default":
        return
    if mt == "phi" or kind not in ("su", "longrope", "yarn"):
        raise ValueError(f"{source}: rope_scaling type '{kind}' is not supported for {mt} (su, longrope, yarn are)")
    for key in ("short_factor", "long_factor"):
        got = rs.get(key)
        if not isinstance(got, list) or len(got) != cfg.rotary_dim // 2:
            raise ValueError(
                f"{source}: rope_scaling.{key} must be a list of {cfg.rotary_dim // 2} numbers "
                f"(rotary dim {cfg.rotary_dim} / 2), got {got if got is None else len(got)}"
            )
    if cfg.original_max_position_embeddings is None:
        raise ValueError(f"{source}: required key 'original_max_position_embeddings' is missing (for rope_scaling)")
    cfg.rope_scaling = {"type": kind, "short_factor": rs["short_factor"], "long_factor": rs["long_factor"]}
    for key in ("factor", "attention_factor", "short_mscale", "long_mscale"):  # optional overrides (mscale: phimoe)
        if rs.get(key) is not None:
            cfg.rope_scaling[key] = rs[key]


# -----------------------------------------------------------------------------------------------------------------
# Rotary position embeddings


class Rotary:
    """cos/sin tables for rotary embeddings: plain, partial, and Phi-3's LongRoPE ("su"/"longrope") and YaRN. A plain
    object, not an nn.Module: its tensors stay fp32 in a bf16 model (bf16 angles lose precision at long context).
    LongRoPE divides each frequency by a per-dimension factor: `short_factor` while the sequence fits the original
    context, `long_factor` once max(position_ids) + 1 > original_max_position_embeddings (transformers' rule), and
    multiplies cos and sin by a constant that depends only on the config:
        su / longrope: sqrt(1 + ln(s) / ln(original))    yarn: 0.1 ln(s) + 1      with s = max_positions / original
    Phi-3.5-MoE's config gives the two constants itself (short_mscale, long_mscale). transformers 5.23's phimoe never
    switches to long_factor (its rotary forward drops the sequence length); we follow the checkpoint's own code.
    """

    def __init__(self, cfg: PhiConfig):
        d, rs, theta = cfg.rotary_dim, cfg.rope_scaling, cfg.rope_theta
        base = theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d)  # (d/2,), never on meta
        base = base / cfg.rope_position_scale  # (Phi-3-small's positions x rope_position_scale: 1.0 in its configs)
        self.original, self.scaled, self.scale = cfg.original_max_position_embeddings, rs is not None, 1.0
        self.inv_freq = self.inv_freq_long = 1.0 / base
        if rs is None:
            return
        s = rs.get("factor") or cfg.max_position_embeddings / self.original
        if rs.get("attention_factor") is not None:
            self.scale = rs["attention_factor"]
        elif s > 1.0 and rs["type"] == "yarn":
            self.scale = 0.1 * math.log(s) + 1.0
        elif s > 1.0:
            self.scale = math.sqrt(1 + math.log(s) / math.log(self.original))
        # the factor divides the frequency, i.e. stretches the wavelength of each dimension
        self.inv_freq = 1.0 / (torch.tensor(rs["short_factor"], dtype=torch.float32, device="cpu") * base)
        self.inv_freq_long = 1.0 / (torch.tensor(rs["long_factor"], dtype=torch.float32, device="cpu") * base)
        self.scale, self.scale_long = rs.get("short_mscale", self.scale), rs.get("long_mscale", self.scale)

    def __call__(self, position_ids, dtype, long=False):
        """position_ids (B, T) -> cos, sin (B, 1, T, rotary_dim) in `dtype`, computed in fp32."""
        dev = position_ids.device
        if self.inv_freq.device != dev:  # built on the CPU: follow the model's device once
            self.inv_freq, self.inv_freq_long = self.inv_freq.to(dev), self.inv_freq_long.to(dev)
        inv_freq, scale = (self.inv_freq_long, self.scale_long) if long else (self.inv_freq, self.scale)
        with torch.autocast(position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq  # (B, T, d/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d): half-split layout, not interleaved
            cos, sin = emb.cos() * scale, emb.sin() * scale
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
    """Preallocated keys and values of every layer (gpt-fast style), filled left to right: k, v are one
    (B, n_kv_head, max_len, head_dim) tensor per layer. For each slot it also keeps whether it is a real
    token (left padding is not), its position id and its token id: a LongRoPE model that crosses its original context
    re-runs everything cached with the long factors (PhiModel.rerun_long). The fill level lives in a device tensor,
    `slot`, so that generate.py's fixed-shape decode step never reads it on the host (torch.compile traces it once)."""

    def __init__(self, cfg: PhiConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # slots filled so far
        self.slots = torch.arange(max_len, device=device)  # (S,) slot indices, for the decode mask
        if self.slot.is_cuda:  # fixed addresses: a decode step captured as a CUDA graph writes them in place
            for t in self.k + self.v + [self.valid, self.pos, self.ids, self.slot, self.slots]:
                torch._dynamo.mark_static_address(t, guard=False)  # guard=False: a new cache is no recompile
        self.padded = False  # some slot holds padding: attention needs an explicit mask
        self.long = False  # keys were rotated with LongRoPE's long factors

    def append(self, ids, valid, pos, start: int):
        """Prompt: reserve slots start .. start+T-1 for tokens ids/valid/pos (B, T)."""
        T = ids.shape[1]
        if start + T > self.ids.shape[1]:
            raise ValueError(f"KV cache full: {start} + {T} tokens > max_len {self.ids.shape[1]}")
        s = slice(start, start + T)
        self.ids[:, s], self.valid[:, s], self.pos[:, s] = ids, valid, pos
        self.slot.fill_(start + T)

    def update(self, layer: int, k, v, at):
        """Write this layer's new k, v (B, n_kv, T, hd) at slot `at`; return the keys and values to attend to. A
        prompt (`at` an int) gets the filled slots; generate.decode_step's tokens (`at` a (T,) tensor of slots) get all
        max_len slots, the unfilled ones hidden by their mask. Both in the cache's dtype, which may be narrower than
        the model's (quantize.cache_dtype: an fp32 model's int8/int4 weights decoded with an fp16 cache)."""
        if isinstance(at, int):
            end = at + k.shape[2]
            self.k[layer][:, :, at:end], self.v[layer][:, :, at:end] = k, v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        self.k[layer].index_copy_(2, at, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, at, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]


# -----------------------------------------------------------------------------------------------------------------
# The layers


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


def gegelu(h, limit):
    """Phi-3-small's MLP activation, (.., 2I) -> (.., I): the even columns of h are the gate, the odd ones the linear
    part; each is clamped to `limit` (the gate from above only; infinities pass, as in its code), then
    quick_gelu(gate) * (linear + 1), where quick_gelu(x) = x * sigmoid(1.702 x)."""
    gate, linear = h[..., ::2], h[..., 1::2]
    gate = torch.where(gate.isinf(), gate, gate.clamp(max=limit))
    linear = torch.where(linear.isinf(), linear, linear.clamp(-limit, limit))
    return gate * torch.sigmoid(1.702 * gate) * (linear + 1)


gelu_tanh = partial(F.gelu, approximate="tanh")  # transformers' "gelu_new" (phi), up to float rounding
ACTIVATIONS = dict(gelu_new=gelu_tanh, gelu_pytorch_tanh=gelu_tanh, gelu_fast=gelu_tanh, gelu=F.gelu, silu=F.silu)
ACTIVATIONS["gegelu"] = gegelu  # phi3small: it takes the whole fc1 output (see MLP)


@dataclass
class AttentionInputs:
    """What every attention layer needs from one forward call, computed once by PhiModel."""

    cos: torch.Tensor  # (B, 1, T, rotary_dim) rotary tables of the new tokens' positions
    sin: torch.Tensor
    mask: torch.Tensor | None = None  # bool (B, 1, T, S): keys each query may see; None: plainly causal
    cache: KVCache | None = None
    at: int | torch.Tensor = 0  # the cache slot of the first new token (see KVCache.update)
    flash: object = None  # flash_attn_func, when this call uses flash-attn
    pos: torch.Tensor | None = None  # (B, T) position ids of the new tokens, and (B, S) of the keys: for
    key_pos: torch.Tensor | None = None  # phi3small's block-sparse layers, whose blocks are blocks of positions


class Attention(nn.Module):
    def __init__(self, cfg: PhiConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.window, self.dropout = cfg.head_dim, cfg.sliding_window, cfg.attention_dropout
        self.scale = cfg.mup_attn_multiplier / cfg.head_dim if cfg.mup_use_scaling else None  # None: 1/sqrt(hd)
        self.grouped, self.sparse = cfg.small, (layer + 1) % cfg.dense_attention_every_n_layers != 0  # phi3small
        step = 0 if cfg.blocksparse_homo_head_pattern else max(1, cfg.blocksparse_vert_stride // self.n_head)
        self.block = (cfg.blocksparse_block_size, cfg.blocksparse_num_local_blocks, cfg.blocksparse_vert_stride, step)
        self.head_offset = 0  # the model's index of this module's first head (tp.py: a rank holds some heads)
        self.sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        self.qkv = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.attn_bias)  # q, k, v in one matmul
        self.out = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.attn_bias)
        self.qk_layernorm = cfg.qk_layernorm
        if cfg.qk_layernorm:
            self.q_norm, self.k_norm = [nn.LayerNorm(self.head_dim, eps=cfg.norm_eps) for _ in range(2)]

    def forward(self, x, a: AttentionInputs):
        """x (B, T, C) -> (B, T, C)."""
        B, T, _ = x.shape
        qkv = self.qkv(x)
        if self.grouped:  # phi3small: per KV head, its H / KV queries, then its key, then its value
            qkv = qkv.view(B, T, self.n_kv_head, -1, self.head_dim)  # (B, T, KV, H / KV + 2, hd)
            q, k, v = qkv[..., :-2, :].flatten(2, 3), qkv[..., -2, :], qkv[..., -1, :]
        else:
            q, k, v = (t.view(B, T, -1, self.head_dim) for t in qkv.split(self.sizes, dim=-1))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H | KV | KV, T, hd)
        if self.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, a.cos, a.sin), apply_rotary(k, a.cos, a.sin)
        if a.cache is not None:
            k, v = a.cache.update(self.layer, k, v, a.at)  # (B, KV, S, hd), S = cached + T, in the cache's dtype
        dropout, mask = self.dropout if self.training else 0.0, a.mask
        if T == 1 and mask is not None and not (self.sparse or a.flash):
            y = self.decode_attention(q, k, v, mask)  # (it reads a narrower cache as it is)
            return self.out(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        k, v = k.to(q.dtype), v.to(q.dtype)  # (a cache narrower than the model, widened)
        if self.sparse:
            y = self.block_sparse_attention(q, k, v, a, dropout)
        elif a.flash:
            # flash-attn wants (B, T, H, hd) and aligns the causal mask bottom-right, so a decode step's single query
            # sees every cached key. window (w - 1, 0): w keys including the query itself, the same rule as the mask.
            window = (self.window - 1, 0) if self.window else (-1, -1)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            y = a.flash(q, k, v, dropout_p=dropout, softmax_scale=self.scale, causal=True, window_size=window)
            y = y.transpose(1, 2)
        else:
            # phi-2's raw q·k can exceed fp16's 65504 (transformers#28163: an explicit fp16 q @ k.T overflows). SDPA's
            # kernels scale before the product and accumulate in fp32, so no upcast is needed here (tested).
            gqa, causal = self.n_kv_head != self.n_head, mask is None and T > 1
            y = F.scaled_dot_product_attention(q, k, v, mask, dropout, causal, scale=self.scale, enable_gqa=gqa)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def block_mask(self, q_pos, k_pos):
        """Phi-3-small's block-sparse pattern: bool (B, H, T, S) from the positions of queries (B, T) and keys (B, S).
        Positions fall in blocks of block_size; a query sees the num_local_blocks last blocks up to its own, and before
        them every vert_stride-th block, from another block for each head h (h * step: the heads together cover every
        block). Causality is the caller's."""
        size, local, stride, step = self.block
        qb, kb = (q_pos // size)[:, None, :, None], (k_pos // size)[:, None, None]  # (B, 1, T, 1), (B, 1, 1, S)
        h = self.head_offset + torch.arange(self.n_head, device=q_pos.device)[:, None, None]  # (H, 1, 1)
        return (qb - kb < local) | ((kb + h * step + 1) % stride == 0)

    def block_sparse_attention(self, q, k, v, a, dropout):
        """Block-sparse attention computed densely under the block mask, 4 blocks of queries at a time: a chunk
        attends to the keys up to its last query only, and its mask is H x chunk x keys bools (all queries at once:
        H x T x S, 2 GiB at 8k tokens)."""
        (T, S), chunk, outs = (q.shape[2], k.shape[2]), 4 * self.block[0], []
        for c in range(0, T, chunk):
            rows, end = slice(c, c + chunk), S - T + min(c + chunk, T)  # end: past this chunk's last key slot
            q_pos, k_pos = a.pos[:, rows], a.key_pos[:, :end]
            causal = a.mask[:, :, rows, :end] if a.mask is not None else k_pos[:, None, None] <= q_pos[:, None, :, None]
            mask = causal & self.block_mask(q_pos, k_pos)
            qc, kc, vc = q[:, :, rows], k[:, :, :end], v[:, :, :end]
            if T == 1:
                outs.append(self.decode_attention(qc, kc, vc, mask))
                continue
            gqa = self.n_kv_head != self.n_head
            outs.append(F.scaled_dot_product_attention(qc, kc, vc, mask, dropout, scale=self.scale, enable_gqa=gqa))
        return torch.cat(outs, 2)

    def decode_attention(self, q, k, v, mask):
        """One query per row (a decode step): two small matmuls beat SDPA's masked kernel here. Query heads are
        grouped by the KV head they share (GQA) instead of repeating k and v; softmax in fp32. mask (B, 1 | H, 1, S)."""
        B, G = q.shape[0], self.n_head // self.n_kv_head
        k, v = k.to(q.dtype), v.to(q.dtype)  # (a cache narrower than the model, widened)
        att = (q.view(B, self.n_kv_head, G, self.head_dim) @ k.transpose(-1, -2)) * (self.scale or self.head_dim**-0.5)
        mask = mask.view(B, -1, G if mask.shape[1] > 1 else 1, mask.shape[-1])  # (B, KV | 1, G | 1, S)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(v.dtype)  # (B, KV, G, S)
        return (att @ v).view(B, self.n_head, 1, self.head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        # phi: fc1 -> gelu -> fc2.  phi3: fc1 holds [gate; up] (gate_up_proj), fc2 is down_proj.
        # phi3small: fc1 is up_proj, [gate; linear] interleaved column by column (see gegelu), fc2 down_proj.
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size * (2 if cfg.glu else 1), bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act '{cfg.hidden_act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
        self.act, self.glu, self.limit = ACTIVATIONS[cfg.hidden_act], cfg.glu, cfg.gegelu_limit

    def forward(self, x):
        h = self.fc1(x)
        if self.act is gegelu:
            return self.fc2(gegelu(h, self.limit))
        if self.glu:
            gate, up = h.chunk(2, dim=-1)  # first half is the gate
            return self.fc2(up * self.act(gate))
        return self.fc2(self.act(h))


def sparsemixer(scores, jitter_eps: float):
    """Phi-3.5-MoE's router, at inference: router logits (N, E) -> weights (N, 2), experts (N, 2). Not Mixtral's
    softmax-then-top-2: the first expert is the argmax; experts whose score is far below the max, (max - score) /
    max(|score|, max) > 2 * jitter_eps, are masked out; its weight is its softmax over what is left. The second
    expert repeats this with the first masked out (the threshold still measured against every score)."""
    weights, experts, masked = [], [], scores
    for _ in range(2):
        top, e = masked.max(-1, keepdim=True)  # (N, 1)
        far = (top - scores) / scores.abs().clamp(min=top) > 2 * jitter_eps
        weights.append(masked.masked_fill(far, float("-inf")).softmax(-1).gather(-1, e))
        experts.append(e)
        masked = masked.scatter(-1, e, float("-inf"))
    return torch.cat(weights, -1), torch.cat(experts, -1)


class MoE(nn.Module):
    """A sparse mixture of SwiGLU experts (phimoe): each token runs through the 2 experts its router picks, weighted.
    Each expert gathers the tokens routed to it (index_select) and adds its output back (index_add_): a decode step
    reads only the chosen experts' weights. `route` is sparsemixer at inference; for training, train.py swaps in
    sparsemixer's training mode (experts sampled, a gradient estimator for the router), as transformers trains."""

    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)  # (block_sparse_moe.gate)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.num_local_experts))
        self.route, self.jitter, self.input_jitter = sparsemixer, cfg.router_jitter_noise, cfg.input_jitter_noise

    def forward(self, x):
        """x (B, T, C) -> (B, T, C)."""
        if self.training and self.input_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
        h = x.reshape(-1, x.shape[-1])  # (N, C) tokens
        weights, experts = self.route(self.router(h), self.jitter)  # (N, 2), (N, 2)
        out = torch.zeros_like(h)
        for e in experts.unique().tolist():  # ascending, as transformers adds them up
            token, k = (experts == e).nonzero(as_tuple=True)  # tokens routed to e, as their first or second
            y = self.experts[e](h.index_select(0, token)) * weights[token, k, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view_as(x)


class Block(nn.Module):
    """
    parallel_block (phi):            sequential (phi3, phimoe, phi3small):
        x ─┬─ norm1 ─┬─ attn ─┐         x ─┬─ norm1 ─ attn ─(+)─┬─ norm2 ─ mlp ─(+)─>
           │         └─ mlp ──(+)─>        └────────────────────┘└─────────────────┘
           └───────────────────┘
    """

    def __init__(self, cfg: PhiConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg, cfg.hidden_size), Attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.moe else MLP(cfg)
        self.parallel = cfg.parallel_block
        if not self.parallel:
            self.norm2 = make_norm(cfg, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x, a: AttentionInputs):
        h = self.norm1(x)
        y = self.drop(self.attn(h, a))
        if self.parallel:
            return x + y + self.drop(self.mlp(h))
        x = x + y
        return x + self.drop(self.mlp(self.norm2(x)))


# -----------------------------------------------------------------------------------------------------------------
# The trunk


class PhiModel(nn.Module):
    """The trunk: embedding, blocks, final norm. forward() returns hidden states (B, T, C); the heads below add a
    last Linear. Loading and saving in Hugging Face layout live here too, so every head has them."""

    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.rotary = Rotary(cfg)
        self.flash_attn = None  # flash_attn_func when set_attention("flash") succeeded
        self.gradient_checkpointing = False  # training: recompute each block in backward instead of storing it

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        output_hidden_states=False,
    ):
        """input_ids (B, T) -> hidden states (B, T, C). attention_mask (B, T) of 1/0 marks real tokens (left padding
        allowed); position ids then count real tokens only, so a padded row gives the same result as the row alone
        (as transformers' generate; a bare transformers forward counts the pads). A KVCache gets the tokens appended.
        inputs_embeds (B, T, C) in place of input_ids: what the embedding layer gives (Phi-3-small's multiplier then
        applies to them too, as in its code). output_hidden_states=True: returns (h, hidden_states), transformers'
        num_layers + 1 tensors (B, T, C): each block's input, then the last block's output after the final norm (h)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass either input_ids or inputs_embeds")
        ids = input_ids if inputs_embeds is None else inputs_embeds.new_full(inputs_embeds.shape[:2], -1).long()
        valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        start = 0 if cache is None else int(cache.slot)  # tokens already in the cache
        if position_ids is None:
            position_ids = self.positions(valid, cache, start)
        long = self.rotary.scaled and int(position_ids.max()) + 1 > self.rotary.original  # LongRoPE's switch
        if cache is not None and start > 0 and long and not cache.long:
            return self.rerun_long(ids, valid, position_ids, cache, output_hidden_states)
        padded = attention_mask is not None and not bool(valid.all())
        key_valid = valid  # (B, S): which keys are real tokens
        if cache is not None:
            cache.append(ids, valid, position_ids, start)  # (embeddings given: ids -1)
            cache.long, cache.padded = long, cache.padded or padded
            padded, key_valid = cache.padded, cache.valid[:, : start + ids.shape[1]]
        flash = None if padded else self.flash_attn  # flash-attn takes no mask: padded batches use SDPA
        mask = None if flash else self.attention_mask(start, ids.shape[1], key_valid, padded)
        k_pos = position_ids if cache is None else cache.pos[:, : start + ids.shape[1]]
        cos, sin = self.rotary(position_ids, self.embed.weight.dtype, long)
        a = AttentionInputs(cos, sin, mask, cache, start, flash, position_ids, k_pos)
        hidden = [] if output_hidden_states else None
        h = self.blocks(self.embeddings(input_ids, inputs_embeds), a, hidden)
        return h if hidden is None else (h, tuple(hidden))

    def trunk(self, *args, output_hidden_states=False, **kw):
        """(hidden states, transformers' hidden_states or None): PhiModel.forward for the heads."""
        out = PhiModel.forward(self, *args, output_hidden_states=output_hidden_states, **kw)
        return out if output_hidden_states else (out, None)

    def embeddings(self, input_ids, inputs_embeds=None):
        """Token ids (B, T), or their embeddings, -> the first block's input (B, T, C): dropout, then Phi-3-small's
        mup_embedding_multiplier."""
        x = self.drop(self.embed(input_ids) if inputs_embeds is None else inputs_embeds)
        return x * self.config.mup_embedding_multiplier if self.config.small else x

    def positions(self, valid, cache, start):
        """Position ids (B, T): real tokens counted from the last cached position (pads repeat their neighbour's)."""
        offset = 0 if start == 0 else cache.pos[:, start - 1 : start] + 1  # (B, 1)
        return (offset + valid.long().cumsum(-1) - 1).clamp(min=0)

    def rerun_long(self, input_ids, valid, position_ids, cache, output_hidden_states=False):
        """LongRoPE crossing its original context: the cached keys were rotated with the short factors, and every
        later layer saw them. Re-run the cached tokens with the long factors, as transformers' generate does
        (transformers#33129: without this, generation turns to garbage past the original context)."""
        old, T = slice(0, int(cache.slot)), input_ids.shape[1]
        ids, valid = torch.cat((cache.ids[:, old], input_ids), 1), torch.cat((cache.valid[:, old], valid), 1)
        if bool((ids < 0).any()):
            raise ValueError(
                "LongRoPE re-runs the cache from its token ids past the original context: tokens given "
                "as inputs_embeds cannot cross it"
            )
        position_ids = torch.cat((cache.pos[:, old], position_ids), 1)
        cache.slot.zero_()
        cache.long, cache.padded = True, False
        out = PhiModel.forward(self, ids, valid, position_ids, cache, output_hidden_states=output_hidden_states)
        return (out[0][:, -T:], tuple(h[:, -T:] for h in out[1])) if output_hidden_states else out[:, -T:]

    def attention_mask(self, start, T, key_valid, padded):
        """A bool (B, 1, T, S) mask of the keys each new query may see, or None where plain causal attention (SDPA's
        is_causal, or all keys for a single query) is the same: no pads, no window cut, no cache behind a prompt."""
        S, window = start + T, self.config.sliding_window
        if not padded and (window is None or S <= window) and (start == 0 or T == 1):
            return None
        q_idx = torch.arange(start, S, device=key_valid.device)[:, None]  # (T, 1) cache slots
        k_idx = torch.arange(S, device=key_valid.device)[None, :]  # (1, S)
        allowed = k_idx <= q_idx  # causal
        if window is not None:
            allowed = allowed & (k_idx > q_idx - window)  # w keys incl. itself
        allowed = allowed[None] & key_valid[:, None, :]  # (B, T, S) no pads
        return (allowed | (k_idx == q_idx))[:, None]  # a pad query sees itself: no empty softmax row (NaN)

    def blocks(self, x, a: AttentionInputs, hidden: list | None = None):
        """The blocks, then the final norm; each block's input and the normed output appended to `hidden` if given."""
        for block in self.layers:
            if hidden is not None:
                hidden.append(x)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, a, use_reentrant=False)
            else:
                x = block(x, a)
        x = self.norm(x)
        if hidden is not None:
            hidden.append(x)
        return x

    def set_attention(self, impl: str):
        """ "sdpa" (default, any device) or "flash" (flash-attn 2, CUDA with fp16/bf16 only; else one line + SDPA)."""
        if impl not in ("sdpa", "flash"):
            raise ValueError(f"attention implementation '{impl}' is unknown (use 'sdpa' or 'flash')")
        self.flash_attn, w, why = None, self.embed.weight, None
        if impl == "flash" and (w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16)):
            why = f"it needs CUDA and float16/bfloat16, the model is on {w.device.type} in {w.dtype}"
        elif impl == "flash":
            try:
                from flash_attn import flash_attn_func as flash_attn
            except ImportError as e:
                flash_attn, why = None, f"flash_attn cannot be imported ({e})"
            self.flash_attn = flash_attn
        if why:
            print(f"flash-attn not used: {why}; using SDPA", file=sys.stderr)
        return self

    # -------------------------------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    def _init_weights(self, m):
        # transformers' init: N(0, initializer_range) for Linear and Embedding, zero biases, norms at identity
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(m.weight)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)

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
        The model is built on the meta device and each tensor is read and cast straight into its slot, so peak memory
        stays near one copy of the weights in `dtype`. Names are mapped from the checkpoint's layout (HF_LAYOUTS)."""
        path = Path(path)
        cfg = PhiConfig.from_hf(_read_json(path / "config.json"), str(path / "config.json"))
        cfg = dataclasses.replace(cfg, **config_overrides)  # e.g. num_labels for a new classification head
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to(dtype).to_empty(device=device)  # allocates, no init work
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
            e = re.findall(r"experts\.(\d+)", key)  # an expert's index (phimoe)
            key = re.sub(r"experts\.\d+", "experts.{e}", key)
            src = table.get(key, key)
            srcs = src if isinstance(src, tuple) else (src,)
            names[name] = tuple(s.format(i=i, j=i + 1, e=e and e[0], last=L + 1) + "." + param for s in srcs)
        return names

    @torch.no_grad()
    def load_hf_weights(self, path, copy=None):
        """Read every tensor from the checkpoint at path. copy(ckpt, our name, checkpoint names, dest): reads a tensor
        its own way if it returns True (tp.py: a rank's slice), else Checkpoint.copy_rows reads it whole."""
        ckpt = Checkpoint(Path(path))
        layout = next((lay for lay, probe in LAYOUT_PROBES.items() if probe in ckpt.files), self.config.model_type)
        ours, used = self.state_dict(), set()
        for our, srcs in self.hf_names(layout).items():
            srcs = tuple(ckpt.renamed.get(s, s) for s in srcs)
            missing = [s for s in srcs if s not in ckpt.files]
            if missing and our.startswith("score."):
                # a classification head absent from a causal-LM checkpoint starts fresh (transformers does the same)
                print(f"{path}: no '{missing[0]}' in the checkpoint: new {our} initialised", file=sys.stderr)
                self._init_weights(self.get_submodule(our.rpartition(".")[0]))
                continue
            if missing:
                raise ValueError(
                    f"{path}: tensor '{missing[0]}' is missing from the checkpoint "
                    f"(needed for {our}, expected shape {list(ours[our].shape)}; layout '{layout}')"
                )
            if not (copy and copy(ckpt, our, srcs, ours[our])):
                ckpt.copy_rows(srcs, ours[our])  # q, k, v stacked along dim 0 for phi
            used.update(srcs)
        # not ours, yet expected: another task's head or a tied lm_head (ignored, as transformers does), old buffers
        heads = ("lm_head", "score", "classifier") if layout not in LEGACY else ()
        used |= {k for k in ckpt.files if k.endswith("rotary_emb.inv_freq") or k.split(".")[0] in heads}
        extra = [k for k in ckpt.files if k not in used]
        if extra:
            raise ValueError(
                f"{ckpt.files[extra[0]]}: unexpected tensor '{extra[0]}' (not part of this "
                f"{self.config.model_type} model, layout '{layout}'; {len(extra)} unexpected in all)"
            )

    def save_pretrained(self, path, max_shard_size: int | str = "5GB"):
        """Write config.json + model.safetensors (sharded above max_shard_size, with an index: huggingface_hub's
        save_torch_state_dict) in the current Hugging Face layout, which transformers' from_pretrained loads."""
        from huggingface_hub import save_torch_state_dict

        ours = self.state_dict()
        if any(t.dtype == torch.int8 for t in ours.values()):  # quantize.quantize_int8 ran
            raise ValueError("an int8-quantized model is not saved: save the original, quantize after loading")
        tensors = {}
        for our, srcs in self.hf_names(self.config.model_type).items():
            t = ours[our].detach().cpu()
            sizes = self.layers[0].attn.sizes if len(srcs) == 3 else [len(t) // len(srcs)] * len(srcs)
            tensors.update(zip(srcs, [t] if len(srcs) == 1 else [p.clone() for p in t.split(sizes)]))  # q, k, v apart
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_torch_state_dict(tensors, path, max_shard_size=max_shard_size)
        cfg = self.config.to_hf()
        name = "Phi3Small" if self.config.small else self.config.model_type.capitalize()  # Phimoe, Phi3, Phi
        cfg["architectures"] = [name + type(self).hf_suffix]  # Phi3SmallForCausalLM ...
        cfg["torch_dtype"] = str(self.embed.weight.dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(cfg, indent=2))


# Where each of our modules lives in a checkpoint, per layout; ".weight"/".bias" follow. {i} is our layer index; {j}
# = i + 1 and {last} = n_layer + 1 in mixformer-sequential, whose layers.0 is the embedding and layers.{last} the
# head. A tuple means our tensor is those tensors concatenated along dim 0: phi stores q, k, v apart, we fuse them.
# Modules not listed keep their names: the task heads lm_head and score.
# fmt: off
HF_LAYOUTS = {
    "phi": {  # PhiForCausalLM, transformers >= 4.37 (phi-1, phi-1.5, phi-2 today)
        "embed": "model.embed_tokens",                       "norm": "model.final_layernorm",
        "layers.{i}.norm1": "model.layers.{i}.input_layernorm", "layers.{i}.attn.out": "model.layers.{i}.self_attn.dense",
        "layers.{i}.attn.qkv": tuple(f"model.layers.{{i}}.self_attn.{x}_proj" for x in "qkv"),
        "layers.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_layernorm",
        "layers.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_layernorm",
        "layers.{i}.mlp.fc1": "model.layers.{i}.mlp.fc1",   "layers.{i}.mlp.fc2": "model.layers.{i}.mlp.fc2",
    },
    "phi3": {  # Phi3ForCausalLM: Phi-3, Phi-3.5, Phi-4, Phi-4-mini
        "embed": "model.embed_tokens",                       "norm": "model.norm",
        "layers.{i}.norm1": "model.layers.{i}.input_layernorm", "layers.{i}.attn.out": "model.layers.{i}.self_attn.o_proj",
        "layers.{i}.attn.qkv": "model.layers.{i}.self_attn.qkv_proj",
        "layers.{i}.norm2": "model.layers.{i}.post_attention_layernorm",
        "layers.{i}.mlp.fc1": "model.layers.{i}.mlp.gate_up_proj", "layers.{i}.mlp.fc2": "model.layers.{i}.mlp.down_proj",
    },
    "phi-msft": {  # Microsoft's remote code, December 2023
        "embed": "transformer.embd.wte",                     "norm": "lm_head.ln",      "lm_head": "lm_head.linear",
        "layers.{i}.norm1": "transformer.h.{i}.ln",          "layers.{i}.attn.out": "transformer.h.{i}.mixer.out_proj",
        "layers.{i}.attn.qkv": "transformer.h.{i}.mixer.Wqkv",  # already [q; k; v]
        "layers.{i}.mlp.fc1": "transformer.h.{i}.mlp.fc1",  "layers.{i}.mlp.fc2": "transformer.h.{i}.mlp.fc2",
    },
    "mixformer-sequential": {  # Microsoft's remote code, 2023 (phi-1, first phi-1.5 and phi-2)
        "embed": "layers.0.wte",                             "norm": "layers.{last}.ln", "lm_head": "layers.{last}.linear",
        "layers.{i}.norm1": "layers.{j}.ln",                 "layers.{i}.attn.out": "layers.{j}.mixer.out_proj",
        "layers.{i}.attn.qkv": "layers.{j}.mixer.Wqkv",
        "layers.{i}.mlp.fc1": "layers.{j}.mlp.fc1",          "layers.{i}.mlp.fc2": "layers.{j}.mlp.fc2",
    },
}
HF_LAYOUTS["phi3small"] = {  # Phi3SmallForCausalLM, the checkpoint's own code (no lm_head: tied)
    "embed": "model.embed_tokens",                           "norm": "model.final_layernorm",
    "layers.{i}.norm1": "model.layers.{i}.input_layernorm",  "layers.{i}.attn.out": "model.layers.{i}.self_attn.dense",
    "layers.{i}.attn.qkv": "model.layers.{i}.self_attn.query_key_value",  # head-major: see Attention
    "layers.{i}.norm2": "model.layers.{i}.post_attention_layernorm",
    "layers.{i}.mlp.fc1": "model.layers.{i}.mlp.up_proj",   "layers.{i}.mlp.fc2": "model.layers.{i}.mlp.down_proj",
}
HF_LAYOUTS["phimoe"] = HF_LAYOUTS["phi3"] | {  # PhimoeForCausalLM (Phi-3.5-MoE): as on the Hub, and as saved by
    "layers.{i}.attn.qkv": HF_LAYOUTS["phi"]["layers.{i}.attn.qkv"],  # transformers 5 (which holds it otherwise,
    "layers.{i}.mlp.router": "model.layers.{i}.block_sparse_moe.gate",  # see Checkpoint)
    "layers.{i}.mlp.experts.{e}.fc1": tuple(f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.w{x}" for x in "13"),
    "layers.{i}.mlp.experts.{e}.fc2": "model.layers.{i}.block_sparse_moe.experts.{e}.w2",
}
CHECKPOINT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin")
# fmt: on
LAYOUT_PROBES = {"phi-msft": "transformer.embd.wte.weight", "mixformer-sequential": "layers.0.wte.weight"}


def _read_json(p: Path):
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


class Checkpoint:
    """The tensors of a checkpoint directory: model.safetensors, sharded safetensors with their index, or old
    pytorch_model*.bin. safetensors' safe_open checks the header (offsets, dtypes, sizes) before any tensor is read;
    .bin files go through torch.load(mmap=True, weights_only=True), which never runs pickled code."""

    ROWS_AT_ONCE = 2**24  # elements read per safe_open (64 MB in fp32): see copy_rows

    def __init__(self, path: Path):
        self.files, self.shapes, self.bins = {}, {}, {}  # checkpoint name -> file, shape; .bin file -> tensors
        self.parts = {}  # a name that is rows of another tensor: name -> (that tensor, index, first row)
        for f in self.find_files(path):
            kind = "safetensors" if f.suffix == ".safetensors" else "PyTorch"
            try:
                if kind == "safetensors":
                    with safe_open(f, framework="pt") as st:  # reads and checks the header
                        shapes = {k: st.get_slice(k).get_shape() for k in st.keys()}
                else:
                    self.bins[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                    shapes = {k: list(t.shape) for k, t in self.bins[f].items()}
            except Exception as e:  # SafetensorError; torch.load's UnpicklingError, RuntimeError, ...
                raise ValueError(f"{f}: not a valid {kind} file ({e})") from None
            self.shapes.update(shapes)
            self.files.update(dict.fromkeys(shapes, f))
        # transformers 4.x named the token-classification head "classifier", 5.x "score"; phimoe's router "gate"
        old = {k.replace("classifier.", "score.", 1): k for k in self.files if k.startswith("classifier.")}
        old |= {k.replace(".mlp.router.", ".block_sparse_moe.gate."): k for k in self.files if ".mlp.router." in k}
        self.renamed = {new: k for new, k in old.items() if new not in self.files}
        # transformers 5 holds a phimoe layer's experts in two 3-D tensors (in memory; it saves the Hub's names):
        # expert e's w1 and w3 are the halves of experts.gate_up_proj[e], its w2 is experts.down_proj[e]
        for k in [k for k in self.files if k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))]:
            (E, rows, cols), f = self.shapes[k], self.files.pop(k)
            ws = ("w1", "w3") if k.endswith("gate_up_proj") else ("w2",)
            for e, (j, w) in itertools.product(range(E), enumerate(ws)):
                name = k.replace(".mlp.", ".block_sparse_moe.").rpartition(".")[0] + f".{e}.{w}.weight"
                self.files[name], self.shapes[name] = f, [rows // len(ws), cols]
                self.parts[name] = (k, (e,), j * rows // len(ws))

    @staticmethod
    def find_files(path: Path):
        for name in CHECKPOINT_FILES:  # an index of shards first
            if (path / name).is_file():
                index = name.endswith(".json") and _read_json(path / name)["weight_map"]
                files = sorted(set(index.values())) if index else [name]
                for f in files:
                    if not (path / f).is_file():
                        raise FileNotFoundError(f"{path / name} lists {f}, which is not in {path}")
                return [path / f for f in files]
        raise FileNotFoundError(
            f"{path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"
        )

    def copy_rows(self, names, dest):
        """Copy the tensors `names`, stacked along dim 0, into dest, casting to its dtype and device. safetensors data
        comes a block of rows at a time, each through a safe_open of its own: the file is memory-mapped, and the pages
        a block touched leave the process when it closes, so loading needs no second copy of the weights."""
        shapes = [self.shapes[n] for n in names]
        rows = [s[0] if s else 1 for s in shapes]
        got = [sum(rows), *shapes[0][1:]] if all(s[1:] == shapes[0][1:] for s in shapes) else shapes
        if got != list(dest.shape):
            raise ValueError(
                f"{self.files[names[0]]}: tensor '{'+'.join(names)}' has shape {got}, expected {list(dest.shape)} from config.json"
            )
        dest, row = dest.view(sum(rows), -1), 0  # (rows, everything else)
        for name, n in zip(names, rows):
            step = max(1, self.ROWS_AT_ONCE // max(1, dest.shape[1]))
            for r in range(0, n, step):
                block = self.read(name, r, min(r + step, n))
                dest[row + r : row + r + len(block)].copy_(block.reshape(-1, dest.shape[1]))
            row += n

    def read(self, name, start, stop, cols=slice(None)):
        """Rows start..stop (and cols) of a checkpoint tensor, read alone (safetensors' get_slice reads no more)."""
        f, (src, index, first) = self.files[name], self.parts.get(name, (name, (), 0))
        at = (*index, slice(first + start, first + stop)) + ((cols,) if len(self.shapes[name]) > 1 else ())
        if f in self.bins:  # (memory-mapped: a slice reads its pages only)
            return self.bins[f][src][at]
        with safe_open(f, framework="pt") as st:
            return st.get_slice(src)[at]


# -----------------------------------------------------------------------------------------------------------------
# Heads


def outputs(main, loss, hidden):
    """A head's answer: main (logits or scores) alone, or a tuple with the loss and/or hidden_states after it."""
    out = (main,) + ((loss,) if loss is not None else ()) + ((hidden,) if hidden is not None else ())
    return out if len(out) > 1 else main


class Phi(PhiModel):
    """Causal language model: PhiForCausalLM / Phi3ForCausalLM."""

    hf_suffix = "ForCausalLM"  # architectures: PhiForCausalLM / Phi3ForCausalLM

    def __init__(self, cfg: PhiConfig):
        super().__init__(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.head_bias)
        self.tie_weights()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, cache=None, **inputs):
        """Returns logits (B, T, vocab); with labels (B, T), returns (logits, loss): labels are shifted inside
        (position t predicts labels[t + 1]) and -100 is ignored, as in transformers. inputs: inputs_embeds,
        output_hidden_states (then hidden_states comes last: (logits, hidden_states) or (logits, loss, hidden_states);
        see PhiModel.forward)."""
        h, hidden = self.trunk(input_ids, attention_mask, position_ids, cache, **inputs)
        logits, loss = self.logits(h), None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return outputs(logits, loss, hidden)

    def logits(self, h):
        """Hidden states (.., C) -> logits (.., vocab). Phi-3-small's muP divides them by mup_width_multiplier, and
        its unused (dummy) token ids get the lowest logit, as in its code."""
        logits = self.lm_head(h)
        if not self.config.small:
            return logits
        dummy = torch.tensor([i for i in SMALL_DUMMY_IDS if i < logits.shape[-1]], device=logits.device)
        return (logits / self.config.mup_width_multiplier).index_fill(-1, dummy, torch.finfo(logits.dtype).min)


class PhiForSequenceClassification(PhiModel):
    """One score per sequence, read at the last non-pad token (the rightmost token != pad_token_id, so both left
    and right padding work), as transformers' *ForSequenceClassification."""

    hf_suffix = "ForSequenceClassification"

    def __init__(self, cfg: PhiConfig):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **inputs):
        """Returns scores (B, num_labels); with labels, (scores, loss): MSE for regression (num_labels 1 or
        problem_type), cross-entropy for integer labels, BCE-with-logits for float multi-label targets. inputs as
        Phi.forward's (with inputs_embeds the last position is read: no ids to find pads in, as transformers)."""
        h, hidden = self.trunk(input_ids, attention_mask, position_ids, None, **inputs)
        logits, (B, T, _), pad = self.score(h), h.shape, self.config.pad_token_id  # (B, T, num_labels)
        if pad is None and B != 1:
            raise ValueError("sequence classification of a batch needs pad_token_id in config.json")
        real = torch.ones(B, T, device=h.device) if pad is None or input_ids is None else (input_ids != pad).long()
        last = (torch.arange(T, device=h.device) * real).argmax(-1)  # (B,) the rightmost non-pad token
        scores = logits[torch.arange(B, device=h.device), last]  # (B, num_labels)
        if labels is None:
            return outputs(scores, None, hidden)
        n, kind = self.config.num_labels, self.config.problem_type
        if kind is None:  # transformers' guess
            multi = labels.dtype not in (torch.long, torch.int)
            kind = "regression" if n == 1 else "multi_label_classification" if multi else "single_label_classification"
        if kind == "regression":
            loss = F.mse_loss(scores.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(scores, labels)
        elif kind == "single_label_classification":
            loss = F.cross_entropy(scores.view(-1, n), labels.view(-1), ignore_index=-100)
        else:
            loss = F.binary_cross_entropy_with_logits(scores, labels)
        return outputs(scores, loss, hidden)


class PhiForTokenClassification(PhiModel):
    """One score per token: dropout + Linear on the hidden states, as transformers' *ForTokenClassification.
    The Linear is "score" as in transformers 5 (4.x called it "classifier": such checkpoints load too)."""

    hf_suffix = "ForTokenClassification"

    def __init__(self, cfg: PhiConfig):
        super().__init__(cfg)
        self.dropout = nn.Dropout(0.1 if cfg.classifier_dropout is None else cfg.classifier_dropout)
        self.score = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **inputs):
        """Returns scores (B, T, num_labels); with labels (B, T), (scores, loss), cross-entropy ignoring -100. inputs
        as Phi.forward's."""
        h, hidden = self.trunk(input_ids, attention_mask, position_ids, None, **inputs)
        scores, loss = self.score(self.dropout(h)), None
        if labels is not None:
            loss = F.cross_entropy(scores.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return outputs(scores, loss, hidden)
