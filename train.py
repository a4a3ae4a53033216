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
    vocab = {c: b for b, c in tokenizer.bytes_to_unicode().items()}
    vocab["<|endoftext|>"] = 256
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n")
    eot = {
        "content": "<|endoftext|>",
        "special": True,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
    }
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "add_bos_token": False,
                "added_tokens_decoder": {"256": eot},
                "model_max_length": 1 << 30,
            },
            indent=2,
        )
    )
    (d / "special_tokens_map.json").write_text(
        json.dumps({k: "<|endoftext|>" for k in ("bos_token", "eos_token", "pad_token", "unk_token")})
    )


def tokenizer_files(src: Path):
    return [f for pat in tokenizer.TOKENIZER_FILES for f in src.glob(pat) if f.is_file()] + [
        f for f in [src / "chat_template.jinja"] if f.is_file()
    ]


def default_corpus():
    """The standard library's own .py sources of this interpreter (~12 MB without its tests and site-packages):
    code, like phi-1's data, and no download."""
    files = glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)
    return sorted(f for f in files if not any(s in f for s in ("site-packages", "/test/", "/tests/")))


def data_files(spec):
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
    starts = torch.randint(len(data) - block_size - 1, (rows * world,), generator=g)[rank * rows : (rank + 1) * rows]
    x = torch.stack([torch.from_numpy(data[s : s + block_size + 1].astype(np.int64)) for s in starts.tolist()])
    return x[:, :-1].to(device), x[:, 1:].to(device)


def labelled_batch(examples, g, rows, rank, world, device, pad_id):
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


def peak_flops(device):
    """bf16 dense peak of common GPUs, for the MFU estimate (None when unknown)."""
    name = torch.cuda.get_device_name(device)
    table = {
        "H200": 989e12,
        "H100": 989e12,
        "A100": 312e12,
        "L40": 181e12,
        "A10": 125e12,
        "4090": 165e12,
        "3090": 71e12,
    }
    return next((v for k, v in table.items() if k in name), None)


# -----------------------------------------------------------------------------------------------------------------
# Training


def parse_args(argv=None):
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
    args = parse_args(argv)
    try:
        train(args)
    except TrainError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad checkpoints, configs and tokenizer files
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
            if args.quantize == "int8":  # (the GPU never holds the bf16 base)
                quantize.quantize_int8(model).to(device)
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
    return dict(
        r=args.lora,
        alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora,
        dropout=args.lora_dropout,
        targets=args.lora_targets and args.lora_targets.split(","),  # None: the model's default (add_lora)
        task=args.task,
        base=args.init,
    )


def check_lora_args(args):
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


