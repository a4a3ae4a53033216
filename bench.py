"""
Benchmarks (never tests: speed is measured here, correctness in test_phi.py). Needs the dev requirements.

    python bench.py models [--sizes tiny,160m,1.4b] [--dtypes float32,bfloat16] [--impls ...] [--device cuda]
                           [--json bench.json]
        our model (eager, compiled decode, int8 weights eager and compiled) against transformers (eager and SDPA
        attention) on the same random weights, each row in a process of its own: prefill tokens/s (prompt 512),
        decode tokens/s at batch 1 and 8, training-step tokens/s (tiny and 160m), peak memory, and batch-1 decode
        as a share of this machine's memory bandwidth (bytes of weights read per token x tokens/s / the bandwidth
        of a plain 1 GB read, measured just before and after that decode: the larger reading counts). Sizes
        moe-tiny and moe-1b are Phi-3.5-MoE-shaped (phimoe), against transformers' PhimoeForCausalLM; small-2l is
        two layers of Phi-3-small (phi3small: one block-sparse, one dense; its vocabulary), ours only (transformers
        has no class for it)
    python bench.py block-sparse [--lengths 1024,2048,4096] [--dtypes float32]
        Phi-3-small's attention at its head shape (32 heads, 8 KV heads, 128 dims): a prompt through a dense layer
        (SDPA, causal) and through a block-sparse one (SDPA under its per-head block mask, a chunk of queries at a
        time), ms and peak memory each
    python bench.py pairs [--sizes ...] [--dtypes ...] [--rounds 3] [--json out.json]
        ours (eager and compiled decode) and transformers (eager and SDPA) taking turns in one process on the CPU:
        the same measures, each a median over the turns, so that the host's drift hits every side alike
    python bench.py int8-agreement [--model out/model] [--bits 4]
        share of prompts whose greedy continuation is the same with int8 (int4) weights as with fp32 (a trained model)
    python bench.py finetune [--shapes phi-2,phi3-mini] [--modes full,lora,lora+int8] [--device cuda] [--json out.json]
        one training step (bf16 autocast, micro-batch 4 x 512 tokens, activation checkpointing, fused AdamW) of
        full fine-tuning, LoRA (r 8 on qkv, out, fc1, fc2; bf16 base) and LoRA on an int8 base, random weights of
        the real shapes, each in a process of its own: peak memory (CPU: the process's peak RSS over its RSS before
        building the model; CUDA: torch.cuda.max_memory_allocated) and tokens/s. Full fine-tuning that cannot fit
        this machine's memory (16 bytes a parameter: fp32 weights, gradients, AdamW's two moments) is not run: its
        row shows that estimate, marked "est."
    python bench.py speculative [--model out/model] [--k 4] [--new-tokens 128]
        greedy speculative decoding with prompt lookup against plain greedy decoding (batch 1, eager) on a trained
        model (default out/model, what `python train.py` writes): an editing workload (the prompt holds code the
        continuation repeats) and a plain one; tokens/s of each, the acceptance rate, and a check that the tokens agree
    python bench.py llama-cpp [--sizes 160m,1.4b] [--only q8_0,int8] [--rounds 1] [--json out.json]
        llama.cpp side by side (needs requirements-bench.txt): the same random phi-shaped weights written as GGUF
        files (architecture phi2; bf16, q8_0 and q4_0, quantized by the gguf package) and run through
        llama-cpp-python's low-level API (llama_decode on token ids: no tokenizer, no sampling, one call a token),
        against ours (bf16, int8, int4; eager, compiled, and compiled ahead of time: +aot) and transformers (bf16),
        each row in a process of its own, the same thread count: prefill tokens/s (512) and batch-1 decode tokens/s
        after a 128-token prompt, and ours over llama.cpp per bit width
    python bench.py serve [--sizes 160m,1.4b] [--clients 1,2,4,8,16] [--dtypes bfloat16]
        N concurrent streaming clients against serve.py (continuous batching, --max-batch 16) run as a program:
        aggregate tokens/s, time to first token p50/p99, time per output token p50 (64 tokens each)
    python bench.py tp [--sizes 1.4b] [--dtypes bfloat16] [--new-tokens 32]
        tensor parallelism (tp.py) against one process on random weights: batch-1 decode tokens/s after a 64-token
        prompt, each rank's weight bytes and peak memory; 2 ranks under torchrun (gloo on the CPU: 1 thread each;
        the one process gets every core)
    python bench.py tokenizers [--json out.json]
        encode throughput of our tiktoken tokenizers vs the Hugging Face `tokenizers` library on ~1 MB of mixed
        text, every family (needs the reference tokenizer files: PHI_REFERENCE, default ../shared/reference)
"""

import argparse
import json
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import generate
import quantize
import tokenizer

REF = Path(os.environ.get("PHI_REFERENCE", Path(__file__).resolve().parent.parent / "shared" / "reference"))


