"""
Run any Phi checkpoint: loading from the Hugging Face Hub or a local directory, sampling settings, decoding (plain,
batched, speculative), streaming text with stop strings, and the command line.

    python generate.py --model microsoft/phi-2 --prompt "def print_prime(n):" --temperature 0

How a prompt moves: the CLI -> load (Hub or directory -> phi.Phi -> a LoRA adapter merged -> quantize.py's module
swaps) -> tokenizer.py -> generate (prefill through phi, then one-token steps with the KV cache, compiled or not) ->
TextStream (text pieces, stop strings) -> stdout. serve.py and train.py use the same pieces.
"""

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import lora
import phi
import quantize
import tp as tensor_parallel
from quantize import huge_pages, q8_on, quantize_int4, quantize_int8, speed_up
from tokenizer import TOKENIZER_FILES, Tokenizer, chat_prompt, download, load_tokenizer

# -----------------------------------------------------------------------------------------------------------------
# Loading a checkpoint

MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json"]
LEGACY_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # read with torch.load(weights_only=True)
QUANTIZERS = {  # "int8"/"int4": on a CPU where quantize.q8_on() the activations are rounded too (int16, int8)
    "int8": quantize_int8,
    "int4": quantize_int4,
    "int8-weight-only": functools.partial(quantize_int8, weight_only=True),
    "int4-weight-only": functools.partial(quantize_int4, weight_only=True),
}


def checkpoint_dir(name_or_dir, revision=None) -> Path:
    """A local directory as it is, or a Hub id fetched (config, weights, tokenizer files only) into the cache."""
    d = Path(name_or_dir)
    if d.is_dir():
        return d
    d = download(str(name_or_dir), MODEL_FILES + TOKENIZER_FILES, revision)
    if not list(d.glob("*.safetensors")):  # an old checkpoint without safetensors
        d = download(str(name_or_dir), MODEL_FILES + LEGACY_FILES + TOKENIZER_FILES, revision)
    return d


def adapter_dir(name_or_dir, revision=None) -> Path:
    """A PEFT adapter's local directory as it is, or a Hub id's adapter files fetched into the cache."""
    d = Path(name_or_dir)
    return d if d.is_dir() else download(str(name_or_dir), lora.ADAPTER_FILES, revision)


def load(name_or_dir, dtype="auto", device=None, revision=None, attn="sdpa", quantize=None, adapter=None, tp=False):
    """(model, tokenizer) from a Hub id or a local directory. dtype "auto" takes the checkpoint's own (float16 becomes
    bfloat16 on the CPU, where float16 matmuls are slow); device None picks CUDA when there is one; quantize="int8"
    stores the weights as int8, "int4" as 4-bit groups; on an x86-64 CPU (where quantize.q8_on(): AMD, AVX2) the
    activations are rounded too, to int16 (int8) or int8 (int4), per block of 32 (integer products: decoding 1.6-2.3x
    faster, prompts without expanding the weights), unless "int8-weight-only" or "int4-weight-only". With int8, or
    int4 with rounded activations, and dtype "auto" on the CPU the rest of the model and the activations are float32
    (converting to bf16 costs more than it saves). adapter: a PEFT LoRA adapter (Hub id or directory), merged into
    the weights before any quantization. tp=True (inside torchrun's process group: tp.init()): this rank's shard of
    the model (tp.py)."""
    huge_pages()  # (before the weights are allocated)
    if tp and (quantize or adapter):
        raise ValueError("tensor parallelism (--tp) takes no --quantize or --adapter yet")
    if quantize is not None and quantize not in QUANTIZERS:
        raise ValueError(f"quantize '{quantize}' is unknown ({', '.join(QUANTIZERS)} or none)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = checkpoint_dir(name_or_dir, revision)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: no config.json (is this a model checkpoint?)")
    fp32 = quantize in ("int8", "int8-weight-only") or quantize == "int4" and q8_on()
    if fp32 and dtype == "auto" and device.type == "cpu":
        dtype = "float32"
    dtype = resolve_dtype(dtype, phi.PhiConfig.from_hf(phi._read_json(d / "config.json")).torch_dtype, device)
    if tp:
        model = tensor_parallel.load(d, dtype, device, attn)
    else:
        model = phi.Phi.from_pretrained(d, dtype=dtype, device=device, attn=attn)
    if adapter is not None:
        lora.merge_adapter(model, adapter_dir(adapter))
    model = speed_up(model)
    if quantize is not None:
        QUANTIZERS[quantize](model)
    tok = load_tokenizer(d)
    model.eos_ids, model.source = eos_ids(d, model.config, tok), d  # (source: where a background build loads it)
    return model, tok


def resolve_dtype(dtype, checkpoint_dtype, device):
    """The torch dtype to load in ("auto": the checkpoint's), once this device can compute in it."""
    if dtype == "auto":
        dtype = checkpoint_dtype or "float32"
        if dtype == "float16" and device.type == "cpu":
            dtype = "bfloat16"
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype '{dtype}' is not one of auto, float32, bfloat16, float16")
        dtype = getattr(torch, dtype)
    try:  # can this device compute in this dtype at all?
        x = torch.ones(4, 4, dtype=dtype, device=device)
        (x @ x).sum().item()
    except (RuntimeError, TypeError, AssertionError) as e:  # a torch built without CUDA raises AssertionError
        raise ValueError(f"{dtype} is not supported on {device}: {str(e).splitlines()[0]}") from None
    return dtype


def eos_ids(d: Path, cfg, tok) -> set:
    """Where generation stops: generation_config.json's eos_token_id (an int or a list: Phi-3 has 32000, 32001,
    32007), else config.json's; plus the tokenizer's eos token."""
    ids = set()
    gen = phi._read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
    for value in (gen.get("eos_token_id"), None if "eos_token_id" in gen else cfg.eos_token_id, tok.eos_id):
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


def end_of_turn_ids(model, tok: Tokenizer) -> set:
    """Where a chat reply stops: the model's EOS ids and the family's end-of-turn token."""
    return set(model.eos_ids) | {tok.added[t]["id"] for t in ("<|end|>", "<|im_end|>") if t in tok.added}


# -----------------------------------------------------------------------------------------------------------------
# Sampling (the same steps, in the same order, as transformers' logits processors)


