"""generate.py: checkpoints in an offline Hugging Face cache, greedy parity with transformers, sampling, streaming text
and stop strings, the CLI, the compiled decode step, speculative decoding."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
import transformers

import generate
import phi
import quantize
import tokenizer
import train
from conftest import (
    GEN_CASES,
    PROMPT,
    ROOT,
    TOK,
    TOL,
    assert_one_line_error,
    compiled_step,
    continuation,
    err,
    from_transformers,
    hf_model,
    hub_repo,
    ids_for,
    needs_reference,
    python_env,
    record,
    run_cli,
    saved,
    small_model,
    snapshot,
    stepped_logits,
    tiny_config,
)


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
def test_load_asks_pytorch_for_huge_pages_unless_told_otherwise(hub, monkeypatch):
    """generate.load sets THP_MEM_ALLOC_ENABLE=1 before the weights are allocated (quantize.huge_pages: PyTorch reads
    it at its first CPU allocation and then backs large ones with 2 MB pages); a value the user set stands."""
    for before, after in ((None, "1"), ("0", "0")):
        if before is None:
            monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
        else:
            monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", before)
        generate.load(snapshot(hub[0], "phi3-4k"), dtype="float32")
        assert os.environ["THP_MEM_ALLOC_ENABLE"] == after


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
        got = generate.process_logits(logits, prev, generate.Sampling(temperature, top_k, top_p, penalty))
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)], atol=1e-6)


def test_sampling_settings_are_one_object_or_its_fields():
    """The decoders take the sampling settings as one generate.Sampling (sampling=) or as its fields by keyword,
    with the same tokens; both at once, or a misspelled field, is a TypeError, not a setting silently ignored."""
    model = phi.Phi.from_config(tiny_config()).eval()

    def tokens(**kw):
        return list(generate.generate(model, [5, 6, 7], 12, eos_ids=set(), **kw))

    s = generate.Sampling(temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    a = tokens(sampling=s)
    assert a == tokens(temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert a != tokens(temperature=0)
    with pytest.raises(TypeError, match="not both"):
        tokens(sampling=s, temperature=0)
    with pytest.raises(TypeError, match="temprature"):
        tokens(temprature=0)


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


@needs_reference("tokenizers")
def test_cli_prints_the_tail_a_stop_string_held_back_when_generation_ends(hub):
    """A stop string that never completes must not eat the text's end: while the text ends with the start of a stop
    string that tail is held back, and when the generation ends (here: max tokens) it is text like the rest (the
    issue's example: a final "\n" with --stop "\n\n"). One stream and every row of a batch."""
    home, _ = hub
    model, tok = generate.load(snapshot(home, "phi-2"), dtype="float32")
    full = tok.decode(list(generate.generate(model, tok.encode(PROMPT), 20, temperature=0)))
    stop = full[-3:] + "<never>"  # the text ends with its first 3 characters; it never appears whole
    assert stop not in full
    args = ("--model", "test/phi-2", "--prompt", PROMPT, "--max-new-tokens", 20, "--temperature", 0, "--stop", stop)
    assert run_cli(home, *args).stdout == full + "\n"
    assert run_cli(home, *args, "--num-samples", 2).stdout == f"=== 0 ===\n{full}\n=== 1 ===\n{full}\n"


def test_text_stream_joins_to_the_decode_with_stops_and_split_characters(tmp_path):
    """generate.TextStream, the one place tokens become text: its pieces join to its .text, which is the decode of
    the tokens (a reply of its own) up to the first stop string; a tail held back for a stop string that never
    completes and a character split over tokens whose end never came are text at the end, as decode gives them."""
    train.write_byte_tokenizer(tmp_path)
    tok = tokenizer.load_tokenizer(tmp_path)  # bytes: "é" is two tokens
    text = "one\ntwo\n\nthree é\n"
    ids = tok.encode(text)
    for tokens, stops, want, stopped in [
        (ids, ["\n\n"], "one\ntwo", True),
        (ids[: text.index("three") + 5], ["\n\n\n"], "one\ntwo\n\nthree", False),
        (ids[: text.index("\n\n") + 1], ["\n\n"], "one\ntwo\n", False),  # the held "\n" comes out at the end
        (ids[:-2], ["é"], tok.decode(ids[:-2]), False),  # half of "é" at the end: U+FFFD, as decode gives it
    ]:
        stream = generate.TextStream(tok, iter(tokens), stops)
        pieces = list(stream)
        assert "".join(pieces) == stream.text == want and stream.stopped == stopped, (tokens, stops)
        assert all(pieces)


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
    assert tokenizer.chat_prompt(tok, "Name a prime.", "Be brief.") == want_text
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
    """--compile for real (inductor, the CPU path of generate.Steps.compiled): on a LongRoPE model whose prompt is
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
@pytest.mark.parametrize("name", ["phi-2", "phimoe"])
def test_embed_pools_the_last_hidden_states_as_transformers_has_them(name, hub):
    """generate.embed: "last" is transformers' last_hidden_state at the text's last token, "mean" its mean over the
    text's tokens (each text run alone there; here in left-padded batches of 2); token ids are used as given."""
    home, refs = hub
    model, tok = generate.load(snapshot(home, name), dtype="float32")
    texts = ["Hello world", PROMPT, "x", tok.encode("def f(x): return x")[:5]]
    last, mean = generate.embed(model, tok, texts), generate.embed(model, tok, texts, pooling="mean", batch_size=2)
    assert last.shape == mean.shape == (4, model.config.hidden_size) and last.dtype == torch.float32
    for i, text in enumerate(texts):
        ids = tok.encode(text, bos=tok.add_bos) if isinstance(text, str) else text
        with torch.no_grad():
            h = refs[name].model(torch.tensor([ids])).last_hidden_state[0]
        e = record(f"embed {name} vs transformers", max(err(last[i], h[-1]), err(mean[i], h.mean(0))))
        assert e <= TOL, (i, e)
    assert err(last[0], mean[0]) > 0.1  # (the two poolings differ)
    with pytest.raises(ValueError, match="pooling must be 'last' or 'mean'"):
        generate.embed(model, tok, texts, pooling="max")
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"text 1 is {context + 1} tokens"):
        generate.embed(model, tok, ["a", [5] * (context + 1)])


