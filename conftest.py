"""Shared helpers of the tests: tiny random configs and their transformers twins (the oracle), the reference data,
an offline Hugging Face cache of test checkpoints (the `hub` fixture), running the CLIs in-process.

Run: python -m pytest -q
- PHI_REFERENCE: the shared reference data (default ../shared/reference); tests that need it skip without it,
  unless PHI_REQUIRE_REFERENCE=1 (.ci/run sets it): then a missing folder fails test_reference_data_is_complete.
- PHI_ORACLE_442: a Python with transformers==4.42.4 (default .venv-hf442/bin/python, built by .ci/run), the last
  version whose Phi-3 has the original "su" and "yarn" rotary classes; 4.43+ folds both into "longrope".
"""

import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
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
    model = randomized(getattr(transformers, HF_CLASSES[kind] + head)(cfg).eval())
    return with_checkpoint_rotary(model) if kind == "phimoe" else model


@torch.no_grad()
def randomized(model):
    """Random weights of a size that makes logits O(1..10): norms' weights near 1, the rest N(0, 0.15) (0.3 for the
    embedding)."""
    for n, p in model.named_parameters():
        if "norm" in n and n.endswith("weight"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0, 0.3 if "embed" in n else 0.15)
    return model


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


def classification_inputs():
    ids = ids_for(10, B=3)
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0  # right padding with the pad id
    ids[2, :3], mask[2, :3] = 0, 0  # left padding
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


TOK = REF / "tokenizers"


_oracles = {}


def oracle(family):
    """The Hugging Face `tokenizers` library on the same tokenizer.json (what transformers runs underneath)."""
    import tokenizers

    if family not in _oracles:
        _oracles[family] = tokenizers.Tokenizer.from_file(str(TOK / family / "tokenizer.json"))
    return _oracles[family]


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


def run_cli(home, *args, stdin="", background_build=False):
    """generate.main(argv) in this process (a subprocess would add seconds of imports and nothing else), offline
    on the Hugging Face cache under home: (exit code, stdout, stderr). stdout is written as bytes and decoded, so a
    generated "\r\n" stays as it is. test_cli_runs_as_a_program runs generate.py as its own process. With
    --no-compile unless background_build or --compile is given: on a CPU where the exported step applies, a run
    without it starts building one in a process that outlives the test (generate.build_later)."""
    if not background_build and not {"--compile", "--no-compile"} & {str(a) for a in args}:
        args = (*args, "--no-compile")
    out, errs = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline=""), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch.multiple(huggingface_hub.constants, HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE=True)
        )
        stack.enter_context(mock.patch.object(sys, "stdin", io.StringIO(stdin)))
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


def peft_on_transformers(base_dir, adapter_dir, head="ForCausalLM", **kw):
    import peft

    auto = getattr(transformers, "AutoModel" + ("ForCausalLM" if head == "ForCausalLM" else head))
    base = auto.from_pretrained(base_dir, attn_implementation="eager", **kw)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


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


# Phi-3-small (phi3small): no transformers class exists; the oracle is mlx-lm (test_phi.py), and its config.json as
# the Hub writes it. Tiny, but with several blocks of 32 positions (mlx-lm takes block sizes 32 and 64 only), heads >=
# vert_stride (mlx-lm's head offset is h + 1, the original's h * max(1, vert_stride // heads) + 1: equal then), the
# real vocabulary size (the dummy token ids are fixed), a gegelu limit that clamps, and muP multipliers other than 1.
SMALL = dict(
    model_type="phi3small",
    vocab_size=100352,
    hidden_size=64,
    ff_intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    layer_norm_epsilon=1e-5,
    rope_embedding_base=10000.0,
    rope_position_scale=1.0,
    blocksparse_block_size=32,
    blocksparse_num_local_blocks=2,
    blocksparse_vert_stride=4,
    blocksparse_homo_head_pattern=False,
    dense_attention_every_n_layers=2,
    gegelu_limit=0.5,
    hidden_act="gegelu",
    mup_embedding_multiplier=10.0,
    mup_width_multiplier=8.0,
    mup_attn_multiplier=1.5,
    mup_use_scaling=True,
    bos_token_id=100257,
    eos_token_id=100257,
)


def small_model(seed=0, **over):
    """Our phi3small model of the SMALL shape with random weights that make its gegelu clamp and its logits O(1)."""
    cfg = phi.PhiConfig.from_hf({**SMALL, **over})
    torch.manual_seed(seed)
    return randomized(phi.Phi.from_config(cfg).eval())