@dataclass
class Sampling:
    """How each next token is picked: the argmax at temperature 0, else a draw (from generator) after the
    repetition penalty, temperature, top-k and top-p. The decoders take it as sampling=Sampling(...), or its fields
    as keywords (generate(model, ids, temperature=0.8, top_p=0.95))."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None

    @classmethod
    def of(cls, sampling=None, **fields) -> "Sampling":
        """sampling as it is, or one made of its fields."""
        if sampling is not None and fields:
            raise TypeError(f"give sampling= or its fields ({', '.join(fields)}), not both")
        return sampling if sampling is not None else cls(**fields)


def process_logits(logits, prev_ids, s: Sampling):
    """logits (B, V) -> filtered logits in fp32: repetition penalty over prev_ids (B, S), then temperature, top-k,
    top-p (removed entries become -inf). Matches RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper and TopPLogitsWarper."""
    logits = logits.float()
    if s.repetition_penalty != 1.0:  # seen tokens: positive logits divided, negative multiplied
        seen, penalty = logits.gather(1, prev_ids), s.repetition_penalty
        logits = logits.scatter(1, prev_ids, torch.where(seen < 0, seen * penalty, seen / penalty))
    if s.temperature not in (0.0, 1.0):
        logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1))).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:  # drop the least likely tokens holding 1 - top_p of the mass
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(logits, prev_ids, s: Sampling):
    """Next token (B,) from logits (B, V): argmax at temperature 0, else a draw from the filtered distribution."""
    logits = process_logits(logits, prev_ids, s)
    if s.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=s.generator)[:, 0]


# -----------------------------------------------------------------------------------------------------------------
# The steps: a prompt through the model, then new tokens with the KV cache


@torch.no_grad()
def prefill(model, ids, mask, cache):
    """Run the prompt (B, T) through the model, filling the cache; logits of the last position (B, V) (the lm_head
    runs on that position only)."""
    return model.logits(phi.PhiModel.forward(model, ids, mask, None, cache)[:, -1])


def can_decode_step(model, cache) -> bool:
    """Can a one-token decode on this cache take decode_step? Not with flash-attn, nor while a LongRoPE model can
    still cross its original context (a cache no longer than that never does)."""
    long_ok = not model.rotary.scaled or cache.long or cache.ids.shape[1] <= model.rotary.original
    return model.flash_attn is None and long_ok


def compiled_step_ok(model, cache) -> bool:
    """Can a compiled step (decode, or speculative verify) run on this cache? Where decode_step can, but for a
    mixture of experts, whose routing picks the experts to run on the host."""
    return can_decode_step(model, cache) and not model.config.moe


def decode_step(model, input_ids, cache):
    """New tokens (B, T) -> hidden states (B, T, C), with shapes that depend on T only, not on how full the cache
    is: the tokens attend over all max_len slots under a mask, and the fill level (cache.slot) is read on the device
    only. This is the step torch.compile compiles once (gpt-fast's decode_one_token): T = 1 for decoding, T = k + 1
    for a speculative verify step."""
    T = input_ids.shape[1]
    at = cache.slot.view(1) + torch.arange(T, device=input_ids.device)  # (T,) the next T slots
    last = (cache.slot.view(1) - 1).clamp(min=0)
    pos = torch.where(cache.slot > 0, cache.pos.index_select(1, last) + 1, 0) + torch.arange(T, device=at.device)
    cache.ids.index_copy_(1, at, input_ids)
    cache.pos.index_copy_(1, at, pos)  # (B, T)
    cache.valid.index_fill_(1, at, True)
    cache.slot += T
    allowed = cache.valid[:, None, :] & (cache.slots <= at[:, None])  # (B, T, S): causal, no pads
    if model.config.sliding_window is not None:
        allowed = allowed & (cache.slots > at[:, None] - model.config.sliding_window)
    cos, sin = model.rotary(pos, model.embed.weight.dtype, cache.long)
    a = phi.AttentionInputs(cos, sin, allowed[:, None], cache, at, pos=pos, key_pos=cache.pos)
    return model.blocks(model.embeddings(input_ids), a)


@torch.no_grad()  # also under torch.compile: a compiled step run with grad enabled loses its cache writes
def decode_tokens(model, tokens, cache):
    """New tokens (B, T) -> logits (B, T, V): decode_step where it can run, else the model's forward."""
    if can_decode_step(model, cache):
        return model.logits(decode_step(model, tokens, cache))
    return model(tokens, cache=cache)


@torch.no_grad()
def decode_one_token(model, token, cache):
    """One new token per row (B,) -> logits (B, V)."""
    return decode_tokens(model, token[:, None], cache)[:, -1]


@dataclass(frozen=True)
class Steps:
    """The functions that run new tokens through the model: decode (one token per row: every step of
    generate_batch) and verify (speculative decoding's last token + proposals). Steps() are the plain ones;
    Steps.compiled(device) the same under torch.compile. Made once, passed to the decoders as steps=."""

    decode: Callable = decode_one_token
    verify: Callable = decode_tokens
    first_compiles: bool = False  # (torch.compile's: the first step compiles; report() leaves it out of the rate)

    @classmethod
    def compiled(cls, device) -> "Steps":
        """Static shapes, so decode is traced once for a whole generation (gpt-fast), verify once for the first
        size and once more with the size as a symbol (torch.compile's automatic dynamic shapes). On CUDA both are
        also captured as CUDA graphs (mode "reduce-overhead"): a token is one graph replay instead of hundreds of
        kernel launches from Python, which otherwise bound small-batch decoding there (the KV cache's tensors keep
        fixed addresses for it, see phi.KVCache). Measured on an H100, 1.4b bf16 batch 1: 204 tok/s compiled
        without graphs, 433 with them."""
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
        compiled = [torch.compile(f, fullgraph=True, mode=mode) for f in (decode_one_token, decode_tokens)]
        return cls(*compiled, first_compiles=True)

    @classmethod
    def exported(cls, model, build: bool = True) -> "Steps":
        """On the CPU: decode through the step compiled ahead of time (ExportedStep; built first with build=True
        where the cache has none), verify with the plain one; the plain steps where it cannot be had."""
        step = ExportedStep.load(model, build)
        return cls(step) if step else cls()


# -----------------------------------------------------------------------------------------------------------------
# The decode step compiled ahead of time (AOTInductor), kept between runs


def step_tensors(cache) -> tuple:
    """What decode_step reads and writes of a KVCache, flat: the exported step's inputs after the tokens."""
    return (cache.slot, cache.pos, cache.ids, cache.valid, cache.slots, *cache.k, *cache.v)


class FlatStep(torch.nn.Module):
    """decode_one_token on flat tensors, for torch.export: (tokens (B,), the rotary frequencies, *step_tensors(cache))
    -> logits (B, V). The frequencies are an input, not a constant (export keeps a copy of a tensor read inside
    Rotary's autocast block), so the exported program's constants are the model's parameters and buffers, which the
    compiled step takes from the model as it loads: the package stores no weights."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, inv_freq, *tensors):
        L, cache = self.model.config.num_hidden_layers, phi.KVCache.__new__(phi.KVCache)  # (over these tensors)
        cache.slot, cache.pos, cache.ids, cache.valid, cache.slots = tensors[:5]
        cache.k, cache.v, cache.long = list(tensors[5 : 5 + L]), list(tensors[5 + L :]), False
        rotary, frequencies = self.model.rotary, self.model.rotary.inv_freq
        rotary.inv_freq = inv_freq
        try:
            return self.model.logits(decode_step(self.model, tokens[:, None], cache))[:, -1]
        finally:
            rotary.inv_freq = frequencies

    def constants(self) -> dict:  # every parameter and buffer by name, tied ones under each of their names
        return dict(self.named_parameters(remove_duplicate=False)) | dict(self.named_buffers(remove_duplicate=False))


class ExportedStep:
    """decode_one_token compiled ahead of time by AOTInductor (torch.export, then C++) for the CPU: no guards and no
    Python between its kernels, so a token costs what they cost (160m int4, AMD EPYC Zen 3: 5.5 ms a token, against
    7.5 for torch.compile's step and 11.8 for the eager one). The package, for any batch size and cache length, is
    kept in ~/.cache/phi/steps: one per model shape (config, quantized layouts), torch, source and thread count,
    without weights, so any checkpoint of that shape loads it (in well under a second) and hands it its own tensors
    (as they are then: a model moved or cast after it loaded needs the step loaded again)."""

    def __init__(self, model, runner, package: Path):
        self.model, self.runner, self.package = model, runner, package
        self.cache_dtype = quantize.cache_dtype(model)  # (what it was exported with)

    def __call__(self, model, token, cache):
        tensors = step_tensors(cache)
        # the compiled code reads its inputs as the contiguous tensors it was exported with (it checks no strides)
        fits = cache.k[0].dtype == self.cache_dtype and all(t.is_contiguous() for t in tensors)
        if model is not self.model or cache.long or not fits:
            return decode_one_token(model, token, cache)  # (cache.long: LongRoPE's long factors)
        with torch.no_grad():
            return self.runner(token.contiguous(), model.rotary.inv_freq, *tensors)

    @staticmethod
    def path(model) -> Path:
        """Where the model's package is kept: a hash of everything the compiled code depends on."""
        key = [torch.__version__, torch.backends.cpu.get_cpu_capability(), str(torch.get_num_threads())]
        key += [json.dumps(model.config.to_hf(), sort_keys=True, default=str)]
        key += [f"{n} {type(m).__name__}" for n, m in model.named_modules()]
        key += [f"{n} {tuple(t.shape)} {t.dtype}" for n, t in model.state_dict().items()]
        key += [Path(m.__file__).read_text() for m in (phi, quantize, sys.modules[__name__])]
        digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:16]
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi" / "steps" / f"{digest}.pt2"

    @classmethod
    def load(cls, model, build: bool = False) -> "ExportedStep | None":
        """The model's step from its package; with build, compiled first where there is none (~30-60 s on 2 cores).
        None where there is no package (and not build), or it fails to build or load (one line on stderr)."""
        path, step = cls.path(model), FlatStep(model)
        try:
            if not path.exists() and build:
                cls.build(step, path)
            if not path.exists():
                return None
            runner, constants = torch._inductor.aoti_load_package(str(path)), step.constants()
            names = runner.get_constant_fqns()
            runner.load_constants({n: constants[n] for n in names}, check_full_update=True, user_managed=True)
        except Exception as e:  # (export, the C++ compiler, a damaged package: the plain step still works)
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"the compiled decode step {path} is not used ({why}); the plain step instead", file=sys.stderr)
            return None
        return cls(model, runner, path)

    @staticmethod
    def builder(path: Path) -> int | None:
        """The pid of the process building the package at path in the background (build_in_background: its lock
        file beside path; 0 while the pid is being written), if it is alive; the lock of one that died is removed."""
        lock = path.with_suffix(".building")
        try:
            pid, age = lock.read_text().strip(), time.time() - lock.stat().st_mtime
            if not pid and age < 60:
                return 0
            try:
                if os.waitpid(int(pid), os.WNOHANG)[0]:  # (a child of this process that has exited: reaped now)
                    raise ProcessLookupError
            except ChildProcessError:  # (another process's)
                os.kill(int(pid), 0)  # (signal 0: is it there)
            return int(pid)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # no such process (or a lock left empty, or damaged)
            lock.unlink(missing_ok=True)
            return None

    @classmethod
    def wait_for_builder(cls, model, timeout: float = 600.0):
        """Wait for the background build of the model's package, if one is running (up to timeout seconds): a run
        beside it would share the cores with it, which made decoding 5-10x slower on 2 cores (AMD EPYC Zen 3, 160m
        int8: 5.6-11 tok/s against 51), though it runs at the lowest priority (SCHED_IDLE)."""
        path, end = cls.path(model), time.time() + timeout
        pid = cls.builder(path)
        if pid is not None:
            print(f"decode: waiting for the background build of the compiled step (pid {pid}, {path})", file=sys.stderr)
        while pid is not None and time.time() < end:
            time.sleep(0.2)
            pid = cls.builder(path)

    @classmethod
    def build_in_background(cls, model, quantizer=None) -> str:
        """Start building the model's package in a process of its own (`generate.py --build-step`, run when a run
        ends), which loads the model from model.source as load() did here (quantizer: load()'s quantize), at the
        lowest priority, and outlives this run (~30-70 s on 2 cores), so that later runs load the package. One build
        per package at a time (a lock file beside it); one that fails leaves its log (failed_build), and no run
        tries again but --compile. Says what became of it, for stderr."""
        path = cls.path(model)
        lock, log = path.with_suffix(".building"), path.with_suffix(".log")
        if path.exists() or cls.builder(path) is not None or log.exists():  # (built, building, or failed)
            return ""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError as e:  # (FileExistsError: another run has just started one)
            return "" if isinstance(e, FileExistsError) else f"decode: no compiled step is built ({e})"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--build-step", str(path), "--model", str(model.source)]
        cmd += ["--dtype", str(model.embed.weight.dtype).removeprefix("torch."), "--device", "cpu"]
        cmd += ["--quantize", quantizer] if quantizer else []
        # the same rule, and the same thread count (both are part of the package's key)
        env = os.environ | {
            "PHI_CPU_KERNELS": str(int(quantize.CPU_KERNELS)),
            "OMP_NUM_THREADS": str(torch.get_num_threads()),
        }
        try:
            with open(log, "w") as out:
                child = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True
                )
            os.write(fd, str(child.pid).encode())
        except OSError as e:
            lock.unlink(missing_ok=True)
            return f"decode: no compiled step is built ({e})"
        finally:
            os.close(fd)
        what = "the step compiled ahead of time for this model shape"
        return f"decode: building {what} in the background, for later runs (pid {child.pid}, log {log})"

    @classmethod
    def failed_build(cls, model) -> Path | None:
        """The log of a background build of the model's package that failed (none is running, none was built)."""
        path = cls.path(model)
        log = path.with_suffix(".log")
        return log if log.exists() and not path.exists() and cls.builder(path) is None else None

    @staticmethod
    def build(step: FlatStep, path: Path):
        """Export the step (example: 2 rows, 16 slots; both dimensions dynamic) and compile it into path."""
        print(f"compiling the decode step ahead of time into {path} (once for this model shape)", file=sys.stderr)
        cfg, model = step.model.config, step.model
        cache = phi.KVCache(cfg, 2, 16, quantize.cache_dtype(model), model.embed.weight.device)
        rows, slots = torch.export.Dim("rows", min=1), torch.export.Dim("slots", min=2)
        shapes = [None, {0: rows, 1: slots}, {0: rows, 1: slots}, {0: rows, 1: slots}, {0: slots}]
        shapes += [{0: rows, 2: slots}] * (2 * cfg.num_hidden_layers)
        inputs = (
            torch.zeros(2, dtype=torch.long, device=cache.ids.device),
            model.rotary.inv_freq,
            *step_tensors(cache),
        )
        with torch.no_grad():
            program = torch.export.export(step, inputs, dynamic_shapes=({0: rows}, None, tuple(shapes)))
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            options = {"aot_inductor.package_constants_in_so": False}  # (the weights come from the model)
            torch._inductor.aoti_compile_and_package(program, package_path=f"{tmp}/step.pt2", inductor_configs=options)
            os.replace(f"{tmp}/step.pt2", path)  # whole or not at all
        path.with_suffix(".log").unlink(missing_ok=True)  # (a background build's, failed or this one)