@needs_reference("tokenizers")
def test_cli_runs_as_a_program(hub):
    """python generate.py in its own process, offline through HF_HOME / HF_HUB_OFFLINE: the in-process runs' output,
    and exit code 1 with one line for bad input."""
    home, _ = hub
    args = ["--model", "test/phi-2", "--prompt", PROMPT, "--max-new-tokens", 8, "--temperature", 0, "--no-compile"]
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


def test_exported_step_is_built_once_kept_and_decodes_as_the_plain_step(hub, tmp_path, monkeypatch):
    """The decode step compiled ahead of time (generate.ExportedStep, AOTInductor), the command line's step on a CPU
    where quantize.CPU_KERNELS holds: without a package in the cache (XDG_CACHE_HOME) the CLI decodes with the plain
    step, says so, and when it ends starts building the package in a process of its own; the next run waits for
    that process, then loads the package, as --compile does; --no-compile decodes with the plain step; the text is
    the plain step's every time. Through the API it gives the plain step's logits (within TOL) and cache writes for
    2 rows at any cache length, and the same greedy tokens for left-padded prompts; a checkpoint of the same shape
    with other weights loads the same package and gets its own logits (the package holds no weights). A damaged
    package is one line on stderr, and the plain step; a background build that failed is not tried again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(quantize, "CPU_KERNELS", True)
    home, _ = hub
    args = (
        "--model",
        "test/phi-2",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        12,
        "--temperature",
        0,
        "--dtype",
        "float32",
    )
    runs = [
        run_cli(home, *args, *extra, background_build=True) for extra in ((), (), ("--compile",), ("--no-compile",))
    ]
    assert [r.returncode for r in runs] == [0] * 4 and len({r.stdout for r in runs}) == 1, runs
    assert "decode: the plain step; after this run, the step compiled ahead of time" in runs[0].stderr
    pid = re.search(r"in the background, for later runs \(pid (\d+), log (.+)\)$", runs[0].stderr, re.M)
    assert pid and f"waiting for the background build of the compiled step (pid {pid[1]}," in runs[1].stderr
    assert all("decode: the step compiled ahead of time" in r.stderr for r in runs[1:3])
    assert "decode: the plain step (--no-compile)" in runs[3].stderr
    assert not any(w in r.stderr for r in runs[1:] for w in ("compiling", "building", "after this run"))

    model, _ = generate.load(snapshot(home, "phi-2"), dtype="float32", device="cpu")
    path = generate.ExportedStep.path(model)
    assert pid[2] == str(path.with_suffix(".log")) and path.exists()
    assert not path.with_suffix(".log").exists() and not path.with_suffix(".building").exists()
    step = generate.ExportedStep.load(model)
    assert isinstance(step, generate.ExportedStep)
    ids = ids_for(20, vocab=model.config.vocab_size)
    with torch.no_grad():
        caches = [phi.KVCache(model.config, 2, S) for S in (20, 20, 31)]
        mine = stepped_logits(model, generate.decode_one_token, ids, 6, caches[0])
        for cache in caches[1:]:
            assert record("exported decode step vs plain", err(stepped_logits(model, step, ids, 6, cache), mine)) <= TOL
        for a, b in zip(generate.step_tensors(caches[0]), generate.step_tensors(caches[1])):
            assert err(a, b) <= 1e-5
        prompts = [ids[0, :5].tolist(), ids[1, :11].tolist()]  # (the first left-padded)
        plain = list(generate.generate_batch(model, prompts, 10, eos_ids=set()))
        steps = generate.Steps.exported(model, build=False)
        assert steps.decode.runner is not step.runner  # (loaded again)
        exported = list(generate.generate_batch(model, prompts, 10, eos_ids=set(), steps=steps))
        assert torch.equal(torch.stack(exported), torch.stack(plain))

        other = copy.deepcopy(model)
        for p in other.parameters():
            p.mul_(1.5)
        step = generate.ExportedStep.load(other)
        assert generate.ExportedStep.path(other) == generate.ExportedStep.path(model)
        want = stepped_logits(other, generate.decode_one_token, ids, 6, phi.KVCache(model.config, 2, 20))
        got = stepped_logits(other, step, ids, 6, phi.KVCache(model.config, 2, 20))
        assert err(got, want) <= TOL and err(got, mine) > 0.1
        same = stepped_logits(model, step, ids, 6, phi.KVCache(model.config, 2, 20))  # (not its model: the plain step)
        assert err(same, mine) <= TOL
        half = [phi.KVCache(model.config, 2, 20, torch.float16) for _ in range(2)]  # (not the dtype it was exported
        got = stepped_logits(model, steps.decode, ids, 6, half[0])  # with, quantize.cache_dtype's: the plain step)
        assert err(got, stepped_logits(model, generate.decode_one_token, ids, 6, half[1])) <= TOL

    generate.ExportedStep.path(model).write_bytes(b"not a package")
    r = run_cli(home, *args, background_build=True)
    assert r.returncode == 0 and r.stdout == runs[0].stdout
    assert re.search(r"the compiled decode step .*\.pt2 is not used \(.+\); the plain step instead", r.stderr), r
    assert "decode: the plain step" in r.stderr and "building" not in r.stderr

    path.unlink()
    path.with_suffix(".log").write_text("a background build that failed")
    r = run_cli(home, *args, background_build=True)
    assert r.returncode == 0 and r.stdout == runs[0].stdout
    assert f"decode: the plain step (a build of the compiled step failed: {path.with_suffix('.log')}; --" in r.stderr
    assert "building" not in r.stderr and not path.exists() and not path.with_suffix(".building").exists()


def test_background_build_lock_names_a_live_builder_only(tmp_path):
    """ExportedStep.builder reads the background build's lock beside a package: a live process's pid is a build
    going on (a run waits for it), a lock still empty for under a minute one starting (0); the lock of a process
    that has exited (this process's child too, reaped), one left empty or damaged, is removed (a build may start)."""
    path = tmp_path / "step.pt2"
    lock = path.with_suffix(".building")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(live.pid))
        assert generate.ExportedStep.builder(path) == live.pid and lock.exists()
    finally:
        live.kill()
    live.wait()
    for text, age, want in ((str(live.pid), 0, None), ("", 0, 0), ("", 120, None), ("x1", 0, None)):
        lock.write_text(text)
        os.utime(lock, (time.time() - age,) * 2)
        assert generate.ExportedStep.builder(path) == want and lock.exists() == (want is not None), (text, age)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])  # (a child not yet reaped: a zombie)
    time.sleep(1.0)
    lock.write_text(str(exited.pid))
    assert generate.ExportedStep.builder(path) is None and not lock.exists()


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
    compiled = torch.compile(generate.decode_one_token, backend=counter, fullgraph=True)
    calls = []
    steps = generate.Steps(decode=lambda *a: calls.append(1) or compiled(*a))
    got = torch.stack(list(generate.generate_batch(model, prompts, new_tokens, eos_ids=set(), steps=steps)))
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

    stats = {}
    steps = generate.Steps(decode=slow_first)
    list(generate.generate_batch(model, [[5, 6, 7], [8]], 12, eos_ids=set(), stats=stats, steps=steps))
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
    """On CUDA: the fp32 forward equals the CPU one, and generate.Steps.compiled's decode step (torch.compile with CUDA
    graphs) is captured (no cudagraph skip: the cache's tensors have fixed addresses), is not traced again for a
    new cache, and equals the full forward pass (sliding window and GQA included)."""
    from torch._dynamo.utils import counters

    path = saved(hf_model("phi3-gqa-window"), tmp_path)
    model, ids = phi.Phi.from_pretrained(path, device="cuda"), ids_for(24)
    with torch.no_grad():
        full = phi.Phi.from_pretrained(path)(ids)
        assert record("cuda vs cpu forward", err(model(ids.cuda()).cpu(), full)) <= TOL
    counters.clear()
    step = generate.Steps.compiled("cuda").decode
    for _ in range(2):
        cache = phi.KVCache(model.config, 2, 24, device="cuda")
        got = stepped_logits(model, step, ids.cuda(), 8, cache)
        assert record("cuda graph decode vs full forward", err(got.cpu(), full[:, 8:])) <= TOL
    assert counters["stats"]["unique_graphs"] == 1 and not counters["inductor"]["cudagraph_skips"]


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
    steps = generate.Steps(verify=lambda *a: calls.append(a[1].shape[1]) or compiled(*a))
    prompt = ids_for(6, B=1)[0].tolist() * 3
    want = list(generate.generate(model, prompt, 30, eos_ids=set()))
    assert list(generate.generate_speculative(model, prompt, 30, k=4, eos_ids=set(), steps=steps)) == want
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