def train(args):
    rank, world, device = setup_distributed(args)
    master = rank == 0
    out = Path(args.out)
    files = data_files(args.data)  # bad input is caught before anything is written
    check_lora_args(args)
    lora_cfg = lora_settings(args) if args.lora else None
    state, resume = None, latest_checkpoint(Path(args.resume)) if args.resume else None
    if resume:
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
    # --- tokenizer: the checkpoint's own, a given one, or bytes
    scratch_config = None if resume or args.init != "scratch" else preset_config(args.config)
    tok_src = args.tokenizer or (str(resume) if resume else None) or (None if args.init == "scratch" else args.init)
    if tok_src in (None, "bytes"):  # written next to each checkpoint when it is saved
        tok_dir = Path(tempfile.mkdtemp(prefix="phi-byte-tokenizer-"))
        write_byte_tokenizer(tok_dir)
    else:
        tok_dir = Path(tok_src) if Path(tok_src).is_dir() else generate.checkpoint_dir(tok_src)
    tok = tokenizer.load_tokenizer(tok_dir)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    # --- data
    label_map, examples = {}, None
    if args.task == "causal-lm":
        if master:  # rank 0 tokenizes, the others then read its files
            token_files(files, tok, out, args.block_size)
        if world > 1:
            torch.distributed.barrier()
        train_data, val_data = token_files(files, tok, out, args.block_size)
    else:
        examples = labelled_examples(files, tok, args.task, args.block_size, label_map)
        n_val = max(1, len(examples) // 10)
        train_data, val_data = examples[:-n_val], examples[-n_val:]
    num_labels = args.num_labels or (
        None if args.task == "causal-lm" else 1 + max(max(y) if isinstance(y, list) else y for _, y in examples)
    )
    # --- model and optimizer
    if device.type == "cpu" and args.lora:  # a large frozen base: memory is what limits
        return_freed_memory()
    elif device.type == "cpu":  # from scratch or full fine-tuning: speed
        keep_freed_memory()
    model = train_routers(build_model(args, scratch_config, device, tok.vocab_size, pad_id, num_labels))
    if model.config.vocab_size < tok.vocab_size:
        raise TrainError(
            f"the tokenizer has {tok.vocab_size} tokens, the model's vocabulary only {model.config.vocab_size}"
        )
    model.gradient_checkpointing = args.checkpointing
    raw = model
    if world > 1:
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.layers:
                fully_shard(block)
            model = fully_shard(model)  # parameters become shards: build the optimizer after
        else:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None
            )
    trained = [p for p in model.parameters() if p.requires_grad]  # with --lora: the adapters (and a score)
    decay = [p for p in trained if p.dim() >= 2]  # matrices decay; biases, norms don't
    no_decay = [p for p in trained if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type in ("cuda", "cpu"),
    )  # one kernel for all parameters
    g = torch.Generator().manual_seed(args.seed)  # the data position
    step = 0
    if resume:
        set_optimizer_state_dict(raw, opt, state["optimizer"], options=FULL)  # FSDP: each rank takes its shards
        g.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        if master:
            print(f"resuming from {resume} at step {step}", file=sys.stderr)
    if args.compile:
        model = torch.compile(model)
    amp = torch.autocast(device.type, dtype=getattr(torch, args.dtype)) if args.dtype != "float32" else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "float16")
    if master:
        n = sum(p.numel() for p in raw.parameters()) + sum(b.numel() for b in raw.buffers() if b.dtype == torch.int8)
        trained = f" ({sum(p.numel() for p in raw.parameters() if p.requires_grad) / 1e6:.2f}M trained)" if lora_cfg else ""
        print(
            f"{args.task}: {n / 1e6:.2f}M parameters{trained} ({raw.config.model_type}, {raw.config.num_hidden_layers} layers, "
            f"{raw.config.hidden_size} wide), {device}, {args.dtype} autocast, {world} process(es)",
            file=sys.stderr,
        )

    def loss_of(batch):
        with amp:
            if args.task == "causal-lm":
                x, y = batch
                logits = model(x)
                return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            ids, mask, labels = batch
            return model(ids, attention_mask=mask, labels=labels)[1]

    def next_batch(data, gen):
        if args.task == "causal-lm":
            return lm_batch(data, gen, args.batch_size, args.block_size, rank, world, device)
        return labelled_batch(data, gen, args.batch_size, rank, world, device, pad_id)

    @torch.no_grad()
    def evaluate():
        model.eval()
        ge = torch.Generator().manual_seed(1234)  # the same validation batches every time
        losses, correct, total = [], 0, 0
        for _ in range(args.eval_steps):
            batch = next_batch(val_data, ge)
            losses.append(loss_of(batch).item())
            if args.task != "causal-lm":
                with amp:
                    scores = model(batch[0], attention_mask=batch[1])
                keep = batch[2] != -100
                correct += int((scores.argmax(-1) == batch[2])[keep].sum())
                total += int(keep.sum())
        model.train()
        return sum(losses) / len(losses), (correct / total if total else None)

    tokens_per_step = args.batch_size * args.grad_accum * world * (args.block_size if args.task == "causal-lm" else 1)
    t0, last_log, losses = time.time(), time.time(), []
    full, steps_left = raw, step < args.max_steps  # full: the model as saved (FSDP: gathered at each checkpoint)
    while step < args.max_steps:
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        step_loss = 0.0  # the mean over the micro-batches
        for micro in range(args.grad_accum):
            sync = micro == args.grad_accum - 1 or world == 1 or args.fsdp
            with model.no_sync() if not sync else nullcontext():
                loss = loss_of(next_batch(train_data, g)) / args.grad_accum
                scaler.scale(loss).backward()
            step_loss += loss.item()
        losses.append(step_loss)
        if not math.isfinite(losses[-1]):
            raise TrainError(
                f"the loss is {losses[-1]} at step {step}: stopping (try a lower --lr, or bfloat16 "
                f"instead of float16); the last good checkpoint is kept"
            )
        scaler.unscale_(opt)  # the gradients' own scale, for the norm and clipping
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)  # inf: only measures
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        if master and (step % args.log_every == 0 or step == args.max_steps):
            dt = time.time() - last_log
            tok_s = tokens_per_step * min(args.log_every, len(losses)) / max(dt, 1e-9)
            eta = (time.time() - t0) / step * (args.max_steps - step) if step else 0
            mfu = ""
            if device.type == "cuda" and args.task == "causal-lm" and peak_flops(device):
                c = raw.config  # 6N per token + attention (nanoGPT's estimate)
                flops = (
                    6 * sum(p.numel() for p in raw.parameters())
                    + 12 * c.num_hidden_layers * c.hidden_size * args.block_size
                )
                mfu = f" | MFU {flops * tok_s / world / peak_flops(device):.1%}"
            bar = "#" * (20 * step // args.max_steps)
            line = (
                f"step {step}/{args.max_steps} [{bar:20}] | loss {sum(losses[-args.log_every :]) / len(losses[-args.log_every :]):.4f} "
                f"| grad norm {norm:.5g} | lr {lr:.2e} | {tok_s:,.0f} tok/s{mfu} | ETA {int(eta) // 60}:{int(eta) % 60:02d}"
            )
            print(line, file=sys.stderr, flush=True)
            last_log = time.time()
        if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
            val, acc = evaluate()
            if master:
                print(
                    f"step {step}: validation loss {val:.4f}" + (f", accuracy {acc:.1%}" if acc is not None else ""),
                    file=sys.stderr,
                    flush=True,
                )
        if args.save_every and step % args.save_every == 0 or step == args.max_steps:
            state = dict(
                step=step,
                task=args.task,
                optimizer=get_optimizer_state_dict(raw, opt, options=FULL),  # by parameter name, unsharded
                data_rng=g.get_state(),
                torch_rng=torch.get_rng_state(),
                args=vars(args),
                label_map=label_map,
            )
            full = unsharded(raw, args.fsdp and world > 1, master)
            if master:
                save_checkpoint(out / f"ckpt-{step:06d}", full, tok_dir, state, lora_cfg)
    if not steps_left:  # resumed at --max-steps: no step ran, nothing was gathered
        full = unsharded(raw, args.fsdp and world > 1, master)
    if master and lora_cfg:
        save_checkpoint(out / "adapter", full, tok_dir, None, lora_cfg)
        print(f"saved {out / 'adapter'} (a PEFT LoRA adapter for {args.init})", file=sys.stderr)
    if master and (args.merge or not lora_cfg):
        if args.merge:  # the base as stored (its own dtype, not int8) + the adapter, through generate's merge
            d = generate.checkpoint_dir(args.init)
            dtype = phi.PhiConfig.from_hf(phi._read_json(d / "config.json")).torch_dtype or "float32"
            over = {"num_labels": raw.config.num_labels} if args.task != "causal-lm" else {}
            full = TASKS[args.task].from_pretrained(d, dtype=getattr(torch, dtype), **over)
            lora.merge_adapter(full, out / "adapter")
        save_checkpoint(out / "model", full, tok_dir, None)
        print(
            f"saved {out / 'model'} (a Hugging Face model directory: python generate.py --model {out / 'model'})",
            file=sys.stderr,
        )
    if master and args.task == "causal-lm" and args.sample_tokens:
        full.eval()
        prompt = tok.encode("def ", allowed_special=set())
        gen = torch.Generator(device).manual_seed(args.seed)
        ids = generate.generate(
            full, prompt, args.sample_tokens, temperature=0.8, top_k=50, generator=gen, eos_ids={tok.eos_id}
        )
        print("sample:\n" + tok.decode(prompt + list(ids)))
    if world > 1:
        torch.distributed.barrier()  # the others wait for rank 0's save: one that tore down first once aborted
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