# -----------------------------------------------------------------------------------------------------------------
# Decoding: a batch of prompts, one prompt


def stop_ids(model, eos_ids=None) -> set:
    """The ids that end a row: eos_ids when given, else the model's own (set by load())."""
    return set(eos_ids if eos_ids is not None else getattr(model, "eos_ids", ()))


def fit_context(model, T: int, max_new_tokens: int) -> int:
    """How many tokens a T-token prompt can have after it: max_new_tokens, or what the context leaves (a note)."""
    context = model.config.max_position_embeddings
    if T > context:
        raise ValueError(f"the prompt is {T} tokens, longer than the model's context of {context}")
    if T + max_new_tokens > context:
        print(f"note: generating {context - T} tokens, not {max_new_tokens}: the context is {context}", file=sys.stderr)
        return context - T
    return max_new_tokens


def left_padded(prompts, device):
    """(ids, mask), both (B, T): the prompts (lists of ids) left-padded, so every row's last token sits at T - 1."""
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, T - len(p) :], mask[r, T - len(p) :] = torch.tensor(p, dtype=torch.long), 1
    return ids, mask


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens=128, *, eos_ids=None, stats=None, steps=None, sampling=None, **kw):
    """Generate for a batch of prompts (lists of ids, left-padded together). Yields a (B,) tensor of new tokens
    per step; a row that has produced an EOS id keeps yielding -1. Stops when every row is done. sampling: a
    Sampling, or its fields as keywords; steps: Steps.compiled(device) for the compiled step; stats (a dict):
    token counts and times, as report() prints them."""
    s, steps, dev = Sampling.of(sampling, **kw), steps or Steps(), model.embed.weight.device
    eos = torch.tensor(sorted(stop_ids(model, eos_ids)), dtype=torch.long, device=dev)
    ids, mask = left_padded(prompts, dev)
    max_new_tokens = fit_context(model, ids.shape[1], max_new_tokens)
    cache = phi.KVCache(model.config, len(prompts), ids.shape[1] + max_new_tokens, quantize.cache_dtype(model), dev)
    # tokens seen so far per row, for the repetition penalty; a pad slot repeats the row's first real token
    seen = torch.where(mask.bool(), ids, ids.gather(1, (mask == 0).sum(1, keepdim=True).clamp(max=ids.shape[1] - 1)))
    done = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=int(mask.sum()), new_tokens=0)
    produced, t0 = torch.zeros((), dtype=torch.long, device=dev), time.perf_counter()
    try:
        logits = prefill(model, ids, mask if (mask == 0).any() else None, cache)
        for step in range(max_new_tokens):
            token = sample(logits, seen, s).masked_fill(done, -1)
            if step == 0:
                stats["prefill_s"], t0 = time.perf_counter() - t0, time.perf_counter()
            done |= torch.isin(token, eos)
            produced += (token >= 0).sum()
            yield token
            if step == max_new_tokens - 1 or done.all():
                break
            if s.repetition_penalty != 1.0:
                seen = torch.cat((seen, token.clamp(min=0)[:, None]), 1)
            # the compiled step traces the fixed-shape decode_step only: flash-attn, a LongRoPE model that can still
            # cross its original context in this cache, and a mixture of experts take the plain step
            step_fn = steps.decode if compiled_step_ok(model, cache) else decode_one_token
            logits = step_fn(model, token.clamp(min=0), cache)
            if step == 0:  # with a compiled step this first step also compiles
                stats["first_step_s"] = time.perf_counter() - t0
            elif step == 1:  # tokens the steps after it produce: new_tokens - this
                stats["first_tokens"] = int(produced)
    finally:  # also when the caller stops early (EOS, stop string)
        stats["decode_s"], stats["new_tokens"] = time.perf_counter() - t0, int(produced)


