"""tp.py: tensor parallelism over torchrun's processes (2 ranks on gloo, the CPU), against one process."""

import shutil
import subprocess
import sys

import pytest
import torch

import generate
import phi
import tp
from conftest import (
    PROMPT,
    ROOT,
    TOK,
    continuation,
    err,
    hf_model,
    needs_reference,
    python_env,
    record,
    saved,
    small_model,
)

# Run under torchrun: each rank loads its shard of every checkpoint given, and saves its logits, greedy tokens and
# weight bytes for the test to compare with one process.
RANK_SCRIPT = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import generate
import tp

device = tp.init()
out = Path(sys.argv[1])
for d in map(Path, sys.argv[2:]):
    model = tp.load(d, torch.float32, device)
    ids = torch.load(d / "ids.pt")
    with torch.no_grad():
        logits = model(ids)
    tokens = list(generate.generate(model, ids[0].tolist(), 12, eos_ids=set()))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.save(dict(logits=logits, tokens=tokens, bytes=nbytes), out / f"{d.name}.{dist.get_rank()}.pt")
dist.destroy_process_group()
"""

SHARDED = (".attn.qkv.", ".attn.out.weight", ".fc1.", ".fc2.weight")  # split across ranks; the rest replicated


def torchrun(n, *args, cwd):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    env = python_env(OMP_NUM_THREADS=1)
    return subprocess.run(
        launch + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_two_ranks_equal_one_process_for_each_architecture(tmp_path):
    """phi (q/k/v stored apart, partial rotary, biases: the row-wise ones added once), Phi-3 with GQA (fused qkv_proj
    and gate_up_proj split per part), phimoe (experts split, router replicated) and Phi-3-small (head-major groups,
    per-head block-sparse pattern, interleaved gegelu pairs): logits within 1e-5 of one process, the same greedy
    tokens, and each rank holding half of the blocks' Linears plus the replicated parts."""
    models = {
        "phi-2": hf_model("phi-2"),
        "phi3-gqa": hf_model("phi3-gqa-window"),
        "phimoe": hf_model("phimoe"),
        "phi3small": small_model(),
    }
    for name, m in models.items():
        saved(m, tmp_path / name)
        vocab, T = (100256, 200) if name == "phi3small" else (96, 40)  # (200: past the 2 local blocks of 32)
        ids = torch.randint(3, vocab, (2, T), generator=torch.Generator().manual_seed(1))
        torch.save(ids, tmp_path / name / "ids.pt")
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    r = torchrun(2, tmp_path / "rank.py", tmp_path, *(tmp_path / n for n in models), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in models:
        one = phi.Phi.from_pretrained(tmp_path / name)
        ids = torch.load(tmp_path / name / "ids.pt")
        with torch.no_grad():
            want = one(ids)
        tokens = list(generate.generate(one, ids[0].tolist(), 12, eos_ids=set()))
        total = sum(p.numel() * p.element_size() for p in one.parameters())
        sharded = sum(p.numel() * p.element_size() for n, p in one.named_parameters() if any(s in n for s in SHARDED))
        for rank in (0, 1):
            got = torch.load(tmp_path / f"{name}.{rank}.pt")
            e = record(f"tensor parallel {name} vs one process", err(got["logits"], want))
            assert e <= 1e-5, (name, rank, e)
            assert got["tokens"] == tokens, (name, rank)
            assert got["bytes"] == total - sharded // 2, (name, rank, got["bytes"], total, sharded)


def test_heads_or_widths_that_do_not_divide_are_one_clear_error():
    cfg = phi.PhiConfig(model_type="phi3", num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(ValueError, match="num_key_value_heads = 1 is not divisible by 2"):
        tp.rank_config(cfg, 2)
    assert tp.rank_config(cfg, 1) == cfg
    with pytest.raises(ValueError, match="intermediate_size = 8192 is not divisible by 3"):
        tp.rank_config(phi.PhiConfig(num_attention_heads=6, num_key_value_heads=6), 3)
    with pytest.raises(ValueError, match="--tp runs under torchrun"):
        tp.init()


@needs_reference("tokenizers")
def test_generate_cli_under_torchrun_prints_the_one_process_text_once(tmp_path):
    """torchrun --nproc_per_node 2 generate.py --tp: rank 0 prints what one process prints, once."""
    model = hf_model("phi-2", vocab_size=51200, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    d = saved(model, tmp_path / "m")
    for f in (TOK / "codegen").iterdir():
        shutil.copy(f, d)
    one, tok = generate.load(d, dtype="float32")
    prompt = tok.encode(PROMPT, bos=tok.add_bos)
    want = continuation(tok, prompt, list(generate.generate(one, prompt, 16))) + "\n"
    args = ("--model", d, "--prompt", PROMPT, "--max-new-tokens", 16, "--temperature", 0, "--dtype", "float32")
    r = torchrun(2, ROOT / "generate.py", *args, "--tp", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == want, r.stderr[-3000:]


@needs_reference("tokenizers")
def test_serve_under_torchrun_answers_as_one_process(tmp_path):
    """torchrun --nproc_per_node 2 serve.py --tp: rank 0 serves HTTP and sends every batch effect (prefill, decode,
    a freed row, a scoring or embedding pass) to rank 1, which runs it too. Greedy completions of different lengths
    asked at once equal one process's; echo logprobs and embeddings are one process's within 1e-4; a request after
    them still runs."""
    import threading

    import openai

    model = hf_model("phi3-gqa-window", vocab_size=51200, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    d = saved(model, tmp_path / "m")
    for f in (TOK / "codegen").iterdir():
        shutil.copy(f, d)
    one, tok = generate.load(d, dtype="float32")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = launch + [str(ROOT / "serve.py"), "--model", str(d), "--tp", "--port", "0", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=python_env(OMP_NUM_THREADS=1))
    try:
        line = ""
        while "/v1" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "serve.py --tp exited"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # (keep its pipe drained)
        client = openai.OpenAI(base_url=line.split(" on ")[1].strip(), api_key="none", max_retries=0, timeout=120)
        prompts, answers = ["def f(x):", "import os\nimport sys\n\n\nclass A:"], {}

        def ask(i):
            r = client.completions.create(model="m", prompt=prompts[i], max_tokens=6 + 6 * i, temperature=0)
            answers[i] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, p in enumerate(prompts):
            ids = tok.encode(p, bos=tok.add_bos)
            assert answers[i] == continuation(tok, ids, list(generate.generate(one, ids, 6 + 6 * i))), i
        ids = tok.encode(prompts[1])
        r = client.completions.create(model="m", prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0)
        with torch.no_grad():
            want = one(torch.tensor([ids]))[0, :-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert err(torch.tensor(r.choices[0].logprobs.token_logprobs[1 : len(ids)]), want) <= 1e-4
        r = client.embeddings.create(model="m", input=prompts)
        assert err(torch.tensor([e.embedding for e in r.data]), generate.embed(one, tok, prompts)) <= 1e-4
        assert client.completions.create(model="m", prompt="x", max_tokens=3, temperature=0).usage.completion_tokens
    finally:
        proc.terminate()
        proc.wait(timeout=30)
