"""Tests for phi.py against transformers (the oracle) on tiny random configs, plus the real Hub config.json files.

Run: python -m pytest -q
- PHI_REFERENCE: the shared reference data (default ../shared/reference); tests that need it skip without it,
  unless PHI_REQUIRE_REFERENCE=1 (.ci/run sets it): then a missing folder fails test_reference_data_is_complete.
- PHI_ORACLE_442: a Python with transformers==4.42.4 (default .venv-hf442/bin/python, built by .ci/run), the last
  version whose Phi-3 has the original "su" and "yarn" rotary classes; 4.43+ folds both into "longrope".
"""

import contextlib
import copy
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import torch
import transformers

import generate
import phi
import train

ROOT = Path(__file__).resolve().parent
REF = Path(os.environ.get("PHI_REFERENCE", ROOT.parent / "shared" / "reference"))
ORACLE_442 = Path(os.environ.get("PHI_ORACLE_442", ROOT / ".venv-hf442" / "bin" / "python"))
TOL = 1e-4  # fp32 max abs logits error allowed
ERRORS = {}  # measured parity errors, printed at the end of the run (pytest -s, or in the summary)


NEEDED = set()  # the reference paths some test needs: all must exist under PHI_REQUIRE_REFERENCE=1


def needs_reference(sub):
    p = REF / sub
    NEEDED.add(p)
    return pytest.mark.skipif(not p.exists(), reason=f"reference data {p} not found (set PHI_REFERENCE)")


def test_reference_data_is_complete():
    """CI (PHI_REQUIRE_REFERENCE=1) fails here, instead of skipping tests, when a reference folder is missing."""
    if os.environ.get("PHI_REQUIRE_REFERENCE") != "1":
        pytest.skip("PHI_REQUIRE_REFERENCE is not 1: tests without their reference data skip")
    assert NEEDED and not [str(p) for p in sorted(NEEDED) if not p.exists()]


def factors(n, seed, lo=1.0, hi=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * (hi - lo) + lo).tolist()


def rope(kind, rotary_dim):
    return {
        "type": kind,
        "short_factor": factors(rotary_dim // 2, 1, 1.0, 1.5),
        "long_factor": factors(rotary_dim // 2, 2),
    }


# name -> (model_type, HF config kwargs, sequence lengths to test). Tiny, but each keeps the real model's shape ratios.
BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CASES = {
    "phi-1.5": ("phi", dict(partial_rotary_factor=0.5), [16]),
    "phi-2": ("phi", dict(hidden_size=80, partial_rotary_factor=0.4), [16]),  # head 20, rotary 8 (phi-2: 80, 32)
    "phi-2-qk-layernorm": ("phi", dict(hidden_size=80, partial_rotary_factor=0.4, qk_layernorm=True), [16]),
    "phi3-4k": ("phi3", dict(max_position_embeddings=64, original_max_position_embeddings=64), [16]),
    "phi3-gqa-window": ("phi3", dict(num_key_value_heads=2, sliding_window=6), [20]),
    "phi3-128k-longrope": (
        "phi3",
        dict(max_position_embeddings=256, original_max_position_embeddings=32, rope_scaling=rope("longrope", 16)),
        [20, 48],
    ),
    "phi4-mini": (
        "phi3",
        dict(
            num_key_value_heads=2,
            partial_rotary_factor=0.75,
            tie_word_embeddings=True,
            max_position_embeddings=256,
            original_max_position_embeddings=32,
            rope_scaling=rope("longrope", 12),
        ),
        [20, 48],
    ),
    # Phi-3.5-MoE: 4 experts (16 real), q/k/v/o and lm_head biases, GQA, a window, LongRoPE with its own mscales
    "phimoe": (
        "phimoe",
        dict(num_key_value_heads=2, num_local_experts=4, intermediate_size=48, attention_bias=True, lm_head_bias=True),
        [16],
    ),
    "phimoe-longrope": (
        "phimoe",
        dict(
            num_key_value_heads=2,
            num_local_experts=4,
            intermediate_size=48,
            attention_bias=True,
            lm_head_bias=True,
            sliding_window=24,
            max_position_embeddings=256,
            original_max_position_embeddings=32,
            rope_scaling=dict(
                rope("longrope", 16), short_mscale=1.1, long_mscale=1.25, original_max_position_embeddings=32
            ),
        ),
        [20, 48],
    ),
}
HF_CLASSES = {"phi": "Phi", "phi3": "Phi3", "phimoe": "Phimoe"}


def remote_code_rotary(self, x, position_ids):
    """Phi-3.5-MoE's rotary as its checkpoint's own code (modeling_phimoe.py on the Hub; transformers 4.46) computes
    it: long_factor and long_mscale once the sequence (max position + 1) passes original_max_position_embeddings.
    transformers 5.23's PhimoeRotaryEmbedding keeps the short factors there; the phimoe test models use this."""
    rp = self.config.rope_parameters
    seq_len = int(position_ids.max()) + 1
    long = rp["rope_type"] != "default" and seq_len > rp["original_max_position_embeddings"]
    if rp["rope_type"] == "default":
        inv_freq, scale = self.rope_init_fn(self.config)
    else:  # transformers' longrope formula: the long factors when seq_len > original_max_position_embeddings
        inv_freq, _ = self.rope_init_fn(self.config, x.device, seq_len)
        scale = rp["long_mscale"] if long else rp["short_mscale"]
    freqs = position_ids[..., None].float() * inv_freq.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def hf_model(name, head="ForCausalLM", **over):
    """A transformers model of case `name` with random weights of a size that makes logits O(1..10)."""
    kind, kw, _ = CASES[name]
    config_cls = getattr(transformers, HF_CLASSES[kind] + "Config")
    cfg = config_cls(**{**BASE, **kw, **over}, attn_implementation="eager")
    torch.manual_seed(0)
    model = getattr(transformers, HF_CLASSES[kind] + head)(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if "embed" in n else 0.15)
    return with_checkpoint_rotary(model) if kind == "phimoe" else model


def with_checkpoint_rotary(model):
    """A transformers phimoe model (a head, or the bare PhimoeModel) with the checkpoint's own rotary past the
    original context (remote_code_rotary)."""
    rotary = getattr(model, "model", model).rotary_emb
    rotary.forward = remote_code_rotary.__get__(rotary)
    return model


def saved(model, path):
    model.save_pretrained(path)
    return path


def from_transformers(name, path, head="ForCausalLM", cls=phi.Phi, **over):
    """(ours, transformers' model): case `name` built by transformers, saved to path, loaded by phi.py."""
    ref = hf_model(name, head, **over)
    return cls.from_pretrained(saved(ref, path)), ref


def tiny_config(**over):
    """A tiny phi.PhiConfig for tests that build our model directly; keyword arguments change it."""
    base = dict(
        model_type="phi",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        initializer_range=0.1,
    )
    return phi.PhiConfig(**{**base, **over})


def python_env(**extra):
    """The environment of a Python subprocess that imports this project's files."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **{k: str(v) for k, v in extra.items()}}


def hub_repo(home, repo_id, commit, refs=("main",)):
    """The Hugging Face cache layout under home: hub/models--org--name/snapshots/<commit> (returned, created) and
    refs/<ref> naming that commit."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def assert_one_line_error(r, prog, message, code):
    """A run that failed as the README promises: exit code `code`, no traceback, and its last stderr line is
    "<prog>: error: <message>"."""
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"{prog}: error: {message}", r.stderr


@pytest.fixture
def fresh_compiler():
    """torch.compile starts from nothing and leaves nothing behind (its caches would carry over between tests)."""
    torch._dynamo.reset()
    yield


def compiled_step(**kw):
    return torch.compile(generate.decode_one_token, fullgraph=True, **kw)


def err(a, b):
    return (a.float() - b.float()).abs().max().item()


def record(key, value):
    ERRORS[key] = max(ERRORS.get(key, 0.0), value)
    return value


@pytest.fixture(scope="session", autouse=True)
def report_errors():
    yield
    if ERRORS:
        print("\nmeasured max abs errors:\n" + "\n".join(f"  {k}: {v:.2e}" for k, v in sorted(ERRORS.items())))


def ids_for(T, B=2, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)


def stepped_logits(model, step, ids, k, cache):
    """Prefill ids[:, :k] into cache, then one decode step per later token: their logits (B, T - k, V). (.clone():
    a CUDA graph's output is overwritten by its next replay.)"""
    generate.prefill(model, ids[:, :k], None, cache)
    return torch.stack([step(model, ids[:, t], cache).clone() for t in range(k, ids.shape[1])], 1)


# ---------------------------------------------------------------------------------------------------------------
# Logit parity, KV cache, padding


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


# ---------------------------------------------------------------------------------------------------------------
# Su / YaRN against transformers 4.42.4 (in its own virtualenv) and su against 5.x


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


# ---------------------------------------------------------------------------------------------------------------
# Heads


def classification_inputs():
    ids = ids_for(10, B=3)
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0  # right padding with the pad id
    ids[2, :3], mask[2, :3] = 0, 0  # left padding
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


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


# ---------------------------------------------------------------------------------------------------------------
# Saving, sharding, legacy names


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


# ---------------------------------------------------------------------------------------------------------------
# Real configs


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
def test_phi3_small_is_a_clear_unsupported_error():
    with pytest.raises(ValueError, match=r"'phi3small' \(Phi-3-small\) is not supported yet; supported: phi"):
        phi.PhiConfig.from_hf(json.loads((REF / "configs/Phi-3-small-8k-instruct.json").read_text()))


# ---------------------------------------------------------------------------------------------------------------
# Error paths


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


def test_kv_cache_overflow_is_an_error(tmp_path):
    model = from_transformers("phi-1.5", tmp_path)[0]
    cache = phi.KVCache(model.config, 2, 8)
    with pytest.raises(ValueError, match=r"KV cache full: 0 \+ 9 tokens > max_len 8"):
        model(ids_for(9), cache=cache)


# ---------------------------------------------------------------------------------------------------------------
# fp16, bf16, flash-attn


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


def fake_flash_attn_func(q, k, v, dropout_p=0.0, causal=False, window_size=(-1, -1)):
    """flash_attn_func's documented semantics in plain torch: (B, T, H, hd) layout, GQA by head groups, causal mask
    aligned to the bottom-right corner, and key j visible from query i iff i + S - T - left <= j <= i + S - T + right."""
    B, T, H, D = q.shape
    S, KV = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // KV, 2), v.repeat_interleave(H // KV, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / D**0.5
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


# ===============================================================================================================
# Tokenizers (generate.py) against the reference libraries on the real vocabularies of each family


TOK = REF / "tokenizers"
FAMILIES = ["codegen", "phi3", "phi4", "phi4mini"]
_tokenizers, _oracles = {}, {}


def our_tokenizer(family):
    if family not in _tokenizers:
        _tokenizers[family] = generate.load_tokenizer(TOK / family)
    return _tokenizers[family]


def oracle(family):
    """The Hugging Face `tokenizers` library on the same tokenizer.json (what transformers runs underneath)."""
    import tokenizers

    if family not in _oracles:
        _oracles[family] = tokenizers.Tokenizer.from_file(str(TOK / family / "tokenizer.json"))
    return _oracles[family]


def oracle_encode(family, text, specials=True):
    ref = oracle(family)
    ref.encode_special_tokens = not specials  # True: special tokens in the text are plain text
    return ref.encode(text, add_special_tokens=False).ids


PIECES = {
    "code": [
        "def f(x):\n",
        "\treturn x\n",
        "    if a == b:\n",
        "        pass",
        "class A:\n\t\tpass\n",
        "x = [1, 2, 3]",
        "  # comment\n",
        "for (int i = 0; i < n; ++i) {\r\n",
        "}\r\n",
        "print(f'{x!r}')",
        "it's",
        "they'LL",
        "we've",
        "I'm",
        "...",
        "--",
        "::",
        "=>",
        "0x1F",
        "3.14159",
        "1234567890",
        "\\n",
        '"quoted"',
        "a_b",
        "CamelCase",
    ],
    "space": [
        " ",
        "  ",
        "   ",
        "    ",
        "     ",
        " " * 17,
        " " * 40,
        "\t",
        "\t\t",
        "\t\t\t\t",
        "\n",
        "\n\n",
        "\r\n",
        " \n ",
        "\u00a0",
        "\u3000",
        "\u2009",
        "\x0b",
        "\x0c",
        "\u2028",
    ],
    "words": [
        "hello",
        "Hello",
        " world",
        "The",
        " quick brown fox",
        "naïve café",
        "Привет мир",
        "Γειά σου",
        "生活的真谛是",
        "日本語のテキスト",
        "한국어 텍스트",
        "مرحبا بالعالم",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "שלום עולם",
        "Ünïcödé",
        "ß",
        "İstanbul",
        "ﬁ",
        "Z̤͔ͧ̑̓ä͖̭̈̇",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "½ ⅓ ∑ ∞ ≠",
        "Führer",
        "Äpfel",
    ],
    "emoji": ["🤗", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🙂🙃", "🐍"],
    "control": ["\x00", "\x01", "\x07", "\x17", "\x1b[0m", "\x7f", "\u200b", "\ufeff", "\x1c", "\x1f"],
    "lookalike": ["<|", "|>", "<|end", "<|user|", "<s>", "</s>", "<unk>", "<|im_start|", "<<|end|>>"],
}


def fuzz_strings(family, n=2000):
    """Deterministic random texts: code, whitespace runs, CRLF, many scripts, emoji, control characters, the
    family's own special tokens inside text, random code points, and the empty string."""
    rng = random.Random(family)
    specials = list(our_tokenizer(family).added)
    out = [""]
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.choice(list(PIECES) + ["special", "random"])
            if kind == "special":
                parts.append(rng.choice(specials))
            elif kind == "random":
                parts.append(
                    "".join(
                        chr(
                            rng.choice(
                                [rng.randint(0x20, 0x2FF), rng.randint(0x370, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]
                            )
                        )
                        for _ in range(rng.randint(1, 4))
                    )
                )
            else:
                parts.append(rng.choice(PIECES[kind]))
        out.append("".join(parts))
    return out


def read_vectors(name):
    texts = (TOK / "vectors" / f"{name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (TOK / "vectors" / f"{name}.out").read_text().split("\n")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]


@needs_reference("tokenizers")
@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_matches_reference_on_fuzz_strings(family):
    tok, mismatches = our_tokenizer(family), []
    for s in fuzz_strings(family):
        got, want = tok.encode(s), oracle_encode(family, s)
        if got != want:
            mismatches.append((s, got, want))
        assert tok.decode(want) == oracle(family).decode(want, skip_special_tokens=False), repr(s)
        plain = tok.encode(s, allowed_special=set())
        if plain != oracle_encode(family, s, specials=False):
            mismatches.append((s, plain, "specials as text"))
        # Round trip. Not through a non-special added token (matched even then) that eats whitespace (Phi-3's
        # "</s>", Phi-4-mini's "<|tool_call|>"), nor in SentencePiece, which puts a "▁" before the text after it.
        if not any(
            c in s
            for c, a in tok.added.items()
            if not a["special"] and (a["lstrip"] or a["rstrip"] or tok.sentencepiece)
        ):
            assert tok.decode(plain) == s, f"round trip of {s!r}"
    assert not mismatches, f"{len(mismatches)} of 2000 differ, e.g. {mismatches[0]}"


@needs_reference("tokenizers/vectors")
@pytest.mark.parametrize("name", ["ggml-vocab-phi-3.gguf", "llama-cpp-python-0.3.36.ggml-vocab-phi-3.gguf"])
def test_phi3_llama_cpp_vectors(name, tmp_path):
    """llama.cpp's Phi-3 vectors (SentencePiece's ids), through tokenizer.json and through tokenizer.model alone."""
    shutil.copy(TOK / "phi3" / "tokenizer.model", tmp_path)
    from_model = generate.load_tokenizer(tmp_path)
    for text, ids in read_vectors(name):
        assert our_tokenizer("phi3").encode(text) == ids, repr(text)
        assert from_model.encode(text) == ids, repr(text)


@needs_reference("tokenizers/vectors")
def test_gpt2_llama_cpp_vectors(tmp_path):
    """llama.cpp's GPT-2 vectors: plain GPT-2 BPE (codegen's vocab.json + merges.txt, without phi's added
    whitespace tokens) matches all of them; the full phi tokenizer matches the reference on the same texts."""
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(TOK / "codegen" / f, tmp_path)
    gpt2 = generate.load_tokenizer(tmp_path)
    for text, ids in read_vectors("ggml-vocab-gpt-2.gguf"):
        assert gpt2.encode(text) == ids, repr(text)
        assert our_tokenizer("codegen").encode(text) == oracle_encode("codegen", text), repr(text)


@needs_reference("tokenizers")
@pytest.mark.parametrize(
    "family,files",
    [
        ("codegen", ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json")),
        ("phi3", ("tokenizer.model", "tokenizer_config.json")),  # added tokens and rstrip flags from the config
    ],
)
def test_tokenizer_without_tokenizer_json_matches_reference(family, files, tmp_path):
    """The other files a checkpoint may ship instead of tokenizer.json give the same ids as tokenizer.json."""
    for f in files:
        shutil.copy(TOK / family / f, tmp_path)
    tok = generate.load_tokenizer(tmp_path)
    for s in fuzz_strings(family, 500):
        assert tok.encode(s) == oracle_encode(family, s), repr(s)


@needs_reference("tokenizers")
def test_phi3_tokenizer_model_against_sentencepiece(tmp_path):
    """tokenizer.model read by our own protobuf reader: same ids as the sentencepiece library."""
    import sentencepiece

    shutil.copy(TOK / "phi3" / "tokenizer.model", tmp_path)
    tok = generate.load_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOK / "phi3" / "tokenizer.model"))
    for s in fuzz_strings("phi3"):
        assert tok.encode(s) == sp.encode(s), repr(s)
        assert tok.decode(sp.encode(s)) == sp.decode(sp.encode(s)), repr(s)


@needs_reference("tokenizers/vectors")
def test_onnxruntime_extensions_vectors(tmp_path):
    cases = {
        c["name"]: c
        for c in json.loads((TOK / "vectors/onnxruntime-extensions.expected_ids.json").read_text())["cases"]
    }
    c = cases["phi3_blob_add_bos"]
    shutil.copy(TOK / "phi3/variants/phi-3.tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(TOK / "phi3/variants/phi-3.tokenizer_config.json", tmp_path / "tokenizer_config.json")
    variant = generate.load_tokenizer(tmp_path)
    assert variant.add_bos and variant.encode(c["text"], bos=True) == c["ids"]
    assert variant.encode(c["text"]) == cases["phi3_blob_no_special"]["ids"]
    c = cases["phi4_chat_template"]
    assert our_tokenizer("phi4").render_chat(c["messages"]) == c["text"]
    assert our_tokenizer("phi4").encode(c["text"]) == c["ids"]
    assert our_tokenizer("phi4").decode(c["ids"], skip_special=True) == c["decoded_skip_special"]
    c = cases["phi4_mini_reasoning_chat_template"]
    assert our_tokenizer("phi4mini").encode(c["text"]) == c["ids"]


@needs_reference("tokenizers")
def test_phi3_small_cl100k(tmp_path):
    """Phi-3-small: cl100k_base ranks + its specials, against tiktoken's own cl100k encoding of the same file."""
    shutil.copy(TOK / "tiktoken" / "cl100k_base.tiktoken", tmp_path)
    shutil.copy(TOK / "phi3small" / "tokenizer_module.json", tmp_path)
    tok = generate.load_tokenizer(tmp_path)
    assert tok.encode("This is a test.") == [2028, 374, 264, 1296, 13]
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    specials = {
        a["content"]: a["id"] for a in json.loads((tmp_path / "tokenizer_module.json").read_text())["added_tokens"]
    }
    ref = tiktoken.Encoding(
        "cl100k",
        pat_str=generate.CL100K_PATTERN,
        special_tokens=specials,
        mergeable_ranks=load_tiktoken_bpe(str(tmp_path / "cl100k_base.tiktoken")),
    )
    for s in fuzz_strings("phi4", 500):
        assert tok.encode(s) == ref.encode(s, allowed_special="all"), repr(s)


@needs_reference("tokenizers")
@pytest.mark.parametrize("family", FAMILIES)
def test_stream_decoder_never_splits_characters(family):
    tok = our_tokenizer(family)
    for s in fuzz_strings(family, 300)[1:]:
        ids = tok.encode(s, allowed_special=set())
        stream = tok.stream()
        chunks = [stream.push(i) for i in ids]
        assert "".join(chunks) == tok.decode(ids)
        assert not any("\ufffd" in c for c in chunks)
        # continuing after a prompt: the first new token keeps its leading space (SentencePiece "▁")
        prompt = tok.encode("Say:")
        stream = tok.stream(context=prompt)
        assert "".join(stream.push(i) for i in ids) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]


@needs_reference("tokenizers")
@pytest.mark.parametrize("family", ["phi3", "phi4", "phi4mini"])
def test_chat_rendering_matches_apply_chat_template(family):
    """Our per-family chat formats against transformers' apply_chat_template on the checkpoint's own template."""
    ref = transformers.AutoTokenizer.from_pretrained(TOK / family)
    tok = our_tokenizer(family)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?\n  Explain."},
        ],
    ]
    if family == "phi4mini":
        conversations.append(
            [{"role": "system", "content": "Use tools.", "tools": '[{"name": "f"}]'}, {"role": "user", "content": "Go"}]
        )
    for messages in conversations:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.render_chat(messages, add_generation_prompt=gen) == want
            assert tok.encode(want) == oracle_encode(family, want)


@needs_reference("tokenizers")
def test_phi2_chat_format():
    tok = our_tokenizer("codegen")
    assert generate.chat_format(tok) == "phi2"
    assert tok.render_chat([{"role": "user", "content": "Name a prime."}]) == "Instruct: Name a prime.\nOutput:"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files \(looked for tokenizer.json, vocab.json"):
        generate.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match=r"tokenizer.json: model type 'Unigram' is not supported \(BPE only\)"):
        generate.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer.json: not valid JSON"):
        generate.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"role 'robot' is not one of system, user, assistant"):
        generate.render_chat("phi3", [{"role": "robot", "content": "x"}])


@needs_reference("tokenizers")
def test_load_tokenizer_from_offline_hub_cache(tmp_path):
    """A Hub id resolves from a pre-filled Hugging Face cache with HF_HUB_OFFLINE=1 (no network here); an id
    missing from the cache is one clear error."""
    snap = hub_repo(tmp_path, "microsoft/phi-2", "0" * 40)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(TOK / "codegen" / f, snap)
    script = (
        "import generate, sys\n"
        "print(generate.load_tokenizer('microsoft/phi-2').encode('def print_prime(n):'))\n"
        "try:\n    generate.load_tokenizer('microsoft/not-cached')\n"
        "except FileNotFoundError as e:\n    print(e)\n"
    )
    env = python_env(HF_HOME=tmp_path, HF_HUB_OFFLINE=1)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ids, err_line = r.stdout.strip().split("\n")
    assert json.loads(ids) == oracle_encode("codegen", "def print_prime(n):")
    assert (
        err_line
        == "'microsoft/not-cached' is not a local directory and is not in the Hugging Face cache (offline, or the Hub is unreachable)"
    )


# ===============================================================================================================
# generate.py: checkpoints in an offline Hugging Face cache, greedy parity with transformers, sampling, CLI

GEN_CASES = {  # name -> (CASES entry, tokenizer family, HF config overrides matching that tokenizer)
    "phi-2": ("phi-2", "codegen", dict(vocab_size=51200, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)),
    "phi3-4k": (
        "phi3-4k",
        "phi3",
        dict(
            vocab_size=32064,
            bos_token_id=1,
            eos_token_id=32000,
            pad_token_id=32000,
            max_position_embeddings=128,
            original_max_position_embeddings=128,
        ),
    ),
    "phi3-longrope": (
        "phi3-128k-longrope",
        "phi3",
        dict(vocab_size=32064, bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
    ),
    "phi4-mini": (
        "phi4-mini",
        "phi4mini",
        dict(vocab_size=200064, bos_token_id=199999, eos_token_id=199999, pad_token_id=199999),
    ),
    "phimoe": (  # Phi-3.5-MoE uses the Phi-3 tokenizer
        "phimoe-longrope",
        "phi3",
        dict(vocab_size=32064, bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
    ),
}
PROMPT = "def print_prime(n):\n    # print all primes below n, one per line"  # 15-25 tokens: below LongRoPE's 32


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """An HF_HOME whose hub cache holds test/<name> for every GEN_CASES entry (written by transformers, with the
    real tokenizer files of the family), and the transformers model of each, for the parity checks."""
    if not TOK.exists():
        pytest.skip(f"reference data {TOK} not found (set PHI_REFERENCE)")
    home = tmp_path_factory.mktemp("hf_home")
    refs = {}
    for name, (case, family, over) in GEN_CASES.items():
        snap = hub_repo(home, f"test/{name}", "1" * 40)
        refs[name] = hf_model(case, **over)
        refs[name].save_pretrained(snap)
        for f in (TOK / family).iterdir():
            if f.is_file():
                shutil.copy(f, snap)
    return home, refs


def run_cli(home, *args, stdin=""):
    """generate.main(argv) in this process (a subprocess would add seconds of imports and nothing else), offline
    on the Hugging Face cache under home: (exit code, stdout, stderr). stdout is written as bytes and decoded, so a
    generated "\r\n" stays as it is. test_cli_runs_as_a_program runs generate.py as its own process."""
    out, errs = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline=""), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch.multiple(huggingface_hub.constants, HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE=True)
        )
        stack.enter_context(mock.patch.object(sys, "stdin", io.StringIO(stdin)))
        stack.enter_context(mock.patch.object(generate, "decode_one_token", generate.decode_one_token))  # --compile
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(errs))
        try:
            code = generate.main([str(a) for a in args])
        except SystemExit as e:  # argparse's errors
            code = e.code
    out.flush()
    return subprocess.CompletedProcess(args, code, out.buffer.getvalue().decode(), errs.getvalue())