def generate(model, prompt_ids, max_new_tokens=128, *, eos_ids=None, stats=None, steps=None, sampling=None, **kw):
    """Yields one int per new token for one prompt (a list of ints or a (1, T) LongTensor); stops at an EOS id
    (not yielded) or after max_new_tokens. Greedy at temperature 0 (the default); sampling: a Sampling, or its fields
    as keywords (temperature, top_k, top_p, repetition_penalty, generator)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    stops, s = stop_ids(model, eos_ids), Sampling.of(sampling, **kw)
    for token in generate_batch(
        model, [prompt_ids], max_new_tokens, eos_ids=stops, stats=stats, steps=steps, sampling=s
    ):
        t = int(token[0])
        if t < 0 or t in stops:
            return
        yield t


# -----------------------------------------------------------------------------------------------------------------
# Beam search: transformers' algorithm (generate(num_beams=K, do_sample=False)), the KV cache reordered each step


@torch.no_grad()
def generate_beam(
    model,
    prompts,
    max_new_tokens=128,
    num_beams=4,
    *,
    length_penalty=1.0,
    early_stopping=False,
    num_return_sequences=1,
    eos_ids=None,
    stats=None,
):
    """Beam search for a batch of prompts (lists of ids, left-padded together). Returns, per prompt, its
    num_return_sequences best hypotheses, best first, as (new tokens, without the EOS that ended them; score): the
    sum of the tokens' log-probabilities (the EOS's included) / their number ** length_penalty. early_stopping: True
    stops a prompt once num_beams hypotheses have ended; False once transformers' estimate says no running beam can
    beat them; "never" (with length_penalty > 0) estimates with the longest possible length. stats (a dict): "steps",
    the tokens each beam went through (the model ran one step fewer)."""
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams = {num_beams}], got {num_return_sequences}")
    dev, K = model.embed.weight.device, num_beams
    eos = torch.tensor(sorted(stop_ids(model, eos_ids)), dtype=torch.long, device=dev)
    ids, mask = left_padded(prompts, dev)
    B, N = len(prompts), fit_context(model, ids.shape[1], max_new_tokens)
    cache = phi.KVCache(model.config, B, ids.shape[1] + N, quantize.cache_dtype(model), dev)
    logits = prefill(model, ids, mask if (mask == 0).any() else None, cache).repeat_interleave(K, 0)  # (B * K, V)
    reorder_rows(cache, torch.arange(B, device=dev).repeat_interleave(K))  # each prompt's K beams start from it
    beams = Beams(B, K, N, eos, length_penalty, early_stopping)
    for t in range(N):
        if stats is not None:
            stats["steps"] = t + 1
        rows, tokens, over = beams.step(logits, t)
        if over:
            break
        reorder_rows(cache, rows)  # each running beam takes its parent's keys and values
        logits = decode_one_token(model, tokens, cache)
    return [beams.best(b, num_return_sequences, set(eos.tolist())) for b in range(B)]


class Beams:
    """Beam search's state for B prompts of K beams, N new tokens at most: the running beams (scores, tokens) and,
    per prompt, the K best ended hypotheses, as transformers keeps them."""

    def __init__(self, B, K, N, eos, length_penalty, early_stopping):
        dev, self.B, self.K, self.N, self.eos = eos.device, B, K, N, eos
        self.penalty, self.early = length_penalty, early_stopping
        self.keep = max(2, 1 + len(eos)) * K  # candidates per step: enough that K of them go on after some end
        self.first_k = torch.arange(self.keep, device=dev) < K  # only the best K candidates may end a hypothesis
        self.running = torch.full((B, K), -1.0e9, device=dev).index_fill_(1, torch.tensor([0], device=dev), 0.0)
        self.seqs = torch.full((B, K, N), -1, dtype=torch.long, device=dev)
        self.ended, self.ended_scores = (
            torch.zeros(B, K, dtype=torch.bool, device=dev),
            self.running.new_full((B, K), -1.0e9),
        )
        self.ended_seqs, self.open = self.seqs.clone(), torch.ones(B, 1, dtype=torch.bool, device=dev)

    def step(self, logits, t):
        """Extend the beams by step t's logits (B * K, V): (the cache rows the next running beams continue, their new
        tokens (B * K,), whether the search is over)."""
        B, K, N = self.B, self.K, self.N
        logprobs = logits.float().log_softmax(-1).view(B, K, -1) + self.running[:, :, None]  # (B, K, V)
        top, idx = logprobs.view(B, -1).topk(self.keep)  # (B, keep): the best continuations of all K beams
        beam, token = idx // logprobs.shape[-1], idx % logprobs.shape[-1]
        cand = self.seqs.gather(1, beam[..., None].expand(-1, -1, N)).clone()
        cand[:, :, t] = token
        hits = torch.isin(token, self.eos) | (t + 1 >= N)  # (B, keep): the candidate ends here
        going = top + hits.float() * -1.0e9  # the K best that go on are the next running beams
        chosen = going.topk(K).indices  # (B, K)
        self.running, self.seqs = going.gather(1, chosen), cand.gather(1, chosen[..., None].expand(-1, -1, N))
        rows = (beam.gather(1, chosen) + torch.arange(B, device=idx.device)[:, None] * K).view(-1)
        self.end(top, cand, hits & self.first_k, t)
        over = not self.open.any() or (self.ended.all() and self.early is True) or hits.all()
        return rows, self.seqs[:, :, t].reshape(-1), over

    def end(self, top, cand, ends, t):
        """The candidates that end here join the ended hypotheses if among the K best of them (none once a prompt's
        K have ended with early_stopping True, or none can beat them); then transformers' estimate of whether a
        running beam still could."""
        final = top / ((t + 1) ** self.penalty)
        final += (self.ended.all(-1, keepdim=True) & (self.early is True)).float() * -1.0e9
        final += (~self.open).float() * -1.0e9
        final += (~ends).float() * -1.0e9
        best = torch.cat((self.ended_scores, final), 1).topk(self.K).indices
        self.ended_scores = torch.cat((self.ended_scores, final), 1).gather(1, best)
        self.ended_seqs = torch.cat((self.ended_seqs, cand), 1).gather(1, best[..., None].expand(-1, -1, self.N))
        self.ended = torch.cat((self.ended, ends), 1).gather(1, best)
        length = self.N if self.early == "never" and self.penalty > 0 else t + 1
        worst = torch.where(self.ended, self.ended_scores.min(1, keepdim=True).values, -1.0e9)
        self.open &= (self.running[:, :1] / length**self.penalty > worst).any(-1, keepdim=True)

    def best(self, b, n, stops) -> list:
        """Prompt b's n best ended hypotheses: [(new tokens up to the EOS, score)], best first."""
        return [(hypothesis(self.ended_seqs[b, r].tolist(), stops), self.ended_scores[b, r].item()) for r in range(n)]