def test_verdict_keeps_the_models_distribution_exactly():
    """generate.verdict on hand-made distributions over 4 tokens, 20,000 seeded draws each: a proposal drawn from q
    (far from p), kept or replaced by a draw from max(p - q, 0), comes out distributed as p; so does a prompt-lookup
    draft taken for certain (q None: the residual is p without it); after a kept proposal the next token follows p's
    next row. Total variation from the exact distribution < 0.01 (its noise here: ~0.005)."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    s, N = generate.Sampling(1.0, generator=g), 20000
    for case in ("draft", 3):  # a draft model's proposals, or a lookup draft (of an unlikely token)
        first, after_kept = torch.zeros(4), torch.zeros(4)
        for _ in range(N):
            d = int(torch.multinomial(q, 1, generator=g)) if case == "draft" else case
            n, token = generate.verdict(p.log(), [d], [q] if case == "draft" else None, s)
            first[d if n else token] += 1
            if n:
                after_kept[token] += 1
        tv = 0.5 * (first / N - p[0]).abs().sum().item()
        assert record(f"verdict total variation ({case})", tv) < 0.01, (case, tv)
        if after_kept.sum() > 5000:
            assert 0.5 * (after_kept / after_kept.sum() - p[1]).abs().sum() < 0.02, case


def test_backoff_schedule_and_catch_up_rolls_the_draft_cache_back(tmp_path, monkeypatch):
    """Backoff: two steps in a row that keep nothing, then four plain steps; a step that keeps drafts resets the
    count of misses. catch_up: a draft cache holding more than the ids (rejected proposals) rolls back to exactly
    them, and its next logits are the full forward's. Speculative decoding on text that never repeats (lookup finds
    nothing to draft) runs plain steps only."""
    b = generate.Backoff(4)
    budgets = []
    for kept in (0, 2, 0, 3, 0, 0, None, None, None, None, 1):  # None: a plain step (nothing proposed)
        budgets.append(b.budget())
        b.update(0 if kept is None else b.budget(), kept or 0)
    assert budgets == [4, 1, 3, 1, 4, 1, 0, 0, 0, 0, 1]
    model = from_transformers("phi3-4k", tmp_path)[0]
    ids = ids_for(16)[0].tolist()
    for held, upto in [(ids[:12] + [7, 8], 12), (ids[:10] + [7, 8, 9], 12), (ids[:9], 12)]:
        cache = phi.KVCache(model.config, 1, 32)  # holding: kept proposals, then rejected ones; or fewer tokens
        with torch.no_grad():
            model(torch.tensor([held]), cache=cache)
            generate.catch_up(model, cache, ids[:upto])
            assert int(cache.slot) == upto and cache.ids[0, :upto].tolist() == ids[:upto]
            got = model(torch.tensor([ids[upto : upto + 1]]), cache=cache)[0, -1]
            want = model(torch.tensor([ids[: upto + 1]]))[0, -1]
        assert err(got, want) <= TOL, held


# -----------------------------------------------------------------------------------------------------------------
# Phi-3-small (phi3small): its logits are checked against mlx-lm in test_phi.py; here the paths around the model


@needs_reference("tokenizers")
def test_phi3small_cli_chat_with_its_cl100k_tokenizer(tmp_path, monkeypatch):
    """A Hub-shaped Phi-3-small directory (weights, cl100k_base.tiktoken and nothing else for the tokenizer): --chat
    renders its format, generates what the API generates, and stops at <|end|> (forced here as the 3rd token)."""
    path = saved(small_model(), tmp_path / "m")
    shutil.copy(TOK / "tiktoken" / "cl100k_base.tiktoken", path)
    model, tok = generate.load(path, dtype="float32")
    text = "<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\nName a prime.<|end|>\n<|assistant|>\n"
    assert tokenizer.chat_prompt(tok, "Name a prime.", "Be brief.") == text
    want = list(generate.generate(model, tok.encode(text), 16, eos_ids=generate.end_of_turn_ids(model, tok)))
    r = run_cli(tmp_path, "--model", path, "--chat", "--prompt", "Name a prime.", *CHAT_ARGS)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(want) + "\n" and len(want) == 16
    sample, calls = generate.sample, []

    def end_at_the_3rd(*args, **kw):
        calls.append(1)
        token = sample(*args, **kw)
        return torch.full_like(token, 100266) if len(calls) == 3 else token

    monkeypatch.setattr(generate, "sample", end_at_the_3rd)
    r = run_cli(tmp_path, "--model", path, "--chat", "--prompt", "Name a prime.", *CHAT_ARGS)
    assert r.stdout == tok.decode(want[:2]) + "\n" and len(calls) == 3  # nothing sampled after <|end|>


def test_phi3small_compiled_decode_and_speculative_decoding_equal_plain_greedy(fresh_compiler):
    """torch.compile traces the decode step (with its per-head block-sparse mask) once, in one graph, and it equals
    the full forward; speculative decoding (prompt lookup, the model as its own draft) yields plain greedy's tokens."""
    import torch._dynamo.testing

    model = small_model()
    counter = torch._dynamo.testing.CompileCounter()
    ids = torch.randint(0, 100256, (2, 110), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        got = stepped_logits(model, compiled_step(backend=counter), ids, 60, phi.KVCache(model.config, 2, 110))
    assert counter.frame_count == 1
    assert record("phi3small compiled decode vs full", err(got, full[:, 60:])) <= TOL
    prompt = ids[0, :20].tolist() * 3  # it repeats itself: prompt lookup finds drafts
    want = list(generate.generate(model, prompt, 40, eos_ids=set()))
    for draft in (None, model):
        stats = {}
        got = list(generate.generate_speculative(model, prompt, 40, k=4, draft=draft, eos_ids=set(), stats=stats))
        assert got == want and stats["drafted"] > 0


# -----------------------------------------------------------------------------------------------------------------
# Beam search


def until_eos(tokens, eos):
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def assert_beams_are_transformers(got, stats, ref, prompts, new, K, n, eos, **kw):
    """generate_beam's hypotheses (got, for the left-padded prompts) are transformers' generate(num_beams=K, ...):
    the same sequences in order, the same scores (K > 1: transformers' K 1 is greedy, without them), as many steps.
    Returns transformers' sequences (new tokens up to the EOS)."""
    ids, mask = generate.left_padded(prompts, "cpu")
    out = ref.generate(
        ids,
        attention_mask=mask,
        num_beams=K,
        do_sample=False,
        max_new_tokens=new,
        num_return_sequences=n,
        eos_token_id=eos,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )
    want = [until_eos(row[ids.shape[1] :].tolist(), eos) for row in out.sequences]
    assert [tokens for hyps in got for tokens, _ in hyps] == want
    scores = torch.tensor([score for hyps in got for _, score in hyps])
    assert K == 1 or record("beam search scores vs transformers", err(scores, out.sequences_scores)) <= TOL
    assert stats["steps"] == len(out.scores)  # (it stops when transformers does)
    return want


@pytest.mark.parametrize(
    "name,K,early,penalty,ends",
    [
        ("phi3-gqa-window", 1, False, 1.0, True),
        ("phi3-gqa-window", 3, True, 1.0, True),
        ("phi3-gqa-window", 3, False, 0.5, True),
        ("phi3-gqa-window", 4, "never", 2.0, False),  # (long hypotheses favoured: none returned ends early)
        ("phi3-gqa-window", 4, False, -1.0, True),
        ("phi-2", 4, True, 1.0, False),
    ],
)
def test_beam_search_equals_transformers(name, K, early, penalty, ends, tmp_path):
    """generate_beam == transformers' generate(num_beams=K, do_sample=False, ...) on a left-padded batch of three
    prompts: the same num_return_sequences sequences per prompt, in order, and their scores (K 1 is greedy there);
    the EOS is a token this random model produces (of its greedy continuation: the first that ends a hypothesis
    returned here), so hypotheses end early."""
    ours, ref = from_transformers(name, tmp_path)
    prompts = [ids_for(9)[0].tolist(), ids_for(6, seed=1)[0].tolist(), ids_for(7, seed=2)[0].tolist()]
    n, kw, stats = min(K, 2), dict(length_penalty=penalty, early_stopping=early), {}
    for eos in generate.generate(ours, prompts[0], 8, eos_ids=set()):  # the first that ends a returned hypothesis
        got = generate.generate_beam(ours, prompts, 10, K, num_return_sequences=n, eos_ids={eos}, stats=stats, **kw)
        if any(len(tokens) < 10 for hyps in got for tokens, _ in hyps):
            break
    want = assert_beams_are_transformers(got, stats, ref, prompts, 10, K, n, eos, **kw)
    assert any(len(t) < 10 for t in want) == ends  # (returned hypotheses that ended at the EOS)


def test_beam_search_reorders_the_cache_and_k1_is_greedy(tmp_path, monkeypatch):
    """One beam is greedy decoding; the KV cache is reordered (index_select per step), never recomputed: after the
    prompt, each step runs one token per beam."""
    model = from_transformers("phi3-4k", tmp_path)[0]
    prompt = ids_for(8)[0].tolist()
    greedy = list(generate.generate(model, prompt, 12, eos_ids=set()))
    assert generate.generate_beam(model, [prompt], 12, 1, eos_ids=set())[0][0][0] == greedy
    widths = []
    step = generate.decode_one_token
    monkeypatch.setattr(generate, "decode_one_token", lambda m, t, c: widths.append(t.shape) or step(m, t, c))
    generate.generate_beam(model, [prompt, prompt[:5]], 12, 3, eos_ids=set())
    assert widths == [torch.Size([6])] * 11
    with pytest.raises(ValueError, match="num_return_sequences must be in"):
        generate.generate_beam(model, [prompt], 12, 2, num_return_sequences=3)


@pytest.mark.parametrize(
    "early,K,penalty", [(e, k, 1.0) for k in (2, 3) for e in (True, False, "never")] + [(True, 4, 2.0)]
)
def test_beam_search_with_a_likely_eos_stops_where_transformers_does(early, K, penalty, tmp_path):
    """An EOS made likely (phi-2's lm_head bias raised for it, in both models): hypotheses end at most steps, whole
    prompts' beams end before others' in the batch, and the search stops early; still transformers' sequences,
    scores and number of steps."""
    ours, ref = from_transformers("phi-2", tmp_path)
    eos, prompts = 5, [ids_for(9 - i, seed=i)[0].tolist() for i in range(4)]
    with torch.no_grad():
        ours.lm_head.bias[eos] += 3.0
        ref.lm_head.bias[eos] += 3.0
    stats, kw = {}, dict(length_penalty=penalty, early_stopping=early)
    got = generate.generate_beam(ours, prompts, 12, K, num_return_sequences=K, eos_ids={eos}, stats=stats, **kw)
    want = assert_beams_are_transformers(got, stats, ref, prompts, 12, K, K, eos, **kw)
    assert any(len(t) < 12 for t in want) and (stats["steps"] < 12 or early == "never")  # (it stopped early)


@needs_reference("tokenizers")
def test_cli_num_beams_prints_transformers_beams(hub):
    """generate.py --num-beams 3 --num-return-sequences 2 --early-stopping: each hypothesis' text under its
    "=== prompt.rank ===" line, the sequences of transformers' generate(num_beams=3, early_stopping=True, ...); bad
    combinations are one clear line."""
    home, refs = hub
    model, tok = generate.load(snapshot(home, "phi3-4k"), dtype="float32")
    prompt = tok.encode(PROMPT, bos=tok.add_bos)
    beams = dict(num_beams=3, num_return_sequences=2, early_stopping=True, length_penalty=0.5)
    out = refs["phi3-4k"].generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, **beams)
    want = "".join(
        f"=== 0.{j} ===\n{continuation(tok, prompt, row[len(prompt) :].tolist())}\n" for j, row in enumerate(out)
    )
    args = ("--model", "test/phi3-4k", "--prompt", PROMPT, "--max-new-tokens", 10, "--dtype", "float32")
    r = run_cli(home, *args, "--num-beams", 3, "--num-return-sequences", 2, "--early-stopping", "--length-penalty", 0.5)
    assert r.returncode == 0 and r.stdout == want, r.stderr
    assert re.search(r"beam 0\.1: score -[\d.]+, 10 tokens", r.stderr)
    r = run_cli(home, *args, "--num-beams", 2, "--num-return-sequences", 3)
    assert_one_line_error(r, "generate.py", "--num-beams K needs K >= 1 and 1 <= --num-return-sequences <= K", 1)
