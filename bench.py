"""
Benchmarks (never tests: speed is measured here, correctness in test_phi.py).

    python bench.py tokenizers [--json out.json]   encode throughput of our tiktoken tokenizers vs the Hugging Face
                                                   `tokenizers` library, on ~1 MB of mixed text, every family

Needs the dev requirements (the reference libraries) and the reference tokenizer files (PHI_REFERENCE, default
../shared/reference).
"""

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import generate

REF = Path(os.environ.get("PHI_REFERENCE", Path(__file__).resolve().parent.parent / "shared" / "reference"))


def mixed_text(n_bytes=1_000_000):
    """Code (the standard library's own sources) and prose in many scripts, with emoji and whitespace runs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = "".join(p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:80])
    prose = ("The quick brown fox jumps over the lazy dog. Привет, мир! Γειά σου κόσμε. 生活的真谛是什么？"
             " 日本語のテキスト。 한국어 텍스트. مرحبا بالعالم. नमस्ते दुनिया। 🤗👍🏽 naïve café\n\n\t\t")
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
    print(f"encode throughput on {mb:.2f} MB of mixed text (best of 3), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print(f"{'family':10} {'ours MB/s':>10} {'tokenizers MB/s':>16} {'speed-up':>9} {'tokens':>9}  same ids")
    for family in ("codegen", "phi3", "phi4", "phi4mini"):
        d = REF / "tokenizers" / family
        ours = generate.load_tokenizer(d)
        ref = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        t_ours, ids = best_of(lambda: ours.encode(text))
        t_ref, enc = best_of(lambda: ref.encode(text, add_special_tokens=False))
        rows.append(dict(family=family, ours_mb_s=mb / t_ours, tokenizers_mb_s=mb / t_ref, tokens=len(ids),
                         same_ids=ids == enc.ids))
        r = rows[-1]
        print(f"{family:10} {r['ours_mb_s']:10.2f} {r['tokenizers_mb_s']:16.2f} {t_ref / t_ours:8.1f}x "
              f"{r['tokens']:9d}  {r['same_ids']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(bench="tokenizers", mb=mb, rows=rows), indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["tokenizers"])
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not (REF / "tokenizers").is_dir():
        sys.exit(f"bench.py: reference tokenizers not found in {REF} (set PHI_REFERENCE)")
    bench_tokenizers(args)