def snapshot(home, name):
    return home / "hub" / f"models--test--{name}" / "snapshots" / ("1" * 40)


def continuation(tok, prompt, new):
    """The text the command line prints for new tokens after prompt (ids): a SentencePiece tokenizer drops a word's
    leading space at the start of a decode, so decode the two together and cut."""
    return tok.decode(prompt + new)[len(tok.decode(prompt)) :]


def hf_greedy(ref, ids, n=48, **kw):
    out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, **kw)[0, len(ids) :].tolist()
    eos = ref.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return out[: next((i for i, t in enumerate(out) if t in eos), len(out))]  # we stop before the EOS


@needs_reference("tokenizers")
@pytest.mark.parametrize("name", GEN_CASES)
def test_greedy_generation_matches_transformers(name, hub):
    """48 greedy tokens, through the API and through the CLI (streamed), equal transformers' generate(). For
    LongRoPE the prompt is below the original context (32) and generation runs past it."""
    home, refs = hub
    model, tok = generate.load(snapshot(home, name), dtype="float32")
    prompt = tok.encode(PROMPT, bos=tok.add_bos)
    want = hf_greedy(refs[name], prompt)
    if name in ("phi3-longrope", "phimoe"):
        assert len(prompt) < 32 < len(prompt) + len(want)
    assert list(generate.generate(model, prompt, max_new_tokens=48, temperature=0)) == want
    r = run_cli(
        home,
        "--model",
        f"test/{name}",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        48,
        "--temperature",
        0,
        "--dtype",
        "float32",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == continuation(tok, prompt, want) + "\n"
    assert re.search(r"prompt: \d+ tokens, [\d.]+ tokens/s; generation: \d+ tokens, [\d.]+ tokens/s", r.stderr)


@needs_reference("tokenizers")
def test_repetition_penalty_generation_matches_transformers(hub):
    home, refs = hub
    model, tok = generate.load(snapshot(home, "phi3-4k"), dtype="float32")
    prompt = tok.encode(PROMPT)
    want = hf_greedy(refs["phi3-4k"], prompt, 24, repetition_penalty=1.5)
    assert list(generate.generate(model, prompt, 24, temperature=0, repetition_penalty=1.5)) == want
    assert want != hf_greedy(refs["phi3-4k"], prompt, 24)


def test_logits_processing_matches_transformers_processors():
    from transformers.generation import logits_process as lp

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    prev = torch.randint(0, 50, (3, 7), generator=g)
    for temperature, top_k, top_p, penalty in [
        (1.0, 0, 1.0, 1.3),
        (0.7, 0, 1.0, 1.0),
        (1.0, 5, 1.0, 1.0),
        (1.0, 0, 0.8, 1.0),
        (0.6, 10, 0.9, 1.2),
        (1.5, 1, 0.5, 0.8),
    ]:
        want = logits.clone()
        if penalty != 1.0:
            want = lp.RepetitionPenaltyLogitsProcessor(penalty)(prev, want)
        if temperature != 1.0:
            want = lp.TemperatureLogitsWarper(temperature)(prev, want)
        if top_k:
            want = lp.TopKLogitsWarper(top_k)(prev, want)
        if top_p < 1.0:
            want = lp.TopPLogitsWarper(top_p)(prev, want)
        got = generate.process_logits(logits, prev, temperature, top_k, top_p, penalty)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)], atol=1e-6)


@needs_reference("tokenizers")
def test_sampling_seed_topk_batch_stop_and_eos(hub):
    home, _ = hub
    model, tok = generate.load(snapshot(home, "phi-2"), dtype="float32")
    prompt = tok.encode(PROMPT)
    greedy = list(generate.generate(model, prompt, 20, temperature=0))

    def sampled(seed, **kw):
        return list(
            generate.generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
        )

    assert sampled(7) == sampled(7) and sampled(7) != sampled(8)  # a seed reproduces its sample
    assert sampled(7, top_k=1) == sampled(8, top_k=1) == greedy  # top-k 1 is greedy
    # EOS stops: declare the 6th greedy token an EOS id
    assert (
        list(generate.generate(model, prompt, 20, temperature=0, eos_ids={greedy[5]}))
        == greedy[: greedy.index(greedy[5])]
    )
    # a left-padded batch of different lengths equals each prompt alone
    prompts = [prompt, tok.encode("import numpy as np"), tok.encode("x")]
    steps = torch.stack(list(generate.generate_batch(model, prompts, 12, temperature=0, eos_ids=set())), 1)
    for r, p in enumerate(prompts):
        assert steps[r].tolist() == list(generate.generate(model, p, 12, temperature=0, eos_ids=set()))


def batch_texts(tok, steps, eos):
    """The text of each row of generate_batch's steps, up to its first EOS (-1: the row had ended)."""
    rows = torch.stack(steps, 1).tolist()
    return [
        tok.decode([t for t in row[: next((i for i, t in enumerate(row) if t < 0 or t in eos), len(row))]])
        for row in rows
    ]