def hypothesis(tokens, stops) -> list:
    """A hypothesis' new tokens: up to its EOS or its end."""
    out = []
    for t in tokens:
        if t < 0 or t in stops:
            break
        out.append(t)
    return out


def reorder_rows(cache: phi.KVCache, rows):
    """Row i of the cache becomes what row rows[i] was (beam search: a beam takes its parent's keys and values)."""
    cache.k, cache.v = [t.index_select(0, rows) for t in cache.k], [t.index_select(0, rows) for t in cache.v]
    cache.valid, cache.pos, cache.ids = (t.index_select(0, rows) for t in (cache.valid, cache.pos, cache.ids))


# -----------------------------------------------------------------------------------------------------------------
# Embeddings: the last hidden states pooled, for downstream use


@torch.no_grad()
def embed(model, tok, texts, pooling="last", batch_size=16):
    """One vector per text (a string, or a list of token ids used as given): the model's last hidden states (after the
    final norm), pooled: "last", the last token's (as the sequence-classification head reads it), or "mean", over the
    text's tokens. Returns (len(texts), hidden_size) float32, not normalized. Strings are encoded as prompts are (BOS
    where the family adds one); batch_size texts at a time, left-padded (each row computes what it computes alone)."""
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    prompts = [tok.encode(t, bos=tok.add_bos) if isinstance(t, str) else list(t) for t in texts]
    context = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if not 0 < len(p) <= context:
            raise ValueError(f"text {i} is {len(p)} tokens: an embedding takes 1 to {context} (the model's context)")
    out = []
    for b in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[b : b + batch_size], model.embed.weight.device)
        h = phi.PhiModel.forward(model, ids, mask if (mask == 0).any() else None).float()  # (B, T, C)
        real = mask[..., None].float()  # (B, T, 1)
        out.append(h[:, -1] if pooling == "last" else (h * real).sum(1) / real.sum(1))
    return torch.cat(out).cpu() if out else torch.zeros(0, model.config.hidden_size)


# -----------------------------------------------------------------------------------------------------------------
# Speculative decoding (batch 1): cheap drafts, verified by the model in one forward over the KV cache


def lookup_draft(context: list, k: int, max_ngram=3) -> list:
    """Prompt lookup: the (up to) k tokens that followed the latest earlier occurrence of the context's last n-gram,
    for n = max_ngram .. 1 (no second model: text that repeats what came before drafts itself)."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        tail = context[-n:]
        for i in range(len(context) - n - 1, -1, -1):
            if context[i : i + n] == tail:
                return context[i + n : i + n + k]
    return []


def catch_up(model, cache, ids):
    """Make the cache hold exactly ids: roll it back past what differs or is extra, run what is missing."""
    held = cache.ids[0, : int(cache.slot)].tolist()
    same = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), min(len(held), len(ids)))
    cache.slot.fill_(same)  # (the slots past it are overwritten)
    if same < len(ids):
        model(torch.tensor([ids[same:]], device=model.embed.weight.device), cache=cache)


def propose(draft, dcache, ids: list, budget: int, s: Sampling):
    """(proposals, q): up to budget tokens to follow ids, from prompt lookup (draft None) or the draft model, and
    the draft model's distributions they were drawn from when it samples (else None)."""
    if draft is None:
        return lookup_draft(ids, budget), None
    catch_up(draft, dcache, ids[:-1])
    proposals, q, token = [], [], ids[-1]
    for _ in range(budget):
        logits = draft(torch.tensor([[token]], device=draft.embed.weight.device), cache=dcache)[0, -1:]  # (1, V)
        if s.temperature:
            q.append(process_logits(logits, None, s).softmax(-1)[0])
        token = int(sample(logits, None, s))
        proposals.append(token)
    return proposals, q


