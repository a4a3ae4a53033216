"""
Train a small Phi from scratch, or fine-tune a real one, on one GPU (or several with torchrun), or on the CPU.

    python train.py                                  # offline demo: a small phi on this Python's own stdlib sources
    python generate.py --model out/model --prompt "def "
    python train.py --init microsoft/phi-1_5 --data my_code/ --max-steps 1000 --dtype bfloat16
    python train.py --init out/model --task seq-cls --data reviews.jsonl        # {"text": ..., "label": ...}
    torchrun --nproc_per_node 2 train.py ...         # DDP (nccl on GPU, gloo on CPU); --fsdp shards instead
    python train.py --init microsoft/phi-2 --lora 16 --quantize int8 --dtype bfloat16 --checkpointing --merge
                                                     # LoRA on a frozen int8 base: OUT/adapter (PEFT), OUT/model

Every checkpoint (out/ckpt-NNNNNN, and out/model at the end) is a Hugging Face model directory (config.json,
model.safetensors, tokenizer files) plus training_state.pt (optimizer, schedule step, RNG and data position),
written to a temporary directory and renamed into place, so a checkpoint is never half-written. --resume continues
exactly where it stopped.
"""

import argparse
import ctypes
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import generate
import lora
import phi
import quantize
import tokenizer

# Size presets for --config (a config.json path works too). "demo" trains in a few minutes on 2 CPU cores.
# fmt: off
PRESETS = {
    "demo": dict(model_type="phi", hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6,
                 num_key_value_heads=6, head_dim=32, partial_rotary_factor=0.5, max_position_embeddings=256),
    "small": dict(model_type="phi", hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, head_dim=64, partial_rotary_factor=0.5, max_position_embeddings=1024),
    "160m": dict(model_type="phi", hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, head_dim=64, partial_rotary_factor=0.5, max_position_embeddings=2048),
    "phi-1.5": dict(model_type="phi", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                    num_key_value_heads=32, head_dim=64, partial_rotary_factor=0.5, max_position_embeddings=2048),
    "phi-2": dict(model_type="phi", hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, head_dim=80, partial_rotary_factor=0.4, max_position_embeddings=2048),
    "phi3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=96, hidden_act="silu",
                      max_position_embeddings=4096, original_max_position_embeddings=4096),
}
# fmt: on
TASKS = {"causal-lm": phi.Phi, "seq-cls": phi.PhiForSequenceClassification, "token-cls": phi.PhiForTokenClassification}


# Checkpoints hold full (unsharded) states keyed by parameter name, whatever the run's parallelism: a checkpoint of
# a one-process, DDP or FSDP run resumes in any of them.
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class TrainError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


# -----------------------------------------------------------------------------------------------------------------
# Tokenizer and data