@needs_reference("tokenizers")
def test_cli_seed_samples_stops_and_batches_equal_the_api(hub):
    """The command line against the API: --seed reproduces; --num-samples at temperature 1 samples each copy of the
    prompt as one seeded batch (the samples differ); several --stop strings cut at the first that appears, in a
    single stream and in each row of a batch; a repeated --prompt is a batch whose rows equal the prompts alone."""
    home, _ = hub
    model, tok = generate.load(snapshot(home, "phi-2"), dtype="float32")
    prompt = tok.encode(PROMPT)
    args = ("--model", "test/phi-2", "--prompt", PROMPT, "--max-new-tokens", 20, "--dtype", "float32")
    a, b = run_cli(home, *args, "--temperature", 1, "--seed", 3), run_cli(home, *args, "--temperature", 1, "--seed", 3)
    want = tok.decode(
        list(generate.generate(model, prompt, 20, temperature=1, generator=torch.Generator().manual_seed(3)))
    )
    assert a.returncode == 0 and a.stdout == b.stdout == want + "\n"
    r = run_cli(home, *args, "--temperature", 1, "--seed", 5, "--num-samples", 2)
    steps = generate.generate_batch(
        model, [prompt, prompt], 20, temperature=1, generator=torch.Generator().manual_seed(5)
    )
    texts = batch_texts(tok, list(steps), model.eos_ids)
    assert texts[0] != texts[1] and r.stdout == f"=== 0 ===\n{texts[0]}\n=== 1 ===\n{texts[1]}\n"
    # stops: the later of two stop strings in the text must not matter; in a batch each row is cut on its own
    full = tok.decode(list(generate.generate(model, prompt, 20, temperature=0)))
    first, later = full[len(full) // 2 : len(full) // 2 + 3], full[-3:]
    assert full.index(first) < full.index(later)
    r = run_cli(home, *args, "--temperature", 0, "--stop", later, "--stop", first)
    assert r.stdout == full[: full.index(first)] + "\n"
    other = "import numpy as np"
    other_full = tok.decode(list(generate.generate(model, tok.encode(other), 20, temperature=0)))
    r = run_cli(home, *args, "--prompt", other, "--temperature", 0)  # a repeated --prompt: a batch of two
    assert r.stdout == f"=== 0 ===\n{full}\n=== 1 ===\n{other_full}\n"
    stop2 = other_full[4:7]
    assert stop2 not in full[: full.index(first)] and first not in other_full[: other_full.index(stop2)]
    r = run_cli(home, *args, "--prompt", other, "--temperature", 0, "--stop", first, "--stop", stop2)
    assert r.stdout == f"=== 0 ===\n{full[: full.index(first)]}\n=== 1 ===\n{other_full[: other_full.index(stop2)]}\n"


@needs_reference("tokenizers")
def test_cli_stops_at_generation_config_eos_and_prompt_file(hub, tmp_path):
    home, _ = hub
    model, tok = generate.load(snapshot(home, "phi3-4k"), dtype="float32")
    prompt = tok.encode(PROMPT)
    greedy = list(generate.generate(model, prompt, 20, temperature=0))
    snap = snapshot(home, "phi3-4k")
    gen = json.loads((snap / "generation_config.json").read_text())
    try:  # a list of EOS ids, as Phi-3's own generation_config.json has
        (snap / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [32000, greedy[3]]}))
        r = run_cli(home, "--model", "test/phi3-4k", "--prompt", PROMPT, "--temperature", 0, "--dtype", "float32")
        assert r.returncode == 0, r.stderr
        assert r.stdout == tok.decode(prompt + greedy[: greedy.index(greedy[3])])[len(tok.decode(prompt)) :] + "\n"
    finally:
        (snap / "generation_config.json").write_text(json.dumps(gen))
    (tmp_path / "prompts.txt").write_text("def print_prime(n):\nHello there\n")
    args = ("--temperature", 0, "--max-new-tokens", 8, "--dtype", "float32")
    r = run_cli(home, "--model", "test/phi3-4k", "--prompt-file", tmp_path / "prompts.txt", *args)
    alone = [
        tok.decode(list(generate.generate(model, tok.encode(p), 8, temperature=0)))
        for p in ("def print_prime(n):", "Hello there")
    ]
    assert r.stdout == f"=== 0 ===\n{alone[0]}\n=== 1 ===\n{alone[1]}\n"


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
CHAT_ARGS = ("--system", "Be brief.", "--max-new-tokens", 16, "--temperature", 0, "--dtype", "float32")


@needs_reference("tokenizers")
@pytest.mark.parametrize("name,family", [("phi3-4k", "phi3"), ("phi4-mini", "phi4mini")])
def test_cli_chat_uses_the_family_template_and_stops_at_the_end_of_turn(name, family, hub, monkeypatch):
    """--chat renders what apply_chat_template renders and generates what the API generates from it. The end-of-turn
    token (<|end|>) ends the reply: here it is forced as the 4th token (random weights never pick it)."""
    home, _ = hub
    model, tok = generate.load(snapshot(home, name), dtype="float32")
    want_text = transformers.AutoTokenizer.from_pretrained(TOK / family).apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )
    assert generate.chat_prompt(tok, "Name a prime.", "Be brief.") == want_text
    ids = tok.encode(want_text)
    end = tok.added["<|end|>"]["id"]
    want = list(generate.generate(model, ids, 16, temperature=0, eos_ids=model.eos_ids))
    assert len(want) == 16 and end not in want
    r = run_cli(home, "--model", f"test/{name}", "--chat", "--prompt", "Name a prime.", *CHAT_ARGS)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(want) + "\n"
    sample, calls = generate.sample, []

    def end_at_the_4th(*args, **kw):
        calls.append(1)
        token = sample(*args, **kw)
        return torch.full_like(token, end) if len(calls) == 4 else token

    monkeypatch.setattr(generate, "sample", end_at_the_4th)
    r = run_cli(home, "--model", f"test/{name}", "--chat", "--prompt", "Name a prime.", *CHAT_ARGS)
    assert r.stdout == tok.decode(want[:3]) + "\n" and len(calls) == 4  # nothing sampled after the end token


@needs_reference("tokenizers")
@pytest.mark.parametrize("name,family", [("phi3-4k", "phi3"), ("phi4-mini", "phi4mini")])
def test_cli_interactive_keeps_the_conversation(name, family, hub):
    """--interactive over two turns: the second prompt is the whole conversation (the first turn and its reply), as
    apply_chat_template renders it; the reply equals the API's greedy reply to that prompt."""
    home, _ = hub
    model, tok = generate.load(snapshot(home, name), dtype="float32")
    template = transformers.AutoTokenizer.from_pretrained(TOK / family)
    end = tok.added["<|end|>"]["id"]

    def reply(messages):
        ids = tok.encode(template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return tok.decode(list(generate.generate(model, ids, 16, temperature=0, eos_ids=model.eos_ids | {end})))

    first = reply(CHAT)
    second = reply(CHAT + [{"role": "assistant", "content": first}, {"role": "user", "content": "And another?"}])
    assert second != reply(CHAT[:1] + [{"role": "user", "content": "And another?"}])  # the history matters
    r = run_cli(home, "--model", f"test/{name}", "--interactive", *CHAT_ARGS, stdin="Name a prime.\nAnd another?\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n{second}\n"


@needs_reference("tokenizers")
def test_cli_revision_picks_the_snapshot_of_a_branch_or_commit(hub, tmp_path):
    """--revision: a branch (refs/v2) or a commit id in the offline cache picks that snapshot, main is the default."""
    home, _ = hub
    for name, commit, refs in (("phi-2", "a" * 40, ["main"]), ("phi3-4k", "b" * 40, ["v2"])):
        shutil.copytree(
            snapshot(home, name), hub_repo(tmp_path, "test/two-revisions", commit, refs), dirs_exist_ok=True
        )
    args = ("--model", "test/two-revisions", "--prompt", PROMPT, "--max-new-tokens", 8, "--temperature", 0)
    want = {}
    for name in ("phi-2", "phi3-4k"):
        model, tok = generate.load(snapshot(home, name), dtype="float32")
        prompt = tok.encode(PROMPT, bos=tok.add_bos)
        want[name] = continuation(tok, prompt, list(generate.generate(model, prompt, 8))) + "\n"
    assert want["phi-2"] != want["phi3-4k"]
    assert run_cli(tmp_path, *args).stdout == want["phi-2"]
    assert run_cli(tmp_path, *args, "--revision", "v2").stdout == want["phi3-4k"]
    assert run_cli(tmp_path, *args, "--revision", "b" * 40).stdout == want["phi3-4k"]
    r = run_cli(tmp_path, *args, "--revision", "v3")
    assert_one_line_error(
        r,
        "generate.py",
        "'test/two-revisions' is not a local directory and is not in the Hugging Face cache "
        "(offline, or the Hub is unreachable)",
        1,
    )


@needs_reference("tokenizers")
def test_cli_compile_runs_inductor_across_the_longrope_switch(hub, fresh_compiler):
    """--compile for real (inductor, the CPU path of generate.compile_decode): on a LongRoPE model whose prompt is
    below the original context (32) and whose generation crosses it, the tokens equal transformers' generate()."""
    from torch._dynamo.utils import counters

    counters.clear()
    home, refs = hub
    _, tok = generate.load(snapshot(home, "phi3-longrope"), dtype="float32")
    prompt = tok.encode(PROMPT, bos=tok.add_bos)
    want = hf_greedy(refs["phi3-longrope"], prompt, 24)
    assert len(prompt) < 32 < len(prompt) + len(want)
    r = run_cli(
        home,
        "--model",
        "test/phi3-longrope",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        24,
        "--temperature",
        0,
        "--dtype",
        "float32",
        "--compile",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == continuation(tok, prompt, want) + "\n"
    assert "after the first step (which compiles:" in r.stderr
    assert counters["stats"]["unique_graphs"] == 1  # the step was compiled, once


@needs_reference("tokenizers")
def test_cli_dtype_auto_takes_the_checkpoints_dtype_float16_as_bfloat16_on_the_cpu(hub, tmp_path):
    """--dtype auto reads config.json's torch_dtype; float16 becomes bfloat16 on the CPU (float16 matmuls are slow
    there), and the tokens equal the API's on a bfloat16 load of the same checkpoint."""
    home, _ = hub
    d = tmp_path / "fp16"
    shutil.copytree(snapshot(home, "phi-2"), d)
    model = phi.Phi.from_pretrained(d, dtype=torch.float16)
    model.save_pretrained(d)
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "float16"
    auto, tok = generate.load(d, dtype="auto", device="cpu")
    assert auto.embed.weight.dtype == torch.bfloat16
    bf16, _ = generate.load(d, dtype="bfloat16", device="cpu")
    want = tok.decode(list(generate.generate(bf16, tok.encode(PROMPT), 8)))
    r = run_cli(
        tmp_path, "--model", d, "--prompt", PROMPT, "--max-new-tokens", 8, "--temperature", 0, "--device", "cpu"
    )
    assert r.returncode == 0 and r.stdout == want + "\n", r.stderr
    assert "torch.bfloat16, cpu" in r.stderr


@needs_reference("tokenizers")
@pytest.mark.parametrize(
    "args,message",
    [
        (
            ("--model", "nobody/nothing"),
            "'nobody/nothing' is not a local directory and is not in the Hugging Face cache "
            "(offline, or the Hub is unreachable)",
        ),
        (("--temperature", "-1"), "--temperature must be >= 0 (0 = greedy), got -1.0"),
        (("--top-p", "0"), "--top-p must be in (0, 1], got 0.0"),
        (("--top-p", "1.5"), "--top-p must be in (0, 1], got 1.5"),
        (("--top-k", "-2"), "--top-k must be >= 0, got -2"),
        (("--attn", "flash", "--device", "cpu"), "--attn flash needs a CUDA device, got cpu"),
        pytest.param(
            ("--device", "cuda", "--dtype", "bfloat16"),
            "torch.bfloat16 is not supported on cuda: Torch not compiled with CUDA enabled",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the run would succeed"),
        ),
        (("--prompt", "word " * 300), "the prompt is 301 tokens, longer than the model's context of 128"),
        (
            ("--dtype", "float64"),
            "argument --dtype: invalid choice: 'float64' (choose from 'auto', 'float32', 'bfloat16', 'float16')",
        ),
        (("--max-new-tokens", "many"), "argument --max-new-tokens: invalid int value: 'many'"),
    ],
)
def test_cli_bad_input_gives_one_clear_line(args, message, hub):
    home, _ = hub
    r = run_cli(home, "--model", "test/phi-2", "--temperature", "0", "--max-new-tokens", 4, *args)
    assert_one_line_error(r, "generate.py", message, 1)


@needs_reference("tokenizers")
def test_cli_runs_as_a_program(hub):
    """python generate.py in its own process, offline through HF_HOME / HF_HUB_OFFLINE: the in-process runs' output,
    and exit code 1 with one line for bad input."""
    home, _ = hub
    args = ["--model", "test/phi-2", "--prompt", PROMPT, "--max-new-tokens", 8, "--temperature", 0]
    env = python_env(HF_HOME=home, HF_HUB_OFFLINE=1, PYTHONIOENCODING="utf-8")
    for extra, code in (([], 0), (["--top-k", "-2"], 1)):
        argv = [sys.executable, str(ROOT / "generate.py"), *map(str, args + extra)]
        r = subprocess.run(argv, capture_output=True, env=env, cwd=home)
        r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())
        assert (r.returncode, r.stdout) == (code, run_cli(home, *args, *extra).stdout), r.stderr
    assert_one_line_error(r, "generate.py", "--top-k must be >= 0, got -2", 1)


def test_cli_missing_weights_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "phi",
                "vocab_size": 96,
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "torch_dtype": "float32",
            }
        )
    )
    r = run_cli(tmp_path, "--model", tmp_path, "--prompt", "x")
    message = f"{tmp_path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"
    assert_one_line_error(r, "generate.py", message, 1)


# ===============================================================================================================
# train.py


CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "json"  # a small, always-present code corpus
TINY = dict(
    model_type="phi",
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    partial_rotary_factor=0.5,
    max_position_embeddings=128,
)


def run_train(tmp_path, *args, torchrun=0):
    """train.py on the tiny config and the json corpus, with the given arguments: train.main(argv) in this process,
    or with torchrun=N in N processes (torch.distributed.run, gloo). (exit code, stdout, stderr)."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    base = ["--config", cfg, "--data", CORPUS, "--block-size", 64, "--batch-size", 8, "--log-every", 5]
    argv = [str(a) for a in base + ["--sample-tokens", 0, "--warmup-steps", 5, *args]]
    if torchrun:
        # --standalone: a rendezvous on a free port of its own (a fixed port could meet another run's processes)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
        env = python_env(OMP_NUM_THREADS=1)
        cmd = launch + [str(ROOT / "train.py")] + argv  # timeout: a hung process group fails, not stalls, the suite
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    out, errs = io.StringIO(), io.StringIO()
    with contextlib.chdir(tmp_path), contextlib.redirect_stdout(out), contextlib.redirect_stderr(errs):
        try:
            code = train.main(argv)
        except SystemExit as e:  # argparse's errors
            code = e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), errs.getvalue())


def weights(d):
    from safetensors.torch import load_file

    return load_file(Path(d) / "model.safetensors")


LOG_LINE = (
    r"step (\d+)/\d+ \[#* *\] \| loss ([\d.]+) \| grad norm ([\d.e+-]+) \| lr [\d.e+-]+ \| [\d,]+ tok/s \| ETA \d+:\d\d"
)


def logged(r):
    """{step: (loss, gradient norm)} from train.py's log lines."""
    return {int(m[1]): (float(m[2]), float(m[3])) for m in re.finditer(LOG_LINE, r.stderr)}


def test_train_loss_goes_down_and_checkpoint_loads_everywhere(tmp_path):
    r = run_train(tmp_path, "--out", tmp_path / "out", "--max-steps", 40, "--eval-every", 20, "--lr", "3e-3")
    assert r.returncode == 0, r.stderr
    val = [float(x) for x in re.findall(r"validation loss ([\d.]+)", r.stderr)]
    first = logged(r)[5][0]
    assert len(val) == 2 and val[1] < val[0] < first and val[1] < first - 1.0, r.stderr
    assert re.search(r"step 40/40 \[#{20}\] .* \| ETA 0:00", r.stderr) and sorted(logged(r)) == list(range(5, 41, 5))
    model_dir = tmp_path / "out" / "model"
    ours, tok = generate.load(model_dir, dtype="float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok.encode("import json\ndef dumps(obj):\n    return")])
    with torch.no_grad():
        assert record("train checkpoint vs transformers", err(ours(ids), ref(ids).logits)) <= TOL
    g = run_cli(tmp_path, "--model", model_dir, "--prompt", "def ", "--max-new-tokens", 20, "--temperature", 0)
    want = tok.decode(list(generate.generate(ours, tok.encode("def "), 20)))
    assert g.returncode == 0 and g.stdout == want + "\n", g.stderr
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)  # the byte tokenizer loads there too
    assert hf_tok.encode("déf  x\n", add_special_tokens=False) == tok.encode("déf  x\n") == list("déf  x\n".encode())


def test_resume_continues_exactly_from_the_latest_checkpoint(tmp_path):
    """A run killed after its checkpoint at step 8 (ckpt-000010 and model gone, a half-written checkpoint left
    behind), resumed with --resume OUT: it continues from the latest complete checkpoint, and its final weights are
    bit-identical to the uninterrupted run's (dropout on, so the RNG state matters too)."""
    out, common = tmp_path / "a", ("--max-steps", 10, "--eval-every", 0, "--dropout", 0.1, "--log-every", 1)
    a = run_train(tmp_path, "--out", out, "--save-every", 4, *common)
    assert a.returncode == 0, a.stderr
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-000004", "ckpt-000008", "ckpt-000010"]
    straight = weights(out / "model")
    shutil.rmtree(out / "ckpt-000010")
    shutil.rmtree(out / "model")
    (out / ".ckpt-000012.tmp").mkdir()  # a save interrupted before its rename
    (out / ".ckpt-000012.tmp" / "model.safetensors").write_bytes(b"half")
    b = run_train(tmp_path, "--out", out, "--resume", out, *common)
    assert b.returncode == 0, b.stderr
    assert f"resuming from {out / 'ckpt-000008'} at step 8" in b.stderr and sorted(logged(b)) == [9, 10]
    resumed = weights(out / "model")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    w8 = weights(out / "ckpt-000008")
    assert not all(torch.equal(straight[k], w8[k]) for k in straight)