def verdict(logits, proposals, q, s: Sampling):
    """(n, token): how many proposals the model keeps, given its logits (n + 1, V) after `last` and each proposal,
    and its own token after the kept ones. Greedy: proposals up to the first that is not the model's argmax. Sampling:
    the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023), under which the tokens are distributed as
    the model's own samples: a proposal d drawn from q is kept with probability min(1, p(d) / q(d)); the first one
    rejected is replaced by a draw from max(p - q, 0), renormalised; all kept, one more draw from p. q is None for
    prompt lookup: a draft taken for certain (q(d) = 1, so max(p - q, 0) is p without d)."""
    if s.temperature == 0:
        wanted = logits.argmax(-1).tolist()
        n = next((i for i, (d, w) in enumerate(zip(proposals, wanted)) if d != w), len(proposals))
        return n, wanted[n]
    p, g = process_logits(logits, None, s).softmax(-1), s.generator  # (n + 1, V)
    for i, d in enumerate(proposals):
        qd = 1.0 if q is None else q[i][d].item()
        if torch.rand((), generator=g, device=p.device).item() * qd < p[i, d].item():
            continue  # kept
        residual = p[i].clone() if q is None else (p[i] - q[i]).clamp(min=0)
        if q is None:
            residual[d] = 0
        if residual.sum() <= 0:  # (only if p(d) = 1, where d was kept: never divide by 0)
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=g))
    return len(proposals), int(torch.multinomial(p[-1], 1, generator=g))


class Backoff:
    """How many drafts to propose next: one more than the last step kept, up to k; after two steps in a row that
    kept none, none for four steps (plain one-token steps), so text that does not repeat costs little extra."""

    def __init__(self, k):
        self.k, self.size, self.misses, self.rest = k, k, 0, 0

    def budget(self) -> int:
        return 0 if self.rest else self.size

    def update(self, proposed: int, kept: int):
        if proposed:
            self.size, self.misses = min(self.k, kept + 1), 0 if kept else self.misses + 1
            if self.misses == 2:
                self.rest, self.misses = 4, 0
        elif self.rest:
            self.rest -= 1


def verify_budget(model, cache, drafts: int, left: int) -> int:
    """How many proposals the next verify step can take: drafts, within the tokens left and the cache, and never
    crossing a LongRoPE model's original context part-way (a rejected token past it would leave keys rotated with
    the long factors before the sequence got there). -1: no room for another token."""
    start = int(cache.slot)
    budget = min(drafts, left, cache.ids.shape[1] - start - 1)
    if budget >= 0 and model.rotary.scaled and not cache.long and start < model.rotary.original:
        budget = min(budget, model.rotary.original - start - 1)
    return budget


@torch.no_grad()
def generate_speculative(
    model, prompt_ids, max_new_tokens=128, k=4, draft=None, *, eos_ids=None, stats=None, steps=None, sampling=None, **kw
):
    """Decoding of one prompt in fewer model calls, with the output of generate(): greedy, token for token; sampled,
    the same distribution (see verdict). Each step proposes up to k tokens (the draft model's continuation, or prompt
    lookup when draft is None), runs the last token and the proposals through the model in one forward over the KV
    cache, keeps the proposals up to the first the model rejects plus a token of its own, and rolls the cache back
    past the rest. How many it drafts follows how many were accepted (Backoff)."""
    s, steps, dev = Sampling.of(sampling, **kw), steps or Steps(), model.embed.weight.device
    if s.repetition_penalty != 1.0:
        raise ValueError("speculative decoding does not take a repetition penalty")
    stops, ids = stop_ids(model, eos_ids), list(prompt_ids)
    max_new_tokens = fit_context(model, len(ids), max_new_tokens)
    if max_new_tokens < 1:
        return
    cache = phi.KVCache(model.config, 1, len(ids) + max_new_tokens, quantize.cache_dtype(model), dev)
    dcache = draft and phi.KVCache(draft.config, 1, len(ids) + max_new_tokens, quantize.cache_dtype(draft), dev)
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(ids), new_tokens=0, drafted=0, accepted=0)
    backoff, t0 = Backoff(k), time.perf_counter()
    new = [int(sample(prefill(model, torch.tensor([ids], device=dev), None, cache), None, s))]
    stats["prefill_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    try:
        while True:  # new: the tokens to yield (the kept proposals and the model's own; the cache lacks the last)
            for token in new:
                if token in stops:
                    return
                yield token
                ids.append(token)
                stats["new_tokens"] += 1
            start = int(cache.slot)
            budget = verify_budget(model, cache, backoff.budget(), max_new_tokens - stats["new_tokens"] - 1)
            if budget < 0:
                return
            proposals, q = propose(draft, dcache, ids, budget, s)
            verify = steps.verify if compiled_step_ok(model, cache) else decode_tokens
            logits = verify(model, torch.tensor([[ids[-1]] + proposals], device=dev), cache)[0]
            n, after = verdict(logits, proposals, q, s)
            stats["drafted"], stats["accepted"] = stats["drafted"] + len(proposals), stats["accepted"] + n
            backoff.update(len(proposals), n)
            cache.slot.fill_(start + 1 + n)  # keep ids[-1] and the accepted proposals: roll back past the rest
            new = proposals[:n] + [after]
    finally:
        stats["decode_s"] = time.perf_counter() - t0


# -----------------------------------------------------------------------------------------------------------------
# Streaming text: where tokens become text, with stop strings (the CLI and serve.py both use it)


def cut_at_stop(text, stops, final=False):
    """(text to show, stopped): text up to the first stop string; while none has appeared and more text may come
    (not final), hold back a tail that could still become one."""
    hits = [text.index(s) for s in stops if s in text]
    if hits:
        return text[: min(hits)], True
    hold = 0 if final else max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False


class TextStream:
    """The text of new tokens (an iterable of ids), piece by piece as they come, cut at the first stop string.
    Iterate for the pieces; then .text is what they joined to, .ids the tokens taken (up to the stop string) and
    .stopped whether a stop string ended it. context: the prompt's ids where the text continues the prompt's text
    (a completion: prompt + text reads as the decode of both, a SentencePiece word keeping its leading space); none
    for a reply of its own (a chat turn: its text is tok.decode(ids), as transformers decodes it)."""

    def __init__(self, tok: Tokenizer, tokens, stops=(), context=()):
        self.tok, self.tokens, self.stops, self.context = tok, tokens, list(stops), list(context)
        self.text, self.ids, self.stopped = "", [], False

    def __iter__(self):
        decoder, text = self.tok.stream(self.context), ""
        try:
            for token in self.tokens:
                self.ids.append(token)
                text += decoder.push(token)
                piece = self._show(text, final=False)
                if piece:
                    yield piece
                if self.stopped:
                    return
            piece = self._show(text + decoder.flush(), final=True)  # the end: what was held back is text too
            if piece:
                yield piece
        finally:  # a stop string or a caller that stops early ends the generation
            getattr(self.tokens, "close", lambda: None)()

    def _show(self, text, final) -> str:
        visible, self.stopped = cut_at_stop(text, self.stops, final)
        piece, self.text = visible[len(self.text) :], visible
        return piece


# -----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description="Generate text with a Phi checkpoint (Hub id or local directory).")
    p.add_argument("--model", default="microsoft/phi-2", help="Hub id or local directory (default microsoft/phi-2)")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--prompt-file", help="a file with one prompt per line, run as a padded batch")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model family's chat format")
    p.add_argument("--system", help="system message for --chat/--interactive")
    p.add_argument("--interactive", action="store_true", help="chat loop on stdin, keeping the conversation")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "flash"])
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="compile the one-token decode step now (CPU: ahead of time, kept in ~/.cache/phi for later runs of any "
        "checkpoint of this shape, which a run without it otherwise builds in the background; CUDA: torch.compile);"
        " --no-compile: the plain step, nothing built",
    )
    p.add_argument("--build-step", help=argparse.SUPPRESS)  # (the process build_in_background starts)
    p.add_argument(
        "--quantize",
        choices=list(QUANTIZERS),
        help="int8 or int4 (groups of 128) weights; where quantize.q8_on() (AMD, AVX2) activations are rounded too"
        " (int8: to int16, int4: to int8; decoding 1.6-2.3x faster), unless int8-weight-only or int4-weight-only",
    )
    p.add_argument("--adapter", help="a PEFT LoRA adapter (Hub id or directory), merged into the weights at load")
    p.add_argument("--speculate", type=int, default=0, metavar="K", help="speculative decoding, K drafts a step")
    p.add_argument("--draft", help="with --speculate: a smaller checkpoint that drafts (default: prompt lookup)")
    p.add_argument("--num-beams", type=int, default=1, metavar="K", help="beam search with K beams (no sampling)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score = logprob sum / length**this")
    p.add_argument(
        "--early-stopping",
        nargs="?",
        const="true",
        default="false",
        choices=["true", "false", "never"],
        help="beam search: stop a prompt once K hypotheses ended (true), when none can beat them (false), never",
    )
    p.add_argument("--num-return-sequences", type=int, default=1, help="beam search: hypotheses shown per prompt")
    p.add_argument("--tp", action="store_true", help="tensor parallel over torchrun's processes (tp.py)")
    return p