def mixed_text(n_bytes=1_000_000):
    """Code (the standard library's own sources) and prose in many scripts, with emoji and whitespace runs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = "".join(p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:80])
    prose = (
        "The quick brown fox jumps over the lazy dog. Привет, мир! Γειά σου κόσμε. 生活的真谛是什么？"
        " 日本語のテキスト。 한국어 텍스트. مرحبا بالعالم. नमस्ते दुनिया। 🤗👍🏽 naïve café\n\n\t\t"
    )
    text = code[: int(n_bytes * 0.7)] + prose * (n_bytes // len(prose.encode()))
    return text.encode()[:n_bytes].decode(errors="ignore")


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench_tokenizers(args):
    import tokenizers

    text = mixed_text()
    mb = len(text.encode()) / 1e6
    rows = []
    print(
        f"encode throughput on {mb:.2f} MB of mixed text (best of 3), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'family':10} {'ours MB/s':>10} {'tokenizers MB/s':>16} {'speed-up':>9} {'tokens':>9}  same ids")
    for family in ("codegen", "phi3", "phi4", "phi4mini"):
        d = REF / "tokenizers" / family
        ours = tokenizer.load_tokenizer(d)
        ref = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        t_ours, ids = best_of(lambda: ours.encode(text))
        t_ref, enc = best_of(lambda: ref.encode(text, add_special_tokens=False))
        rows.append(
            dict(
                family=family,
                ours_mb_s=mb / t_ours,
                tokenizers_mb_s=mb / t_ref,
                tokens=len(ids),
                same_ids=ids == enc.ids,
            )
        )
        r = rows[-1]
        print(
            f"{family:10} {r['ours_mb_s']:10.2f} {r['tokenizers_mb_s']:16.2f} {t_ref / t_ours:8.1f}x "
            f"{r['tokens']:9d}  {r['same_ids']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(bench="tokenizers", mb=mb, rows=rows), indent=2))


# -----------------------------------------------------------------------------------------------------------------
# Models

SIZES = {  # phi-style (parallel block, partial rotary); 1.4b is phi-1.5's shape
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8),
    "160m": dict(
        vocab_size=51200, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    ),
    "1.4b": dict(
        vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32
    ),
    "0.5b": dict(  # 1.4b's first 8 layers
        vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=32
    ),
    # phimoe (Phi-3.5-MoE's block: GQA 4:1, biased q/k/v/o and lm_head, LayerNorm, top-2 of E SwiGLU experts)
    "moe-tiny": dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_local_experts=8,
    ),
    "small-2l": dict(  # Phi-3-small's layers (and vocabulary), two of them: 0.85B
        vocab_size=100352, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32
    ),
    "moe-1b": dict(  # 1.02B stored, ~0.2B active per token (16 experts of 3 x 1024 x 1024 in each of 18 layers)
        vocab_size=32064,
        hidden_size=1024,
        intermediate_size=1024,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_local_experts=16,
    ),
}
NEW_TOKENS = {"tiny": 200, "160m": 64, "1.4b": 16, "0.5b": 32, "moe-tiny": 200, "moe-1b": 32, "small-2l": 32}


IMPLS = ("ours", "ours+compile", "ours+int8", "ours+int8+compile", "hf-eager", "hf-sdpa")
# bench.py llama-cpp's also: int4, and -wo (weight-only: PyTorch's int8/int4 kernels, activations not rounded)


def rss_mb(key="VmRSS"):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 1024


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Bandwidth:
    """Read bandwidth of this machine now: summing a 1 GB fp32 tensor, best of 3 (what a memory-bound decode can
    reach). It drifts by tens of percent within minutes on a shared machine, so each batch-1 decode is divided by
    the larger of the readings taken just before and just after it."""

    def __init__(self):
        import torch

        self.a = torch.ones(2**28)

    def __call__(self):
        return self.a.numel() * 4 / min(timed(self.a.sum) for _ in range(3)) / 1e9


def decode_bytes(model):
    """Bytes read per decoded token: every weight but the embedding table (one row of it); of a mixture of experts'
    experts, the two a token is routed to."""
    n_experts = getattr(getattr(model, "config", None), "num_local_experts", 0)
    return sum(
        t.numel() * t.element_size() * (2 / n_experts if ".experts." in n else 1)
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if not n.startswith(("embed.", "model.embed_tokens."))
    )


def model_config(size):
    import phi

    s, moe = SIZES[size], size.startswith("moe")
    H = s["num_attention_heads"]
    if size.startswith("small"):  # Phi-3-small-8k-instruct's config.json, with these sizes
        real = json.loads((REF / "configs" / "Phi-3-small-8k-instruct.json").read_text())
        return phi.PhiConfig.from_hf(real | {"ff_intermediate_size": s["intermediate_size"]} | s)
    return phi.PhiConfig(
        model_type="phimoe" if moe else "phi",
        num_key_value_heads=H // 4 if moe else H,  # phimoe: GQA 4:1
        partial_rotary_factor=1.0 if moe else 0.5,
        hidden_act="silu" if moe else "gelu_new",
        attention_bias=moe,  # (phi has its biases whatever these say)
        lm_head_bias=moe,
        head_dim=s["hidden_size"] // H,
        max_position_embeddings=2048,
        **s,
    )


def bench_block_sparse(args):
    """A prompt through one attention layer of Phi-3-small's shape: dense (its odd layers) and block-sparse (its even
    ones: SDPA under the per-head block mask, a chunk of queries at a time, phi.Attention.block_sparse_attention);
    time and the process's peak memory over its memory before the layer ran (each row in a process of its own)."""
    import torch

    print(
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}: ms per prompt, one layer (its Linears too)"
    )
    print(f"{'dtype':8} {'tokens':>6} {'dense ms':>9} {'sparse ms':>9} {'sparse/dense':>12} {'dense MB':>9} "
          f"{'sparse MB':>9} {'keys kept':>9}")  # fmt: skip
    for dtype_name in args.dtypes.split(","):
        for T in map(int, args.lengths.split(",")):
            rows = {kind: row_process("_block_sparse_row", kind, dtype_name, T)[0] for kind in ("dense", "sparse")}
            if None in rows.values():
                print(f"{dtype_name:8} {T:6d} failed")
                continue
            d, sp = rows["dense"], rows["sparse"]
            print(
                f"{dtype_name:8} {T:6d} {d['ms']:9.1f} {sp['ms']:9.1f} {sp['ms'] / d['ms']:11.2f}x {d['peak_mb']:9.0f} "
                f"{sp['peak_mb']:9.0f} {sp['kept']:9.0%}",
                flush=True,
            )


def block_sparse_row(kind, dtype_name, T):
    """One row of bench_block_sparse, in its own process: prints {ms, peak_mb, kept} as JSON."""
    import torch

    import phi

    cfg, dtype = model_config("small-2l"), getattr(torch, dtype_name)
    attn = phi.Attention(cfg, 0 if kind == "sparse" else 1).to(dtype).eval()  # layer 0 block-sparse, 1 dense
    x, pos = torch.randn(1, T, cfg.hidden_size, dtype=dtype), torch.arange(T)[None]
    a = phi.AttentionInputs(*phi.Rotary(cfg)(pos, dtype), pos=pos, key_pos=pos)
    blocks = torch.arange(0, T, cfg.blocksparse_block_size)[None]  # the share of causal block pairs the pattern keeps
    causal = blocks[:, None, None] <= blocks[:, None, :, None]
    kept = (causal & attn.block_mask(blocks, blocks)).sum().item() / (causal.sum().item() * cfg.num_attention_heads)
    base = rss_mb()
    with torch.no_grad():
        ms = 1000 * min(timed(lambda: attn(x, a)) for _ in range(3))
    print(json.dumps(dict(ms=ms, peak_mb=rss_mb("VmHWM") - base, kept=kept)))


def row_process(*argv):
    """`bench.py ARGV` (one row) in a process of its own: (the JSON it printed last, None), or (None, the last lines
    of its stderr) when it failed."""
    import subprocess

    r = subprocess.run([sys.executable, __file__, *map(str, argv)], capture_output=True, text=True)
    if r.returncode != 0:
        return None, r.stderr.strip().splitlines()
    return json.loads(r.stdout.strip().splitlines()[-1]), None