def test_sigkill_then_resume_equals_the_uninterrupted_run_every_time(tmp_path):
    """train.py as a process, killed with SIGKILL at a different moment each time (right after its checkpoint at step
    50 appears, then 0.5 and 1 s later), resumed with --resume OUT: the final weights are bit-identical to an
    uninterrupted run's, every time (three kills)."""
    import signal
    import time

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    argv = ["--config", cfg, "--data", CORPUS, "--block-size", 64, "--batch-size", 8, "--sample-tokens", 0]
    argv = [
        sys.executable,
        str(ROOT / "train.py"),
        *map(str, argv + ["--max-steps", 300, "--save-every", 50, "--eval-every", 50]),
    ]
    env = python_env(OMP_NUM_THREADS=2)
    straight = subprocess.run(
        argv + ["--out", str(tmp_path / "straight")], capture_output=True, text=True, env=env, timeout=300
    )
    assert straight.returncode == 0, straight.stderr
    want = weights(tmp_path / "straight" / "model")
    for delay in (0.0, 0.5, 1.0):
        out = tmp_path / f"killed-{delay}"
        proc = subprocess.Popen(argv + ["--out", str(out)], stderr=subprocess.DEVNULL, env=env)
        while not (out / "ckpt-000050").exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "model").exists(), "the run ended before it was killed: nothing was tested"
        resumed = subprocess.run(
            argv + ["--out", str(out), "--resume", str(out)], capture_output=True, text=True, env=env, timeout=300
        )
        assert resumed.returncode == 0, resumed.stderr
        got = weights(out / "model")
        assert all(torch.equal(got[k], want[k]) for k in want), f"killed {delay} s after ckpt-000050: weights differ"