def main(argv=None):
    p = build_parser()

    def error(message):  # argparse's own errors too: one line on stderr, exit code 1
        print(f"generate.py: error: {message}", file=sys.stderr)
        sys.exit(1)

    p.error = error
    args = p.parse_args(argv)
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?"
    try:
        run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def check_args(args):
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError("--max-new-tokens and --num-samples must be >= 1")
    if args.speculate < 0 or args.draft and not args.speculate:
        raise ValueError("--speculate K needs K >= 1 (and --draft needs --speculate)")
    if args.speculate and args.repetition_penalty != 1.0:
        raise ValueError("--speculate does not take a --repetition-penalty")
    if args.num_beams < 1 or not 1 <= args.num_return_sequences <= args.num_beams:
        raise ValueError("--num-beams K needs K >= 1 and 1 <= --num-return-sequences <= K")
    if args.num_beams > 1 and (args.speculate or args.repetition_penalty != 1.0 or args.num_samples != 1):
        raise ValueError("--num-beams searches: it takes no --speculate, --repetition-penalty or --num-samples")
    if args.attn == "flash":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not device.startswith("cuda"):
            raise ValueError(f"--attn flash needs a CUDA device, got {device}")
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ValueError("--attn flash needs the flash-attn package (pip install flash-attn)") from None
        if args.dtype == "float32":
            raise ValueError("--attn flash needs --dtype bfloat16 or float16")


def run(args):
    """Load, then stream one prompt's continuation, decode a batch, decode speculatively, or chat."""
    check_args(args)
    if args.build_step:
        return build_step(args)
    if args.tp:  # every rank runs every step; rank 0 prints
        args.device = str(tensor_parallel.init())
        if torch.distributed.get_rank():
            sys.stdout = sys.stderr = open(os.devnull, "w")
    model, tok = load(
        args.model, args.dtype, args.device, args.revision, args.attn, args.quantize, args.adapter, tp=args.tp
    )
    print(
        f"loaded {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{model.embed.weight.dtype}, {model.embed.weight.device}",
        file=sys.stderr,
    )
    decoding = decoding_options(args, model, tok)
    if args.interactive:
        interactive(model, tok, args, decoding)
    else:
        decode_prompts(model, tok, args, decoding)
    build_later(model, args, decoding["steps"])


def decode_prompts(model, tok, args, decoding):
    """The prompts of --prompt and --prompt-file (or a default one), each --num-samples times: streamed, as a batch,
    speculatively or by beam search; the speed on stderr."""
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    texts = [chat_prompt(tok, p, args.system) if args.chat else p for p in prompts or ["def print_prime(n):"]]
    batch = [tok.encode(t, bos=tok.add_bos) for t in texts for _ in range(args.num_samples)]
    stats = {}
    if args.speculate:
        speculate(model, tok, args, batch, decoding, stats)
    elif args.num_beams > 1:
        beam_search(model, tok, args, batch, decoding)
    elif len(batch) == 1:
        show(tok, generate(model, batch[0], stats=stats, **decoding), args.stop, reply_context(args, batch[0]))
    else:
        show_batch(model, tok, args, batch, decoding, stats)
    report(stats, decoding["steps"].first_compiles)


def aot_steps(model, tp: bool = False) -> bool:
    """Does the command line decode through the step compiled ahead of time (where there is one)? On a CPU where
    quantize.py's rule holds (CPU_KERNELS), but not for a LongRoPE model (the exported step has the short factors
    only), a mixture of experts (whose routing picks experts on the host) or tensor-parallel ranks."""
    plain = model.config.moe or model.rotary.scaled or model.embed.weight.device.type != "cpu" or tp
    return quantize.CPU_KERNELS and not plain


