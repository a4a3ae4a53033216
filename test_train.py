"""train.py: loss, checkpoints and exact resumption, torchrun (DDP/FSDP), mixed precision, fine-tuning heads, bad input,
Phi-3.5-MoE's router in training."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import generate
import lora
import phi
import train
from conftest import (
    CORPUS,
    REF,
    ROOT,
    TINY,
    TOL,
    assert_one_line_error,
    err,
    hf_model,
    ids_for,
    logged,
    needs_reference,
    oracle,
    peft_on_transformers,
    python_env,
    record,
    run_cli,
    run_train,
    saved,
    sparsemixer_cases,
    tiny_checkpoint,
    tiny_config,
    toy_classification,
    weights,
)


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
    # an evaluation before each checkpoint: FSDP's forwards without a backward must leave the shards as they were
    common = ("--eval-every", 1, "--eval-steps", 2, "--log-every", 1, "--max-steps", 2)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run it where one is lent)")
def test_train_device_cuda_means_this_process_gpu(monkeypatch):
    """`train.py --device cuda` (no index) trains on this process's GPU: torchrun's LOCAL_RANK, else cuda:0."""
    import argparse

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train.setup_distributed(argparse.Namespace(device="cuda"))[2] == torch.device("cuda", 0)


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
        wrapped = lora.add_lora(phi.Phi.from_pretrained(base), dict(r=2, alpha=4, dropout=0.0, targets=None))
        assert {n.split(".")[-1] for n, m in wrapped.named_modules() if isinstance(m, lora.LoRALinear)} == {
            "qkv",
            "out",
        }
        bad = run_train(tmp_path, *args[:-2], "--lora-targets", "qkv,fc1", "--out", tmp_path / "o2")
        assert bad.returncode == 2 and "phimoe's experts cannot take a PEFT LoRA" in bad.stderr