def test_checkpoint_write_interrupted_before_the_rename_keeps_the_previous_one(tmp_path, monkeypatch):
    """train.save_checkpoint writes into a temporary directory and renames it into place: a save that dies while
    writing (here: the weights file is half written, then the process is interrupted) leaves the previous checkpoint
    as it was, and --resume finds it."""
    tok_dir = tmp_path / "tok"
    train.write_byte_tokenizer(tok_dir)
    model = phi.Phi.from_config(tiny_config())
    train.save_checkpoint(tmp_path / "ckpt-000001", model, tok_dir, {"step": 1})
    before = weights(tmp_path / "ckpt-000001")

    def dies_while_writing(self, path, **kw):
        Path(path).mkdir()
        (Path(path) / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(phi.Phi, "save_pretrained", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(tmp_path / "ckpt-000001", model, tok_dir, {"step": 2})
    after = weights(tmp_path / "ckpt-000001")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert train.latest_checkpoint(tmp_path) == tmp_path / "ckpt-000001"
    assert torch.load(tmp_path / "ckpt-000001" / "training_state.pt")["step"] == 1


def test_grad_accum_equals_one_big_batch(tmp_path):
    """--grad-accum 2 x 4 sequences == 8 sequences at once: the same gradient norm (a sum of micro-batch losses
    instead of their mean would double it) and the same weights after two steps."""
    common = ("--max-steps", 2, "--eval-every", 0, "--log-every", 1)
    big = run_train(tmp_path, "--out", tmp_path / "big", "--batch-size", 8, *common)
    acc = run_train(tmp_path, "--out", tmp_path / "acc", "--batch-size", 4, "--grad-accum", 2, *common)
    assert big.returncode == 0 and acc.returncode == 0, big.stderr + acc.stderr
    for step in (1, 2):
        (loss1, norm1), (loss2, norm2) = logged(big)[step], logged(acc)[step]
        assert loss1 == pytest.approx(loss2, rel=1e-4) and norm1 == pytest.approx(norm2, rel=1e-4)
    w1, w2 = weights(tmp_path / "big" / "model"), weights(tmp_path / "acc" / "model")
    assert record("grad-accum 2x4 vs batch 8, two steps", max(err(w1[k], w2[k]) for k in w1)) <= 1e-6


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-lora"])
def test_torchrun_two_processes_equal_one(mode, tmp_path):
    """torchrun with gloo on the CPU, 2 processes x 4 sequences == 1 process x 8 sequences: the same gradient norm
    (each process's loss is a mean over its rows and DDP/FSDP average the gradients: a sum over processes would
    double it) and the same weights after two steps; then a resume of the 2-process checkpoint in 2 processes
    equals the uninterrupted run. ddp-lora: the same for LoRA adapters on a frozen --init (compared merged)."""
    fsdp = ["--fsdp"] if mode == "fsdp" else []
    common = ("--eval-every", 0, "--log-every", 1, "--max-steps", 2)
    if mode == "ddp-lora":
        common += (
            "--init",
            tiny_checkpoint(tmp_path / "base"),
            "--lora",
            4,
            "--lora-dropout",
            0,
            "--merge",
            "--lr",
            "1e-2",
        )
    one = run_train(tmp_path, "--out", tmp_path / "one", "--batch-size", 8, *common)
    assert one.returncode == 0, one.stderr
    two = run_train(
        tmp_path, "--out", tmp_path / "two", "--batch-size", 4, "--save-every", 1, *fsdp, *common, torchrun=2
    )
    assert two.returncode == 0, two.stderr
    assert "2 process(es)" in two.stderr
    for step in (1, 2):
        assert logged(two)[step][1] == pytest.approx(logged(one)[step][1], rel=1e-4)
    w1, w2 = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert record(f"torchrun {mode} 2 vs 1 process, two steps", max(err(w1[k], w2[k]) for k in w1)) <= 1e-6
    resumed = run_train(
        tmp_path,
        "--out",
        tmp_path / "three",
        "--batch-size",
        4,
        "--resume",
        tmp_path / "two" / "ckpt-000001",
        *fsdp,
        *common,
        torchrun=2,
    )
    assert resumed.returncode == 0, resumed.stderr
    w3 = weights(tmp_path / "three" / "model")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


def test_mixed_precision_training_bf16_and_fp16_grad_scaler(tmp_path):
    """--dtype bfloat16 and float16 autocast: the first step's loss and gradient norm close to float32's (fp16 goes
    through the GradScaler: its gradients are scaled by 65536 and must be unscaled before the norm and clipping),
    yet not bit-equal (autocast is on); the weights stay float32 and still train."""
    runs = {}
    for dtype in ("float32", "bfloat16", "float16"):
        r = run_train(
            tmp_path,
            "--out",
            tmp_path / dtype,
            "--dtype",
            dtype,
            "--max-steps",
            10,
            "--log-every",
            1,
            "--eval-every",
            0,
        )
        assert r.returncode == 0, r.stderr
        runs[dtype] = logged(r)
        assert all(w.dtype == torch.float32 for w in weights(tmp_path / dtype / "model").values())
    for dtype, tol in (("bfloat16", 2e-2), ("float16", 2e-3)):
        (loss, norm), (loss32, norm32) = runs[dtype][1], runs["float32"][1]
        assert loss == pytest.approx(loss32, rel=tol) and norm == pytest.approx(norm32, rel=5 * tol)
        assert [n for _, n in runs[dtype].values()] != [n for _, n in runs["float32"].values()]  # autocast is on
        assert runs[dtype][10][0] < loss - 0.5


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """--checkpointing (model.gradient_checkpointing) recomputes each block in the backward pass instead of keeping
    its activations: each block runs twice, and the loss and every gradient equal the plain run's (dropout on: the
    recomputation replays the same random mask)."""
    cfg = tiny_config(model_type="phi3", resid_pdrop=0.1, embd_pdrop=0.1, attention_dropout=0.0)
    torch.manual_seed(0)
    model = phi.Phi.from_config(cfg).train()
    ids, grads, losses, calls = ids_for(16), {}, {}, []
    forward = model.layers[0].forward  # (forward hooks do not fire in the recomputation)
    model.layers[0].forward = lambda *a: calls.append(1) or forward(*a)
    for on in (False, True):
        model.gradient_checkpointing = on
        calls.clear()
        torch.manual_seed(1)
        model.zero_grad()
        loss = model(ids, labels=ids)[1]
        loss.backward()
        assert len(calls) == (2 if on else 1)
        losses[on], grads[on] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert losses[True] == losses[False]
    assert max(err(grads[True][n], grads[False][n]) for n in grads[True]) <= 1e-6


def test_token_files_are_reused_across_runs(tmp_path, monkeypatch):
    """The corpus is tokenized once into train.bin/val.bin under a hash of its files and the tokenizer: a second run
    reads them without tokenizing, a changed file makes new ones."""
    tok_dir = tmp_path / "tok"
    train.write_byte_tokenizer(tok_dir)
    tok = generate.load_tokenizer(tok_dir)
    corpus = tmp_path / "corpus.py"
    corpus.write_text("def f(x):\n    return x\n" * 200)
    encode, calls = tok.encode, []
    monkeypatch.setattr(tok, "encode", lambda *a, **kw: calls.append(1) or encode(*a, **kw))
    first = train.token_files([str(corpus)], tok, tmp_path, 32)
    n = len(calls)
    again = train.token_files([str(corpus)], tok, tmp_path, 32)
    assert n and len(calls) == n and np_equal(first, again)
    corpus.write_text("class A:\n    pass\n" * 300)
    changed = train.token_files([str(corpus)], tok, tmp_path, 32)
    assert len(calls) > n and len(list(tmp_path.glob("tokens-*"))) == 2
    assert bytes(changed[0][:10]) != bytes(first[0][:10])


def np_equal(a, b):
    return all((x == y).all() for x, y in zip(a, b))


@needs_reference("configs")
@pytest.mark.parametrize(
    "preset,real", [("phi-1.5", "phi-1.json"), ("phi-2", "phi-2.json"), ("phi3-mini", "Phi-3-mini-4k-instruct.json")]
)
def test_train_presets_have_the_real_models_shapes(preset, real):
    """`train.py --config phi-2` etc. build the named model's architecture (phi-1.5 has phi-1's shape)."""
    ours, want = train.preset_config(preset), phi.PhiConfig.from_hf(json.loads((REF / "configs" / real).read_text()))
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(ours, key) == getattr(want, key), key
    assert (ours.num_key_value_heads, ours.head_dim, ours.rotary_dim) == (
        want.num_key_value_heads,
        want.head_dim,
        want.rotary_dim,
    )
    assert (ours.hidden_act, ours.max_position_embeddings) == (want.hidden_act, want.max_position_embeddings)


def test_train_demo_preset_is_the_default(tmp_path):
    """`python train.py` trains the "demo" preset (the README's first command): its saved config has that shape."""
    r = run_train(tmp_path, "--out", tmp_path / "out", "--max-steps", 1, "--eval-every", 0)  # --config tiny.json
    assert r.returncode == 0, r.stderr
    args = train.parse_args([])
    assert args.config == "demo" and args.init == "scratch"
    cfg = train.preset_config("demo")
    r = run_train(tmp_path, "--out", tmp_path / "demo", "--config", "demo", "--max-steps", 1, "--eval-every", 0)
    saved_cfg = json.loads((tmp_path / "demo" / "model" / "config.json").read_text())
    assert (saved_cfg["hidden_size"], saved_cfg["num_hidden_layers"]) == (cfg.hidden_size, cfg.num_hidden_layers)


def toy_classification(path, n=200, seed=0):
    """Separable toy sets: sentiment by word choice (seq-cls), and per-word tags: digits vs letters (token-cls)."""
    rng = random.Random(seed)
    good, bad, filler = (
        ["great", "lovely", "superb", "fine"],
        ["awful", "boring", "dreadful", "poor"],
        ["the", "film", "was", "very", "and", "plot"],
    )
    with open(path / "seq.jsonl", "w") as f:
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(filler, 4) + [rng.choice(good if label else bad)]
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    with open(path / "tok.jsonl", "w") as f:
        for _ in range(n):
            words = [rng.choice(filler) if rng.random() < 0.5 else str(rng.randint(0, 999)) for _ in range(8)]
            f.write(json.dumps({"tokens": words, "labels": [int(w.isdigit()) for w in words]}) + "\n")


def test_finetune_from_hub_format_checkpoint_and_classification_heads(tmp_path):
    """A random checkpoint written by transformers (+ the byte tokenizer) fine-tunes as a causal LM, and as a
    sequence classifier and a token classifier (each >= 90% accuracy on a separable toy set)."""
    ckpt = tmp_path / "hub-format"
    torch.manual_seed(0)  # the same checkpoint whichever tests ran before
    ref = transformers.PhiForCausalLM(
        transformers.PhiConfig(
            **{k: v for k, v in TINY.items() if k != "model_type"}, pad_token_id=256, eos_token_id=256, bos_token_id=256
        )
    )
    ref.save_pretrained(ckpt)
    train.write_byte_tokenizer(ckpt)
    lm = run_train(tmp_path, "--init", ckpt, "--out", tmp_path / "lm", "--max-steps", 20, "--eval-every", 10)
    assert lm.returncode == 0, lm.stderr
    val = [float(x) for x in re.findall(r"validation loss ([\d.]+)", lm.stderr)]
    assert val[1] < val[0]
    toy_classification(tmp_path)
    seq = run_train(
        tmp_path,
        "--init",
        ckpt,
        "--task",
        "seq-cls",
        "--data",
        tmp_path / "seq.jsonl",
        "--out",
        tmp_path / "seq",
        "--max-steps",
        60,
        "--eval-every",
        60,
        "--eval-steps",
        4,
        "--lr",
        "3e-3",
    )
    assert seq.returncode == 0, seq.stderr
    acc = float(re.findall(r"accuracy ([\d.]+)%", seq.stderr)[-1])
    assert record("seq-cls toy accuracy %", acc) >= 90, seq.stderr
    clf = phi.PhiForSequenceClassification.from_pretrained(tmp_path / "seq" / "model")
    assert clf.config.num_labels == 2
    tag = run_train(
        tmp_path,
        "--init",
        ckpt,
        "--task",
        "token-cls",
        "--data",
        tmp_path / "tok.jsonl",
        "--out",
        tmp_path / "tag",
        "--max-steps",
        40,
        "--eval-every",
        20,
        "--eval-steps",
        4,
        "--lr",
        "3e-3",
    )
    assert tag.returncode == 0, tag.stderr
    acc = float(re.findall(r"accuracy ([\d.]+)%", tag.stderr)[-1])  # 58% = always "not a number"
    assert record("token-cls toy accuracy %", acc) >= 90, tag.stderr
    tagger = phi.PhiForTokenClassification.from_pretrained(tmp_path / "tag" / "model").eval()
    tok = generate.load_tokenizer(tmp_path / "tag" / "model")
    ids = tok.encode("the 417 plot 9", allowed_special=set())  # the label sits on each word's first non-space byte
    assert tagger(torch.tensor([ids])).argmax(-1)[0, [0, 4, 8, 13]].tolist() == [0, 1, 0, 1]


@needs_reference("tokenizers")
@pytest.mark.parametrize("name", ["codegen", "phi3", "phi4"])
def test_token_labels_sit_on_each_words_first_non_space_token(tmp_path, name):
    """phi3 and phi4 split " 417" into a lone space + digits: a causal tagger cannot label that space (it has not
    seen the word yet), so the label goes to the first token with text; an empty first word has no token to label."""
    tok = generate.load_tokenizer(REF / "tokenizers" / name)
    words, tags = ["", "417", "the", "Washington", "😀x", "  9", "end"], ["X", "N", "O", "LOC", "E", "N", "O"]
    (tmp_path / "t.jsonl").write_text((json.dumps({"tokens": words, "labels": tags}) + "\n") * 10)  # 10: the minimum
    label_map = {}
    ids, labels = train.labelled_examples([tmp_path / "t.jsonl"], tok, "token-cls", 512, label_map)[0]
    assert len(ids) == len(labels)
    # where each label must sit, from the reference tokenizer's character offsets: each word is encoded as its own
    # piece (" " + word after the first), and the label goes to the token that holds the word's first character
    want, start = {}, 0
    for i, (word, tag) in enumerate(zip(words, tags)):
        piece = ("" if i == 0 else " ") + word
        enc = oracle(name).encode(piece, add_special_tokens=False)
        assert ids[start : start + len(enc.ids)] == enc.ids
        if word:
            first = len(piece) - len(piece.lstrip())
            want[start + next(k for k, (a, b) in enumerate(enc.offsets) if a <= first < b)] = label_map[tag]
        start += len(enc.ids)
    assert start == len(ids)
    assert {i: y for i, y in enumerate(labels) if y != -100} == want
    if name != "codegen":  # " 417" is a lone space, then digits: the label is not on the piece's first token
        assert ids.index(oracle(name).encode(" 417", add_special_tokens=False).ids[0]) not in want


def test_train_bad_input_one_clear_error_nothing_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.py").write_text("x = 1\n")
    cases = [
        (("--data", tmp_path / "missing"), f"--data {tmp_path / 'missing'}: no such file or directory"),
        (("--data", tmp_path / "empty"), f"--data {tmp_path / 'empty'}: no files found"),
        (
            ("--data", tmp_path / "short.py"),
            "the corpus is 7 tokens: too short for --block-size 64 (needs at least 1300, so that train "
            "and validation each hold a block)",
        ),
        (
            ("--config", "huge"),
            "--config huge: not a preset (demo, small, 160m, phi-1.5, phi-2, phi3-mini) nor a config.json file",
        ),
    ]
    for args, message in cases:
        assert_one_line_error(run_train(tmp_path, "--out", out, "--max-steps", 2, *args), "train.py", message, 2)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    ok = run_train(tmp_path, "--out", tmp_path / "run", "--max-steps", 2, "--eval-every", 0, "--save-every", 2)
    assert ok.returncode == 0, ok.stderr
    before = weights(tmp_path / "run" / "model")
    latest = tmp_path / "run" / "ckpt-000002"
    for args, message in [
        (("--task", "seq-cls"), f"--resume {latest} was trained with --task causal-lm, not seq-cls"),
        (("--block-size", 32), f"--resume {latest} was trained with --block-size 64, not 32"),
        (
            ("--task", "tagging"),
            "argument --task: invalid choice: 'tagging' (choose from 'causal-lm', 'seq-cls', 'token-cls')",
        ),
    ]:
        r = run_train(tmp_path, "--out", tmp_path / "run", "--resume", tmp_path / "run", "--max-steps", 4, *args)
        assert_one_line_error(r, "train.py", message, 2)
    r = run_train(tmp_path, "--out", out, "--resume", tmp_path / "empty")
    assert_one_line_error(
        r, "train.py", f"--resume {tmp_path / 'empty'}: no checkpoint with a training_state.pt there", 2
    )
    after = weights(tmp_path / "run" / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ===============================================================================================================
# Speed machinery (correctness only: the speed itself is measured by bench.py)


def test_compiled_decode_step_compiles_once_and_matches(tmp_path, fresh_compiler):
    """The decode step has static shapes (it attends over all cache slots under a mask and reads the fill level
    only on the device): torch.compile traces it once for a whole generation, in one graph, and it still equals
    the full forward pass (sliding window and GQA included)."""
    import torch._dynamo.testing

    model = from_transformers("phi3-gqa-window", tmp_path)[0]
    counter = torch._dynamo.testing.CompileCounter()
    step = compiled_step(backend=counter)
    ids = ids_for(24)
    with torch.no_grad():
        full = model(ids)
        cache = phi.KVCache(model.config, 2, 24)
        got = stepped_logits(model, step, ids, 8, cache)
    assert counter.frame_count == 1
    assert err(got, full[:, 8:]) <= TOL


def test_compiled_batch1_decode_streams_weights_and_matches(monkeypatch, fresh_compiler):
    """Batch-1 decoding under torch.compile (inductor) multiplies by every weight as multiply-and-sum (generate.matvec):
    the logits equal the full forward pass, for biased Linears, a row longer than 4096 (summed in 4 chunks of 2050)
    and int8 weights. The caller's grad mode is left on: a compiled step run with grad enabled used to lose its
    cache writes after the first token (decode_one_token runs under no_grad)."""
    calls = []

    def counted(x, weight, scale=None):
        calls.append(tuple(weight.shape))
        return matvec(x, weight, scale)

    matvec = generate.matvec
    monkeypatch.setattr(generate, "matvec", counted)
    cfg = tiny_config(intermediate_size=8200, num_hidden_layers=1)
    torch.manual_seed(0)
    model = generate.speed_up(phi.Phi.from_config(cfg).eval(), cpu_kernels=True)
    ids = ids_for(16, B=1)
    for m in (model, generate.quantize_int8(generate.speed_up(phi.Phi.from_config(cfg).eval(), cpu_kernels=True))):
        torch._dynamo.reset()  # the int8 model: a new graph
        step = compiled_step()
        with torch.no_grad():
            full = m(ids)
        cache = phi.KVCache(cfg, 1, 16)
        got = stepped_logits(m, step, ids, 10, cache)  # > 8 rows: int8 prefill in fp32, like the full forward
        assert (64, 8200) in calls  # fc2: the chunked long row went through matvec
        calls.clear()
        assert (
            record(f"compiled batch-1 decode vs full forward ({type(m.lm_head).__name__})", err(got, full[:, 10:]))
            <= TOL
        )


def test_bf16_matvec_widens_in_int32_pairs_exactly(monkeypatch, fresh_compiler):
    """bf16 weights and input: matvec widens them two at a time (generate.bf16_halves, bit operations on int32 pairs), eager
    and compiled, from generate.PAIRS_MIN_WEIGHTS weights on. Against fp32 products of the same bf16 numbers, the result is
    off by the final bf16 rounding only; rows whose chunks have an odd length (4097 = 17 x 241, and 63) and smaller
    weights take the plain widening, with the same result."""
    halves = []
    bf16_halves = generate.bf16_halves
    monkeypatch.setattr(generate, "bf16_halves", lambda t: halves.append(t.shape) or bf16_halves(t))
    compiled = torch.compile(generate.matvec, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    for N, K, pairs in [(2**14, 64, True), (128, 8200, True), (40, 8200, False), (256, 4097, False), (40, 63, False)]:
        x, w = torch.randn(1, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
        want = x.float() @ w.float().T  # exact products of the bf16 numbers, fp32 sums
        bound = (want.abs() * 2**-8 + 1e-5 * (x.float().abs() @ w.float().abs().T)).max().item()  # rounding; sums
        for name, f in [("eager", generate.matvec), ("compiled", compiled)]:
            halves.clear()
            got = f(x, w)
            assert got.dtype == torch.bfloat16 and got.shape == (1, N)
            assert record(f"bf16 matvec {name}, {N}x{K} (max err / bf16 rounding bound)", err(got, want) / bound) <= 1
            assert len(halves) == (2 if pairs else 0)  # x and the weight; the compiled call counts too


@pytest.mark.parametrize("model_type", ["phi", "phi3"])
def test_compiled_batch1_decode_of_a_bf16_model_matches_eager(model_type, monkeypatch, fresh_compiler):
    """A bf16 model (parallel block with biases; Phi-3 block with GQA): the compiled batch-1 step, whose products go
    through the int32-pair widening (threshold at 0 here), is as close to the exact result (the same bf16 weights in
    fp32) as the eager bf16 step is: the eager step rounds every op's output to bf16, inductor only what it stores,
    so its error may be smaller but not larger (bound: 1.1x the eager step's; measured 0.75-0.77x). A wrong widening
    fails it (tried: the low half shifted by 15 bits; the high half's last mantissa bit lost)."""
    monkeypatch.setattr(generate, "PAIRS_MIN_WEIGHTS", 0)
    cfg = tiny_config(
        model_type=model_type,
        intermediate_size=192,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = generate.speed_up(phi.Phi.from_config(cfg).eval().bfloat16(), cpu_kernels=True)
    exact = copy.deepcopy(model).float()
    ids = ids_for(14, B=1)
    out = {}
    for name, m, step in [
        ("exact", exact, generate.decode_one_token),
        ("eager", model, generate.decode_one_token),
        ("compiled", model, compiled_step()),
    ]:
        cache = phi.KVCache(cfg, 1, 14, dtype=m.embed.weight.dtype)
        out[name] = stepped_logits(m, step, ids, 6, cache).float()
    eager, compiled = err(out["eager"], out["exact"]), err(out["compiled"], out["exact"])
    record(f"compiled bf16 batch-1 decode vs exact / eager vs exact ({model_type})", compiled / eager)
    assert compiled <= 1.1 * eager


def test_compiled_int8_decode_of_several_rows_matches_eager(fresh_compiler):
    """int8 weights, compiled decode step with 3 rows (PyTorch's int8 kernel, kept opaque to inductor as the custom op
    generate.int8_mm): the same tokens' logits as the eager step, and within 2% of the fp32 model."""
    cfg = tiny_config(intermediate_size=256)
    torch.manual_seed(0)
    fp32 = phi.Phi.from_config(cfg).eval()
    q = generate.quantize_int8(copy.deepcopy(fp32))
    ids = ids_for(12, B=3)
    steps = {"eager": generate.decode_one_token, "compiled": compiled_step()}
    out = {}
    for name, step in steps.items():
        cache = phi.KVCache(cfg, 3, 12)
        out[name] = stepped_logits(q, step, ids, 8, cache)
    with torch.no_grad():
        want = fp32(ids)[:, 8:]
    # the same int8 kernel (an op inductor does not look into) both ways, fp32 around it: equal up to fp32 reordering
    assert record("compiled vs eager int8 decode, 3 rows", err(out["compiled"], out["eager"])) <= TOL
    assert ((out["compiled"] - want).norm() / want.norm()).item() <= 0.02


def test_compiled_int4_decode_matches_eager(fresh_compiler):
    """int4 weights, compiled decode step (batch 1 and 3 rows, a bf16 model): PyTorch's int4 kernel both ways, so
    the logits equal the eager step's up to bf16 rounding of what inductor fuses around it, and are no farther
    from the fp32 model's than the eager step's."""
    cfg = tiny_config(intermediate_size=256)
    torch.manual_seed(0)
    fp32 = phi.Phi.from_config(cfg).eval()
    q = generate.quantize_int4(copy.deepcopy(fp32).to(torch.bfloat16))
    assert isinstance(q.layers[0].mlp.fc1, generate.Int4Linear)
    for B in (1, 3):
        ids, out = ids_for(12, B=B), {}
        for name, step in {"eager": generate.decode_one_token, "compiled": compiled_step()}.items():
            out[name] = stepped_logits(q, step, ids, 8, phi.KVCache(cfg, B, 12, dtype=torch.bfloat16)).float()
        with torch.no_grad():
            want = fp32(ids)[:, 8:]
        scale = want.abs().max().item()
        assert (
            record(f"compiled vs eager int4 decode, {B} rows / max|logit|", err(out["compiled"], out["eager"]) / scale)
            <= 2e-2
        )
        rel = {k: ((v - want).norm() / want.norm()).item() for k, v in out.items()}
        assert rel["compiled"] <= 1.1 * rel["eager"]  # no farther from fp32 than the eager int4 step


@pytest.mark.parametrize("new_tokens", [20, 36])
def test_compiled_generation_of_a_longrope_model(tmp_path, monkeypatch, new_tokens, fresh_compiler):
    """`--compile` on a LongRoPE model (original context 32 here): a generation whose cache fits in the original
    context (8 + 20 slots) runs the compiled step for every token; one that crosses it (8 + 36) runs the plain step
    up to the crossing (which re-runs the cache with the long factors), the compiled one after it. Greedy tokens
    equal eager generation's either way (this used to fail to compile)."""
    import torch._dynamo.testing

    model = from_transformers("phi4-mini", tmp_path)[0]
    prompts = ids_for(8).tolist()
    want = torch.stack(list(generate.generate_batch(model, prompts, new_tokens, eos_ids=set())))
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(generate.eager_decode_one_token, backend=counter, fullgraph=True)
    calls = []
    monkeypatch.setattr(generate, "decode_one_token", lambda *a: calls.append(1) or compiled(*a))
    got = torch.stack(list(generate.generate_batch(model, prompts, new_tokens, eos_ids=set())))
    assert torch.equal(got, want)
    assert counter.frame_count == 1
    # new_tokens - 1 decode calls; the one at step k feeds position 8 + k: steps up to 24 (position 32) are plain
    assert len(calls) == (new_tokens - 1 if new_tokens == 20 else new_tokens - 1 - 25)


def test_compiled_speed_report_leaves_out_the_first_step(monkeypatch, capsys):
    """With --compile the tokens/s printed leave out the first decode step, where torch.compile compiles: here a
    step that takes 1 s once, in a 2-row batch (whose first two steps produce 4 tokens)."""
    import time

    cfg = tiny_config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    model, eager, calls = phi.Phi.from_config(cfg).eval(), generate.decode_one_token, []

    def slow_first(*args):
        calls.append(time.sleep(1.0) if not calls else None)
        return eager(*args)

    monkeypatch.setattr(generate, "decode_one_token", slow_first)
    stats = {}
    list(generate.generate_batch(model, [[5, 6, 7], [8]], 12, eos_ids=set(), stats=stats))
    generate.report(stats, compiled=True)
    m = re.search(
        r"generation: 24 tokens, ([\d.]+) tokens/s after the first step \(which compiles: (\d\.\d) s\)",
        capsys.readouterr().err,
    )
    assert m and float(m[2]) >= 1.0 and stats["first_tokens"] == 4
    # 20 tokens over the time after the first step (counting that step's second would change it by over 1 s)
    assert float(m[1]) == pytest.approx(20 / (stats["decode_s"] - stats["first_step_s"]), rel=0.01, abs=0.06)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run it where one is lent)")
def test_cuda_forward_and_graph_decode_match(tmp_path, fresh_compiler):
    """On CUDA: the fp32 forward equals the CPU one, and generate.compile_decode's step (torch.compile with CUDA
    graphs) is captured (no cudagraph skip: the cache's tensors have fixed addresses), is not traced again for a
    new cache, and equals the full forward pass (sliding window and GQA included)."""
    from torch._dynamo.utils import counters

    path = saved(hf_model("phi3-gqa-window"), tmp_path)
    model, ids = phi.Phi.from_pretrained(path, device="cuda"), ids_for(24)
    with torch.no_grad():
        full = phi.Phi.from_pretrained(path)(ids)
        assert record("cuda vs cpu forward", err(model(ids.cuda()).cpu(), full)) <= TOL
    counters.clear()
    step = generate.compile_decode("cuda")
    for _ in range(2):
        cache = phi.KVCache(model.config, 2, 24, device="cuda")
        got = stepped_logits(model, step, ids.cuda(), 8, cache)
        assert record("cuda graph decode vs full forward", err(got.cpu(), full[:, 8:])) <= TOL
    assert counters["stats"]["unique_graphs"] == 1 and not counters["inductor"]["cudagraph_skips"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run it where one is lent)")
def test_train_device_cuda_means_this_process_gpu(monkeypatch):
    """`train.py --device cuda` (no index) trains on this process's GPU: torchrun's LOCAL_RANK, else cuda:0."""
    import argparse

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train.setup_distributed(argparse.Namespace(device="cuda"))[2] == torch.device("cuda", 0)


def test_speed_up_is_a_module_swap_chosen_by_the_cpu_rule(tmp_path, hub, monkeypatch):
    """phi.py builds plain nn.Linear; generate.speed_up swaps in FastLinear (the CPU kernels) sharing each parameter:
    the state dict keeps its names, a tied lm_head stays tied, the logits stay the same. generate.load applies it
    where generate.CPU_KERNELS says so (AMD CPUs; PHI_CPU_KERNELS=0/1 overrides), and not elsewhere."""
    path = saved(hf_model("phi4-mini"), tmp_path)
    plain = phi.Phi.from_pretrained(path)
    assert all(type(m) is torch.nn.Linear for m in plain.modules() if isinstance(m, torch.nn.Linear))
    assert generate.speed_up(plain, cpu_kernels=False) is plain and not any(
        isinstance(m, generate.FastLinear) for m in plain.modules()
    )
    fast = generate.speed_up(phi.Phi.from_pretrained(path), cpu_kernels=True)
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * fast.config.num_hidden_layers + 1
    assert all(type(m) is generate.FastLinear for m in linears)
    assert list(fast.state_dict()) == list(plain.state_dict()) and fast.lm_head.weight is fast.embed.weight
    ids = ids_for(20)
    with torch.no_grad():
        assert err(fast(ids), plain(ids)) <= TOL
    for rule in (False, True):
        monkeypatch.setattr(generate, "CPU_KERNELS", rule)
        model, _ = generate.load(snapshot(hub[0], "phi-2"), dtype="float32", device="cpu")
        assert isinstance(model.layers[0].mlp.fc1, generate.FastLinear) == rule
    for value, want in (("0", "False"), ("1", "True")):
        env = python_env(PHI_CPU_KERNELS=value)
        r = subprocess.run(
            [sys.executable, "-c", "import generate; print(generate.CPU_KERNELS)"],
            env=env,
            text=True,
            capture_output=True,
        )
        assert r.stdout.strip() == want, r.stderr


def transformers_init(name, path):
    """Case `name` with transformers' own random init (not hf_model's larger weights), saved to path."""
    kind, kw, _ = CASES[name]
    torch.manual_seed(0)
    hf_cfg = getattr(transformers, HF_CLASSES[kind] + "Config")(**{**BASE, **kw})
    return saved(getattr(transformers, HF_CLASSES[kind] + "ForCausalLM")(hf_cfg), path)


@pytest.mark.parametrize("name", ["phi-2", "phi3-4k", "phi4-mini", "phimoe"])
def test_int8_logits_close_to_fp32(name, tmp_path):
    """Weight-only int8 (per-channel symmetric) on transformers' own random init: logits within 2% of fp32
    (||int8 - fp32|| / ||fp32||), with fp32 and with bf16 activations."""
    path = transformers_init(name, tmp_path)
    ids = ids_for(48)
    with torch.no_grad():
        want = phi.Phi.from_pretrained(path)(ids)
        q = generate.quantize_int8(phi.Phi.from_pretrained(path))
        assert q.layers[0].attn.qkv.weight.dtype == torch.int8
        rel = ((q(ids) - want).norm() / want.norm()).item()
        qb = generate.quantize_int8(phi.Phi.from_pretrained(path, dtype=torch.bfloat16))
        rel_bf16 = ((qb(ids).float() - want).norm() / want.norm()).item()
    assert record(f"int8 logits relative error {name}", rel) < 0.02
    assert record(f"int8 (bf16) logits relative error {name}", rel_bf16) < 0.02


def test_int8_prompt_multiplies_the_expanded_weights_as_fast_linear_does(tmp_path, monkeypatch):
    """With fp32 activations on the CPU an int8 model's prompt expands each weight and takes FastLinear's matmul:
    oneDNN from generate.ONEDNN_MIN_WEIGHTS on (F.linear, MKL, is 1.2-1.4x slower at 512 rows), the same logits."""
    model = generate.speed_up(from_transformers("phi-2", tmp_path)[0], cpu_kernels=True)
    q = generate.quantize_int8(model)
    ids, calls, op = ids_for(12), [], generate.onednn_linear
    monkeypatch.setattr(generate, "onednn_linear", lambda *a: calls.append(a[1].dtype) or op(*a))
    with torch.no_grad():
        want = q(ids)  # the tiny weights: all F.linear
        assert not calls
        monkeypatch.setattr(generate, "ONEDNN_MIN_WEIGHTS", 0)
        got = q(ids)
    assert calls == [torch.float32] * (4 * q.config.num_hidden_layers + 1)
    assert record("int8 prompt, oneDNN vs F.linear logits", err(got, want)) <= TOL


def test_int8_cannot_be_saved_and_cli_equals_the_api(tmp_path, hub):
    """An int8 model refuses to be saved (its weights are not the checkpoint's); --quantize int8 on the command line
    generates the API's int8 tokens, which differ from the unquantized ones here (so the option is not ignored)."""
    q = generate.quantize_int8(from_transformers("phi-1.5", tmp_path)[0])
    with pytest.raises(ValueError, match="an int8-quantized model is not saved"):
        q.save_pretrained(tmp_path / "no")
    home, _ = hub
    want = {}
    for quantize in (None, "int8"):
        model, tok = generate.load(snapshot(home, "phi3-4k"), quantize=quantize)
        prompt = tok.encode("def f(x):", bos=tok.add_bos)
        want[quantize] = continuation(tok, prompt, list(generate.generate(model, prompt, 24)))
    assert want[None] != want["int8"]
    args = ("--model", "test/phi3-4k", "--prompt", "def f(x):", "--max-new-tokens", 24, "--temperature", 0)
    assert run_cli(home, *args, "--quantize", "int8").stdout == want["int8"] + "\n"


def test_train_stops_on_a_non_finite_loss(tmp_path):
    r = run_train(
        tmp_path,
        "--out",
        tmp_path / "out",
        "--max-steps",
        20,
        "--eval-every",
        0,
        "--lr",
        "1e12",
        "--warmup-steps",
        1,
        "--grad-clip",
        0,
    )
    assert_one_line_error(r, "train.py", r.stderr.strip().splitlines()[-1].removeprefix("train.py: error: "), 2)
    assert re.fullmatch(
        r"train.py: error: the loss is (nan|inf) at step \d+: stopping \(try a lower --lr, or bfloat16 "
        r"instead of float16\); the last good checkpoint is kept",
        r.stderr.strip().splitlines()[-1],
    )
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("name", ["phi-2", "phi4-mini"])
def test_onednn_linears_match_transformers_in_forward_backward_and_compiled_decode(
    name, tmp_path, monkeypatch, fresh_compiler
):
    """fp32 Linears on the CPU from generate.ONEDNN_MIN_WEIGHTS weights on are oneDNN matmuls (a custom op with its own
    backward). With that threshold at 0, every one is: logits, loss and every parameter's gradient equal
    transformers' (phi4-mini: lm_head tied to the embedding), the compiled 3-row decode step equals the full forward,
    and under bf16 autocast the Linears are left to autocast (bf16 out)."""
    calls = []
    op = generate.onednn_linear
    monkeypatch.setattr(generate, "ONEDNN_MIN_WEIGHTS", 0)
    monkeypatch.setattr(generate, "onednn_linear", lambda *a: calls.append(a[1].shape) or op(*a))
    ours, ref = from_transformers(name, tmp_path)
    ours, ref = generate.speed_up(ours, cpu_kernels=True).train(), ref.train()
    ids = ids_for(12)
    logits, loss = ours(ids, labels=ids)
    n = 4 * ours.config.num_hidden_layers + 1  # qkv, out, fc1, fc2 per layer, lm_head
    assert len(calls) == n
    loss.backward()  # + each input's gradient
    assert len(calls) == 2 * n
    out = ref(ids, labels=ids)
    out.loss.backward()
    assert record(f"oneDNN logits {name}", err(logits, out.logits)) <= TOL
    assert record(f"oneDNN loss {name}", abs(loss.item() - out.loss.item())) <= TOL
    hf_params = dict(ref.named_parameters())
    for our, srcs in ours.hf_names(ours.config.model_type).items():
        want = torch.cat([hf_params[s].grad for s in srcs])
        got = ours.get_parameter(our).grad
        assert record(f"oneDNN gradients {name}", err(got, want)) <= TOL * max(1.0, want.abs().max().item()), our

    ours.eval()
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(ids).dtype == torch.bfloat16 and not calls
    ids3 = ids_for(12, B=3)
    step = compiled_step()
    cache = phi.KVCache(ours.config, 3, 12)
    got = stepped_logits(ours, step, ids3, 8, cache)
    with torch.no_grad():
        assert record(f"oneDNN compiled 3-row decode {name}", err(got, ours(ids3)[:, 8:])) <= TOL
    assert calls


# ===============================================================================================================
# LoRA adapters (PEFT format): peft + transformers as the oracle

PEFT_TARGETS = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def peft_adapter(ref, path, targets, task="CAUSAL_LM", r=4, **kw):
    """A PEFT LoRA adapter on transformers' model ref with random A and B (B is zero at peft's own init), saved to
    path: (the peft model, path)."""
    import peft

    cfg = peft.LoraConfig(
        r=r, lora_alpha=2 * r + 1, target_modules=targets, task_type=task, init_lora_weights=False, **kw
    )
    torch.manual_seed(5)
    model = peft.get_peft_model(copy.deepcopy(ref), cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize(
    "name,targets,kw",
    [
        ("phi-2", PEFT_TARGETS["phi"], {}),
        ("phi-2", ["k_proj", "fc2"], dict(use_rslora=True)),
        ("phi3-gqa-window", PEFT_TARGETS["phi3"], {}),
        (
            "phi4-mini",
            ["qkv_proj", "down_proj"],
            dict(use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3}),
        ),
    ],
)
def test_peft_made_adapter_gives_peft_logits(name, targets, kw, tmp_path):
    """A LoRA adapter made by peft (random A and B; all targets or a subset; lora_alpha/r or rslora's
    lora_alpha/sqrt(r); per-module rank and alpha) merged by generate.load(..., adapter=) gives the logits peft gives
    transformers (fp32); phi's q_proj/k_proj/v_proj land on row slices of our fused qkv."""
    ref = hf_model(name)
    saved(ref, tmp_path / "base")
    tuned, adapter = peft_adapter(ref, tmp_path / "adapter", targets, **kw)
    ours = generate.merge_adapter(phi.Phi.from_pretrained(tmp_path / "base"), adapter)
    ids = ids_for(20)
    with torch.no_grad():
        want = tuned(ids).logits
        assert err(want, ref(ids).logits) > 10 * TOL  # the adapter changes the logits
        assert record(f"peft adapter {name} {'+'.join(targets)}", err(ours(ids), want)) <= TOL


def tiny_checkpoint(path, model_type="phi", **over):
    """A random checkpoint of the TINY shape written by transformers, with the byte tokenizer (what --init takes)."""
    kw = {k: v for k, v in TINY.items() if k != "model_type"}
    if model_type in ("phi3", "phimoe"):
        kw = {**kw, "partial_rotary_factor": 1.0, "num_key_value_heads": 2, "hidden_act": "silu"}
    if model_type == "phimoe":
        kw = {**kw, "num_local_experts": 4, "attention_bias": True, "lm_head_bias": True}
    torch.manual_seed(0)
    cls = getattr(transformers, HF_CLASSES[model_type] + "ForCausalLM")
    config = getattr(transformers, HF_CLASSES[model_type] + "Config")(
        **kw, pad_token_id=256, eos_token_id=256, bos_token_id=256, **over
    )
    cls(config).save_pretrained(path)
    train.write_byte_tokenizer(path)
    return path


def file_hashes(d):
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(d).iterdir()) if f.is_file()}


def peft_on_transformers(base_dir, adapter_dir, head="ForCausalLM", **kw):
    import peft

    auto = getattr(transformers, "AutoModel" + ("ForCausalLM" if head == "ForCausalLM" else head))
    base = auto.from_pretrained(base_dir, attn_implementation="eager", **kw)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize("model_type", ["phi", "phi3"])
def test_lora_training_writes_a_peft_adapter_that_peft_generate_and_merge_agree_on(model_type, tmp_path):
    """train.py --lora on a frozen base: OUT/adapter is a PEFT adapter (config fields, peft's tensor names) that
    peft loads into transformers' model with the logits generate.load(..., adapter=) gives us, and OUT/model
    (--merge) equals both; the base checkpoint's files are untouched and the merged model differs from the base only
    in the adapted Linears; checkpoints hold the adapter and the training state, not the base."""
    base = tiny_checkpoint(tmp_path / "base", model_type)
    before = file_hashes(base)
    args = ("--init", base, "--out", tmp_path / "out", "--lora", 4, "--lora-targets", "qkv,out,fc1,fc2,lm_head")
    r = run_train(tmp_path, *args, "--merge", "--max-steps", 12, "--eval-every", 6, "--save-every", 6, "--lr", "1e-2")
    assert r.returncode == 0, r.stderr
    val = [float(x) for x in re.findall(r"validation loss ([\d.]+)", r.stderr)]
    assert val[1] < val[0], r.stderr
    assert file_hashes(base) == before
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state.pt"} <= set(
        file_hashes(out / "ckpt-000006")
    )
    assert not list((out / "ckpt-000006").glob("model*.safetensors"))
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    want_targets = PEFT_TARGETS[model_type] + ["lm_head"]
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert sorted(cfg["target_modules"]) == sorted(want_targets) and cfg["base_model_name_or_path"] == str(base)
    tuned = peft_on_transformers(base, out / "adapter")
    ours, _ = generate.load(base, dtype="float32", adapter=out / "adapter")
    merged = phi.Phi.from_pretrained(out / "model")
    plain = phi.Phi.from_pretrained(base)
    ids = ids_for(24, vocab=256)
    with torch.no_grad():
        want = tuned(ids).logits
        assert err(want, plain(ids)) > 100 * TOL  # training moved the adapters
        assert record(f"train --lora {model_type}: ours vs peft", err(ours(ids), want)) <= TOL
        assert record(f"train --lora {model_type}: --merge vs peft", err(merged(ids), want)) <= TOL
    adapted = ("attn.qkv.", "attn.out.", "mlp.fc1.", "mlp.fc2.", "lm_head.")
    for name, p in plain.state_dict().items():
        same = torch.equal(p, merged.state_dict()[name])
        assert same != (name.endswith(".weight") and any(a in name for a in adapted)), name


def test_lora_classifier_adapter_loads_in_peft_and_resumes_exactly(tmp_path):
    """--task seq-cls --lora: the score trains fully and is saved as peft's modules_to_save; peft loads the adapter
    into transformers' PhiForSequenceClassification with our logits. A LoRA run resumed from its checkpoint (without
    repeating its --lora-targets) ends with the adapter bit-identical to the uninterrupted run's (dropout on)."""
    base = tiny_checkpoint(tmp_path / "base")
    toy_classification(tmp_path)
    common = ("--init", base, "--task", "seq-cls", "--data", tmp_path / "seq.jsonl", "--lora", 4, "--lora-dropout", 0.1)
    common += ("--eval-every", 0, "--lr", "3e-3", "--max-steps", 8)
    a = run_train(tmp_path, *common, "--out", tmp_path / "a", "--save-every", 4, "--lora-targets", "qkv,out")
    assert a.returncode == 0, a.stderr
    cfg = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    tuned = peft_on_transformers(base, tmp_path / "a" / "adapter", "ForSequenceClassification", num_labels=2)
    ours = generate.merge_adapter(
        phi.PhiForSequenceClassification.from_pretrained(base, num_labels=2), tmp_path / "a" / "adapter"
    )
    ids, mask, pos = classification_inputs()
    ids = ids.masked_fill(mask == 0, 256)  # transformers pools at the last token that is not the pad id
    with torch.no_grad():
        want = tuned(ids, attention_mask=mask, position_ids=pos).logits
        assert record("train --lora seq-cls: ours vs peft", err(ours(ids, attention_mask=mask), want)) <= TOL
    # resumed without --lora-targets: the checkpoint's (qkv,out); other targets are one clear error
    b = run_train(tmp_path, *common, "--out", tmp_path / "b", "--resume", tmp_path / "a" / "ckpt-000004")
    assert b.returncode == 0, b.stderr
    c = run_train(tmp_path, *common, "--out", tmp_path / "c", "--resume", tmp_path / "a", "--lora-targets", "qkv")
    assert c.returncode == 2 and "was trained with --lora-targets qkv,out, not qkv" in c.stderr
    from safetensors.torch import load_file

    wa, wb = (load_file(tmp_path / x / "adapter" / "adapter_model.safetensors") for x in "ab")
    w4 = load_file(tmp_path / "a" / "ckpt-000004" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], w4[k]) for k in wa)