def cpu_model() -> str:
    """The CPU's model name, as lscpu shows it (every speed figure is stated beside it)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":")[1].strip() for line in f if line.startswith("model name")), platform.processor()
            )
    except OSError:
        return platform.processor()


def bench_models(args):
    import tempfile

    import torch
    import transformers

    import phi

    torch.manual_seed(0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, transformers {transformers.__version__}, device {device}, "
        f"CPU kernels {'on' if quantize.CPU_KERNELS else 'off'} (quantize.CPU_KERNELS)"
        + (
            f" ({torch.cuda.get_device_name()})"
            if device == "cuda"
            else f"; read bandwidth now {Bandwidth()():.1f} GB/s"
        )
    )
    head = (
        f"{'size':5} {'dtype':8} {'impl':17} {'prefill':>9} {'decode b1':>9} {'decode b8':>9} {'train':>8} "
        f"{'peak MB':>8} {'b1 % bw':>7}"
    )
    rows = []
    for size in args.sizes.split(","):
        cfg = model_config(size)
        ckpt = Path(tempfile.mkdtemp(prefix=f"phi-bench-{size}-"))
        phi.Phi.from_config(cfg).save_pretrained(ckpt)  # one set of random weights for all
        print(
            f"\n{size}: {sum(p.numel() for p in phi.Phi.from_pretrained(ckpt).parameters()) / 1e6:.0f}M parameters; "
            f"tokens/s; train: forward+backward+AdamW; b1 % bw: batch-1 decode x bytes read per token / read "
            f"bandwidth measured beside it; peak MB: the row's process, over its RSS before loading"
        )
        print(head)
        for dtype_name in args.dtypes.split(","):
            for impl in args.impls.split(","):
                if device != "cpu" and "int8" in impl or size.startswith("small") and impl.startswith("hf"):
                    continue  # the int8 kernels here are CPU ones; transformers has no Phi-3-small
                # one process per row: its own peak memory, no compiled code or allocator state left by the last
                got, errors = row_process("_row", size, dtype_name, impl, ckpt, device)
                if errors is not None:
                    print(f"{size:5} {dtype_name:8} {impl:17} failed: {errors[-1:]}")
                    continue
                row = dict(size=size, dtype=dtype_name, impl=impl, **got)
                rows.append(row)
                share = row["decode_b1_bandwidth_share"]
                print(
                    f"{size:5} {dtype_name:8} {impl:17} {row['prefill']:9.1f} {row['decode_b1']:9.1f} "
                    f"{row['decode_b8']:9.1f} {row['train'] or float('nan'):8.0f} {row['peak_mb']:8.0f} "
                    f"{'' if share is None else f'{share:7.0%}'}",
                    flush=True,
                )
            ratios(rows, size, dtype_name)
        if size == "1.4b" and device == "cpu":
            rows.append(dict(size=size, load_peak_over_size=load_peak(ckpt)))
            print(f"loading the 1.4b checkpoint as bf16 peaks at {rows[-1]['load_peak_over_size']:.2f}x its size")
        shutil.rmtree(ckpt)
    if args.json:
        info = dict(bench="models", machine=platform.machine(), cpu=cpu_model(), device=device, cores=os.cpu_count())
        Path(args.json).write_text(json.dumps(dict(info, rows=rows), indent=2))


def ratios(rows, size, dtype):
    by = {r["impl"]: r for r in rows if r.get("size") == size and r.get("dtype") == dtype}
    hf = {
        k: max(((by[i][k] or 0) for i in ("hf-eager", "hf-sdpa") if i in by), default=0)
        for k in ("prefill", "decode_b1", "decode_b8", "train")
    }
    for impl in (i for i in IMPLS if i.startswith("ours") and i in by):
        print(
            f"      {impl} / best transformers: "
            + ", ".join(f"{k} {by[impl][k] / hf[k]:.2f}x" for k in hf if by[impl][k] and hf[k])
        )


def runners(impl, model, cfg, dtype, device):
    """prefill() and decode(B, k) -> tokens/s for one implementation: ours (a phi.Phi, its decode step compiled if
    impl says so) or transformers (a PhiForCausalLM, its attention set to impl's)."""
    import torch
    import transformers

    import phi

    torch.manual_seed(0)
    ids512 = torch.randint(cfg.vocab_size, (1, 512), device=device)
    prompt = torch.randint(cfg.vocab_size, (1, 128)).tolist()[0]
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    if impl.startswith("ours"):
        steps = generate.Steps.compiled(device) if "compile" in impl else generate.Steps()
        if "aot" in impl:  # the step compiled ahead of time (built here if not in the cache: what --compile does)
            steps = generate.Steps.exported(model)
            if not isinstance(steps.decode, generate.ExportedStep):
                raise RuntimeError("the decode step compiled ahead of time is not there (see the line above)")

        def prefill():
            generate.prefill(model, ids512, None, phi.KVCache(cfg, 1, 512, quantize.cache_dtype(model), device))
            sync()

        def decode(B, k):
            stats = {}
            list(generate.generate_batch(model, [prompt] * B, k, eos_ids=set(), stats=stats, steps=steps))
            return (stats["new_tokens"] - B) / stats["decode_s"]

        return prefill, decode
    stamps = []

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            sync()
            stamps.append(time.perf_counter())
            return scores

    def prefill():  # logits of the last position only, as transformers' generate asks for them
        model.set_attn_implementation(impl[3:])
        model(ids512, use_cache=True, logits_to_keep=1)
        sync()

    def decode(B, k):
        model.set_attn_implementation(impl[3:])
        stamps.clear()
        x = torch.tensor([prompt] * B, device=device)
        model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=k,
            min_new_tokens=k,
            do_sample=False,
            pad_token_id=0,
            logits_processor=transformers.LogitsProcessorList([Stamp()]),
        )
        return (len(stamps) - 1) * B / (stamps[-1] - stamps[0])

    return prefill, decode


def load_impl(impl, ckpt, dtype, device):
    import transformers

    import phi

    if impl.startswith("ours"):
        quantize.huge_pages()  # (as generate.load)
        model = quantize.speed_up(phi.Phi.from_pretrained(ckpt, dtype=dtype, device=device))  # CPU kernels
        weight_only = "-wo" in impl  # PyTorch's kernels, activations not rounded
        if "int4" in impl:
            return quantize.quantize_int4(model, weight_only=weight_only)
        return quantize.quantize_int8(model, weight_only) if "int8" in impl else model
    moe = json.loads((Path(ckpt) / "config.json").read_text())["model_type"] == "phimoe"
    cls = transformers.PhimoeForCausalLM if moe else transformers.PhiForCausalLM
    model = cls.from_pretrained(ckpt, dtype=dtype, attn_implementation=impl[3:])
    return model.to(device).eval()


