"""phi.py against transformers (the oracle) on tiny random configs: logits, KV cache, padding, rotary variants, heads,
saving and loading, the real Hub config.json files, error paths, fp16/bf16/flash-attn, Phi-3.5-MoE."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

import generate
import phi
from conftest import (
    CASES,
    HF_CLASSES,
    NEEDED,
    ORACLE_442,
    REF,
    ROOT,
    TOL,
    classification_inputs,
    err,
    factors,
    from_transformers,
    hf_model,
    ids_for,
    needs_reference,
    python_env,
    record,
    rope,
    saved,
    small_model,
    sparsemixer_cases,
    stepped_logits,
    tiny_config,
    with_checkpoint_rotary,
)


def test_reference_data_is_complete():
    """CI (PHI_REQUIRE_REFERENCE=1) fails here, instead of skipping tests, when a reference folder is missing."""
    if os.environ.get("PHI_REQUIRE_REFERENCE") != "1":
        pytest.skip("PHI_REQUIRE_REFERENCE is not 1: tests without their reference data skip")
    assert NEEDED and not [str(p) for p in sorted(NEEDED) if not p.exists()]


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name, tmp_path):
    ours, ref = from_transformers(name, tmp_path)
    for T in CASES[name][2]:
        ids = ids_for(T)
        with torch.no_grad():
            e = record(f"logits {name} T={T}", err(ours(ids), ref(ids).logits))
        assert e <= TOL, f"{name} T={T}: max abs error {e}"


@pytest.mark.parametrize("name", CASES)
def test_kv_cache_decode_equals_full_forward(name, tmp_path):
    """Prefill a prompt, then decode one token at a time; each step's logits must equal a full forward over the
    sequence so far. For LongRoPE the prompt (20) is below the original context (32) and decoding runs past it,
    which makes the model re-run the cache with the long factors at the crossing, as transformers' generate does."""
    model = from_transformers(name, tmp_path)[0]
    T = max(CASES[name][2]) + 4
    ids, prompt = ids_for(T), 10 if max(CASES[name][2]) < 20 else 20
    cache = phi.KVCache(model.config, 2, T)
    with torch.no_grad():
        steps = [model(ids[:, :prompt], cache=cache)[:, -1]]
        steps += [model(ids[:, t : t + 1], cache=cache)[:, -1] for t in range(prompt, T)]
        for t, got in zip(range(prompt - 1, T), steps):
            want = model(ids[:, : t + 1])[:, -1]
            e = record(f"decode {name}", err(got, want))
            assert e <= TOL, f"{name}: decode step at position {t}: max abs error {e}"


@pytest.mark.parametrize("name", CASES)
def test_left_padded_batch_equals_rows_alone(name, tmp_path):
    """Rows of different lengths, left-padded, through prefill and cached decode, equal each row run alone."""
    model = from_transformers(name, tmp_path)[0]
    T = max(CASES[name][2])
    ids = ids_for(T, B=3)
    lengths = [T, T - 5, T - 9]
    batch, mask = ids.clone(), torch.ones_like(ids)
    for r, n in enumerate(lengths):
        batch[r, : T - n], mask[r, : T - n] = 0, 0
    extra = ids_for(4, B=3, seed=1)
    with torch.no_grad():
        cache = phi.KVCache(model.config, 3, T + 4)
        got = [model(batch, attention_mask=mask, cache=cache)]
        got += [model(extra[:, i : i + 1], cache=cache) for i in range(4)]
        got = torch.cat(got, 1)  # (3, T + 4, vocab)
        full = model(torch.cat((batch, extra), 1), attention_mask=torch.cat((mask, torch.ones_like(extra)), 1))
        for r, n in enumerate(lengths):
            alone = model(torch.cat((ids[r : r + 1, T - n :], extra[r : r + 1]), 1))[0]
            e = record(f"padded {name}", max(err(got[r, T - n :], alone), err(full[r, T - n :], alone)))
            assert e <= TOL, f"{name}: row {r} (length {n}) differs from the row alone by {e}"


def test_left_padding_matches_transformers_with_position_ids(tmp_path):
    """With explicit position ids (what transformers' generate passes), a padded batch equals transformers too."""
    ours, ref = from_transformers("phi3-gqa-window", tmp_path)
    ids, mask = ids_for(12), torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask), ref(ids, attention_mask=mask, position_ids=pos).logits
    e = record("padded vs transformers phi3-gqa-window", err(a[mask.bool()], b[mask.bool()]))
    assert e <= TOL