def command_line_steps(model, compile: bool | None, tp: bool = False) -> Steps:
    """The decode steps of the command line. Where aot_steps: the step compiled ahead of time where its package is
    in the cache (or being built in the background: waited for), with --compile built first (once per model shape);
    else the plain one, and (compile None: no --no-compile) the package built in the background when this run ends
    (build_later); one line on stderr says which. Elsewhere torch.compile's steps with --compile, and the plain
    steps for a mixture of experts."""
    device = model.embed.weight.device
    if compile and model.config.moe:  # generate_batch would take the plain step at every token
        print("note: --compile is not used: a mixture of experts picks its experts on the host", file=sys.stderr)
    if not aot_steps(model, tp):
        return Steps.compiled(device) if compile and not model.config.moe else Steps()
    if compile is False:
        print("decode: the plain step (--no-compile)", file=sys.stderr)
        return Steps()
    ExportedStep.wait_for_builder(model)
    steps = Steps.exported(model, build=bool(compile))
    failed, path = ExportedStep.failed_build(model), ExportedStep.path(model)
    if isinstance(steps.decode, ExportedStep):
        print(f"decode: the step compiled ahead of time for this model shape ({steps.decode.package})", file=sys.stderr)
    elif failed:
        print(
            f"decode: the plain step (a build of the compiled step failed: {failed}; --compile tries again)",
            file=sys.stderr,
        )
    elif compile is None and not path.exists():  # (one there that did not load: the line above)
        why = "after this run, the step compiled ahead of time for this model shape is built in the background, once"
        print(f"decode: the plain step; {why} (--no-compile: not)", file=sys.stderr)
    else:
        print("decode: the plain step", file=sys.stderr)
    return steps


def build_later(model, args, steps: Steps):
    """When a run ends: where it decoded with the plain step for want of a package (and no --no-compile), start
    building one in the background for the runs after it (ExportedStep.build_in_background)."""
    if args.compile is None and aot_steps(model, args.tp) and not isinstance(steps.decode, ExportedStep):
        line = ExportedStep.build_in_background(model, args.quantize)
        if line:
            print(line, file=sys.stderr)


def build_step(args):
    """--build-step PATH, the process ExportedStep.build_in_background starts: load the model as the run that
    started it did, then build its package at PATH and load it once (a package that does not load is no package).
    Its lock stays until it has exited (ExportedStep.builder: a run waits for the whole process); its log (stdout and
    stderr) where the build failed."""
    if hasattr(os, "SCHED_IDLE"):  # the lowest priority (which still left a run beside it 5-10x slower)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    path = Path(args.build_step)
    model, _ = load(args.model, args.dtype, "cpu", quantize=args.quantize)
    if ExportedStep.path(model) != path:  # (the key of what was loaded here is not the starting run's)
        raise ValueError(f"this model's compiled step would be {ExportedStep.path(model)}, not {path}")
    if ExportedStep.load(model, build=True) is None:
        raise ValueError(f"the compiled step {path} was not built (the line above says why)")


def decoding_options(args, model, tok) -> dict:
    """The decoders' keywords from the command line: max_new_tokens, eos_ids, sampling, steps."""
    steps = command_line_steps(model, args.compile, args.tp)
    generator = None
    if args.seed is not None:
        torch.manual_seed(args.seed)
        generator = torch.Generator(model.embed.weight.device).manual_seed(args.seed)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, generator)
    # a chat reply also ends at the family's end-of-turn token
    eos = end_of_turn_ids(model, tok) if args.chat or args.interactive else set(model.eos_ids)
    return dict(max_new_tokens=args.max_new_tokens, eos_ids=eos, sampling=sampling, steps=steps)


def reply_context(args, prompt_ids) -> list:
    """TextStream's context: the prompt where the text continues it, none for a chat reply."""
    return [] if args.chat or args.interactive else prompt_ids


def show(tok, tokens, stops, context=()) -> str:
    """Print the text of tokens as it comes (a TextStream), then a newline; the text."""
    stream = TextStream(tok, tokens, stops, context)
    for piece in stream:
        print(piece, end="", flush=True)
    print(flush=True)
    return stream.text


def show_batch(model, tok, args, batch, decoding, stats):
    """Decode the prompts as one padded batch; print each row's text under a "=== row ===" line."""
    rows = [[] for _ in batch]
    for step in generate_batch(model, batch, stats=stats, **decoding):
        for r, t in enumerate(step.tolist()):
            if t >= 0 and t not in decoding["eos_ids"]:
                rows[r].append(t)
    for r, (prompt, ids) in enumerate(zip(batch, rows)):
        print(f"=== {r} ===\n{''.join(TextStream(tok, ids, args.stop, reply_context(args, prompt)))}", flush=True)


def beam_search(model, tok, args, batch, decoding):
    """--num-beams: each prompt's --num-return-sequences best hypotheses (under "=== prompt.rank ===" lines when
    there are several), their scores on stderr."""
    early = {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)
    found = generate_beam(
        model,
        batch,
        decoding["max_new_tokens"],
        args.num_beams,
        length_penalty=args.length_penalty,
        early_stopping=early,
        num_return_sequences=args.num_return_sequences,
        eos_ids=decoding["eos_ids"],
    )
    several = len(batch) > 1 or args.num_return_sequences > 1
    for r, (prompt, hypotheses) in enumerate(zip(batch, found)):
        for j, (ids, score) in enumerate(hypotheses):
            text = "".join(TextStream(tok, ids, args.stop, reply_context(args, prompt)))
            print(f"=== {r}.{j} ===\n{text}" if several else text, flush=True)
            print(f"beam {r}.{j}: score {score:.4f}, {len(ids)} tokens", file=sys.stderr)


def speculate(model, tok, args, batch, decoding, stats):
    """--speculate: one prompt, drafts from --draft or prompt lookup; the acceptance on stderr."""
    if len(batch) != 1:
        raise ValueError("--speculate decodes one prompt at a time (batch 1)")
    draft = load(args.draft, args.dtype, args.device, args.revision)[0] if args.draft else None
    if draft is not None and draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"--draft {args.draft}: vocabulary {draft.config.vocab_size}, the model's {model.config.vocab_size}"
        )
    tokens = generate_speculative(model, batch[0], k=args.speculate, draft=draft, stats=stats, **decoding)
    show(tok, tokens, args.stop, reply_context(args, batch[0]))
    print(f"speculative: {stats['accepted']} of {stats['drafted']} drafts accepted", file=sys.stderr)


def interactive(model, tok, args, decoding):
    """A chat on stdin: each line a user turn, each reply streamed and kept in the conversation."""
    history = []
    print("chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        ids = tok.encode(chat_prompt(tok, line.rstrip("\n"), args.system, history), bos=tok.add_bos)
        stats = {}
        reply = show(tok, generate(model, ids, stats=stats, **decoding), args.stop)
        history += [{"role": "user", "content": line.rstrip("\n")}, {"role": "assistant", "content": reply}]
        report(stats, decoding["steps"].first_compiles)


def report(stats, compiled=False):
    """Speed on stderr: prompt tokens/s, generated tokens/s (compiled: after the first step, which compiles)."""
    if stats.get("prefill_s"):
        n, s = stats["new_tokens"], stats["decode_s"]
        rate = f"{n / max(s, 1e-9):.1f} tokens/s"
        if compiled and "first_tokens" in stats:  # the one-off compile is not the speed of decoding
            rate = (
                f"{(n - stats['first_tokens']) / max(s - stats['first_step_s'], 1e-9):.1f} tokens/s after "
                f"the first step (which compiles: {stats['first_step_s']:.1f} s)"
            )
        print(
            f"prompt: {stats['prompt_tokens']} tokens, {stats['prompt_tokens'] / stats['prefill_s']:.1f} tokens/s; "
            f"generation: {n} tokens, {rate}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