def test_lora_token_classifier_adapter_loads_in_peft(tmp_path):
    """--task token-cls --lora: a TOKEN_CLS adapter with the score as modules_to_save, which peft loads into
    transformers' PhiForTokenClassification with our logits."""
    base = tiny_checkpoint(tmp_path / "base")
    toy_classification(tmp_path)
    r = run_train(
        tmp_path,
        "--init",
        base,
        "--task",
        "token-cls",
        "--data",
        tmp_path / "tok.jsonl",
        "--lora",
        4,
        "--eval-every",
        0,
        "--lr",
        "3e-3",
        "--max-steps",
        6,
        "--out",
        tmp_path / "out",
    )
    assert r.returncode == 0, r.stderr
    adapter = tmp_path / "out" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"
    tuned = peft_on_transformers(base, adapter, "ForTokenClassification", num_labels=2)
    ours = generate.merge_adapter(phi.PhiForTokenClassification.from_pretrained(base, num_labels=2), adapter)
    ids = ids_for(12, vocab=256)
    with torch.no_grad():
        assert record("train --lora token-cls: ours vs peft", err(ours(ids), tuned(ids).logits)) <= TOL


def test_lora_bad_arguments_one_clear_error(tmp_path):
    base = tiny_checkpoint(tmp_path / "base")
    tied = tiny_checkpoint(tmp_path / "tied", "phi3", tie_word_embeddings=True)
    for args, message in [
        (("--lora", 4), "--lora R needs R >= 1 and --init (the checkpoint to adapt)"),
        (("--init", base, "--quantize", "int8"), "--quantize needs --lora (a frozen base to quantize or merge into)"),
        (
            ("--init", base, "--lora", 4, "--lora-targets", "qkv,q_proj"),
            "--lora-targets q_proj: not one of qkv, out, fc1, fc2, lm_head",
        ),
        (
            ("--init", base, "--lora", 4, "--fsdp"),
            "--lora with --fsdp is not supported (the base is frozen: DDP, or one process, is enough)",
        ),
        (
            ("--init", tied, "--lora", 4, "--lora-targets", "lm_head"),
            "--lora-targets lm_head: this model's lm_head is its embedding (tied); leave lm_head out",
        ),
    ]:
        r = run_train(tmp_path, "--out", tmp_path / "out", "--max-steps", 2, *args)
        assert_one_line_error(r, "train.py", message, 2)
    assert not (tmp_path / "out" / "adapter").exists()


