"""
LoRA adapters: LoRALinear and wrapping a model to train them, PEFT's adapter files out and in, merging at load.

A LoRA adds scale * B @ A to a Linear's weight (A: r x in, B: out x r; scale = lora_alpha / r, or / sqrt(r) with
use_rslora). PEFT names each by the Hugging Face module it adapts: "base_model.model.<module>.lora_A.weight", in
adapter_config.json + adapter_model.safetensors. phi's q_proj, k_proj and v_proj are row slices of our one qkv
Linear: each one's B @ A lands on its rows. train.py trains adapters (add_lora, save_adapter, load_lora to resume);
generate.load merges them into the weights (merge_adapter). Every function here takes a local directory: fetching
an adapter from the Hub is generate.py's job.
"""

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import phi
from quantize import Int8Linear

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
PEFT_PREFIX = "base_model.model."
PEFT_TASKS = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS"}
TARGETS = ("qkv", "out", "fc1", "fc2", "lm_head")  # our Linears' names (docs/finetune.md maps them to Hugging Face's)


# -----------------------------------------------------------------------------------------------------------------
# Training: a frozen base, low-rank adapters on top (swapped in for its Linears, as quantize.py swaps its own)


class LoRALinear(nn.Module):
    """A frozen Linear (or quantize.Int8Linear) plus a trainable low-rank update: base(x) + scale * B(A(dropout(x))),
    A (r, in) and B (out, r) in fp32. A starts random (kaiming uniform, as peft), B at zero: step 0 is the base."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        out_features, in_features = base.weight.shape
        self.base, self.scale, self.dropout = base, alpha / r, nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale


def add_lora(model, lora: dict):
    """Freeze the model, wrap the target Linears in LoRALinear; a classifier's score trains fully (peft's
    modules_to_save). lora: r, alpha, dropout, targets (None: the model's default). A target that cannot take a
    PEFT LoRA is a ValueError, raised before the model changes."""
    if lora["targets"] is None:  # phimoe's experts are not Linears to peft (see below)
        lora["targets"] = ["qkv", "out"] if model.config.moe else ["qkv", "out", "fc1", "fc2"]
    if "lm_head" in lora["targets"] and model.config.tie_word_embeddings:
        raise ValueError("--lora-targets lm_head: this model's lm_head is its embedding (tied); leave lm_head out")
    experts = [t for t in lora["targets"] if t in ("fc1", "fc2")] if model.config.moe else []
    if experts:  # (transformers 5 holds all of a layer's experts in one 3-D tensor: no Linear for peft to adapt)
        raise ValueError(f"--lora-targets {experts[0]}: phimoe's experts cannot take a PEFT LoRA (use qkv,out,lm_head)")
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if name in lora["targets"] and isinstance(child, (nn.Linear, Int8Linear)):
                setattr(module, name, LoRALinear(child, lora["r"], lora["alpha"], lora["dropout"]))
    if hasattr(model, "score"):
        model.score.requires_grad_(True)
    return model


# -----------------------------------------------------------------------------------------------------------------
# PEFT's names: which rows of which of our Linears each Hugging Face module is


def lora_modules(model: nn.Module) -> dict:
    """Hugging Face module name -> (our Linear's module name, first row, rows) for every Linear of the model."""
    with torch.device("meta"):  # a plain copy: the names do not depend on swapped-in modules
        plain = type(model)(model.config)
    out = {}
    for ours, hf in plain.hf_names(model.config.model_type).items():
        module = plain.get_submodule(ours.rpartition(".")[0])
        if not isinstance(module, nn.Linear) or not ours.endswith(".weight"):
            continue
        # phi's q, k, v are rows of qkv (of GQA's sizes: its Attention's); phimoe's w1 and w3 the halves of an fc1
        split = [module.out_features // len(hf)] * len(hf)
        sizes = plain.get_submodule(ours.rsplit(".", 2)[0]).sizes if len(hf) == 3 else split
        for name, first, rows in zip(hf, [sum(sizes[:i]) for i in range(len(sizes))], sizes):
            out[name.removesuffix(".weight")] = (ours.removesuffix(".weight"), first, rows)
    return out


def held_modules(model) -> dict:
    """Our Linear's module name -> [(PEFT's name of a Hugging Face module it holds, first row, rows)]."""
    held = {}
    for hf, (ours, first, rows) in lora_modules(model).items():
        held.setdefault(ours, []).append((PEFT_PREFIX + hf, first, rows))
    return held


# -----------------------------------------------------------------------------------------------------------------
# Writing and reading adapters


def adapter_tensors(model) -> dict:
    """The trained tensors under PEFT's names: for each LoRALinear one LoRA per Hugging Face module it holds (phi's
    qkv: q_proj, k_proj and v_proj share A, each takes its rows of B, so the three add up to ours exactly), and a
    classifier's score."""
    held, out = held_modules(model), {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for peft_name, first, rows in held[name]:
                out[f"{peft_name}.lora_A.weight"] = m.lora_A
                out[f"{peft_name}.lora_B.weight"] = m.lora_B[first : first + rows]
    if hasattr(model, "score"):
        for n, p in model.score.named_parameters():
            out[f"{PEFT_PREFIX}score.{n}"] = p
    return {k: v.detach().float().cpu().clone() for k, v in out.items()}  # q, k, v: one copy of A each


def save_adapter(d: Path, model, lora: dict):
    """adapter_model.safetensors + adapter_config.json in d (lora: r, alpha, dropout, task, base)."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model)
    save_file(tensors, d / "adapter_model.safetensors")
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors if ".lora_" in k})
    config = dict(
        peft_type="LORA",
        task_type=PEFT_TASKS[lora["task"]],
        base_model_name_or_path=lora["base"],
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=targets,
        modules_to_save=["score"] if hasattr(model, "score") else None,
        bias="none",
        fan_in_fan_out=False,
        use_rslora=False,
        init_lora_weights=True,
        inference_mode=True,
    )
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_adapter(d: Path):
    """(adapter_config.json as a dict, its tensors) of the PEFT adapter in directory d."""
    d = Path(d)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{d}: no adapter_config.json (is this a PEFT adapter?)")
    cfg = phi._read_json(d / "adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{d}: peft_type {cfg.get('peft_type')!r} is not supported (LoRA adapters only)")
    for key in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(key):
            raise ValueError(f"{d}: {key} is not supported (plain LoRA only)")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{d}: bias {cfg['bias']!r} is not supported (LoRA adapters with bias 'none' only)")
    if (d / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return cfg, load_file(d / "adapter_model.safetensors")
    if (d / "adapter_model.bin").is_file():
        return cfg, torch.load(d / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{d}: no adapter_model.safetensors or adapter_model.bin")


@torch.no_grad()
def load_lora(model, d: Path):
    """Our own adapter back into the LoRALinear modules (to resume): A from the first of a module's LoRAs (they
    share it), B joined from their rows; a classifier's score."""
    saved = read_adapter(d)[1]
    missing = [name for name in adapter_tensors(model) if name not in saved]
    if missing:
        raise ValueError(f"{d}: the adapter has no {missing[0]} (not made with this run's --lora settings?)")
    held = held_modules(model)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_A.copy_(saved[held[name][0][0] + ".lora_A.weight"])
            m.lora_B.copy_(torch.cat([saved[peft_name + ".lora_B.weight"] for peft_name, _, _ in held[name]]))
    if hasattr(model, "score"):
        for n, p in model.score.named_parameters():
            p.copy_(saved[f"{PEFT_PREFIX}score.{n}"])


# -----------------------------------------------------------------------------------------------------------------
# Merging an adapter into the weights (generate.load's adapter=): everything is checked before a weight changes


@torch.no_grad()
def merge_adapter(model: nn.Module, d: Path):
    """Add the PEFT LoRA adapter in directory d to the model's weights, in place (modules_to_save, e.g. a
    classifier's score, are replaced). Anything that does not fit this model is one ValueError naming it, raised
    before any weight changes."""
    cfg, tensors = read_adapter(d)
    modules = lora_modules(model)
    check_targets(cfg, modules, model.config.model_type, d)
    pairs, saves = split_adapter(model, tensors, d)
    deltas = [lora_delta(model, cfg, modules, module, ab, d) for module, ab in pairs.items()]
    for param, value in saves:  # everything fits: change the weights
        param.copy_(value)
    for rows, scale, ab in deltas:  # rows of the weight += scale * B @ A, computed in fp32
        delta = ab["B"].to(rows.device, torch.float32) @ ab["A"].to(rows.device, torch.float32)
        rows.copy_(rows.float() + scale * delta)
    return model


def check_targets(cfg: dict, modules: dict, kind: str, d: Path):
    """Every target_modules entry of adapter_config.json names a Linear of this model."""
    targets = cfg.get("target_modules") or []
    for t in targets if isinstance(targets, list) else []:
        if not any(m == t or m.endswith("." + t) for m in modules):
            raise ValueError(
                f"{d}: target module {t!r} does not exist in this {kind} model (an adapter for "
                f"another architecture?); its Linears: {sorted({m.rsplit('.', 1)[-1] for m in modules})}"
            )


def split_adapter(model, tensors: dict, d: Path):
    """(Hugging Face module -> {"A": lora_A, "B": lora_B}, [(parameter, new value)] of the modules to save)."""
    kind = model.config.model_type
    pairs, saves, params = {}, [], dict(model.named_parameters())
    single = {hf[0]: ours for ours, hf in model.hf_names(kind).items() if len(hf) == 1}  # modules to save
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", name)
        if m:
            pairs.setdefault(m[1], {})[m[2]] = value
            continue
        ours = single.get(name)
        if ours is None or ours not in params:
            raise ValueError(f"{d}: {key} has no counterpart in this {kind} model")
        if params[ours].shape != value.shape:
            raise ValueError(
                f"{d}: {key} has shape {tuple(value.shape)}, this model's {ours} {tuple(params[ours].shape)}"
            )
        saves.append((params[ours], value))
    return pairs, saves


def lora_delta(model, cfg: dict, modules: dict, module: str, ab: dict, d: Path):
    """(the rows of our weight that one Hugging Face module is, its scale, its A and B), once they fit."""
    kind = model.config.model_type
    if module not in modules:
        raise ValueError(
            f"{d}: the adapter adapts {module}, which this {kind} model does not have (an adapter "
            "for another architecture?)"
        )
    if set(ab) != {"A", "B"}:
        have, lack = ("A", "B") if "A" in ab else ("B", "A")
        raise ValueError(f"{d}: {module} has a lora_{have} but no lora_{lack}")
    ours, first, rows = modules[module]
    weight = model.get_submodule(ours).weight
    r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r"))
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
    want_a, want_b = (r, weight.shape[1]), (rows, r)
    if tuple(ab["A"].shape) != want_a or tuple(ab["B"].shape) != want_b:
        raise ValueError(
            f"{d}: {module}: lora_A {tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)}, expected {want_a} "
            f"and {want_b} (rank {r} from adapter_config.json, this model's {rows} x {weight.shape[1]} weight)"
        )
    return weight[first : first + rows], alpha / (math.sqrt(r) if cfg.get("use_rslora") else r), ab


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key that matches the module name's end."""
    return next((v for k, v in patterns.items() if re.search(rf"(^|\.){k}$", module)), default)