def measure_row(size, dtype_name, impl, ckpt, device):
    """One row, in its own process: load one implementation and time it: prefill (1 x 512), decode (1 and 8 rows
    after a 128-token prompt), and a training step (tiny and 160m). Prints the result as JSON."""
    import torch

    cfg, dtype = model_config(size), getattr(torch, dtype_name)
    bandwidth = Bandwidth() if device == "cpu" else None
    n = NEW_TOKENS[size]
    base = rss_mb()
    out = {}
    with torch.no_grad():
        model = load_impl(impl, ckpt, dtype, device)
        prefill, decode = runners(impl, model, cfg, dtype, device)
        for B in (1, 8):  # warm-up (and compile) once each
            decode(B, n if "compile" in impl else 4)
        out["prefill"] = 512 / min(timed(prefill) for _ in range(2 if size == "1.4b" else 5))
        before = bandwidth() if bandwidth else None
        out["decode_b1"] = decode(1, n)
        after = bandwidth() if bandwidth else None
        out["decode_b8"] = decode(8, n)
        out["decode_b1_bandwidth_share"] = (
            decode_bytes(model) * out["decode_b1"] / (max(before, after) * 1e9) if bandwidth else None
        )
        out["bandwidth_gbs"] = [before, after]
    out["train"] = None
    if size not in ("1.4b", "moe-1b", "small-2l") and impl in ("ours", "hf-eager", "hf-sdpa"):
        out["train"] = train_step(model.float().train(), dtype, cfg, hf=impl.startswith("hf"), device=device)
    out["peak_mb"] = rss_mb("VmHWM") - base if device == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


PAIRED = ("ours", "ours+compile", "hf-eager", "hf-sdpa")


def bench_pairs(args):
    """Ours and transformers taking turns in one process, `--rounds` times, on one set of random weights per size and
    dtype: the host's bandwidth and speed drift by 10% and more within minutes (a shared machine), which separate
    rows (bench.py models) take as differences; turns see the same drift. Median tokens/s of each, and ours over the
    better transformers attention (eager or SDPA) per measure."""
    import statistics
    import tempfile

    import torch

    import phi

    print(
        f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, CPU kernels "
        f"{'on' if quantize.CPU_KERNELS else 'off'}; median of {args.rounds or 3} turns, tokens/s; ratio: ours / the "
        f"better transformers row"
    )
    results = []
    for size in args.sizes.split(","):
        cfg, n = model_config(size), NEW_TOKENS[size]
        ckpt = Path(tempfile.mkdtemp(prefix=f"phi-pairs-{size}-"))
        torch.manual_seed(0)
        phi.Phi.from_config(cfg).save_pretrained(ckpt)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            torch._dynamo.reset()  # a fresh compile per model: dynamo's recompile limit is per function
            with torch.no_grad():
                ours, hf = load_impl("ours", ckpt, dtype, "cpu"), load_impl("hf-sdpa", ckpt, dtype, "cpu")
                run = {i: runners(i, ours if i.startswith("ours") else hf, cfg, dtype, "cpu") for i in PAIRED}
                for impl, (prefill, decode) in run.items():  # warm-up (and compile) once each
                    for B in (1, 8):
                        decode(B, n if "compile" in impl else 4)
                got = {(i, m): [] for i in PAIRED for m in ("prefill", "decode_b1", "decode_b8")}
                for _ in range(args.rounds or 3):
                    for impl, (prefill, decode) in run.items():
                        got[impl, "prefill"].append(512 / min(timed(prefill) for _ in range(2)))
                        got[impl, "decode_b1"].append(decode(1, n))
                        got[impl, "decode_b8"].append(decode(8, n))
            if size != "1.4b":
                models = {"ours": ours.float().train(), "hf-eager": hf.float().train(), "hf-sdpa": hf}
                for _ in range(args.rounds or 3):
                    for impl, model in models.items():
                        if impl.startswith("hf"):
                            model.set_attn_implementation(impl[3:])
                        got.setdefault((impl, "train"), []).append(train_step(model, dtype, cfg, hf=impl != "ours"))
            med = {k: statistics.median(v) for k, v in got.items()}
            for impl in ("ours", "ours+compile"):
                cells = []
                for m in ("prefill", "decode_b1", "decode_b8", "train"):
                    if (impl, m) in med:
                        best = max(med["hf-eager", m], med["hf-sdpa", m])
                        cells.append(f"{m} {med[impl, m]:.1f} / {best:.1f} = {med[impl, m] / best:.2f}x")
                print(f"{size:5} {dtype_name:8} {impl:13} " + ", ".join(cells), flush=True)
            results.append(dict(size=size, dtype=dtype_name, medians={f"{i} {m}": v for (i, m), v in med.items()}))
        shutil.rmtree(ckpt)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(bench="pairs", cpu=cpu_model(), rows=results), indent=2))