def test_sliding_window_bites(tmp_path):
    """The window changes the result once the sequence is longer than it (else the parity test proves nothing)."""
    path = saved(hf_model("phi3-gqa-window"), tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = None
    (tmp_path / "nowin").mkdir()
    (tmp_path / "nowin" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "nowin" / "model.safetensors").symlink_to(path / "model.safetensors")
    a, b = phi.Phi.from_pretrained(path), phi.Phi.from_pretrained(tmp_path / "nowin")
    ids = ids_for(20)
    with torch.no_grad():
        assert err(a(ids[:, :6]), b(ids[:, :6])) <= TOL  # window 6: no effect up to 6 tokens
        assert err(a(ids), b(ids)) > 1e-2


ORACLE_SCRIPT = r"""
import sys, torch, transformers
assert transformers.__version__ == "4.42.4", transformers.__version__
model = transformers.Phi3ForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
for name in sys.argv[2:]:
    ids = torch.load(name + ".ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, name + ".logits.pt")
"""


def run_oracle_442(model_dir, inputs):
    for name, ids in inputs.items():
        torch.save(ids, f"{name}.ids.pt")
    r = subprocess.run([str(ORACLE_442), "-c", ORACLE_SCRIPT, str(model_dir), *inputs], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return {name: torch.load(f"{name}.logits.pt") for name in inputs}


@pytest.mark.skipif(
    not ORACLE_442.exists(),
    reason=f"no transformers 4.42.4 Python at {ORACLE_442} (bash .ci/run builds it; or set PHI_ORACLE_442)",
)
@pytest.mark.parametrize("kind", ["su", "yarn"])
def test_su_and_yarn_match_transformers_442(kind, tmp_path):
    cfg = tiny_config(
        model_type="phi3",
        max_position_embeddings=256,
        original_max_position_embeddings=32,
        rope_scaling=rope(kind, 16),
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    model = phi.Phi.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    model.save_pretrained(tmp_path / "m")
    inputs = {str(tmp_path / f"T{T}"): ids_for(T) for T in (20, 48)}  # below and above the original 32
    loaded = phi.Phi.from_pretrained(tmp_path / "m")
    if kind == "su":  # we save "su" as "longrope" (test_su_config_is_saved_as_longrope_that_transformers_5_loads)
        cfg = json.loads((tmp_path / "m" / "config.json").read_text())  # 4.42 knows "su" only: its copy says "su"
        cfg["rope_scaling"]["type"] = "su"
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    expected = run_oracle_442(tmp_path / "m", inputs)
    for name, ids in inputs.items():
        with torch.no_grad():
            e = record(f"logits {kind} vs 4.42 T={ids.shape[1]}", err(loaded(ids), expected[name]))
        assert e <= TOL


def test_yarn_and_longrope_differ_only_in_scale():
    """The YaRN class's magnitude (0.1 ln s + 1) vs LongRoPE's sqrt(1 + ln s / ln o), with s = 256/32."""
    cfg = dict(model_type="phi3", max_position_embeddings=256, original_max_position_embeddings=32)
    su = phi.Rotary(tiny_config(**cfg, rope_scaling=rope("su", 16)))
    yarn = phi.Rotary(tiny_config(**cfg, rope_scaling=rope("yarn", 16)))
    import math

    assert su.scale == pytest.approx(math.sqrt(1 + math.log(8) / math.log(32)))
    assert yarn.scale == pytest.approx(0.1 * math.log(8) + 1)
    assert torch.equal(su.inv_freq_long, yarn.inv_freq_long)


@pytest.mark.parametrize("name", ["phi-2", "phi3-gqa-window", "phimoe"])
@pytest.mark.parametrize("problem", ["single_label_classification", "regression", "multi_label_classification"])
def test_sequence_classification_matches_transformers(name, problem, tmp_path):
    num_labels = 1 if problem == "regression" else 3
    ours, ref = from_transformers(
        name,
        tmp_path,
        "ForSequenceClassification",
        phi.PhiForSequenceClassification,
        num_labels=num_labels,
        problem_type=problem,
    )
    ids, mask, pos = classification_inputs()
    labels = {
        "single_label_classification": torch.tensor([0, 2, 1]),
        "regression": torch.tensor([0.5, -1.0, 2.0]),
        "multi_label_classification": torch.tensor([[1.0, 0, 1], [0, 0, 1], [0, 1, 0]]),
    }[problem]
    with torch.no_grad():
        out = ref(ids, attention_mask=mask, position_ids=pos, labels=labels)
        scores, loss = ours(ids, attention_mask=mask, labels=labels)
    assert scores.shape == (3, num_labels)
    e = record(f"seq-cls {name} {problem}", max(err(scores, out.logits), abs(loss.item() - out.loss.item())))
    assert e <= TOL


@pytest.mark.parametrize("name", ["phi-1.5", "phi4-mini"])
def test_token_classification_matches_transformers(name, tmp_path):
    ours, ref = from_transformers(name, tmp_path, "ForTokenClassification", phi.PhiForTokenClassification, num_labels=5)
    ids, mask, pos = classification_inputs()
    labels = torch.where(mask == 0, -100, torch.randint(0, 5, (3, 10), generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        out = ref(ids, attention_mask=mask, position_ids=pos, labels=labels)
        scores, loss = ours(ids, attention_mask=mask, labels=labels)
    assert scores.shape == (3, 10, 5)
    e = record(
        f"token-cls {name}", max(err(scores[mask.bool()], out.logits[mask.bool()]), abs(loss.item() - out.loss.item()))
    )
    assert e <= TOL


@pytest.mark.parametrize("name", ["phi-2", "phi3-4k"])
def test_causal_lm_loss_matches_transformers(name, tmp_path):
    ours, ref = from_transformers(name, tmp_path)
    ids = ids_for(12)
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        logits, loss = ours(ids, labels=labels)
        e = abs(loss.item() - ref(ids, labels=labels).loss.item())
    assert record(f"lm loss {name}", e) <= TOL


def test_classifier_head_initialised_from_causal_lm_checkpoint(tmp_path, capfd):
    """Fine-tuning a classifier from a causal-LM checkpoint: the trunk loads, the new head starts fresh."""
    path = saved(hf_model("phi-1.5"), tmp_path)
    clf = phi.PhiForSequenceClassification.from_pretrained(path)
    lm = phi.Phi.from_pretrained(path)
    assert torch.equal(clf.layers[1].mlp.fc2.weight, lm.layers[1].mlp.fc2.weight)
    assert "new score.weight initialised" in capfd.readouterr().err


@pytest.mark.parametrize(
    "name,cls,head",
    [
        ("phi-2-qk-layernorm", phi.Phi, "ForCausalLM"),
        ("phi4-mini", phi.Phi, "ForCausalLM"),
        ("phi3-gqa-window", phi.PhiForSequenceClassification, "ForSequenceClassification"),
        ("phi-1.5", phi.PhiForTokenClassification, "ForTokenClassification"),
        ("phimoe-longrope", phi.Phi, "ForCausalLM"),
        ("phimoe", phi.PhiForSequenceClassification, "ForSequenceClassification"),
    ],
)
def test_our_save_loads_in_transformers(name, cls, head, tmp_path):
    ours = from_transformers(name, tmp_path / "hf", head, cls)[0]
    with torch.no_grad():  # change every weight, so the check is on what *we* wrote
        for p in ours.parameters():
            p.mul_(0.9).add_(0.01)
    ours.save_pretrained(tmp_path / "ours", max_shard_size=20_000)  # forces several shards + index
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    ref = getattr(transformers, "Auto" + ("ModelForCausalLM" if head == "ForCausalLM" else "Model" + head))
    ref = ref.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(ref).__name__ == HF_CLASSES[CASES[name][0]] + head
    ids, mask, pos = classification_inputs()
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask), ref(ids, attention_mask=mask, position_ids=pos).logits
    if head == "ForCausalLM" or head == "ForTokenClassification":
        a, b = a[mask.bool()], b[mask.bool()]
    assert record(f"save->transformers {name} {head}", err(a, b)) <= TOL
    again = cls.from_pretrained(tmp_path / "ours")  # and our own loader reads the shards back exactly
    for (n, p), q in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), n
    again.save_pretrained(tmp_path / "ours")  # one file now: the shards and index of the last save are gone
    assert sorted(f.name for f in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(cls.from_pretrained(tmp_path / "ours").embed.weight, ours.embed.weight)


def test_su_config_is_saved_as_longrope_that_transformers_5_loads(tmp_path):
    """The first Phi-3-128k revisions say rope_scaling "su"; transformers 5.23 cannot read that (KeyError), so we save
    the same formula under its later name, "longrope", and transformers' logits equal ours past the original context."""
    ref = hf_model("phi3-128k-longrope")
    saved(ref, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_scaling"] = dict(rope("su", 16), type="su")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    ours = phi.Phi.from_pretrained(tmp_path / "hf")
    assert ours.config.rope_scaling["type"] == "su"
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["rope_scaling"]["type"] == "longrope"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = ids_for(48)  # past the original context of 32: the long factors
    with torch.no_grad():
        assert record("su saved as longrope, transformers 5 logits", err(ours(ids), back(ids).logits)) <= TOL


def legacy_checkpoint(ref, path, layout):
    """Write transformers' phi weights under Microsoft's old remote-code names (independent of phi.py's table):
    phi-msft: transformer.embd.wte, transformer.h.N.{ln, mixer.Wqkv, mixer.out_proj, mlp.fc1/fc2}, lm_head.{ln, linear}
    mixformer-sequential: layers.0.wte, layers.N+1.{...same...}, layers.<L+1>.{ln, linear}. Wqkv = [q; k; v]."""
    sd, L, out = ref.state_dict(), ref.config.num_hidden_layers, {}
    block = (lambda i: f"transformer.h.{i}") if layout == "phi-msft" else (lambda i: f"layers.{i + 1}")
    emb, head = ("transformer.embd.wte", "lm_head") if layout == "phi-msft" else ("layers.0.wte", f"layers.{L + 1}")
    out[f"{emb}.weight"] = sd["model.embed_tokens.weight"]
    for p in ("weight", "bias"):
        out[f"{head}.ln.{p}"] = sd[f"model.final_layernorm.{p}"]
        out[f"{head}.linear.{p}"] = sd[f"lm_head.{p}"]
        for i in range(L):
            a = f"model.layers.{i}"
            out[f"{block(i)}.ln.{p}"] = sd[f"{a}.input_layernorm.{p}"]
            out[f"{block(i)}.mixer.Wqkv.{p}"] = torch.cat([sd[f"{a}.self_attn.{x}_proj.{p}"] for x in "qkv"])
            out[f"{block(i)}.mixer.out_proj.{p}"] = sd[f"{a}.self_attn.dense.{p}"]
            out[f"{block(i)}.mlp.fc1.{p}"], out[f"{block(i)}.mlp.fc2.{p}"] = (
                sd[f"{a}.mlp.fc1.{p}"],
                sd[f"{a}.mlp.fc2.{p}"],
            )
    out[f"{block(0)}.mixer.rotary_emb.inv_freq"] = torch.ones(4)  # old files carry this buffer: ignored
    c = ref.config
    cfg = {
        "model_type": layout,
        "n_embd": c.hidden_size,
        "n_layer": L,
        "n_head": c.num_attention_heads,
        "n_inner": c.intermediate_size,
        "rotary_dim": int(c.hidden_size // c.num_attention_heads * 0.4),
        "n_positions": c.max_position_embeddings,
        "layer_norm_epsilon": c.layer_norm_eps,
        "activation_function": "gelu_new",
        "vocab_size": c.vocab_size,
        "pad_vocab_size_multiple": 32,
    }
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("layout,fmt", [("mixformer-sequential", "bin"), ("phi-msft", "safetensors")])
def test_legacy_checkpoint_loads_and_matches(layout, fmt, tmp_path):
    ref = hf_model("phi-2")
    tensors = legacy_checkpoint(ref, tmp_path / "legacy", layout)
    if fmt == "bin":  # the original phi-1/1.5 files are pytorch_model.bin
        torch.save(tensors, tmp_path / "legacy" / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "legacy" / "model.safetensors")
    ours = phi.Phi.from_pretrained(tmp_path / "legacy")
    ids = ids_for(16)
    with torch.no_grad():
        e = record(f"legacy {layout}", err(ours(ids), ref(ids).logits))
    assert e <= TOL


@needs_reference("configs/phi-2-mixformer-sequential.index.json")
def test_legacy_names_match_real_phi2_index():
    """Our mixformer-sequential name table produces exactly the tensor names of the real (pre-2024) phi-2 files."""
    cfg = phi.PhiConfig.from_hf(json.loads((REF / "configs/phi-2-mixformer-sequential.json").read_text()))
    with torch.device("meta"):
        model = phi.Phi(cfg)
    ours = {n for names in model.hf_names("mixformer-sequential").values() for n in names}
    real = set(json.loads((REF / "configs/phi-2-mixformer-sequential.index.json").read_text())["weight_map"])
    assert ours == real


MEMORY_SCRIPT = r"""
import sys, torch, phi
def rss(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
with torch.device("meta"):                       # first use of the meta device imports ~75 MB of torch modules
    phi.Phi(phi.PhiConfig(num_hidden_layers=1))
before = rss("VmRSS")
model = phi.Phi.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
print(rss("VmHWM") - before, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def test_loading_peaks_near_one_copy_of_the_weights(tmp_path):
    """A checkpoint stored in fp32 (~330 MB), loaded as bf16 (~165 MB): the process grows by under 1.3x the bf16
    weights. Reading the file through a memory map, or building an fp32 model first, would not fit."""
    cfg = tiny_config(
        model_type="phi3",
        vocab_size=1024,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=64,
        hidden_act="silu",
    )
    phi.Phi.from_config(cfg).save_pretrained(tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=python_env(),
    )
    assert r.returncode == 0, r.stderr
    grew, weights = map(int, r.stdout.split())
    record("load peak / bf16 weights", grew / weights)
    assert grew < 1.3 * weights, (
        f"loading {weights / 2**20:.0f} MB of weights grew the process by {grew / 2**20:.0f} MB"
    )


REAL = [
    "phi-1.json",
    "phi-2.json",
    "Phi-3-mini-4k-instruct.json",
    "Phi-3-medium-4k-instruct.json",
    "Phi-3.5-mini-instruct.json",
    "phi-4.json",
    "Phi-4-mini-instruct.json",
]


@needs_reference("configs")
@pytest.mark.parametrize("fname", REAL)
def test_real_configs_build_the_same_shapes_as_transformers(fname):
    d = json.loads((REF / "configs" / fname).read_text())
    cfg = phi.PhiConfig.from_hf(d)
    with torch.device("meta"):
        ours = phi.Phi(cfg)
        hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k != "auto_map"})
        ref = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if cfg.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    got = {}
    sd = ours.state_dict()
    for our, names in ours.hf_names(cfg.model_type).items():
        sizes = ours.layers[0].attn.sizes if len(names) == 3 else [sd[our].shape[0]]
        for n, s in zip(names, sizes):
            got[n] = (s, *sd[our].shape[1:])
    assert got == want
    assert cfg.rotary_dim == int(cfg.head_dim * hf_cfg.rope_parameters["partial_rotary_factor"])
    again = phi.PhiConfig.from_hf(cfg.to_hf())  # to_hf round-trips
    assert again == cfg
    transformers.AutoConfig.for_model(**cfg.to_hf())  # and transformers accepts it


@needs_reference("configs")
def test_legacy_real_config_parses():
    cfg = phi.PhiConfig.from_hf(json.loads((REF / "configs/phi-2-mixformer-sequential.json").read_text()))
    ref = phi.PhiConfig.from_hf(json.loads((REF / "configs/phi-2.json").read_text()))
    for k in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "partial_rotary_factor",
        "max_position_embeddings",
        "norm_eps",
        "hidden_act",
        "rotary_dim",
    ):
        assert getattr(cfg, k) == getattr(ref, k), k


@needs_reference("configs")
def test_real_longrope_config_values():
    """Phi-3.5-mini: 48 factors, attention scale sqrt(1 + ln 32 / ln 4096); Phi-4-mini: rotary dim 96 of 128."""
    p35 = phi.Rotary(phi.PhiConfig.from_hf(json.loads((REF / "configs/Phi-3.5-mini-instruct.json").read_text())))
    assert p35.scale == pytest.approx(1.1902380714238083, abs=1e-12)
    assert p35.inv_freq.shape == p35.inv_freq_long.shape == (48,)
    m4 = phi.PhiConfig.from_hf(json.loads((REF / "configs/Phi-4-mini-instruct.json").read_text()))
    assert (m4.head_dim, m4.rotary_dim, m4.num_key_value_heads, m4.tie_word_embeddings) == (128, 96, 8, True)


@needs_reference("configs")
def test_real_phi3_small_config_builds_7_39b_parameters():
    d = json.loads((REF / "configs/Phi-3-small-8k-instruct.json").read_text())
    cfg = phi.PhiConfig.from_hf(d)
    with torch.device("meta"):
        model = phi.Phi(cfg)
    n = sum(p.numel() for p in model.parameters())  # the tied lm_head counted once
    assert round(n / 1e9, 2) == 7.39, n
    assert (cfg.intermediate_size, cfg.rope_theta, cfg.norm_eps, cfg.tie_word_embeddings) == (14336, 1e6, 1e-5, True)
    assert [layer.attn.sparse for layer in model.layers[:4]] == [True, False, True, False]  # dense: (i + 1) % 2 == 0
    assert model.layers[0].attn.scale == 1 / 128 and model.layers[0].mlp.fc1.out_features == 2 * 14336
    again = phi.PhiConfig.from_hf(cfg.to_hf())  # to_hf round-trips (writing the original context it implies)
    assert again == dataclasses.replace(cfg, original_max_position_embeddings=8192)
    assert {k: cfg.to_hf()[k] for k in ("ff_intermediate_size", "rope_embedding_base", "layer_norm_epsilon")} == {
        k: d[k] for k in ("ff_intermediate_size", "rope_embedding_base", "layer_norm_epsilon")
    }


def good_config():
    return dict(
        model_type="phi3",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        original_max_position_embeddings=32,
    )


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(model_type="llama"), r"unknown model_type 'llama'; supported: phi, phi-msft"),
        (dict(model_type="phi3v"), r"'phi3v' \(Phi-3-vision\) is not supported yet"),
        (dict(model_type="phimoe", num_experts_per_tok=4), r"num_experts_per_tok 4: phimoe routes to 2 experts"),
        (dict(model_type="phi3small"), r"required key 'dense_attention_every_n_layers' is missing"),
        (dict(model_type=None), r"no 'model_type' key"),
        (dict(hidden_size=None), r"required key 'hidden_size' is missing"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), r"rope_scaling type 'dynamic' is not supported"),
        (
            dict(rope_scaling=dict(rope("longrope", 16), short_factor=[1.0] * 7)),
            r"rope_scaling.short_factor must be a list of 8 numbers \(rotary dim 16 / 2\), got 7",
        ),
        (
            dict(rope_scaling=rope("longrope", 16), original_max_position_embeddings=None),
            r"required key 'original_max_position_embeddings' is missing",
        ),
        (dict(num_key_value_heads=3), r"do not divide evenly"),
    ],
)
def test_config_errors(change, message):
    d = {k: v for k, v in {**good_config(), **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        phi.PhiConfig.from_hf(d, "x/config.json")


def test_weight_errors(tmp_path):
    path = saved(hf_model("phi-1.5"), tmp_path / "m")
    from safetensors.torch import load_file, save_file

    good = load_file(path / "model.safetensors")

    def load_with(tensors):
        save_file(tensors, path / "model.safetensors")
        return phi.Phi.from_pretrained(path)

    bad = dict(good)
    del bad["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(
        ValueError, match=r"tensor 'model.layers.1.self_attn.k_proj.weight' is missing .*expected shape \[192, 64\]"
    ):
        load_with(bad)
    bad = dict(good, **{"model.layers.0.mlp.fc1.weight": torch.zeros(97, 64)})
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.fc1.weight' has shape \[97, 64\], expected \[96, 64\]"):
        load_with(bad)
    bad = dict(good, **{"model.layers.7.mlp.fc1.weight": torch.zeros(96, 64)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.7.mlp.fc1.weight'"):
        load_with(bad)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors, model.safetensors.index.json"):
        phi.Phi.from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json not found"):
        phi.Phi.from_pretrained(path)


def corrupt(raw: bytes, case: str) -> bytes:
    """A model.safetensors file (8-byte little-endian header length, JSON header, data) broken in one way."""
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, last = header[names[0]], header[names[-1]]
    if case == "truncated":
        return raw[: 8 + n + len(data) // 2]
    if case == "empty":
        return b""
    if case == "not safetensors":
        return b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123\n"
    if case == "absurd header length":
        return (2**62).to_bytes(8, "little") + raw[8:]
    if case == "offsets past the end":
        last["data_offsets"] = [o + len(data) for o in last["data_offsets"]]
    elif case == "same offsets":  # a second tensor of the same shape pointing at the first one's bytes
        twin = next(k for k in names[1:] if header[k]["shape"] == first["shape"])
        header[twin]["data_offsets"] = first["data_offsets"]
    elif case == "unknown dtype":
        first["dtype"] = "Q4"
    elif case == "dtype size mismatch":
        first["dtype"] = "F16"  # 2 bytes a number: the offsets span twice the data
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize(
    "case,message",
    [
        ("offsets past the end", r"invalid (offset|shape, data type, or offset)"),
        ("truncated", r"file not fully covered"),
        ("same offsets", r"invalid offset for tensor `\S+`"),
        ("not safetensors", r"header too large"),
        ("absurd header length", r"header too large"),
        ("unknown dtype", r"unknown variant `Q4`"),
        ("dtype size mismatch", r"invalid shape, data type, or offset"),
        ("empty", r"header too small"),
    ],
)
def test_malformed_safetensors_is_one_clear_error(case, message, tmp_path):
    """Each way a weights file can be broken is one ValueError naming the file and what safetensors' own reader found
    (its header checks: offsets inside the file and covering it, dtypes, sizes), never a model of whatever bytes."""
    path = saved(hf_model("phi-1.5"), tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(corrupt(f.read_bytes(), case))
    with pytest.raises(ValueError, match=re.escape(f"{f}: not a valid safetensors file (") + ".*" + message):
        phi.Phi.from_pretrained(path)


def test_malformed_bin_and_sharded_index_errors(tmp_path):
    path = saved(hf_model("phi-1.5"), tmp_path / "m")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=re.escape(str(path / "pytorch_model.bin")) + ": not a valid PyTorch file"):
        phi.Phi.from_pretrained(path)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"lists model-00001-of-00002.safetensors, which is not in"):
        phi.Phi.from_pretrained(path)


@pytest.mark.parametrize("name", ["phi-2", "phi3-gqa-window"])
def test_sharded_pytorch_bin_in_the_current_layout(name, tmp_path):
    """transformers' names in pytorch_model-0000N-of-00002.bin shards with a pytorch_model.bin.index.json (what
    save_pretrained wrote before safetensors), and in one pytorch_model.bin: our logits equal transformers'."""
    ours, ref = from_transformers(name, tmp_path / "st")
    sd, files = ref.state_dict(), ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    halves = [dict(list(sd.items())[: len(sd) // 2]), dict(list(sd.items())[len(sd) // 2 :])]
    for d, shards in ((tmp_path / "sharded", halves), (tmp_path / "one", [sd])):
        d.mkdir()
        shutil.copy(tmp_path / "st" / "config.json", d)
        for f, part in zip(files if len(shards) == 2 else ["pytorch_model.bin"], shards):
            torch.save({k: v.clone() for k, v in part.items()}, d / f)
        if len(shards) == 2:
            index = {"metadata": {}, "weight_map": {k: f for f, part in zip(files, shards) for k in part}}
            (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        ids = ids_for(16)
        with torch.no_grad():
            e = record(f"pytorch_model.bin ({d.name}) {name}", err(phi.Phi.from_pretrained(d)(ids), ref(ids).logits))
        assert e <= TOL


def test_transformers_4_token_classifier_name_loads(tmp_path):
    """transformers 4.x saved the token-classification head as "classifier", 5.x as "score": both load."""
    from safetensors.torch import load_file, save_file

    ours, ref = from_transformers("phi-1.5", tmp_path, "ForTokenClassification", phi.PhiForTokenClassification)
    sd = load_file(tmp_path / "model.safetensors")
    assert {k for k in sd if k.startswith("score.")} == {"score.weight", "score.bias"}
    save_file({k.replace("score.", "classifier.", 1): v for k, v in sd.items()}, tmp_path / "model.safetensors")
    old = phi.PhiForTokenClassification.from_pretrained(tmp_path)
    ids = ids_for(10)
    with torch.no_grad():
        assert err(old(ids), ref(ids).logits) <= TOL


def test_flash_is_not_used_for_a_padded_batch(tmp_path):
    """flash-attn is used for unpadded batches only: a left-padded batch (prompt and its decode steps) takes SDPA
    and equals the SDPA model; an unpadded batch on the same model calls flash."""
    model = from_transformers("phi3-gqa-window", tmp_path)[0]
    ids, calls = ids_for(20), []
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask)
        model.flash_attn = lambda *a, **kw: calls.append(1) or fake_flash_attn_func(*a, **kw)
        got = model(ids, attention_mask=mask)
        cache = phi.KVCache(model.config, 2, 22)
        model(ids, attention_mask=mask, cache=cache)
        model(ids[:, :1], cache=cache)
        assert not calls
        assert err(got, want) <= TOL
        model(ids)
    assert calls


@pytest.mark.parametrize("name", ["phi-2", "phimoe"])
def test_weights_read_in_many_small_blocks_equal_the_whole_reads(name, tmp_path, monkeypatch):
    """Checkpoint.copy_rows reads a few rows at a time (ROWS_AT_ONCE elements): with blocks of 2-3 rows every tensor
    spans many, ending mid-tensor and mid-part (phi's q, k, v stacked; phimoe's w1, w3): the weights equal those read
    in one block each (the default here), which the parity tests check against transformers."""
    ours = from_transformers(name, tmp_path)[0]
    monkeypatch.setattr(phi.Checkpoint, "ROWS_AT_ONCE", 200)  # rows of 64-96 elements: 2 or 3 a block
    small = phi.Phi.from_pretrained(tmp_path)
    for key, t in ours.state_dict().items():
        assert torch.equal(small.state_dict()[key], t), key


def test_kv_cache_overflow_is_an_error(tmp_path):
    model = from_transformers("phi-1.5", tmp_path)[0]
    cache = phi.KVCache(model.config, 2, 8)
    with pytest.raises(ValueError, match=r"KV cache full: 0 \+ 9 tokens > max_len 8"):
        model(ids_for(9), cache=cache)


def test_phi2_fp16_does_not_overflow(tmp_path):
    """phi-2's q·k exceeds fp16's 65504 (transformers#28163). Scale q and k up until it does; our fp16 forward must
    stay finite and close to fp32, although plain fp16 scores q @ k.T overflow (an attention written that way fails)."""
    ref = hf_model("phi-2")
    with torch.no_grad():
        for layer in ref.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(100)
                proj.bias.mul_(100)
    path = saved(ref, tmp_path)
    f32, f16 = phi.Phi.from_pretrained(path), phi.Phi.from_pretrained(path, dtype=torch.float16)
    ids = ids_for(16)
    x = f16.layers[0].norm1(f16.embed(ids))
    q, k, _ = f16.layers[0].attn.qkv(x).split(f16.layers[0].attn.sizes, -1)
    assert not torch.isfinite(q[0] @ k[0].T).all(), "scores should overflow fp16 for this test to mean anything"
    with torch.no_grad():
        a, b = f32(ids), f16(ids)
    assert torch.isfinite(b).all()
    assert err(a, b) / a.abs().max().item() < 2e-2


@pytest.mark.parametrize("name,tol", [("phi-2", 1e-2), ("phi3-gqa-window", 1e-3), ("phi4-mini", 1e-3)])
def test_bf16_matches_transformers_bf16(name, tol, tmp_path):
    """bf16 logits against transformers' bf16 (SDPA, as ours) on the same weights, as a fraction of max |logit|.
    The Phi-3 block runs the same ops in the same order as transformers: measured 0, bound 1e-3 (a tenth of one
    bf16 rounding of the largest logit). phi-2 rounds to bf16 at other points (measured 6.2e-3, bound 1e-2). Both
    are as far from the fp32 logits as each other: our relative error is at most 1.05x transformers'."""
    ids = ids_for(48 if name == "phi4-mini" else 20)  # phi4-mini: past the original context (long factors)
    hf_model(name).save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():
        exact = phi.Phi.from_pretrained(tmp_path)(ids)
        ours = phi.Phi.from_pretrained(tmp_path, dtype=torch.bfloat16)(ids)
        theirs = ref.eval()(ids).logits
    assert ours.dtype == torch.bfloat16
    scale = exact.abs().max().item()
    assert record(f"bf16 vs transformers bf16 {name}, / max |logit|", err(ours, theirs) / scale) <= tol

    def rel(x):
        return ((x.float() - exact).norm() / exact.norm()).item()

    assert rel(ours) <= 1.05 * rel(theirs)


def test_flash_requested_on_cpu_falls_back_with_one_line(tmp_path, capfd):
    path = saved(hf_model("phi-1.5"), tmp_path)
    capfd.readouterr()
    model = phi.Phi.from_pretrained(path, attn="flash")
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines == [
        "flash-attn not used: it needs CUDA and float16/bfloat16, the model is on cpu in torch.float32; using SDPA"
    ]
    assert model.flash_attn is None


def fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """flash_attn_func's documented semantics in plain torch: (B, T, H, hd) layout, GQA by head groups, causal mask
    aligned to the bottom-right corner, and key j visible from query i iff i + S - T - left <= j <= i + S - T + right."""
    B, T, H, D = q.shape
    S, KV = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // KV, 2), v.repeat_interleave(H // KV, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * (softmax_scale or D**-0.5)
    i = torch.arange(T)[:, None] + S - T
    j = torch.arange(S)[None, :]
    left, right = window_size
    ok = torch.ones(T, S, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return torch.einsum("bhts,bshd->bthd", scores.masked_fill(~ok, float("-inf")).softmax(-1), v)


def test_flash_path_layout_and_window(tmp_path, monkeypatch):
    """The flash branch (tensor layout, GQA, window argument, decode alignment) run against a reference flash."""
    model = from_transformers("phi3-gqa-window", tmp_path)[0]
    ids = ids_for(20)
    calls = []

    def flash(*args, **kw):
        calls.append(kw["window_size"])
        return fake_flash_attn_func(*args, **kw)

    with torch.no_grad():
        want = model(ids)
        model.flash_attn = flash
        got = model(ids)
        cache = phi.KVCache(model.config, 2, 20)
        steps = torch.cat(
            [model(ids[:, :12], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)], 1
        )
    assert calls and set(calls) == {(5, 0)}  # window 6 = the query and the 5 keys before it
    assert err(got, want) <= TOL
    assert err(steps, want) <= TOL


def test_phimoe_rotary_past_the_original_context_is_the_checkpoints_own(tmp_path):
    """Below the original context (32) we equal transformers 5.23 as it is; past it 5.23 keeps the short factors
    (its PhimoeRotaryEmbedding drops the sequence length), the checkpoint's code switches to long_factor and
    long_mscale: we follow the checkpoint (the parity tests' models carry remote_code_rotary), and the two differ."""
    path = saved(hf_model("phimoe-longrope"), tmp_path)
    ours, stock = phi.Phi.from_pretrained(path), transformers.PhimoeForCausalLM.from_pretrained(path).eval()
    short, long = ids_for(20), ids_for(48)
    with torch.no_grad():
        assert record("phimoe vs stock transformers 5.23, T=20", err(ours(short), stock(short).logits)) <= TOL
        assert err(ours(long), stock(long).logits) > 0.05
        # the long factors' frequencies and long_mscale, written out from the config
        cfg = json.loads((path / "config.json").read_text())
        rs = cfg.get("rope_scaling") or cfg["rope_parameters"]
        pos = torch.arange(48)[None]
        cos, _ = ours.rotary(pos, torch.float32, long=True)
        theta = rs.get("rope_theta", cfg.get("rope_theta"))  # (transformers' phimoe default: 1e6)
        inv = 1.0 / (torch.tensor(rs["long_factor"]) * theta ** (torch.arange(0, 16, 2).float() / 16))
        want = torch.cat([pos[0, :, None] * inv] * 2, -1).cos() * rs["long_mscale"]
    assert err(cos[0, 0], want) <= 1e-6


def test_sparsemixer_ties_and_near_ties_match_transformers():
    """phi.sparsemixer picks the same two experts with the same weights as transformers' sparsemixer (eval mode) on
    scores built with exact ties, scores exactly on and just past the jitter threshold, and negative scores; and it
    is not Mixtral's softmax-then-top-2 (which gives other weights on the same scores)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as hf_sparsemixer

    scores, eps = sparsemixer_cases()
    weights, experts = phi.sparsemixer(scores, eps)
    want_w, want_e = hf_sparsemixer(scores, jitter_eps=eps, training=False)
    assert torch.equal(experts, want_e)
    assert torch.equal(weights, want_w)
    assert experts[0].tolist() == [0, 1] and experts[1, 0] == 0 and experts[5].tolist() == [0, 2]
    top2 = scores.softmax(-1).topk(2, -1)
    assert err(weights, top2.values) > 0.1


def test_phimoe_with_tied_router_rows_matches_transformers(tmp_path):
    """A whole model whose routers tie on purpose (two experts with the same router row: every token ties; a third
    row a hair smaller: near-ties at the threshold) still equals transformers."""
    ref = hf_model("phimoe")
    with torch.no_grad():
        for layer in ref.model.layers:
            w = layer.mlp.router.weight
            w[1] = w[0]
            w[2] = w[0] * (1 - 0.019)  # just inside 2 * router_jitter_noise (0.02) of expert 0's score
    ours = phi.Phi.from_pretrained(saved(ref, tmp_path))
    ids = ids_for(16)
    with torch.no_grad():
        assert record("phimoe tied routers", err(ours(ids), ref(ids).logits)) <= TOL
        _, experts = phi.sparsemixer(ours.layers[0].mlp.router(ours.layers[0].norm2(ours.embed(ids))), 0.01)
    assert set(experts.flatten().tolist()) >= {0, 1}


def test_phimoe_runs_only_the_chosen_experts_on_only_their_tokens(tmp_path):
    """Each expert gets just the tokens routed to it (a gather, not every expert on every token): a batch-1 decode
    step runs two experts per layer, on one row each, and a prompt's experts see as many rows as routed there."""
    model = from_transformers("phimoe", tmp_path)[0]
    calls = []
    for i, layer in enumerate(model.layers):
        for e, expert in enumerate(layer.mlp.experts):
            expert.register_forward_hook(lambda m, inp, out, i=i, e=e: calls.append((i, e, inp[0].shape[0])))
    ids = ids_for(12, B=1)
    with torch.no_grad():
        cache = phi.KVCache(model.config, 1, 13)
        generate.prefill(model, ids, None, cache)
        prompt_calls, calls[:] = list(calls), []
        generate.decode_one_token(model, torch.tensor([5]), cache)
    per_layer = [[c for c in calls if c[0] == i] for i in range(len(model.layers))]
    assert all(len(p) == 2 and all(rows == 1 for _, _, rows in p) for p in per_layer), calls
    assert sum(rows for *_, rows in prompt_calls) == 2 * 12 * len(model.layers)  # 2 experts x 12 tokens x layers


def test_phimoe_reads_transformers_5_fused_experts(tmp_path):
    """transformers 5 holds a layer's experts as experts.gate_up_proj (E, 2I, C) and down_proj (E, C, I) and its
    router as mlp.router (in memory; save_pretrained writes the Hub's w1/w2/w3 and gate): a checkpoint in that
    layout loads too (sharded and .bin), and our save writes the Hub's names."""
    from safetensors.torch import save_file

    ref = hf_model("phimoe")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert (
        "model.layers.0.mlp.experts.gate_up_proj" in state
        and state["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    )
    ref.config.save_pretrained(tmp_path / "st")
    save_file(state, tmp_path / "st" / "model.safetensors")
    ref.config.save_pretrained(tmp_path / "bin")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    ids = ids_for(16)
    with torch.no_grad():
        want = ref(ids).logits
        for d in ("st", "bin"):
            ours = phi.Phi.from_pretrained(tmp_path / d)
            assert record(f"phimoe fused layout ({d})", err(ours(ids), want)) <= TOL
    ours.save_pretrained(tmp_path / "ours")
    from safetensors import safe_open

    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.experts.3.w2.weight",
    } <= names
    assert not any(".mlp." in n for n in names)


def test_phimoe_token_classification_on_transformers_trunk(tmp_path):
    """transformers has no PhimoeForTokenClassification: our token classifier's scores are its score Linear applied
    to transformers' PhimoeModel hidden states (the trunk is the oracle), left and right padding included."""
    path = saved(hf_model("phimoe"), tmp_path)
    ours = phi.PhiForTokenClassification.from_pretrained(path, num_labels=5).eval()
    trunk = with_checkpoint_rotary(transformers.PhimoeModel.from_pretrained(path).eval())
    ids, mask, pos = classification_inputs()
    with torch.no_grad():
        want = ours.score(trunk(ids, attention_mask=mask, position_ids=pos).last_hidden_state)
        got = ours(ids, attention_mask=mask)
    assert record("token-cls phimoe", err(got[mask.bool()], want[mask.bool()])) <= TOL


PHI35_MOE = dict(  # microsoft/Phi-3.5-MoE-instruct's config.json (the values that shape it)
    model_type="phimoe",
    architectures=["PhiMoEForCausalLM"],
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=6400,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=16,
    num_experts_per_tok=2,
    max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=131072,
    attention_bias=True,
    lm_head_bias=True,
    router_jitter_noise=0.01,
    input_jitter_noise=0.01,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=32000,
    rope_scaling=dict(
        type="longrope",
        short_factor=factors(64, 1, 1.0, 1.1),
        long_factor=factors(64, 2, 1.0, 64.0),
        short_mscale=1.243163121016122,
        long_mscale=1.243163121016122,
        original_max_position_embeddings=4096,
    ),
)


def test_phi35_moe_config_parses_with_its_real_size():
    """The Phi-3.5-MoE-instruct values parse; on the meta device the model has transformers' parameter count
    (41.9B: 16 experts of 3 x 4096 x 6400 in each of 32 layers), and its config round-trips through to_hf."""
    cfg = phi.PhiConfig.from_hf(PHI35_MOE)
    assert (cfg.moe, cfg.attn_bias, cfg.head_bias, cfg.num_local_experts, cfg.sliding_window) == (
        True,
        True,
        True,
        16,
        131072,
    )
    assert cfg.rope_scaling["short_mscale"] == cfg.rope_scaling["long_mscale"] == 1.243163121016122
    with torch.device("meta"):
        ours = phi.Phi(cfg)
        ref = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**{**PHI35_MOE, "architectures": None}))
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert round(n / 1e9, 1) == 41.9
    assert ours.rotary.scale == ours.rotary.scale_long == 1.243163121016122  # the config's, not sqrt(1 + ln s / ln o)
    back = transformers.PhimoeConfig(**cfg.to_hf())
    assert (back.num_local_experts, back.attention_bias, back.lm_head_bias) == (16, True, True)
    assert phi.PhiConfig.from_hf(cfg.to_hf()) == cfg


# -----------------------------------------------------------------------------------------------------------------
# Phi-3-small (phi3small) against mlx-lm 0.32.2's phi3small.py, and against the formulas written out in plain torch


def mlx_small(path):
    """mlx-lm's phi3small model of a checkpoint directory, with its block-sparse layers given an additive causal mask:
    it adds create_attention_mask's boolean mask to the scores as numbers (True -> +1), so within a diagonal block a
    query would see later keys."""
    import mlx.core as mx
    import mlx_lm.models.phi3small as small
    from mlx_lm.utils import load_model

    def additive(h, cache=None, return_array=False):
        m = boolean(h, cache, return_array=return_array)
        if m is None or isinstance(m, str) or m.dtype != mx.bool_:
            return m
        return mx.where(m, mx.array(0.0, mx.float32), mx.array(-float("inf"), mx.float32))

    boolean = small.create_attention_mask
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(small, "create_attention_mask", additive)
        model, _ = load_model(path)
    return model, additive


def mlx_small_logits(path, ids, prefill=64):
    """mlx-lm's logits (1, T, V) at every position of ids (1, T): the first `prefill` tokens (a multiple of the block
    size: its prefill takes the rows of a padded block mask, so query t would get the block of t + padding) at once,
    then one token at a time through its KV cache (that path is right)."""
    import mlx.core as mx
    import mlx_lm.models.phi3small as small
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    model, additive = mlx_small(path)
    cache, x = make_prompt_cache(model), mx.array(ids.numpy())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(small, "create_attention_mask", additive)
        out = [np.array(model(x[:, :prefill], cache=cache))]
        out += [np.array(model(x[:, t : t + 1], cache=cache)) for t in range(prefill, ids.shape[1])]
    return torch.from_numpy(np.concatenate(out, 1))


REAL_IDS = torch.ones(100352, dtype=torch.bool)
REAL_IDS[phi.SMALL_DUMMY_IDS] = False


def small_ids(T, B=1, seed=1):
    return torch.randint(0, 100256, (B, T), generator=torch.Generator().manual_seed(seed))


def test_phi3small_logits_match_mlx_lm(tmp_path):
    """200 tokens: 7 blocks of 32 (not a multiple), 2 local blocks, every 4th block before them by head: queries in
    the last blocks lose some blocks to the stride; muP multipliers 10, 8, 1.5; a gegelu limit of 0.5 that clamps."""
    ours = small_model()
    ids = small_ids(200)
    ref = mlx_small_logits(saved(ours, tmp_path), ids)
    with torch.no_grad():
        got = ours(ids)
    e = record("logits phi3small vs mlx-lm T=200", err(got[..., REAL_IDS], ref[..., REAL_IDS]))
    assert e <= TOL, e
    assert (got[..., ~REAL_IDS] == torch.finfo(torch.float32).min).all() and ref[..., ~REAL_IDS].isneginf().all()
    # what the comparison covers: the block mask cuts keys, and gegelu clamps
    with torch.no_grad():
        dense = small_model(dense_attention_every_n_layers=1)(ids)
        h = ours.layers[0].mlp.fc1(ours.layers[0].norm2(torch.randn(1, 50, 64)))
    assert err(dense[..., REAL_IDS], got[..., REAL_IDS]) > 100 * TOL
    assert (h.abs() > ours.config.gegelu_limit).float().mean() > 0.2


def reference_small_logits(sd, c, ids, hidden=None):
    """Phi-3-small's forward written out from the formulas in plain torch, per head and per query: the checkpoint's
    tensors (sd, by their Hub names) and config.json (c) in, logits (T, V) out; ids (T,). hidden: a list that gets
    each layer's input, then the final norm's output (transformers' hidden_states, as the original code collects)."""
    T, H, KV, hd = (
        len(ids),
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["hidden_size"] // c["num_attention_heads"],
    )
    bs, local, stride = c["blocksparse_block_size"], c["blocksparse_num_local_blocks"], c["blocksparse_vert_stride"]
    inv_freq = 1.0 / c["rope_embedding_base"] ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(T)[:, None].float() * c["rope_position_scale"] * inv_freq  # (T, hd / 2)
    cos, sin = ang.cos(), ang.sin()

    def ln(x, n):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[n + ".weight"], sd[n + ".bias"], 1e-5)

    def lin(x, n):
        return x @ sd[n + ".weight"].T + sd[n + ".bias"]

    def rot(x):  # (T, hd): dim j pairs with dim j + hd / 2
        x1, x2 = x[:, : hd // 2], x[:, hd // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = sd["model.embed_tokens.weight"][ids] * c["mup_embedding_multiplier"]
    for i in range(c["num_hidden_layers"]):
        (hidden if hidden is not None else []).append(x)
        p = f"model.layers.{i}."
        qkv = lin(ln(x, p + "input_layernorm"), p + "self_attn.query_key_value").view(T, KV, H // KV + 2, hd)
        sparse = (i + 1) % c["dense_attention_every_n_layers"] != 0
        heads = []
        for h in range(H):
            q, k, v = (
                rot(qkv[:, h // (H // KV), h % (H // KV)]),
                rot(qkv[:, h // (H // KV), -2]),
                qkv[:, h // (H // KV), -1],
            )
            scores = q @ k.T * c["mup_attn_multiplier"] / hd
            t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]  # query and key positions
            qb, kb = t // bs, s // bs
            seen = (s <= t) & (not sparse or (qb - kb < local) | ((kb + h * max(1, stride // H) + 1) % stride == 0))
            scores = scores.masked_fill(~seen, float("-inf"))
            heads.append(scores.softmax(-1) @ v)
        x = x + lin(torch.cat(heads, -1), p + "self_attn.dense")
        up = lin(ln(x, p + "post_attention_layernorm"), p + "mlp.up_proj")
        gate, linear, limit = up[:, 0::2], up[:, 1::2], c["gegelu_limit"]
        gate, linear = gate.clamp(max=limit), linear.clamp(-limit, limit)
        x = x + lin(gate * torch.sigmoid(1.702 * gate) * (linear + 1), p + "mlp.down_proj")
    x = ln(x, "model.final_layernorm")
    (hidden if hidden is not None else []).append(x)
    logits = x @ sd["model.embed_tokens.weight"].T / c["mup_width_multiplier"]
    logits[:, phi.SMALL_DUMMY_IDS] = float("-inf")
    return logits


def test_phi3small_matches_a_plain_torch_transcription(tmp_path):
    """Independent of mlx-lm: 200 tokens (7 blocks of 32: the early ones fall out of a query's local window unless its
    head's stride keeps them); the original's head step max(1, vert_stride // heads) with fewer heads than the stride
    (2 heads, stride 8: head 1 keeps block 3 where mlx-lm's h + 1 would keep block 6)."""
    from safetensors.torch import load_file

    for over in ({}, dict(num_attention_heads=2, num_key_value_heads=1, blocksparse_vert_stride=8)):
        ours = small_model(**over)
        path = saved(ours, tmp_path / str(len(over)))
        sd, c = load_file(path / "model.safetensors"), json.loads((path / "config.json").read_text())
        ids = small_ids(200)
        with torch.no_grad():
            ref, got = reference_small_logits(sd, c, ids[0]), ours(ids)[0]
        e = record("logits phi3small vs plain torch T=200", err(got[:, REAL_IDS], ref[:, REAL_IDS]))
        assert e <= TOL, (over, e)


def test_phi3small_decode_and_left_padding_equal_the_full_forward(tmp_path):
    """The KV cache (a prefill of more queries than one chunk of block_sparse_attention, then generate.py's decode
    step, whose mask spans all slots), and a left-padded row of a batch: the same logits as the row in one forward."""
    model, ids = small_model(), small_ids(200, B=2)
    with torch.no_grad():
        full = model(ids)
        stepped = stepped_logits(model, generate.decode_one_token, ids, 150, phi.KVCache(model.config, 2, 200))
        short = small_ids(110, seed=2)
        batch = torch.cat([torch.zeros(1, 40, dtype=torch.long), short], 1)
        mask = torch.cat([torch.zeros(1, 40), torch.ones(1, 110)], 1).long()
        padded = model(torch.cat([batch, ids[:1, :150]]), attention_mask=torch.cat([mask, torch.ones(1, 150).long()]))
        alone = model(short)
    assert record("phi3small decode vs full", err(stepped, full[:, 150:])) <= TOL
    assert record("phi3small left padding", err(padded[0, 40:], alone[0])) <= TOL
    assert err(padded[1], full[0, :150]) <= TOL


def test_phi3small_greedy_equals_mlx_lm_greedy(tmp_path):
    """generate.generate (prefill, compiled-shape decode steps) against mlx-lm's argmax loop through its cache."""
    import mlx.core as mx
    import mlx_lm.models.phi3small as small
    from mlx_lm.models.cache import make_prompt_cache

    model, prompt = small_model(), small_ids(64)
    ours = list(generate.generate(model, prompt, max_new_tokens=40, eos_ids=[]))
    ref_model, additive = mlx_small(saved(model, tmp_path))
    cache, x, ref = make_prompt_cache(ref_model), mx.array(prompt.numpy()), []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(small, "create_attention_mask", additive)
        for _ in range(40):
            ref.append(mx.argmax(ref_model(x, cache=cache)[0, -1]).item())
            x = mx.array([[ref[-1]]])
    assert ours == ref


def test_phi3small_saves_the_hub_layout_and_loads_back(tmp_path):
    from safetensors import safe_open

    model = small_model()
    path = saved(model, tmp_path)
    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.final_layernorm.bias" in names
    layer = {n.split(".", 3)[3] for n in names if n.startswith("model.layers.0.")}
    assert layer == {
        f"{m}.{w}"
        for m in ("input_layernorm", "post_attention_layernorm", "self_attn.query_key_value", "self_attn.dense")
        + ("mlp.up_proj", "mlp.down_proj")
        for w in ("weight", "bias")
    }
    again, ids = phi.Phi.from_pretrained(path), small_ids(80)
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert again.lm_head.weight is again.embed.weight


def test_phi3small_classification_heads_pool_and_pad_like_the_causal_model(tmp_path):
    """Phi-3-small's trunk under the sequence and token classification heads: a left-padded row scores as it does
    alone (its block-sparse layers follow positions, not slots), and the score head saves and loads back."""
    lm = small_model(pad_token_id=100257)
    ids, short = small_ids(100), small_ids(70, seed=2)
    batch = torch.cat([ids, torch.cat([torch.full((1, 30), 100257), short], 1)])
    mask = torch.cat([torch.ones(1, 100), torch.cat([torch.zeros(1, 30), torch.ones(1, 70)], 1)]).long()
    for cls in (phi.PhiForSequenceClassification, phi.PhiForTokenClassification):
        model = cls(lm.config).eval()
        model.load_state_dict({**lm.state_dict(), "score.weight": torch.randn_like(model.score.weight)}, strict=False)
        with torch.no_grad():
            got, alone = model(batch, attention_mask=mask), model(short)
            hidden = phi.PhiModel.forward(model, short)
            again = cls.from_pretrained(saved(model, tmp_path / cls.__name__))(short)
        if cls is phi.PhiForSequenceClassification:
            assert err(got[1], alone[0]) <= TOL and err(alone, model.score(hidden[:, -1])) <= TOL
        else:
            assert err(got[1, 30:], alone[0]) <= TOL
        assert err(again, alone) <= TOL


def test_phi3small_dense_layers_take_flash_with_the_mup_scale():
    """With flash-attn, Phi-3-small's dense layers call it (softmax_scale = mup_attn_multiplier / head_dim, not
    flash's 1/sqrt(head_dim)); its block-sparse layers keep SDPA under their mask. Same logits, prompt and decode."""
    model, ids = small_model(), small_ids(150, B=2)
    scales = []

    def flash(*args, **kw):
        scales.append(kw["softmax_scale"])
        return fake_flash_attn_func(*args, **kw)

    with torch.no_grad():
        want = model(ids)
        model.flash_attn = flash
        cache = phi.KVCache(model.config, 2, 150)
        got = torch.cat(
            [model(ids[:, :140], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(140, 150)], 1
        )
    assert len(scales) == 2 * 11 and set(scales) == {1.5 / 16}  # 2 dense layers, 11 calls each
    assert record("phi3small flash path", err(got, want)) <= TOL


# -----------------------------------------------------------------------------------------------------------------
# Hidden states and input embeddings


@pytest.mark.parametrize("name", ["phi-2", "phi3-gqa-window", "phimoe"])
def test_hidden_states_match_transformers_with_padding_and_after_a_cached_decode(name, tmp_path):
    """output_hidden_states: transformers' num_layers + 1 tensors (the embedding output, each layer's, the last after
    the final norm) on a left-padded batch (real positions compared), the logits unchanged beside them; then a prefill
    and one-token decode steps through the KV cache give each position's hidden states of the full forward."""
    ours, ref = from_transformers(name, tmp_path, num_hidden_layers=3)
    ids, mask = ids_for(14), torch.ones(2, 14, dtype=torch.long)
    mask[1, :5] = 0
    pos, real = (mask.cumsum(-1) - 1).clamp(min=0), mask.bool()
    with torch.no_grad():
        logits, got = ours(ids, attention_mask=mask, output_hidden_states=True)
        want = ref(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
        assert len(got) == len(want) == 4 and torch.equal(logits, ours(ids, attention_mask=mask))
        e = record(f"hidden states {name} vs transformers", max(err(a[real], b[real]) for a, b in zip(got, want)))
        assert e <= TOL, e
        full = ours(ids, output_hidden_states=True)[1]
        cache = phi.KVCache(ours.config, 2, 14)
        steps = [ours(ids[:, :9], cache=cache, output_hidden_states=True)[1]]
        steps += [ours(ids[:, t : t + 1], cache=cache, output_hidden_states=True)[1] for t in range(9, 14)]
        stepped = [torch.cat([s[layer] for s in steps], 1) for layer in range(4)]
    e = record(f"hidden states {name} decode vs full", max(err(a, b) for a, b in zip(stepped, full)))
    assert e <= TOL, e


def test_phi3small_hidden_states_match_the_plain_torch_transcription(tmp_path):
    """Phi-3-small (no transformers class): its hidden states against the transcription of its formulas, whose first
    one carries mup_embedding_multiplier (10 here) as the original code's does."""
    from safetensors.torch import load_file

    ours = small_model()
    path = saved(ours, tmp_path)
    sd, c = load_file(path / "model.safetensors"), json.loads((path / "config.json").read_text())
    ids, want = small_ids(100), []
    with torch.no_grad():
        reference_small_logits(sd, c, ids[0], want)
        got = ours(ids, output_hidden_states=True)[1]
    assert len(got) == len(want) == c["num_hidden_layers"] + 1
    e = record("hidden states phi3small vs plain torch", max(err(a[0], b) for a, b in zip(got, want)))
    assert e <= TOL, e


@pytest.mark.parametrize("name", ["phi-1.5", "phi3-128k-longrope", "phimoe", "phi3small"])
def test_inputs_embeds_equal_ids_alone_and_before_a_cached_decode(name, tmp_path):
    """model(inputs_embeds=embed(ids)) == model(ids) (Phi-3-small's multiplier applied to both, as its code does); a
    prompt given as embeddings, then ids decoded through the cache, == the full forward; the classification heads
    take them too (sequence classification then reads the last position, as transformers' does)."""
    model = small_model() if name == "phi3small" else from_transformers(name, tmp_path)[0]
    ids = small_ids(20, B=2) if name == "phi3small" else ids_for(20)
    with torch.no_grad():
        full, E = model(ids), model.embed(ids)
        assert err(model(inputs_embeds=E), full) == 0.0
        cache = phi.KVCache(model.config, 2, 20)
        got = torch.cat([model(inputs_embeds=E[:, :12], cache=cache)] + [model(ids[:, 12:], cache=cache)], 1)
        assert record(f"inputs_embeds {name} then cached ids", err(got, full)) <= TOL
        if name == "phi3small":
            assert err(model(inputs_embeds=E / model.config.mup_embedding_multiplier), full) > 1.0  # (it applies)
            return
        save = tmp_path / "clf"
        model.save_pretrained(save)
        clf = phi.PhiForSequenceClassification.from_pretrained(save, num_labels=3)
        assert err(clf(inputs_embeds=E), clf(ids)) == 0.0  # (no pads in ids: both read the last position)
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model(ids, inputs_embeds=E)


def test_inputs_embeds_cannot_cross_longrope_original_context_in_the_cache(tmp_path):
    """LongRoPE re-runs the cache from its token ids when it crosses the original context (32 here): a prompt given as
    embeddings cannot be re-run: one clear error, not a silently wrong answer."""
    model = from_transformers("phi3-128k-longrope", tmp_path)[0]
    ids = ids_for(40)
    cache = phi.KVCache(model.config, 2, 40)
    with torch.no_grad():
        model(inputs_embeds=model.embed(ids[:, :30]), cache=cache)
        model(ids[:, 30:32], cache=cache)
        with pytest.raises(ValueError, match="inputs_embeds cannot cross"):
            model(ids[:, 32:33], cache=cache)


def test_hidden_states_through_the_longrope_rerun_equal_the_full_forward(tmp_path):
    """Decoding across LongRoPE's original context (32) re-runs the cache with the long factors: each step returns
    its own position's hidden states, as the full forward over the tokens so far has them."""
    model = from_transformers("phi3-128k-longrope", tmp_path)[0]
    ids, cache = ids_for(36), phi.KVCache(model.config, 2, 36)
    with torch.no_grad():
        model(ids[:, :30], cache=cache)
        for t in range(30, 36):
            got = model(ids[:, t : t + 1], cache=cache, output_hidden_states=True)[1]
            want = model(ids[:, : t + 1], output_hidden_states=True)[1]
            e = record("hidden states longrope rerun vs full", max(err(a, b[:, -1:]) for a, b in zip(got, want)))
            assert e <= TOL and got[0].shape[1] == 1, (t, e)
    assert cache.long