def test_lora_with_compile_checkpointing_and_grad_accum_equals_the_plain_step(tmp_path):
    """--lora under --compile, --checkpointing and --grad-accum 2 x 4 gives the plain run's (batch 8, eager) loss and
    gradient norm at each step (up to the compiled kernels' rounding)."""
    base = tiny_checkpoint(tmp_path / "base")
    common = ("--init", base, "--lora", 4, "--lora-dropout", 0, "--max-steps", 2, "--eval-every", 0, "--log-every", 1)
    plain = run_train(tmp_path, *common, "--out", tmp_path / "plain", "--batch-size", 8)
    torch._dynamo.reset()
    fancy = run_train(
        tmp_path,
        *common,
        "--out",
        tmp_path / "fancy",
        "--batch-size",
        4,
        "--grad-accum",
        2,
        "--checkpointing",
        "--compile",
    )
    torch._dynamo.reset()
    assert plain.returncode == 0 and fancy.returncode == 0, plain.stderr + fancy.stderr
    for step in (1, 2):
        (loss1, norm1), (loss2, norm2) = logged(plain)[step], logged(fancy)[step]
        assert loss1 == pytest.approx(loss2, rel=1e-4) and norm1 == pytest.approx(norm2, rel=1e-3)


def test_lora_on_an_int8_base_trains_and_applies_to_the_bf16_base(tmp_path):
    """--lora with --quantize int8: the frozen base is int8 (per channel), the adapters train in bf16 autocast; the
    loss falls, and the adapter, merged into the base loaded in bf16, lowers the loss there too."""
    base = tiny_checkpoint(tmp_path / "base")
    r = run_train(
        tmp_path,
        "--init",
        base,
        "--out",
        tmp_path / "out",
        "--lora",
        16,
        "--lora-targets",
        "qkv,out,fc1,fc2,lm_head",
        "--quantize",
        "int8",
        "--dtype",
        "bfloat16",
        "--max-steps",
        40,
        "--eval-every",
        20,
        "--lr",
        "2e-2",
        "--log-every",
        1,
    )
    assert r.returncode == 0, r.stderr
    val = [float(x) for x in re.findall(r"validation loss ([\d.]+)", r.stderr)]
    assert val[1] < val[0] and logged(r)[40][0] < logged(r)[1][0] - 0.5, r.stderr
    tok = generate.load_tokenizer(base)
    text = (CORPUS / "decoder.py").read_text()[:2000]
    ids = torch.tensor([tok.encode(text, allowed_special=set())])
    losses = {}
    for adapter in (None, tmp_path / "out" / "adapter"):
        model, _ = generate.load(base, dtype="bfloat16", adapter=adapter)
        with torch.no_grad():
            losses[adapter is not None] = model(ids, labels=ids)[1].item()
    assert losses[True] < losses[False] - 0.5


def test_lora_quantized_base_is_int8_and_only_adapters_train(tmp_path):
    """What --lora --quantize int8 builds: every adapted Linear's base stores int8 weights, and the only parameters
    with gradients are the adapters'."""
    import argparse

    base = tiny_checkpoint(tmp_path / "base")
    args = train.parse_args(["--init", str(base), "--lora", "4", "--quantize", "int8", "--dtype", "bfloat16"])
    model = train.build_model(args, None, torch.device("cpu"), 257, 256, None)
    loras = [m for m in model.modules() if isinstance(m, train.LoRALinear)]
    assert len(loras) == 4 * TINY["num_hidden_layers"]
    assert all(isinstance(m.base, generate.Int8Linear) and m.base.weight.dtype == torch.int8 for m in loras)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n in dict(model.named_parameters()) if ".lora_" in n}
    assert isinstance(args, argparse.Namespace)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda cfg, t: cfg.update(peft_type="IA3"), "peft_type 'IA3' is not supported (LoRA adapters only)"),
        (lambda cfg, t: cfg.update(r=8), "(rank 8 from adapter_config.json, this model's"),
        (lambda cfg, t: cfg.update(target_modules=["qkv_proj"]), "target module 'qkv_proj' does not exist in this phi"),
        (
            lambda cfg, t: t.update({k.replace("q_proj", "qkv_proj"): t.pop(k) for k in list(t) if "q_proj" in k}),
            "which this phi model does not have (an adapter for another architecture?)",
        ),
        (lambda cfg, t: t.update({k.replace("layers.0", "layers.7"): t.pop(k) for k in list(t)}), "layers.7"),
        (lambda cfg, t: cfg.update(use_dora=True), "use_dora is not supported (plain LoRA only)"),
    ],
)
def test_adapter_that_does_not_fit_is_one_clear_error(change, message, tmp_path):
    """Another adapter type, a rank that is not the tensors', a target module or tensor this architecture does not
    have: one ValueError naming the adapter and the problem, and the model's weights as they were."""
    from safetensors.torch import load_file, save_file

    ref = hf_model("phi-1.5")
    saved(ref, tmp_path / "base")
    _, adapter = peft_adapter(ref, tmp_path / "adapter", PEFT_TARGETS["phi"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    change(cfg, tensors)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, adapter / "adapter_model.safetensors")
    model = phi.Phi.from_pretrained(tmp_path / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        generate.merge_adapter(model, adapter)
    assert str(e.value).startswith(str(adapter) + ": ")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-merged


@needs_reference("tokenizers")
def test_cli_adapter_from_the_hub_cache_equals_the_api(hub, tmp_path):
    """--adapter with a Hub id (from the offline cache) on the command line: the API's tokens with that adapter, which
    differ from the base model's."""
    home, refs = hub
    _, adapter = peft_adapter(refs["phi-2"], tmp_path / "adapter", ["q_proj", "v_proj", "fc1"])
    shutil.copytree(adapter, hub_repo(home, "test/phi-2-lora", "2" * 40), dirs_exist_ok=True)
    want = {}
    for a in (None, adapter):
        model, tok = generate.load(snapshot(home, "phi-2"), dtype="float32", adapter=a)
        want[a] = tok.decode(list(generate.generate(model, tok.encode(PROMPT), 12)))
    assert want[None] != want[adapter]
    args = ("--model", "test/phi-2", "--prompt", PROMPT, "--max-new-tokens", 12, "--temperature", 0)
    r = run_cli(home, *args, "--adapter", "test/phi-2-lora", "--dtype", "float32")
    assert r.returncode == 0 and r.stdout == want[adapter] + "\n", r.stderr
    assert_one_line_error(
        run_cli(home, *args, "--adapter", tmp_path),
        "generate.py",
        f"{tmp_path}: no adapter_config.json (is this a PEFT adapter?)",
        1,
    )


# ===============================================================================================================
# serve.py: an OpenAI-compatible server, tested with the official openai client


@pytest.fixture
def server(hub):
    """serve.py on a free loopback port, in a thread of this process, for a checkpoint of the hub fixture:
    yields (base_url, model, tok, start) where start(name) (re)starts it on another checkpoint."""
    import serve

    running = []

    def start(name):
        model, tok = generate.load(snapshot(hub[0], name), dtype="float32")
        httpd = serve.serve(model, tok, f"test/{name}", port=0)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        running.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1", model, tok

    yield start
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


def openai_client(url):
    import openai

    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)


@needs_reference("tokenizers")
@pytest.mark.parametrize("name", ["phi3-4k", "phi4-mini"])
def test_serve_chat_and_completions_equal_generate(name, server):
    """Greedy chat completion == generate.generate on the family's rendered prompt (as apply_chat_template renders
    it); streaming concatenates to the same text; /v1/completions likewise; stop strings; usage; /v1/models."""
    url, model, tok = server(name)
    client = openai_client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    template = transformers.AutoTokenizer.from_pretrained(TOK / GEN_CASES[name][1])
    ids = tok.encode(template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    end = tok.added["<|end|>"]["id"]
    want = list(generate.generate(model, ids, 12, temperature=0, eos_ids=model.eos_ids | {end}))
    text = continuation(tok, ids, want)
    r = client.chat.completions.create(model=f"test/{name}", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    chunks = client.chat.completions.create(
        model=f"test/{name}", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    stop = text[4:7]
    r = client.chat.completions.create(
        model=f"test/{name}", messages=messages, max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].message.content == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    prompt_ids = tok.encode(PROMPT, bos=tok.add_bos)
    plain = continuation(tok, prompt_ids, list(generate.generate(model, prompt_ids, 10, temperature=0)))
    r = client.completions.create(model=f"test/{name}", prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.choices[0].text == plain
    assert [m.id for m in client.models.list().data] == [f"test/{name}"]


@needs_reference("tokenizers")
def test_serve_two_concurrent_clients_get_their_own_answers(server):
    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    prompts = ["Name a prime.", "Say hello in French."]
    want = [
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": p}], max_tokens=16, temperature=0
        )
        .choices[0]
        .message.content
        for p in prompts
    ]
    assert want[0] != want[1]
    got = [None, None]

    def ask(i):
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompts[i]}], max_tokens=16, temperature=0
        )
        got[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


@needs_reference("tokenizers")
def test_serve_bad_requests_are_400_and_the_server_keeps_serving(server):
    import http.client

    import openai

    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    msg = [{"role": "user", "content": "hi"}]
    for kw, param in [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens="many"), "max_tokens"),
        (dict(temperature="hot"), "temperature"),
        (dict(messages=[{"role": "user", "content": "word " * 300}]), "messages"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", **{"messages": msg, **kw})
        assert (
            e.value.status_code == 400
            and e.value.body["param"] == param
            and e.value.body["type"] == "invalid_request_error"
        )
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=b"{not json", headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400 and "not valid JSON" in json.loads(r.read())["error"]["message"]
    # a client that goes away mid-stream: its generation stops (few tokens sampled), the server still answers
    calls = []
    sample = generate.sample
    generate.sample = lambda *a, **kw: calls.append(1) or sample(*a, **kw)
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = json.dumps({"messages": msg, "max_tokens": 100, "temperature": 0, "stream": True})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.fp.readline()  # the first event, then hang up
        r.close()
        conn.close()
        r = client.chat.completions.create(model="m", messages=msg, max_tokens=4, temperature=0)
        assert r.choices[0].message.content is not None
    finally:
        generate.sample = sample
    assert len(calls) < 100 + 4
    assert client.with_options().models.list().data


@needs_reference("tokenizers")
def test_serve_phi4_mini_tool_call_round_trip(server, monkeypatch):
    """Tools on a Phi-4-mini-shaped model: the prompt the server builds from OpenAI messages (tools, an assistant's
    tool_calls, a tool result) is what the checkpoint's own chat template renders; a forced <|tool_call|> reply comes
    back as OpenAI tool_calls (finish_reason "tool_calls"); malformed JSON in it comes back as content."""
    url, model, tok = server("phi4-mini")
    client = openai_client(url)
    fn = {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "user", "content": "And in Rome?"},
    ]
    template = [  # the same conversation as Phi-4-mini's template takes it
        {"role": "system", "content": "You help.", "tools": json.dumps([fn])},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>',
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "user", "content": "And in Rome?"},
    ]
    want_prompt = transformers.AutoTokenizer.from_pretrained(TOK / "phi4mini").apply_chat_template(
        template, tokenize=False, add_generation_prompt=True
    )
    end = tok.added["<|end|>"]["id"]
    prompts, reply = [], []
    real_generate = generate.generate
    monkeypatch.setattr(
        generate, "generate", lambda m, ids, *a, **kw: prompts.append(list(ids)) or real_generate(m, ids, *a, **kw)
    )
    monkeypatch.setattr(generate, "sample", lambda logits, *a, **kw: torch.full(logits.shape[:1], reply.pop(0)))
    for text, calls in [
        ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Rome"}}]<|/tool_call|>', True),
        ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": Rome}]<|/tool_call|>', False),
    ]:
        reply[:] = tok.encode(text) + [end]
        r = client.chat.completions.create(
            model="m", messages=messages, tools=[{"type": "function", "function": fn}], max_tokens=40
        )
        assert prompts[-1] == tok.encode(want_prompt)
        choice = r.choices[0]
        if calls:
            assert choice.finish_reason == "tool_calls" and not choice.message.content
            assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
                ("get_weather", {"city": "Rome"})
            ]
            assert choice.message.tool_calls[0].id.startswith("call_")
        else:
            assert choice.finish_reason == "stop" and choice.message.content == text and not choice.message.tool_calls