def train_step(model, dtype, cfg, hf, device="cpu"):
    """Tokens/s of forward + backward + AdamW on 4 x 256 tokens (fp32 weights, autocast to dtype), best of 3. Each
    as its users get it: fused AdamW (train.py's, and transformers' Trainer default since torch 2.8); ours also with
    train.py's keep_freed_memory() (transformers as fast with it: the kernels are the same)."""
    import torch
    import torch.nn.functional as F

    import train

    if not hf and device == "cpu":
        train.keep_freed_memory()
    if not hf:
        train.train_routers(model)  # a mixture of experts routes as train.py trains it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(cfg.vocab_size, (4, 257), device=device)
    amp = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with amp:
            logits = model(x[:, :-1]).logits if hf else model(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    return 4 * 256 / min(timed(step) for _ in range(3))


def load_peak(ckpt):
    """Peak RSS growth of a fresh process loading the checkpoint as bf16, over the size of the bf16 weights."""
    import subprocess

    script = (
        "import sys, torch, phi\n"
        "with torch.device('meta'): phi.Phi(phi.PhiConfig(num_hidden_layers=1))\n"
        "rss = lambda k: int(next(l for l in open('/proc/self/status') if l.startswith(k)).split()[1]) * 1024\n"
        "before = rss('VmRSS')\n"
        "m = phi.Phi.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
        "print((rss('VmHWM') - before) / sum(p.numel() * p.element_size() for p in m.parameters()))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(ckpt)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)},
    )
    return float(r.stdout.strip()) if r.returncode == 0 else float("nan")


FINETUNE_VOCAB = {"phi-2": 51200, "phi3-mini": 32064}  # train.PRESETS shapes with their real vocabularies


def finetune_config(shape):
    import phi
    import train

    return phi.PhiConfig(**train.PRESETS[shape], vocab_size=FINETUNE_VOCAB.get(shape, 51200))


def finetune_row(shape, mode, device):
    """One row of bench.py finetune, in this process (bench_finetune starts one per row): prints a JSON object."""
    import torch
    import torch.nn.functional as F

    import lora
    import phi
    import train

    cfg = finetune_config(shape)
    use_lora = mode.startswith("lora")
    cuda = device == "cuda"
    if not cuda and use_lora:  # as train.py
        train.return_freed_memory()
    elif not cuda:
        train.keep_freed_memory()
    before = rss_mb()
    torch.set_default_dtype(torch.bfloat16 if use_lora else torch.float32)  # built in its dtype: no fp32 copy first
    with torch.device(device):
        model = phi.Phi(cfg)
        model.apply(model._init_weights)
    torch.set_default_dtype(torch.float32)
    model = quantize.speed_up(model)
    if mode == "lora+int8":
        quantize.quantize_int8(model, weight_only=True)  # as train.py's frozen base
    if use_lora:
        lora.add_lora(model, dict(r=8, alpha=16, dropout=0.05, targets=["qkv", "out", "fc1", "fc2"]))
    model.gradient_checkpointing = True
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, fused=True)
    x = torch.randint(cfg.vocab_size, (4, 513), device=device)
    build_peak = rss_mb("VmHWM") - before
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:  # the peak from here on: the training step (the model included), not the building of it
        Path("/proc/self/clear_refs").write_text("5")

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    seconds = timed(step)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM") - before
    params = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.dtype == torch.int8
    )
    print(
        json.dumps(
            dict(
                shape=shape,
                mode=mode,
                device=device,
                params=params,
                trained=sum(p.numel() for p in trained),
                peak_mb=round(peak),
                build_peak_mb=round(build_peak),
                tok_s=round(4 * 512 / seconds, 1),
                estimate=False,
            )
        )
    )