def write_byte_tokenizer(d: Path):
    """A tokenizer that needs no download: the 256 bytes (id = byte value) + <|endoftext|> (256), written as
    byte-level BPE files without merges (vocab.json + merges.txt), which generate.py and transformers both read."""
    d.mkdir(parents=True, exist_ok=True)
    eot = "<|endoftext|>"
    vocab = {c: b for b, c in tokenizer.bytes_to_unicode().items()}
    vocab[eot] = 256
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n")
    specials = {k: eot for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    added = dict(content=eot, special=True, lstrip=False, rstrip=False, normalized=False, single_word=False)
    config = dict(tokenizer_class="GPT2Tokenizer", **specials, add_bos_token=False, added_tokens_decoder={"256": added})
    (d / "tokenizer_config.json").write_text(json.dumps(dict(config, model_max_length=1 << 30), indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps(specials))


def tokenizer_files(src: Path):
    """The tokenizer's files in directory src (and its chat template), the ones a checkpoint copies."""
    files = [f for pat in tokenizer.TOKENIZER_FILES for f in src.glob(pat) if f.is_file()]
    return files + [f for f in [src / "chat_template.jinja"] if f.is_file()]


def default_corpus():
    """The standard library's own .py sources of this interpreter (~12 MB without its tests and site-packages):
    code, like phi-1's data, and no download."""
    files = glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)
    return sorted(f for f in files if not any(s in f for s in ("site-packages", "/test/", "/tests/")))


def data_files(spec):
    """--data's files: comma-separated files, directories (every file under them) and globs; default_corpus()."""
    if spec is None:
        return default_corpus()
    files = []
    for part in spec.split(","):
        p = Path(part)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif any(c in part for c in "*?["):
            files += sorted(glob.glob(part, recursive=True))
        elif p.is_file():
            files.append(str(p))
        else:
            raise TrainError(f"--data {part}: no such file or directory")
    if not files:
        raise TrainError(f"--data {spec}: no files found")
    return files


def read_documents(files):
    """Texts: whole files, or the "text" field of each line of a .jsonl file."""
    for f in files:
        if f.endswith(".jsonl"):
            for n, line in enumerate(open(f, encoding="utf-8", errors="replace"), 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise TrainError(f'{f}:{n}: expected a JSON object with a "text" field') from None
        else:
            yield Path(f).read_text(encoding="utf-8", errors="replace")


def token_files(files, tok, cache_dir: Path, block_size):
    """Tokenize the corpus once into memory-mapped token files (train.bin, val.bin: the last 10%), nanoGPT style.
    The files are cached under a hash of the inputs and the tokenizer."""
    h = hashlib.sha256(
        repr((tok.vocab_size, tok.eos_id, [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files])).encode()
    )
    d = cache_dir / f"tokens-{h.hexdigest()[:16]}"
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    if not (d / "val.bin").exists():
        ids = np.concatenate(
            [
                np.array(tok.encode(text, allowed_special=set()) + [tok.eos_id], dtype=dtype)
                for text in read_documents(files)
            ]
            or [np.zeros(0, dtype)]
        )
        if len(ids) < 20 * (block_size + 1):
            raise TrainError(
                f"the corpus is {len(ids)} tokens: too short for --block-size {block_size} "
                f"(needs at least {20 * (block_size + 1)}, so that train and validation each hold a block)"
            )
        tmp = d.with_name(d.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        split = int(len(ids) * 0.9)
        ids[:split].tofile(tmp / "train.bin")
        ids[split:].tofile(tmp / "val.bin")
        tmp.rename(d)
    return (np.memmap(d / "train.bin", dtype=dtype, mode="r"), np.memmap(d / "val.bin", dtype=dtype, mode="r"))


def labelled_examples(files, tok, task, block_size, label_map):
    """seq-cls: {"text", "label"}; token-cls: {"tokens": [words], "labels": [one per word]} -> (ids, labels).
    Token labels go to each word's first token (-100 on the rest, as transformers' examples do), skipping tokens that
    are only the separating space: a causal model at a lone " " has not seen the word yet (Phi-3's and Phi-4's
    tokenizers split " 417" into " " + digits; a byte tokenizer splits every word)."""
    out = []
    for f in files:
        for n, line in enumerate(open(f, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                if task == "seq-cls":
                    ids = tok.encode(ex["text"], allowed_special=set())[:block_size]
                    labels = (
                        label_map.setdefault(ex["label"], len(label_map))
                        if not isinstance(ex["label"], int)
                        else ex["label"]
                    )
                else:
                    ids, labels = [], []
                    if len(ex["tokens"]) != len(ex["labels"]):
                        raise KeyError
                    for i, (word, lab) in enumerate(zip(ex["tokens"], ex["labels"])):
                        piece = tok.encode(("" if i == 0 else " ") + word, allowed_special=set())
                        lab = label_map.setdefault(lab, len(label_map)) if not isinstance(lab, int) else lab
                        tags = [-100] * len(piece)
                        if piece:  # the first token with text, else the last one
                            tags[next((j for j, t in enumerate(piece) if tok.decode([t]).strip()), -1)] = lab
                        ids += piece
                        labels += tags
                    ids, labels = ids[:block_size], labels[:block_size]
            except (json.JSONDecodeError, KeyError, TypeError):
                fields = '"text" and "label"' if task == "seq-cls" else '"tokens" and "labels" of equal length'
                raise TrainError(f"{f}:{n}: expected a JSON object with {fields}") from None
            if ids:
                out.append((ids, labels))
    if len(out) < 10:
        raise TrainError(f"--data: {len(out)} labelled examples; a {task} run needs at least 10")
    return out


# -----------------------------------------------------------------------------------------------------------------
# Batches: every rank draws the same global batch from one seeded generator and takes its own rows, so the data
# position is just that generator's state, and N GPUs see exactly what one GPU with N times the batch would.


def lm_batch(data, g, rows, block_size, rank, world, device):
    """(inputs, targets), rows x block_size each: random windows of the token array, targets shifted by one."""
    starts = torch.randint(len(data) - block_size - 1, (rows * world,), generator=g)[rank * rows : (rank + 1) * rows]
    x = torch.stack([torch.from_numpy(data[s : s + block_size + 1].astype(np.int64)) for s in starts.tolist()])
    return x[:, :-1].to(device), x[:, 1:].to(device)


def labelled_batch(examples, g, rows, rank, world, device, pad_id):
    """(ids, attention mask, labels) of random examples, padded on the right to the longest (labels with -100)."""
    pick = torch.randint(len(examples), (rows * world,), generator=g)[rank * rows : (rank + 1) * rows].tolist()
    T = max(len(examples[i][0]) for i in pick)
    ids = torch.full((rows, T), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, T, dtype=torch.long)
    labels = []
    for r, i in enumerate(pick):  # right padding: the pooled token is the last real one
        x, y = examples[i]
        ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
        labels.append(torch.tensor(y) if isinstance(y, int) else torch.tensor(y + [-100] * (T - len(y))))
    return ids.to(device), mask.to(device), torch.stack(labels).to(device)


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, model, tok_dir: Path, state: dict | None, lora_cfg: dict | None = None):
    """model directory (with lora: the PEFT adapter only) + tokenizer files (+ training_state.pt), written to a
    temporary directory, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora_cfg:
        lora.save_adapter(tmp, model, lora_cfg)
    else:
        model.save_pretrained(tmp)
    for f in tokenizer_files(tok_dir):
        shutil.copy(f, tmp / f.name)
    if state is not None:
        torch.save(state, tmp / "training_state.pt")
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(d: Path):
    """d itself if it is a checkpoint (it holds a training_state.pt), else d's latest ckpt-NNNNNN."""
    if (d / "training_state.pt").exists():
        return d
    found = sorted(d.glob("ckpt-*/training_state.pt"))
    if not found:
        raise TrainError(f"--resume {d}: no checkpoint with a training_state.pt there")
    return found[-1].parent


def glibc():
    """The C library, for mallopt; None where it is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory():
    """On the CPU, keep freed memory in the process. glibc gives every freed block over 32 MB back to the OS, so
    each step's largest tensors (logits and their gradient, tokens x vocab floats; the embedding and lm_head
    gradients) arrive as fresh pages that the kernel faults in and zeroes 4 kB at a time: about a quarter of a
    160M-model step on 2 cores. No mmap-ed blocks and no trimming make malloc reuse them (what jemalloc or tcmalloc,
    which PyTorch's CPU tuning guide suggests, also do). glibc only; elsewhere nothing changes."""
    libc = glibc()
    if libc is None:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: serve big blocks from the heap, not from mmap
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep the heap's free top instead of returning it


def return_freed_memory():
    """On the CPU, hand every freed block of 1 MB or more back to the OS, for fine-tuning a large model where memory
    is what limits. glibc's default raises its mmap threshold (up to 32 MB) each time a large block is freed, after
    which blocks of that size come from the heap, where freed ones stay: fragmentation that grew a phi-2 LoRA step
    (activation checkpointing) by ~100 MB a layer, 3 GB in all. A fixed threshold turns that adjustment off. glibc
    only; elsewhere nothing changes."""
    libc = glibc()
    if libc is not None:
        libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD


# -----------------------------------------------------------------------------------------------------------------
# Phi-3.5-MoE's router in training: sparsemixer's estimator (https://huggingface.co/papers/2409.12136), as
# transformers' training mode. Each of the two experts is sampled (Gumbel-max) among those the jitter mask leaves,
# not taken as the argmax, and the router's gradient is estimated with Heun's third-order method. (Where the mask
# leaves a single expert its weight is 1, and that token gives the router no gradient, in either mode.) The random
# draws come in transformers' order, so a seeded step routes as its training mode does.


class SparseMixerGrad(torch.autograd.Function):
    """Forward: the sampled expert's weight, times 1 or 1/3 (heun). Backward: the gradient of that weight with
    respect to all router scores, as if it were softmax(gates) at the sampled expert (transformers' PhimoeMultiplier)."""

    @staticmethod
    def forward(ctx, scores, weight, expert, gates, heun):
        ctx.save_for_backward(weight, expert, gates)
        return weight * heun

    @staticmethod
    def backward(ctx, grad):
        weight, expert, gates = ctx.saved_tensors
        grad = grad * weight  # (N, 1)
        return (gates * grad.mul(-1)).scatter_add(-1, expert, grad), None, None, None, None


def sparsemixer_train(scores, jitter_eps):
    """phi.sparsemixer in training mode: router scores (N, E) -> weights (N, 2), experts (N, 2)."""
    weights, experts, masked = [], [], scores
    for k in range(2):
        with torch.no_grad():  # the mask, as at inference
            top = masked.max(-1, keepdim=True).values
            far = (top - scores) / scores.abs().clamp(min=top) > 2 * jitter_eps
        logits = masked.masked_fill(far, float("-inf"))
        log_e = torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()
        e = (logits - log_e).max(-1)[1].unsqueeze(-1)  # Gumbel-max: a draw from softmax(logits)
        gates = logits.softmax(-1)
        best = gates.max(-1, keepdim=True)
        u = torch.rand_like(best.values) if k == 0 else torch.rand_like(best.values).uniform_()  # (its draws)
        heun = torch.add(0.3333, (e == best.indices) | (u > 0.75), alpha=0.6667).type_as(gates)  # 1 or 1/3
        weights.append(SparseMixerGrad.apply(scores, gates.gather(-1, e), e, gates, heun))
        experts.append(e)
        masked = torch.scatter(scores, -1, e, float("-inf"))  # the second expert: any but the first
    return torch.cat(weights, -1), torch.cat(experts, -1)


def train_routers(model):
    """Each MoE routes with sparsemixer_train while the model is in training mode, with phi.sparsemixer in eval."""
    for m in model.modules():
        if isinstance(m, phi.MoE):
            m.route = lambda scores, eps, m=m: (sparsemixer_train if m.training else phi.sparsemixer)(scores, eps)
    return model


def lr_at(step, args):
    """Linear warmup to --lr, then cosine decay to --min-lr at --max-steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (args.lr - args.min_lr)


# bf16 dense peak TFLOP/s of common GPUs, by a part of their name (A100 before A10), for the MFU estimate
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40": 181, "A10": 125, "4090": 165, "3090": 71}


def peak_flops(device):
    """The GPU's bf16 dense peak FLOP/s (PEAK_TFLOPS), None when unknown."""
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


# -----------------------------------------------------------------------------------------------------------------
# The command line, the processes, the model


def parse_args(argv=None):
    """The command line (argv, default sys.argv) as a Namespace; a bad one exits with code 2."""
    p = argparse.ArgumentParser(description="Train or fine-tune a Phi model.")
    p.add_argument("--init", default="scratch", help="scratch, or a Hub id / local directory to fine-tune")
    p.add_argument("--config", default="demo", help=f"size preset ({', '.join(PRESETS)}) or a config.json (scratch)")
    p.add_argument("--tokenizer", default=None, help="bytes (scratch default), or a Hub id / directory")
    p.add_argument(
        "--data",
        default=None,
        help="files, a directory, a glob or .jsonl, comma-separated (default: this Python's stdlib .py sources)",
    )
    p.add_argument("--task", default="causal-lm", choices=list(TASKS))
    p.add_argument("--num-labels", type=int, default=None, help="classification: default from the data")
    p.add_argument("--out", default="out")
    p.add_argument("--resume", default=None, help="a checkpoint directory (or an out dir: its latest)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-step per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.0, help="residual/embedding dropout (scratch)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="autocast dtype")
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (less memory)")
    p.add_argument("--fsdp", action="store_true", help="with torchrun: shard parameters (FSDP) instead of DDP")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--sample-tokens", type=int, default=200, help="causal-lm: sample this many tokens at the end")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--lora", type=int, default=0, metavar="R", help="train rank-R LoRA adapters on a frozen --init")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x R)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument(
        "--lora-targets",
        help=f"Linears to adapt, of {','.join(lora.TARGETS)} (default qkv,out,fc1,fc2; phimoe: qkv,out)",
    )
    p.add_argument("--quantize", choices=["int8"], help="with --lora: store the frozen base as int8 (per channel)")
    p.add_argument("--merge", action="store_true", help="with --lora: also write OUT/model with the adapter merged")

    def error(message):  # argparse's own errors too: one line on stderr, exit code 2
        print(f"train.py: error: {message}", file=sys.stderr)
        sys.exit(2)

    p.error = error
    return p.parse_args(argv)


def main(argv=None):
    """train.py's command line: the exit code (0, or 2 after a one-line error on bad input)."""
    args = parse_args(argv)
    try:
        train(args)
    except (TrainError, ValueError, FileNotFoundError) as e:  # ValueError...: bad checkpoints, configs, tokenizers
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def unsharded(model, fsdp, master):
    """The model itself, or with FSDP a full copy gathered from the shards: every rank must call this, rank 0 gets
    the copy (the others None)."""
    if not fsdp:
        return model
    state = get_model_state_dict(model, options=FULL)
    if not master:
        return None
    full = type(model).from_config(model.config)
    full.load_state_dict(state)
    return full


def setup_distributed(args):
    """(rank, world size, device): torchrun's environment (nccl on GPUs, gloo on the CPU), or one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # "cuda": this process's GPU (torchrun's LOCAL_RANK)
        device = torch.device("cuda", local)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def preset_config(name):
    """A fresh model's PhiConfig: a PRESETS name or a config.json path."""
    if name in PRESETS:
        return phi.PhiConfig(**PRESETS[name])
    if Path(name).is_file():
        return phi.PhiConfig.from_hf(json.loads(Path(name).read_text()), name)
    raise TrainError(f"--config {name}: not a preset ({', '.join(PRESETS)}) nor a config.json file")


def build_model(args, cfg, device, tok_vocab, pad_id, num_labels):
    """The model to train: from a --resume checkpoint, a --init checkpoint, or a fresh one of config cfg. With --lora
    the base is --init's, frozen in the compute dtype (it needs no fp32 master copy), int8 with --quantize int8."""
    cls = TASKS[args.task]
    torch.manual_seed(args.seed)  # what starts random (a fresh model, a new score, LoRA's A) is the same every run
    if cfg is None:
        src = Path(args.resume) if args.resume and not args.lora else generate.checkpoint_dir(args.init)
        over = {"num_labels": num_labels} if num_labels else {}
        dtype = getattr(torch, args.dtype) if args.lora else torch.float32
        load_on = torch.device("cpu") if args.quantize else device  # int8: quantized on the CPU, then moved
        model = quantize.speed_up(cls.from_pretrained(src, dtype=dtype, device=load_on, **over).train())
        if args.lora:
            if args.quantize == "int8":  # (the GPU never holds the bf16 base; activations never rounded)
                quantize.quantize_int8(model, weight_only=True).to(device)
            lora.add_lora(model, lora_settings(args))
            if args.resume:
                lora.load_lora(model, Path(args.resume))
        return model
    cfg.vocab_size = -(-tok_vocab // 64) * 64  # round up to a multiple of 64 (faster matmuls)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.block_size)
    cfg.embd_pdrop = cfg.resid_pdrop = args.dropout
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = pad_id
    cfg.num_labels = num_labels or cfg.num_labels
    return quantize.speed_up(cls.from_config(cfg, device=device).train())


def lora_settings(args):
    """--lora's flags as lora.add_lora's settings (and the adapter_config.json it writes)."""
    return dict(
        r=args.lora,
        alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora,
        dropout=args.lora_dropout,
        targets=args.lora_targets and args.lora_targets.split(","),  # None: the model's default (add_lora)
        task=args.task,
        base=args.init,
    )


def check_lora_args(args):
    """Raise TrainError on flags that need --lora without it, or --lora flags that cannot work."""
    if not args.lora:
        for flag, on in (("--quantize", args.quantize), ("--merge", args.merge)):
            if on:
                raise TrainError(f"{flag} needs --lora (a frozen base to quantize or merge into)")
        return
    if args.lora < 1 or args.init == "scratch":
        raise TrainError("--lora R needs R >= 1 and --init (the checkpoint to adapt)")
    bad = [t for t in (args.lora_targets or "qkv").split(",") if t not in lora.TARGETS]
    if bad:
        raise TrainError(f"--lora-targets {bad[0]}: not one of {', '.join(lora.TARGETS)}")
    if args.fsdp:
        raise TrainError("--lora with --fsdp is not supported (the base is frozen: DDP, or one process, is enough)")


# -----------------------------------------------------------------------------------------------------------------
# The run: what the steps of train() share. One object instead of a dozen arguments to every helper, nanoGPT's
# globals made explicit.


@dataclass
class Run:
    """One training run's state, filled in by train()'s steps in order."""

    args: argparse.Namespace  # the command line (with --resume: args.resume becomes the checkpoint directory itself)
    rank: int  # this process's index (torchrun's RANK; 0 alone): rank 0 prints and writes the checkpoints
    world: int  # the number of processes training together (1 without torchrun)
    device: torch.device  # where this process trains
    files: list  # the --data files
    lora_cfg: dict | None = None  # --lora's settings (lora_settings); None: every parameter trains
    resume: Path | None = None  # the checkpoint resumed from
    state: dict | None = None  # its training_state.pt: step, optimizer, RNG states, args, label_map
    tok: object = None  # the tokenizer (tokenizer.load_tokenizer)
    tok_dir: Path | None = None  # its files, copied into every checkpoint
    pad_id: int | None = None  # pads classification batches; a fresh model's bos/eos/pad token
    label_map: dict = field(default_factory=dict)  # classification: label as written in the data -> class id
    train_data: object = None  # causal-lm: a memory-mapped token array; classification: [(ids, labels)]
    val_data: object = None  # the same for validation (the corpus's last 10%)
    raw: torch.nn.Module | None = None  # the model itself (FSDP: holding shards): checkpoints are keyed on it
    model: torch.nn.Module | None = None  # what a step calls: raw, wrapped in DDP or FSDP, compiled
    full: torch.nn.Module | None = None  # the model as saved (FSDP: gathered on rank 0, None on the others)
    saved_at: int | None = None  # the step at which full was last gathered and saved
    opt: torch.optim.Optimizer | None = None  # AdamW over the trained parameters
    scaler: torch.amp.GradScaler | None = None  # float16: scales the loss so small gradients survive; else a no-op
    amp: object = None  # the autocast context of each forward (nullcontext in float32)
    g: torch.Generator | None = None  # the data position: every training batch is drawn from it
    step: int = 0  # optimizer steps done
    losses: list = field(default_factory=list)  # each step's loss in this process's run, for the log's mean
    t0: float = 0.0  # when the loop began (the ETA)
    last_log: float = 0.0  # when the last log line was printed (tokens per second)

    @property
    def master(self):
        """Rank 0: the process that prints and writes."""
        return self.rank == 0

    @property
    def causal(self):
        """A language model (next-token loss), not a classifier."""
        return self.args.task == "causal-lm"


# -----------------------------------------------------------------------------------------------------------------
# Setup: the steps before the loop, in train()'s order. Their order is part of the result: build_model seeds the
# global RNG and the model's initialization draws from it, so nothing between it and the loop may draw.


def start_run(args):
    """Distributed setup and every check of the input that can fail before anything is written: a Run, with the
    resumed checkpoint's state when --resume."""
    rank, world, device = setup_distributed(args)
    files = data_files(args.data)  # bad input is caught before anything is written
    check_lora_args(args)
    run = Run(args, rank, world, device, files, lora_cfg=lora_settings(args) if args.lora else None)
    if args.resume:
        run.resume, run.state = resume_state(args)
    return run


def resume_state(args):
    """The checkpoint --resume names (an out directory: its latest) and its training_state.pt, after checking that
    the flags that shape the model and data are the ones it was trained with. Sets args.resume to that checkpoint."""
    resume = latest_checkpoint(Path(args.resume))
    args.resume = str(resume)
    state = torch.load(resume / "training_state.pt", weights_only=False)
    defaults = vars(parse_args([]))  # for keys a checkpoint of an older train.py does not have
    for key in ("task", "config", "init", "block_size", "lora", "lora_targets", "quantize"):
        was = state["args"].get(key, defaults[key])
        if key == "lora_targets" and args.lora_targets is None:  # not given: the checkpoint's own
            args.lora_targets = was
        if was != getattr(args, key):
            raise TrainError(
                f"--resume {resume} was trained with --{key.replace('_', '-')} {was}, not {getattr(args, key)}"
            )
    return resume, state


def load_tokenizer(args, resume):
    """(tokenizer, its directory): the checkpoint's own, --tokenizer's, --init's, or the byte tokenizer, written to a
    temporary directory (it is copied next to each checkpoint when it is saved)."""
    src = args.tokenizer or (str(resume) if resume else None) or (None if args.init == "scratch" else args.init)
    if src in (None, "bytes"):
        tok_dir = Path(tempfile.mkdtemp(prefix="phi-byte-tokenizer-"))
        write_byte_tokenizer(tok_dir)
    else:
        tok_dir = Path(src) if Path(src).is_dir() else generate.checkpoint_dir(src)
    return tokenizer.load_tokenizer(tok_dir), tok_dir


def load_data(run):
    """(train split, validation split, number of labels): token files for causal-lm, else labelled examples (filling
    run.label_map; the number of labels from the data unless --num-labels). Validation is the last 10%."""
    args = run.args
    if run.causal:
        if run.master:  # rank 0 tokenizes, the others then read its files
            token_files(run.files, run.tok, Path(args.out), args.block_size)
        if run.world > 1:
            torch.distributed.barrier()
        return (*token_files(run.files, run.tok, Path(args.out), args.block_size), args.num_labels or None)
    examples = labelled_examples(run.files, run.tok, args.task, args.block_size, run.label_map)
    n_val = max(1, len(examples) // 10)
    num_labels = args.num_labels or 1 + max(max(y) if isinstance(y, list) else y for _, y in examples)
    return examples[:-n_val], examples[-n_val:], num_labels


def tune_cpu_memory(run):
    """On the CPU, how freed memory is kept: handed back for LoRA on a large frozen base (memory is what limits),
    kept for training from scratch or in full (speed)."""
    if run.device.type == "cpu" and run.args.lora:
        return_freed_memory()
    elif run.device.type == "cpu":
        keep_freed_memory()


def make_model(run, scratch_config, num_labels):
    """The model to train, unwrapped (build_model), with sparsemixer routers in training and --checkpointing."""
    model = build_model(run.args, scratch_config, run.device, run.tok.vocab_size, run.pad_id, num_labels)
    model = train_routers(model)
    if model.config.vocab_size < run.tok.vocab_size:
        raise TrainError(
            f"the tokenizer has {run.tok.vocab_size} tokens, the model's vocabulary only {model.config.vocab_size}"
        )
    model.gradient_checkpointing = run.args.checkpointing
    return model


def wrap_model(run):
    """run.raw as the processes train it: itself alone; under torchrun, DDP (each process holds all of it and the
    gradients are averaged) or, with --fsdp, FSDP (each process holds a shard of every block)."""
    if run.world == 1:
        return run.raw
    if run.args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in run.raw.layers:
            fully_shard(block)
        return fully_shard(run.raw)  # parameters become shards: the optimizer is built after
    device_ids = [run.device] if run.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(run.raw, device_ids=device_ids)


def make_optimizer(run):
    """AdamW over the trained parameters (with --lora: the adapters, and a score head), weight decay on matrices
    only (not on biases and norms), fused into one kernel for all parameters."""
    args = run.args
    trained = [p for p in run.model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=run.device.type in ("cuda", "cpu"))


def restore_training_state(run):
    """With --resume: the optimizer's state, the data position, the global RNG (dropout) and the step count, as the
    checkpoint saved them, so the run goes on exactly as if it had never stopped."""
    if run.resume is None:
        return
    set_optimizer_state_dict(run.raw, run.opt, run.state["optimizer"], options=FULL)  # FSDP: each rank its shards
    run.g.set_state(run.state["data_rng"])
    torch.set_rng_state(run.state["torch_rng"])
    run.step = run.state["step"]
    if run.master:
        print(f"resuming from {run.resume} at step {run.step}", file=sys.stderr)


def mixed_precision(args, device):
    """(autocast context, GradScaler) for --dtype: float32 needs neither; bfloat16 autocasts; float16 also scales
    the loss, since its small gradients would underflow to zero."""
    amp = torch.autocast(device.type, dtype=getattr(torch, args.dtype)) if args.dtype != "float32" else nullcontext()
    return amp, torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")


def describe(run):
    """Print what trains where (rank 0): parameters (int8 weights counted, they are buffers), shape, device."""
    if not run.master:
        return
    raw, args = run.raw, run.args
    n = sum(p.numel() for p in raw.parameters()) + sum(b.numel() for b in raw.buffers() if b.dtype == torch.int8)
    n_trained = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    trained = f" ({n_trained / 1e6:.2f}M trained)" if run.lora_cfg else ""
    print(
        f"{args.task}: {n / 1e6:.2f}M parameters{trained} ({raw.config.model_type}, {raw.config.num_hidden_layers} "
        f"layers, {raw.config.hidden_size} wide), {run.device}, {args.dtype} autocast, {run.world} process(es)",
        file=sys.stderr,
    )


# -----------------------------------------------------------------------------------------------------------------
# The loop: a step, its log line, evaluation, checkpoints.


def get_batch(run, data, g):
    """This process's rows of the next global batch of data drawn from generator g: (inputs, targets) for
    causal-lm, (ids, attention mask, labels) for classification."""
    args = run.args
    if run.causal:
        return lm_batch(data, g, args.batch_size, args.block_size, run.rank, run.world, run.device)
    return labelled_batch(data, g, args.batch_size, run.rank, run.world, run.device, run.pad_id)


def loss_of(run, batch):
    """The mean loss of a batch (get_batch's), under autocast: next-token cross entropy, or the head's own."""
    with run.amp:
        if run.causal:
            x, y = batch
            logits = run.model(x)
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # in float32 whatever the autocast
        ids, mask, labels = batch
        return run.model(ids, attention_mask=mask, labels=labels)[1]


def train_step(run):
    """One optimizer step over --grad-accum micro-batches, at lr_at's learning rate: appends the step's loss (the
    mean over its micro-batches) to run.losses, counts the step, returns (gradient norm before clipping, lr)."""
    args = run.args
    lr = lr_at(run.step, args)
    for group in run.opt.param_groups:
        group["lr"] = lr
    step_loss = 0.0
    for micro in range(args.grad_accum):
        # DDP averages the gradients across processes in every backward: only the last micro-batch's needs it
        sync = micro == args.grad_accum - 1 or run.world == 1 or args.fsdp
        with run.model.no_sync() if not sync else nullcontext():
            loss = loss_of(run, get_batch(run, run.train_data, run.g)) / args.grad_accum  # a mean, not a sum
            run.scaler.scale(loss).backward()
        step_loss += loss.item()
    run.losses.append(step_loss)
    if not math.isfinite(step_loss):  # before the optimizer steps: the weights are still those of a good step
        raise TrainError(
            f"the loss is {step_loss} at step {run.step}: stopping (try a lower --lr, or bfloat16 "
            f"instead of float16); the last good checkpoint is kept"
        )
    run.scaler.unscale_(run.opt)  # the gradients' own scale, for the norm and clipping
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip or math.inf)  # inf: only measures
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    return norm, lr


def mfu_text(run, tok_s):
    """The log line's MFU part: model FLOPs utilization on a known GPU for causal-lm (nanoGPT's estimate: 6N per
    token plus attention), "" elsewhere."""
    if run.device.type != "cuda" or not run.causal or not peak_flops(run.device):
        return ""
    c, n = run.raw.config, sum(p.numel() for p in run.raw.parameters())
    flops = 6 * n + 12 * c.num_hidden_layers * c.hidden_size * run.args.block_size
    return f" | MFU {flops * tok_s / run.world / peak_flops(run.device):.1%}"


def log_line(run, norm, lr):
    """Print the step's progress line: the mean loss since the last line, gradient norm, learning rate, speed
    (tokens per second, since the last line), MFU on a GPU, time left."""
    args, step = run.args, run.step
    tokens_per_step = args.batch_size * args.grad_accum * run.world * (args.block_size if run.causal else 1)
    tok_s = tokens_per_step * min(args.log_every, len(run.losses)) / max(time.time() - run.last_log, 1e-9)
    eta = (time.time() - run.t0) / step * (args.max_steps - step) if step else 0
    recent = run.losses[-args.log_every :]
    bar = "#" * (20 * step // args.max_steps)
    line = (
        f"step {step}/{args.max_steps} [{bar:20}] | loss {sum(recent) / len(recent):.4f} | grad norm {norm:.5g} "
        f"| lr {lr:.2e} | {tok_s:,.0f} tok/s{mfu_text(run, tok_s)} | ETA {int(eta) // 60}:{int(eta) % 60:02d}"
    )
    print(line, file=sys.stderr, flush=True)
    run.last_log = time.time()


@torch.no_grad()
def evaluate(run):
    """(mean validation loss, accuracy or None for causal-lm) over --eval-steps batches, the same batches every
    time (their own seeded generator: the data position of training is untouched). Every rank must call it."""
    run.model.eval()
    g = torch.Generator().manual_seed(1234)
    losses, correct, total = [], 0, 0
    for _ in range(run.args.eval_steps):
        batch = get_batch(run, run.val_data, g)
        losses.append(loss_of(run, batch).item())
        if not run.causal:
            with run.amp:
                scores = run.model(batch[0], attention_mask=batch[1])
            keep = batch[2] != -100  # token-cls: the labelled tokens only
            correct += int((scores.argmax(-1) == batch[2])[keep].sum())
            total += int(keep.sum())
    run.model.train()
    if run.args.fsdp and run.world > 1:  # forwards without a backward leave the root's parameters gathered, and
        run.raw.reshard()  # get_optimizer_state_dict (the next checkpoint) finds them by their shards only
    return sum(losses) / len(losses), (correct / total if total else None)


def log_eval(run, val, acc):
    """Print evaluate's result (rank 0)."""
    if run.master:
        line = f"step {run.step}: validation loss {val:.4f}" + (f", accuracy {acc:.1%}" if acc is not None else "")
        print(line, file=sys.stderr, flush=True)


def save_step(run):
    """Write OUT/ckpt-NNNNNN: the model (with --lora: the adapter) and training_state.pt, everything --resume needs
    to go on bit-exactly. Every rank must call it (FSDP gathers the shards); rank 0 writes."""
    args = run.args
    state = dict(
        step=run.step,
        task=args.task,
        optimizer=get_optimizer_state_dict(run.raw, run.opt, options=FULL),  # by parameter name, unsharded
        data_rng=run.g.get_state(),
        torch_rng=torch.get_rng_state(),
        args=vars(args),
        label_map=run.label_map,
    )
    run.full, run.saved_at = unsharded(run.raw, args.fsdp and run.world > 1, run.master), run.step
    if run.master:
        save_checkpoint(Path(args.out) / f"ckpt-{run.step:06d}", run.full, run.tok_dir, state, run.lora_cfg)


# -----------------------------------------------------------------------------------------------------------------
# Finishing: the final directories and the sample.


def merged_model(run):
    """--merge: the base as stored (its own dtype, not int8) with OUT/adapter merged in, through lora's merge (the
    one generate.load uses)."""
    args = run.args
    d = generate.checkpoint_dir(args.init)
    dtype = phi.PhiConfig.from_hf(phi._read_json(d / "config.json")).torch_dtype or "float32"
    over = {"num_labels": run.raw.config.num_labels} if not run.causal else {}
    full = TASKS[args.task].from_pretrained(d, dtype=getattr(torch, dtype), **over)
    lora.merge_adapter(full, Path(args.out) / "adapter")
    return full


def print_sample(run):
    """Print a sample of --sample-tokens tokens after "def " from the final model (seeded: the same every run)."""
    run.full.eval()
    prompt = run.tok.encode("def ", allowed_special=set())
    gen = torch.Generator(run.device).manual_seed(run.args.seed)
    ids = generate.generate(
        run.full, prompt, run.args.sample_tokens, temperature=0.8, top_k=50, generator=gen, eos_ids={run.tok.eos_id}
    )
    print("sample:\n" + run.tok.decode(prompt + list(ids)))


def finish(run):
    """After the loop: OUT/adapter (--lora), OUT/model (the trained model, or with --merge the base merged with the
    adapter), the sample, then the processes part."""
    args, out = run.args, Path(run.args.out)
    if run.saved_at != run.step:  # resumed at --max-steps: no step ran, nothing was gathered (every rank calls it)
        run.full = unsharded(run.raw, args.fsdp and run.world > 1, run.master)
    if run.master and run.lora_cfg:
        save_checkpoint(out / "adapter", run.full, run.tok_dir, None, run.lora_cfg)
        print(f"saved {out / 'adapter'} (a PEFT LoRA adapter for {args.init})", file=sys.stderr)
    if run.master and (args.merge or not run.lora_cfg):
        if args.merge:  # the sample, too, comes from the merged model
            run.full = merged_model(run)
        save_checkpoint(out / "model", run.full, run.tok_dir, None)
        print(
            f"saved {out / 'model'} (a Hugging Face model directory: python generate.py --model {out / 'model'})",
            file=sys.stderr,
        )
    if run.master and run.causal and args.sample_tokens:
        print_sample(run)
    if run.world > 1:
        torch.distributed.barrier()  # the others wait for rank 0's save: one that tore down first once aborted
        torch.distributed.destroy_process_group()


def train(args):
    """Train as the command line says: checkpoints under --out as it goes (and --resume from one), the final model
    or adapter at the end. Raises TrainError on bad input."""
    run = start_run(args)  # processes, input checks, the resumed checkpoint's state
    scratch_config = None if run.resume or args.init != "scratch" else preset_config(args.config)
    run.tok, run.tok_dir = load_tokenizer(args, run.resume)
    run.pad_id = run.tok.pad_id if run.tok.pad_id is not None else run.tok.eos_id
    run.train_data, run.val_data, num_labels = load_data(run)

    # the model (seeded: from scratch, the same weights every run), then as the processes train it
    tune_cpu_memory(run)
    run.raw = make_model(run, scratch_config, num_labels)
    run.model = wrap_model(run)
    run.opt = make_optimizer(run)
    run.g = torch.Generator().manual_seed(args.seed)  # the data position
    restore_training_state(run)
    if args.compile:
        run.model = torch.compile(run.model)
    run.amp, run.scaler = mixed_precision(args, run.device)
    describe(run)

    run.t0 = run.last_log = time.time()
    while run.step < args.max_steps:
        norm, lr = train_step(run)
        last = run.step == args.max_steps
        if run.master and (run.step % args.log_every == 0 or last):
            log_line(run, norm, lr)
        if args.eval_every and (run.step % args.eval_every == 0 or last):
            log_eval(run, *evaluate(run))
        if args.save_every and run.step % args.save_every == 0 or last:
            save_step(run)
    finish(run)


if __name__ == "__main__":
    sys.exit(main())