@needs_reference("tokenizers")
def test_serve_n_choices_and_seed_and_the_program(server, hub):
    """n=2 at temperature 1 gives two different choices, and a seed reproduces them; serve.py as a program listens on
    127.0.0.1 by default (port 0: a free one, printed) and answers /health."""
    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    msg = [{"role": "user", "content": "Tell me a story."}]

    def texts(seed):
        r = client.chat.completions.create(model="m", messages=msg, max_tokens=12, temperature=1, n=2, seed=seed)
        return [c.message.content for c in r.choices]

    a = texts(3)
    assert a[0] != a[1] and texts(3) == a and texts(4) != a
    env = python_env(HF_HOME=hub[0], HF_HUB_OFFLINE=1)
    cmd = [sys.executable, str(ROOT / "serve.py"), "--model", "test/phi3-4k", "--port", "0", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        m = re.fullmatch(r"serve.py: test/phi3-4k on http://127\.0\.0\.1:(\d+)/v1\n", line)
        assert m, line
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{m[1]}/health", timeout=30) as r:
            assert json.loads(r.read()) == {"status": "ok"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ===============================================================================================================
# Speculative decoding (greedy, batch 1)


@pytest.mark.parametrize("name", ["phi-2", "phi3-gqa-window", "phi4-mini"])
def test_speculative_greedy_equals_plain_greedy(name, tmp_path):
    """generate_speculative yields plain greedy decoding's tokens, token for token, whatever drafts (prompt lookup,
    the model itself: every draft accepted, another model: most rejected) and k; phi4-mini's generation crosses its
    original context (32); an EOS id stops it where plain decoding stops."""
    model = from_transformers(name, tmp_path)[0]
    prompt = ids_for(6, B=1)[0].tolist() * 3  # it repeats itself: prompt lookup finds drafts
    n = 40
    want = list(generate.generate(model, prompt, n, eos_ids=set()))
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for k in (1, 4):
        for draft_name, draft in (("lookup", None), ("itself", model), ("other", other)):
            stats = {}
            got = list(generate.generate_speculative(model, prompt, n, k=k, draft=draft, eos_ids=set(), stats=stats))
            assert got == want, (k, draft_name)
            assert stats["new_tokens"] == n and stats["accepted"] <= stats["drafted"]
            if draft_name == "itself":
                assert stats["accepted"] == stats["drafted"] > 0
    stop = want[7]
    got = list(generate.generate_speculative(model, prompt, n, k=4, eos_ids={stop}))
    assert got == want[: want.index(stop)]
    if name == "phi4-mini":  # no verify step runs part of its tokens below the original context, part above
        spans, orig = [], model.rotary.original

        def seen(module, args, kwargs):
            cache = kwargs.get("cache")
            if cache is not None:
                spans.append((int(cache.slot), args[0].shape[1], cache.long))

        hook = model.register_forward_pre_hook(seen, with_kwargs=True)
        list(generate.generate_speculative(model, prompt, n, k=4, draft=copy.deepcopy(model), eos_ids=set()))
        hook.remove()  # (the draft, a copy, is not watched: its steps need not keep this rule)
        assert all(long or s + t <= orig or s >= orig for s, t, long in spans), spans
        assert any(s >= orig and not long for s, t, long in spans)  # the step that crossed it


def test_speculative_verify_step_compiles_per_size_and_matches(tmp_path, monkeypatch, fresh_compiler):
    """The verify step under torch.compile (--compile with --speculate): generate.decode_step takes T tokens with
    shapes that depend on T only: the verify sizes (1 to k + 1 tokens) compile at most twice (the first size, then
    torch.compile's automatic dynamic shapes take T as a symbol), each in one graph; several
    tokens at once through it equal the full forward (GQA, sliding window), and speculative greedy decoding with
    the compiled verify step yields plain greedy decoding's tokens."""
    import torch._dynamo.testing

    model = from_transformers("phi3-gqa-window", tmp_path)[0]
    ids = ids_for(20)
    with torch.no_grad():
        cache = phi.KVCache(model.config, 2, 20)
        generate.prefill(model, ids[:, :9], None, cache)
        got = torch.cat([generate.decode_tokens(model, ids[:, t : t + 4], cache) for t in (9, 13)], 1)
        assert record("decode_step, 4 tokens at once", err(got, model(ids[:, :17])[:, 9:])) <= TOL
    counter = torch._dynamo.testing.CompileCounter()
    compiled, calls = torch.compile(generate.decode_tokens, backend=counter, fullgraph=True), []
    monkeypatch.setattr(generate, "verify_tokens", lambda *a: calls.append(a[1].shape[1]) or compiled(*a))
    prompt = ids_for(6, B=1)[0].tolist() * 3
    want = list(generate.generate(model, prompt, 30, eos_ids=set()))
    assert list(generate.generate_speculative(model, prompt, 30, k=4, eos_ids=set())) == want
    assert calls and max(calls) == 5 and 1 <= counter.frame_count <= 2 < len(set(calls))  # (then a dynamic size)


@needs_reference("tokenizers")
def test_cli_speculate_equals_plain_greedy(hub):
    """--speculate K (prompt lookup) and --speculate K --draft MODEL print what plain greedy decoding prints, and
    say how many drafts were accepted; a repetition penalty with --speculate is refused."""
    home, _ = hub
    args = ("--model", "test/phi3-4k", "--prompt", PROMPT + "\n" + PROMPT, "--max-new-tokens", 24, "--temperature", 0)
    want = run_cli(home, *args).stdout
    for extra in (("--speculate", 3), ("--speculate", 2, "--draft", "test/phi3-4k")):
        r = run_cli(home, *args, *extra)
        assert r.returncode == 0 and r.stdout == want, r.stderr
        assert re.search(r"speculative: \d+ of \d+ drafts accepted", r.stderr)
    r = run_cli(home, "--model", "test/phi3-4k", "--speculate", 3, "--repetition-penalty", 1.3)
    assert_one_line_error(r, "generate.py", "--speculate does not take a --repetition-penalty", 1)


def test_speculative_sampling_keeps_the_models_distribution(tmp_path):
    """Sampled speculative decoding (temperature 1) draws from the model's own distribution: over 1500 seeded runs the
    second new token (the one drafted: by prompt lookup, or by a draft model) has frequencies as close to the exact
    marginal sum_t1 p(t1) p(t2 | t1) as plain sampling's (total variation distance, ~0.09-0.10 each). The prompt holds
    every token id, so prompt lookup always drafts; keeping every draft (tried) puts it at 0.34-0.43. (A subtler
    slip, leaving the rejected lookup draft in the residual, moves this near-uniform tiny model by less than the
    noise of 1,500 draws: not caught here.)"""
    model = from_transformers("phi3-gqa-window", tmp_path)[0]
    V = model.config.vocab_size
    prompt = list(range(3, V)) + [5, 9, 14]
    with torch.no_grad():
        p1 = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        p2 = model(torch.tensor([prompt + [t] for t in range(V)]))[:, -1].softmax(-1)  # (V, V): p(t2 | t1)
    exact = p1 @ p2
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    runs = {
        "plain": lambda g: generate.generate(model, prompt, 3, temperature=1.0, eos_ids=set(), generator=g),
        "lookup": lambda g: generate.generate_speculative(
            model, prompt, 3, k=2, temperature=1.0, eos_ids=set(), generator=g
        ),
        "draft": lambda g: generate.generate_speculative(
            model, prompt, 3, k=2, draft=other, temperature=1.0, eos_ids=set(), generator=g
        ),
    }
    tv = {}
    for name, run in runs.items():
        counts = torch.zeros(V)
        for seed in range(1500):
            counts[list(run(torch.Generator().manual_seed(seed)))[1]] += 1
        tv[name] = record(
            f"speculative sampling, total variation of the 2nd token ({name})",
            0.5 * (counts / counts.sum() - exact).abs().sum().item(),
        )
    assert tv["lookup"] <= 1.3 * tv["plain"] + 0.02 and tv["draft"] <= 1.3 * tv["plain"] + 0.02, tv


# ===============================================================================================================
# int4 weight-only (issue 20, item 2)


def test_int4_linear_multiplies_by_its_dequantized_weights():
    """Int4Linear through PyTorch's CPU int4 kernel equals x @ W4.T, W4 the 4-bit weights dequantized by the scheme
    itself (q * scale + min per group of 64 columns), up to bf16 rounding; W4 is within a 15th of each group's range
    of the original weight."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    q = generate.Int4Linear(lin, 64)
    w = lin.weight.detach().reshape(96, 4, 64)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    w4 = (torch.round((w - lo) / step) * step + lo).reshape(96, 256)
    assert ((w4 - lin.weight).abs() <= step.repeat_interleave(64, 1).reshape(96, 256) / 2 + 1e-6).all()
    x = torch.randn(5, 3, 256)
    with torch.no_grad():
        want = x @ w4.T + lin.bias
        got = q(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert record("int4 kernel vs dequantized weights, relative", ((got - want).norm() / want.norm()).item()) <= 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (PyTorch's CUDA int4 kernel)")
def test_int4_linear_on_cuda_equals_the_cpu_kernel_and_dequantized_weights():
    """On CUDA, Int4Linear packs for PyTorch's CUDA int4 kernel (two 4-bit numbers a byte, then its tiles): the same
    product as the CPU kernel's and as the dequantized weights', up to bf16 rounding; a model quantized there decodes
    greedily as its own full forward."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    cpu, cuda = generate.Int4Linear(lin, 64), generate.Int4Linear(copy.deepcopy(lin).cuda(), 64)
    x = torch.randn(5, 256)
    with torch.no_grad():
        want, got = cpu(x), cuda(x.cuda()).cpu()
    assert record("int4 CUDA vs CPU kernel, relative", ((got - want).norm() / want.norm()).item()) <= 1e-2
    model = generate.quantize_int4(phi.Phi.from_config(tiny_config(intermediate_size=256), device="cuda").bfloat16())
    assert isinstance(model.layers[0].mlp.fc1, generate.Int4Linear)
    prompt = ids_for(8, B=1)[0].tolist()
    out = list(generate.generate(model, prompt, max_new_tokens=4, eos_ids=set()))
    with torch.no_grad():
        full = model(torch.tensor([prompt + out[:-1]], device="cuda"))[0, 7:].argmax(-1).tolist()
    assert out == full


@pytest.mark.parametrize("name", ["phi-2", "phi3-4k", "phi4-mini"])
def test_int4_logits_close_to_fp32(name, tmp_path):
    """Weight-only int4 (groups of 128, 64 or 32 columns; asymmetric) on transformers' own random init: logits within
    15% of fp32 (||int4 - fp32|| / ||fp32||; measured 6-13% on these tiny models, where a group is a Linear's whole
    row; int8 is within 2%)."""
    path = transformers_init(name, tmp_path)
    ids = ids_for(48)
    with torch.no_grad():
        want = phi.Phi.from_pretrained(path)(ids)
        q = generate.quantize_int4(phi.Phi.from_pretrained(path))
        assert any(isinstance(m, generate.Int4Linear) for m in q.modules())
        rel = ((q(ids) - want).norm() / want.norm()).item()
    assert record(f"int4 logits relative error {name}", rel) < 0.15
    # a bf16 model, a batch: the activations reach the kernel as they are (the prompts' last rows: a strided slice)
    qb = generate.quantize_int4(phi.Phi.from_pretrained(path, dtype=torch.bfloat16))
    out = torch.stack(list(generate.generate_batch(qb, ids[:, :8].tolist(), 4, eos_ids=set())), 1)
    with torch.no_grad():
        assert torch.equal(out, qb(torch.cat((ids[:, :8], out[:, :-1]), 1))[:, 7:].argmax(-1))


@needs_reference("tokenizers")
def test_cli_quantize_int4_equals_the_api(hub):
    home, _ = hub
    model, tok = generate.load(snapshot(home, "phi3-4k"), dtype="float32", quantize="int4")
    prompt = tok.encode("def f(x):", bos=tok.add_bos)
    want = continuation(tok, prompt, list(generate.generate(model, prompt, 16)))
    plain = generate.load(snapshot(home, "phi3-4k"), dtype="float32")[0]
    assert want != continuation(tok, prompt, list(generate.generate(plain, prompt, 16)))  # int4 shows
    args = ("--model", "test/phi3-4k", "--prompt", "def f(x):", "--max-new-tokens", 16, "--temperature", 0)
    assert run_cli(home, *args, "--dtype", "float32", "--quantize", "int4").stdout == want + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Phi-3.5-MoE (phimoe): sparsemixer routing, experts, its rotary, the real config, training


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


def sparsemixer_cases():
    """Router scores (N, E) with ties and near-ties placed on purpose around sparsemixer's threshold."""
    eps = 0.125  # threshold 2 * eps = 0.25, exact in binary: (max - s) / max == 0.25 is kept, a hair more is not
    rows = [
        [4.0, 4.0, 1.0, 0.0, -1.0, 2.0],  # exact tie at the max: the first index wins, the other is second
        [4.0, 3.0, 2.99, 1.0, 3.0, 0.5],  # 3.0 exactly on the threshold (kept), 2.99 just past it (masked)
        [1.0, 0.8, 0.79, 0.9, -2.0, 0.0],  # second round: 0.9 is the max, 0.8 and 0.79 around its threshold
        [-1.0, -1.1, -1.3, -1.25, -5.0, -1.0],  # all negative: |score| is the scale; a tie at -1.0
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all equal
        [2.0, -2.0, 2.0, 2.0, 1.5, 1.6],  # three-way tie
    ]
    g = torch.Generator().manual_seed(0)
    grid = (torch.randint(-8, 9, (64, 6), generator=g) / 4.0).tolist()  # a coarse grid: ties everywhere
    return torch.tensor(rows + grid), eps


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


def test_sparsemixer_training_mode_matches_transformers():
    """train.sparsemixer_train (sampled experts, Heun's router gradient) equals transformers' sparsemixer in training
    mode under the same seed: the same experts, weights and gradient with respect to the router scores (on the tie
    cases and on random scores); and it samples (other experts than the argmax for some tokens)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as hf_sparsemixer

    ties, eps = sparsemixer_cases()
    for scores in (ties, torch.randn(256, 8, generator=torch.Generator().manual_seed(1)) * 0.02):
        up = torch.randn(len(scores), 2, generator=torch.Generator().manual_seed(2))
        got = []
        for fn in (lambda s: train.sparsemixer_train(s, eps), lambda s: hf_sparsemixer(s, eps, training=True)):
            s = scores.clone().requires_grad_(True)
            torch.manual_seed(7)
            w, e = fn(s)
            (w * up).sum().backward()
            got.append((w.detach(), e, s.grad))
        (w, e, g), (hw, he, hg) = got
        assert torch.equal(e, he) and torch.equal(w, hw) and torch.equal(g, hg)
    assert not torch.equal(e, phi.sparsemixer(scores, eps)[1])  # sampled, not the argmax
    assert g.abs().sum() > 0


def test_phimoe_training_step_matches_transformers_training_mode(tmp_path):
    """A whole phimoe model in training mode, with train.py's routers (train_routers), under the same seed as
    transformers' model in training mode: the same loss and the same router gradients in every layer; in eval mode
    it routes as at inference again. (The router rows are made alike, so the jitter mask keeps several experts: with
    one left, sparsemixer's router gradient is zero, in training mode too.)"""
    ref = hf_model("phimoe")
    with torch.no_grad():
        for layer in ref.model.layers:
            w = layer.mlp.router.weight
            w.copy_(w[0] + 0.002 * torch.randn_like(w))
    ours = train.train_routers(phi.Phi.from_pretrained(saved(ref, tmp_path)))
    ids = ids_for(16)
    ours.train(), ref.train()
    losses = []
    for m in (ours, ref):
        torch.manual_seed(3)
        loss = m(ids, labels=ids)[1] if m is ours else m(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= TOL
    for a, b in zip(ours.layers, ref.model.layers):
        assert a.mlp.router.weight.grad.abs().sum() > 0
        assert record("phimoe training router grad", err(a.mlp.router.weight.grad, b.mlp.router.weight.grad)) <= 1e-5
    with torch.no_grad():
        eval_logits = ref.eval()(ids).logits
        assert err(ours.eval()(ids), eval_logits) <= TOL
        torch.manual_seed(4)
        assert err(ours.train()(ids), eval_logits) > 1e-3  # training samples other experts


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_phimoe_fine_tunes_full_and_lora(mode, tmp_path):
    """train.py --init on a phimoe checkpoint: the loss falls; the full run's checkpoint loads in transformers with
    our logits; the LoRA run (attention and lm_head) writes an adapter peft loads into transformers' PhimoeForCausalLM
    with the logits generate.load(..., adapter=) gives us. LoRA's default targets on phimoe are qkv,out; expert
    targets are one clear error (transformers 5 holds the experts as 3-D tensors: nothing peft can adapt)."""
    base = tiny_checkpoint(tmp_path / "base", "phimoe")
    args = ["--init", base, "--out", tmp_path / "out", "--max-steps", 16, "--eval-every", 8, "--lr", "1e-2"]
    if mode == "lora":
        args += ["--lora", 8, "--lora-targets", "qkv,out,lm_head"]
    r = run_train(tmp_path, *args)
    assert r.returncode == 0, r.stderr
    val = [float(x) for x in re.findall(r"validation loss ([\d.]+)", r.stderr)]
    assert val[-1] < val[0], r.stderr
    ids = ids_for(24, vocab=256)
    with torch.no_grad():
        if mode == "full":
            ref = transformers.PhimoeForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
            ours = phi.Phi.from_pretrained(tmp_path / "out" / "model")
            assert err(ours(ids), phi.Phi.from_pretrained(base)(ids)) > 100 * TOL  # it trained
            assert record("phimoe train.py checkpoint vs transformers", err(ours(ids), ref(ids).logits)) <= TOL
        else:
            cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
            assert sorted(cfg["target_modules"]) == ["k_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
            tuned = peft_on_transformers(base, tmp_path / "out" / "adapter")
            ours, _ = generate.load(base, dtype="float32", adapter=tmp_path / "out" / "adapter")
            assert record("phimoe train --lora: ours vs peft", err(ours(ids), tuned(ids).logits)) <= TOL
    if mode == "lora":  # the default targets on phimoe, and an expert target
        lora = train.add_lora(phi.Phi.from_pretrained(base), dict(r=2, alpha=4, dropout=0.0, targets=None))
        assert {n.split(".")[-1] for n, m in lora.named_modules() if isinstance(m, train.LoRALinear)} == {"qkv", "out"}
        bad = run_train(tmp_path, *args[:-2], "--lora-targets", "qkv,fc1", "--out", tmp_path / "o2")
        assert bad.returncode == 2 and "phimoe's experts cannot take a PEFT LoRA" in bad.stderr


def test_phimoe_int8_quantizes_the_experts_not_the_router(tmp_path):
    """--quantize int8 on a phimoe model stores every expert's Linears as int8 and keeps the router in its dtype;
    greedy generation still runs through the cache (and equals the int8 model's own full forward)."""
    path = transformers_init("phimoe", tmp_path)
    q = generate.quantize_int8(phi.Phi.from_pretrained(path))
    experts = [m for layer in q.layers for e in layer.mlp.experts for m in (e.fc1, e.fc2)]
    assert experts and all(isinstance(m, generate.Int8Linear) for m in experts)
    assert all(type(layer.mlp.router) is torch.nn.Linear for layer in q.layers)
    prompt = ids_for(8, B=1)[0].tolist()
    out = list(generate.generate(q, prompt, max_new_tokens=6, eos_ids=set()))
    with torch.no_grad():
        full = q(torch.tensor([prompt + out[:-1]]))[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert out == full