def bench_finetune(args):
    import torch

    import phi

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
    available = (
        torch.cuda.mem_get_info()[1]
        if device == "cuda"
        else int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable")).split()[1]) * 1024
    )
    rows = []
    print(f"finetune, {where}: bf16 autocast, micro-batch 4 x 512 tokens, activation checkpointing", file=sys.stderr)
    for shape in args.shapes.split(","):
        for mode in args.modes.split(","):
            with torch.device("meta"):
                n = sum(p.numel() for p in phi.Phi(finetune_config(shape)).parameters())
            if mode == "full" and 16 * n > 0.8 * available:
                row = dict(
                    shape=shape,
                    mode=mode,
                    device=device,
                    params=n,
                    trained=n,
                    peak_mb=round(16 * n / 2**20),
                    tok_s=None,
                    estimate=True,
                )
            else:
                row, errors = row_process("_finetune", shape, mode, device)
                if errors is not None:
                    print("\n".join(errors)[-2000:], file=sys.stderr)
                    continue
            rows.append(row)
            peak = f"{row['peak_mb'] / 1024:.1f} GB" + (" est. (16 B/param)" if row["estimate"] else "")
            speed = "–" if row["tok_s"] is None else f"{row['tok_s']:.1f}"
            print(
                f"| {shape} | {mode} | {row['trained'] / 1e6:.1f}M of {row['params'] / 1e6:.0f}M | {peak} | {speed} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(where=where, rows=rows), indent=1))


def bench_serve(args):
    """N concurrent streaming completions (64 tokens each, greedy, a 64-token prompt) against serve.py run as a
    program on random weights of each size with phi-2's tokenizer: aggregate tokens/s, time to first token p50/p99,
    time per output token p50. The weights: one bf16 checkpoint per size (--dtypes' first), reused for each N."""
    import statistics
    import subprocess
    import tempfile
    import threading

    import phi

    dtype = args.dtypes.split(",")[0]
    print(f"{cpu_model()}, {os.cpu_count()} cores; serve.py --dtype {dtype}; streaming completions of 64 tokens")
    print(f"{'size':5} {'clients':>7} {'tok/s all':>9} {'vs 1':>5} {'ttft p50':>8} {'ttft p99':>8} {'tpot p50':>8}")
    for size in args.sizes.split(","):
        ckpt = Path(tempfile.mkdtemp(prefix=f"phi-serve-{size}-"))
        phi.Phi.from_config(model_config(size)).save_pretrained(ckpt)
        for f in (REF / "tokenizers" / "codegen").iterdir():
            shutil.copy(f, ckpt)
        cmd = [sys.executable, str(Path(__file__).parent / "serve.py"), "--model", str(ckpt), "--port", "0"]
        proc = subprocess.Popen(cmd + ["--dtype", dtype, "--max-batch", "16"], stderr=subprocess.PIPE, text=True)
        port = int(proc.stderr.readline().rsplit(":", 1)[1].split("/")[0])
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # (keep its pipe drained)
        try:
            one = None
            for n in map(int, args.clients.split(",")):
                runs = serve_clients(port, n)
                total = sum(r["tokens"] for r in runs) / (max(r["end"] for r in runs) - min(r["start"] for r in runs))
                one = one or total
                ttft = sorted(r["first"] - r["start"] for r in runs)
                tpot = statistics.median((r["end"] - r["first"]) / max(1, r["tokens"] - 1) for r in runs)
                p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
                print(
                    f"{size:5} {n:7d} {total:9.1f} {total / one:4.1f}x {statistics.median(ttft):8.2f} {p99:8.2f} "
                    f"{tpot * 1000:6.0f}ms",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait()
            shutil.rmtree(ckpt)


def serve_clients(port, n):
    """n streaming completions at once: each one's start, first text, end time and completion tokens."""
    import http.client
    import threading

    runs, barrier = [dict() for _ in range(n)], threading.Barrier(n)
    body = json.dumps(
        dict(
            prompt="def f(x):\n" * 16, max_tokens=64, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )

    def client(run):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        barrier.wait()
        run["start"] = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        for line in conn.getresponse():
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    run.setdefault("first", time.perf_counter())
                if chunk.get("usage"):
                    run["tokens"] = chunk["usage"]["completion_tokens"]
        run["end"] = time.perf_counter()
        run.setdefault("first", run["end"])

    threads = [threading.Thread(target=client, args=(run,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return runs


FINETUNE_MODES = ("full", "lora", "lora+int8")


def unknown_choice(args):
    """The message for a --sizes, --dtypes, --impls, --modes or --shapes entry this bench does not know, or None:
    a typo must not run another measure under its name."""
    import train

    known = dict(
        sizes=SIZES, dtypes=("float32", "bfloat16", "float16"), impls=IMPLS, modes=FINETUNE_MODES, shapes=train.PRESETS
    )
    for option, names in known.items():
        for name in getattr(args, option).split(","):
            if name not in names:
                return f"--{option}: unknown {name!r} (known: {', '.join(names)})"
    return None


def bench_tp(args):
    import subprocess
    import tempfile

    import torch

    import phi

    dtype = args.dtypes.split(",")[0]
    print(f"tensor parallel, {cpu_model()}, {os.cpu_count()} cores, {dtype}, batch 1, {args.new_tokens} new tokens")
    print("| size | ranks | decode tok/s | weights per rank GB | peak RSS per rank GB |\n|---|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        ckpt = Path(tempfile.mkdtemp(prefix=f"phi-tp-{size}-"))
        phi.Phi.from_config(model_config(size), dtype=getattr(torch, dtype)).save_pretrained(ckpt)
        try:
            for n in (1, 2):
                for f in ckpt.glob("rank*.json"):
                    f.unlink()
                launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
                cmd = launch + [__file__, "_tp_row", str(ckpt), dtype, str(args.new_tokens)]
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    print(r.stderr[-2000:], file=sys.stderr)
                    continue
                rows = [json.loads(f.read_text()) for f in ckpt.glob("rank*.json")]
                tok_s = min(row["tok_s"] for row in rows)
                gb, rss = max(row["weights"] for row in rows) / 1e9, max(row["peak_mb"] for row in rows) / 1024
                print(f"| {size} | {n} | {tok_s:.2f} | {gb:.2f} | {rss:.2f} |", flush=True)
        finally:
            shutil.rmtree(ckpt)


def tp_row(ckpt, dtype, new_tokens):
    """One rank of bench_tp (under torchrun): CKPT/rank{r}.json, its decode tokens/s, weight bytes and peak RSS."""
    import torch

    import phi
    import quantize
    import tp

    device = tp.init()
    dtype = getattr(torch, dtype)
    world = torch.distributed.get_world_size()
    model = tp.load(Path(ckpt), dtype, device) if world > 1 else phi.Phi.from_pretrained(ckpt, dtype, device)
    model = quantize.speed_up(model)
    prompt = torch.randint(0, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    list(generate.generate(model, prompt, 4, eos_ids=set()))  # (warm-up)
    t = time.perf_counter()
    n = len(list(generate.generate(model, prompt, int(new_tokens), eos_ids=set())))
    t = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rank = torch.distributed.get_rank()
    (Path(ckpt) / f"rank{rank}.json").write_text(
        json.dumps(dict(tok_s=n / t, weights=weights, peak_mb=rss_mb("VmHWM")))
    )
    torch.distributed.destroy_process_group()


def bench_speculative(args):
    import torch

    torch.set_num_threads(torch.get_num_threads())
    model, tok = generate.load(args.model)
    code = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text().splitlines()
    block = "\n".join(code[40:46])  # (the demo model's context is 256 bytes)
    workloads = {  # editing: the prompt holds the code, then starts it again; plain: a fresh start
        "editing": block + "\n\n" + code[40] + "\n",
        "plain": "def ",
    }
    print(f"speculative, {cpu_model()}: {args.model}, greedy, batch 1, k {args.k}, {args.new_tokens} new tokens")
    print("| workload | plain tok/s | speculative tok/s | speed-up | drafts accepted |")
    print("|---|---:|---:|---:|---:|")
    for name, text in workloads.items():
        prompt = tok.encode(text)
        runs = {}
        for mode in ("plain", "speculative", "plain", "speculative"):  # taking turns; the better of two each
            stats = {}
            if mode == "plain":
                out = list(generate.generate(model, prompt, args.new_tokens, eos_ids=set(), stats=stats))
            else:
                out = list(
                    generate.generate_speculative(model, prompt, args.new_tokens, k=args.k, eos_ids=set(), stats=stats)
                )
            rate = len(out) / (stats["prefill_s"] + stats["decode_s"])
            if mode in runs:
                assert out == runs[mode][0], "speculative decoding changed the tokens"
            runs[mode] = (out, max(rate, runs.get(mode, (None, 0, {}))[1]), stats)
        assert runs["plain"][0] == runs["speculative"][0], "speculative decoding changed the tokens"
        st = runs["speculative"][2]
        plain, spec = runs["plain"][1], runs["speculative"][1]
        print(f"| {name} | {plain:.1f} | {spec:.1f} | {spec / plain:.2f}x | {st['accepted']} of {st['drafted']} |")
    verify_cost(args.verify_size)


def verify_cost(size, ks=(1, 2, 4, 8)):
    """Time of a (K+1)-token verify step over a 256-token KV cache, relative to a 1-token step (eager, batch 1,
    random weights of `size`, bf16): accepting a tokens a step gives at most (a + 1) / that ratio the plain speed."""
    import torch

    import phi

    cfg = model_config(size)
    torch.manual_seed(0)
    model = quantize.speed_up(phi.Phi.from_config(cfg, dtype=torch.bfloat16).eval())
    cache = phi.KVCache(cfg, 1, 256 + 16, dtype=torch.bfloat16)
    generate.prefill(model, torch.randint(cfg.vocab_size, (1, 256)), None, cache)

    def step(T):
        with torch.no_grad():
            model(torch.randint(cfg.vocab_size, (1, T)), cache=cache)
        cache.slot.fill_(256)  # rolled back, as a rejected verify is

    times = {}
    for T in [1] + [k + 1 for k in ks]:
        step(T)
        times[T] = min(timed(lambda: step(T)) for _ in range(5))
    row = ", ".join(f"K={k}: {times[k + 1] / times[1]:.2f}x" for k in ks)
    print(f"verify step / 1-token step at {size} bf16 ({times[1] * 1e3:.0f} ms a token): {row}")


# -----------------------------------------------------------------------------------------------------------------
# llama.cpp side by side: the same random weights written as a GGUF file (arch phi2) in bf16, q8_0 and q4_0, run
# through llama-cpp-python's low-level API (llama_decode on token ids: no sampling, no per-token Python work beyond
# one call), each row in a process of its own, the same thread count as torch's


LLAMA_ROWS = ("bf16", "q8_0", "q4_0")
LLAMA_OURS = [  # (impl, dtype): ours per bit width (int8/int4 as generate.load makes them on the CPU), transformers
    ("ours", "bfloat16"),
    ("ours+compile", "bfloat16"),
    ("ours+aot", "bfloat16"),
    ("ours+int8", "float32"),
    ("ours+int8+compile", "float32"),
    ("ours+int8+aot", "float32"),
    ("ours+int8-wo", "float32"),
    ("ours+int4", "float32"),
    ("ours+int4+compile", "float32"),
    ("ours+int4+aot", "float32"),
    ("ours+int4-wo", "bfloat16"),
    ("hf-sdpa", "bfloat16"),
]
BITS = {
    "bf16": ("ours", "ours+compile", "ours+aot"),
    "q8_0": ("ours+int8", "ours+int8+compile", "ours+int8+aot"),
    "q4_0": ("ours+int4", "ours+int4+compile", "ours+int4+aot"),
}


def write_gguf(ckpt, path, kind):
    """Our phi-shaped checkpoint as a llama.cpp GGUF file (architecture phi2): matrices in `kind` (bf16, q8_0, q4_0,
    quantized by the gguf package's own code), norms and biases in f32, phi-2's vocabulary (the reference codegen
    tokenizer, padded to the embedding's rows; never used to tokenize here)."""
    import gguf
    import torch

    import phi

    model = phi.Phi.from_pretrained(ckpt)
    cfg, T = model.config, gguf.GGMLQuantizationType
    qtype = {"bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[kind]
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.rotary_dim)
    ftypes = gguf.LlamaFileType
    w.add_file_type({"bf16": ftypes.MOSTLY_BF16, "q8_0": ftypes.MOSTLY_Q8_0, "q4_0": ftypes.MOSTLY_Q4_0}[kind])
    tj = json.loads((REF / "tokenizers" / "codegen" / "tokenizer.json").read_text())
    tokens, types = [f"[PAD{i}]" for i in range(cfg.vocab_size)], [gguf.TokenType.UNUSED] * cfg.vocab_size
    for t, i in tj["model"]["vocab"].items():
        tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for t in tj["added_tokens"]:
        tokens[t["id"]], types[t["id"]] = (
            t["content"],
            gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED,
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(50256)
    w.add_eos_token_id(50256)
    names = {"embed": "token_embd", "norm": "output_norm", "lm_head": "output"}
    layer = {
        "norm1": "attn_norm",
        "attn.qkv": "attn_qkv",
        "attn.out": "attn_output",
        "mlp.fc1": "ffn_up",
        "mlp.fc2": "ffn_down",
    }
    for name, t in model.state_dict().items():
        module, _, param = name.rpartition(".")
        if module.startswith("layers."):
            _, i, rest = module.split(".", 2)
            gname = f"blk.{i}.{layer[rest]}.{param}"
        else:
            gname = f"{names[module]}.{param}"
        a = t.to(torch.float32).numpy()
        if a.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_row(path, size, threads):
    """One llama.cpp row, in its own process: prefill 512 tokens; batch-1 decode after a 128-token prompt (each step
    one llama_decode of the next token id, synchronized). Prints the result as JSON."""
    import ctypes

    import llama_cpp as L

    threads, n = int(threads), NEW_TOKENS[size]
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 1024, 512, 512, threads, threads
    ctx = L.llama_init_from_model(model, cp)
    memory = L.llama_get_memory(ctx)
    rng = random.Random(0)
    ids = (ctypes.c_int32 * 512)(*[rng.randrange(50000) for _ in range(512)])

    def run(tokens, count):
        if L.llama_decode(ctx, L.llama_batch_get_one(tokens, count)) != 0:
            raise RuntimeError("llama_decode failed")
        L.llama_synchronize(ctx)

    def prefill():
        L.llama_memory_clear(memory, True)
        run(ids, 512)

    def decode(k):
        L.llama_memory_clear(memory, True)
        run(ids, 128)
        one = (ctypes.c_int32 * 1)()
        t0 = time.perf_counter()
        for i in range(k):
            one[0] = ids[128 + i]
            run(one, 1)
        return k / (time.perf_counter() - t0)

    prefill()
    decode(4)  # warm-up
    out = {"prefill": 512 / min(timed(prefill) for _ in range(2 if size == "1.4b" else 5)), "decode_b1": decode(n)}
    print(json.dumps(out))


def wanted(args, row):  # llama-cpp --only: the rows whose name holds one of its comma-separated parts
    return not args.only or any(part in row for part in args.only.split(","))


def bench_llama_cpp(args):
    """Per size: llama.cpp (bf16, q8_0, q4_0) and ours (bf16, int8, int4; eager, compiled, exported) and
    transformers on the same random weights; prefill (512) and batch-1 decode tokens/s; ours over llama.cpp per bit
    width."""
    import statistics
    import tempfile

    import torch

    import phi

    threads = torch.get_num_threads()
    print(
        f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, {threads} threads; "
        f"median of {args.rounds or 1} round(s)"
    )
    results = []
    for size in args.sizes.split(","):
        cfg = model_config(size)
        if cfg.vocab_size != 51200:
            print(f"{size}: skipped (the GGUF file carries phi-2's vocabulary of 51200)")
            continue
        d = Path(tempfile.mkdtemp(prefix=f"phi-llama-{size}-"))
        torch.manual_seed(0)
        phi.Phi.from_config(cfg).save_pretrained(d / "ckpt")
        runs, gguf = {}, {}  # row -> its result in each round; llama.cpp row -> its GGUF file
        for kind in [k for k in LLAMA_ROWS if wanted(args, f"llama.cpp {k}")]:
            gguf[f"llama.cpp {kind}"] = d / f"{kind}.gguf"
            write_gguf(d / "ckpt", d / f"{kind}.gguf", kind)
        our_rows = [(impl, dtype) for impl, dtype in LLAMA_OURS if wanted(args, f"{impl} {dtype}")]
        for _ in range(args.rounds or 1):  # every row once a round: the host's drift reaches each row alike
            for name, path in gguf.items():
                runs.setdefault(name, []).append(row_process("_llama", path, size, threads))
            for impl, dtype in our_rows:
                runs.setdefault(f"{impl} {dtype}", []).append(row_process("_row", size, dtype, impl, d / "ckpt", "cpu"))
        rows = {}
        for name, tries in runs.items():
            for _, errors in tries:
                if errors is not None:
                    print(f"{name} failed: {errors[-3:]}")
            got = [r for r, _ in tries if r]
            rows[name] = None  # (every round failed: no median to take)
            if got:
                median = {k: statistics.median(r[k] for r in got) for k in ("prefill", "decode_b1")}
                rows[name] = median | {"rounds": got}
        shutil.rmtree(d)
        print(f"\n{size}: tokens/s (prefill 512; decode batch 1 after a 128-token prompt)")
        print(f"{'row':28} {'prefill':>9} {'decode b1':>9}")
        for name, row in rows.items():
            if row:
                print(f"{name:28} {row['prefill']:9.1f} {row['decode_b1']:9.2f}")
        for kind, impls in BITS.items():
            peer = rows.get(f"llama.cpp {kind}")
            ours = [v for k, v in rows.items() if v and k.split()[0] in impls]
            if peer and ours:
                dec, pre = max(o["decode_b1"] for o in ours), max(o["prefill"] for o in ours)
                print(
                    f"  ours (best) / llama.cpp {kind}: decode b1 {dec / peer['decode_b1']:.2f}x, prefill {pre / peer['prefill']:.2f}x"
                )
        results.append(dict(size=size, rows=rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(bench="llama-cpp", cpu=cpu_model(), threads=threads, results=results), indent=2)
        )


def bench_int8_agreement(args):
    """Share of prompts whose greedy continuation with int8 (or --bits 4: int4) weights equals the fp32 one, on a
    trained model (default out/model, what `python train.py` writes): prompts are line starts of the stdlib sources
    (up to ~160). Also, along the fp32 continuations: the share of tokens whose argmax agrees, and the mean KL
    divergence of the quantized model's next-token distribution from fp32's (steadier than 50 greedy yes/no)."""
    import torch

    model, tok = generate.load(args.model, dtype="float32")
    kind = f"int{args.bits}" + "-weight-only" * args.weight_only
    q = generate.load(args.model, dtype="float32", quantize=kind)[0]
    lines = [line for line in mixed_text(400_000).splitlines() if len(line.strip()) > 12][::37][: args.prompts]
    same = top1 = tokens = 0
    kl = 0.0
    with torch.no_grad():
        for line in lines:
            prompt = tok.encode(line[: len(line) // 2])
            a = list(generate.generate(model, prompt, args.new_tokens, temperature=0, eos_ids=set()))
            b = list(generate.generate(q, prompt, args.new_tokens, temperature=0, eos_ids=set()))
            same += a == b
            ids = torch.tensor([prompt + a[:-1]])
            p, r = (torch.log_softmax(m(ids)[0, len(prompt) - 1 :], -1) for m in (model, q))
            top1, tokens, kl = (
                top1 + (p.argmax(-1) == r.argmax(-1)).sum().item(),
                tokens + len(p),
                kl + (p.exp() * (p - r)).sum().item(),
            )
    print(
        f"{kind} vs fp32 greedy continuations ({args.new_tokens} tokens) identical on {same} of {len(lines)} prompts "
        f"({same / len(lines):.0%}); along fp32's: argmax agrees on {top1 / tokens:.2%} of {tokens} tokens, mean KL "
        f"{kl / tokens:.2e}; model {args.model}"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["_row"]:  # bench_models runs each row as: bench.py _row SIZE DTYPE IMPL CKPT DEVICE
        sys.exit(measure_row(*sys.argv[2:]))
    if sys.argv[1:2] == ["_finetune"]:  # bench_finetune runs each row as: bench.py _finetune SHAPE MODE DEVICE
        sys.exit(finetune_row(*sys.argv[2:]))
    if sys.argv[1:2] == ["_block_sparse_row"]:  # bench_block_sparse's rows: bench.py _block_sparse_row KIND DTYPE T
        sys.exit(block_sparse_row(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    if sys.argv[1:2] == ["_tp_row"]:  # bench_tp's ranks: bench.py _tp_row CKPT DTYPE NEW_TOKENS
        sys.exit(tp_row(*sys.argv[2:]))
    if sys.argv[1:2] == ["_llama"]:  # bench_llama_cpp runs each llama.cpp row as: bench.py _llama GGUF SIZE THREADS
        sys.exit(llama_row(*sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "what",
        choices=[
            "models",
            "pairs",
            "finetune",
            "speculative",
            "tokenizers",
            "int8-agreement",
            "llama-cpp",
            "block-sparse",
            "serve",
            "tp",
        ],
    )
    p.add_argument("--k", type=int, default=4, help="speculative: drafts a step")
    p.add_argument("--bits", type=int, default=8, choices=[8, 4], help="int8-agreement: int8 or int4 weights")
    p.add_argument("--weight-only", action="store_true", help="int8-agreement: activations not rounded")
    p.add_argument("--verify-size", default="1.4b", help="speculative: the size whose verify-step cost is measured")
    p.add_argument("--shapes", default="phi-2,phi3-mini", help="finetune: train.py presets")
    p.add_argument("--modes", default="full,lora,lora+int8", help="finetune")
    p.add_argument(
        "--rounds", type=int, help="pairs: turns of each implementation (3); llama-cpp: rounds of every row (1)"
    )
    p.add_argument("--model", default="out/model", help="int8-agreement: a trained checkpoint")
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--new-tokens", type=int, default=32, help="int8-agreement, speculative")
    p.add_argument("--sizes", default="tiny,160m,1.4b")
    p.add_argument("--lengths", default="1024,2048,4096", help="block-sparse: prompt lengths")
    p.add_argument("--clients", default="1,2,4,8,16", help="serve: concurrent streaming clients")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--only", help="llama-cpp: the rows whose name holds one of these (e.g. q8_0,int8)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if (unknown := unknown_choice(args)) is not None:
        p.error(unknown)
    if args.what == "models":
        bench_models(args)
    elif args.what == "pairs":
        bench_pairs(args)
    elif args.what == "speculative":
        bench_speculative(args)
    elif args.what == "finetune":
        bench_finetune(args)
    elif args.what == "int8-agreement":
        bench_int8_agreement(args)
    elif args.what == "llama-cpp":
        bench_llama_cpp(args)
    elif args.what == "block-sparse":
        bench_block_sparse(args)
    elif args.what == "serve":
        bench_serve(args)
    elif args.what == "tp":
        bench_tp(args)
    else:
        if not (REF / "tokenizers").is_dir():
            sys.exit(f"bench.py: reference tokenizers not found in {REF} (set PHI_REFERENCE)")
        bench_tokenizers(args)
