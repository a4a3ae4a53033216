"""lora.py: PEFT LoRA adapters, made by peft and merged by us, trained by us and loaded by peft."""

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import generate
import lora
import phi
import quantize
import train
from conftest import (
    CORPUS,
    PROMPT,
    TINY,
    TOL,
    assert_one_line_error,
    classification_inputs,
    err,
    hf_model,
    hub_repo,
    ids_for,
    logged,
    needs_reference,
    peft_on_transformers,
    record,
    run_cli,
    run_train,
    saved,
    snapshot,
    tiny_checkpoint,
    toy_classification,
    small_model,
)


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
        # peft matches a pattern at a dot boundary: "proj" is no q_proj (those keep r 4), "dense" is the out Linear
        ("phi-2", PEFT_TARGETS["phi"], dict(rank_pattern={"proj": 3, "dense": 2}, alpha_pattern={"proj": 7})),
    ],
)
def test_peft_made_adapter_gives_peft_logits(name, targets, kw, tmp_path):
    """A LoRA adapter made by peft (random A and B; all targets or a subset; lora_alpha/r or rslora's
    lora_alpha/sqrt(r); per-module rank and alpha) merged by generate.load(..., adapter=) gives the logits peft gives
    transformers (fp32); phi's q_proj/k_proj/v_proj land on row slices of our fused qkv."""
    ref = hf_model(name)
    saved(ref, tmp_path / "base")
    tuned, adapter = peft_adapter(ref, tmp_path / "adapter", targets, **kw)
    ours = lora.merge_adapter(phi.Phi.from_pretrained(tmp_path / "base"), adapter)
    ids = ids_for(20)
    with torch.no_grad():
        want = tuned(ids).logits
        assert err(want, ref(ids).logits) > 10 * TOL  # the adapter changes the logits
        assert record(f"peft adapter {name} {'+'.join(targets)}", err(ours(ids), want)) <= TOL


@pytest.mark.parametrize("name", ["phi-2", "phi3-gqa-window"])
def test_the_model_as_trained_gives_the_logits_of_its_exported_adapter(name, tmp_path):
    """The training model (lora.add_lora: LoRALinear with random A and B, r 4, alpha 8: scale 2) gives the logits of
    its adapter as saved, loaded by generate.load(base, adapter=) and by peft on transformers' model: the scale used
    in training is the one the adapter files mean."""
    ref = hf_model(name)
    base = saved(ref, tmp_path / "base")
    model = phi.Phi.from_pretrained(base)
    spec = dict(r=4, alpha=8, dropout=0.0, targets=None, task="causal-lm", base=str(base))
    lora.add_lora(model, spec).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    lora.save_adapter(tmp_path / "adapter", model, spec)
    merged = lora.merge_adapter(phi.Phi.from_pretrained(base), tmp_path / "adapter")
    tuned = peft_on_transformers(base, tmp_path / "adapter")
    ids = ids_for(20)
    with torch.no_grad():
        trained, want = model(ids), tuned(ids).logits
        assert err(trained, ref(ids).logits) > 10 * TOL  # (the adapters change the logits)
        e = record(f"lora as trained vs exported {name}", max(err(trained, want), err(merged(ids), want)))
    assert e <= TOL, e


def file_hashes(d):
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(d).iterdir()) if f.is_file()}


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
    ours = lora.merge_adapter(
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
    ours = lora.merge_adapter(phi.PhiForTokenClassification.from_pretrained(base, num_labels=2), adapter)
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
    """What --lora --quantize int8 builds: every adapted Linear's base stores int8 weights, the only parameters with
    gradients are the adapters', and (random adapters) its logits are those of the dequantized base (int8 x scale, as
    fp32 Linears) with the same adapters, in fp32."""
    base = tiny_checkpoint(tmp_path / "base")
    args = train.parse_args(["--init", str(base), "--lora", "4", "--quantize", "int8", "--dtype", "float32"])
    model = train.build_model(args, None, torch.device("cpu"), 257, 256, None).eval()
    loras = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    assert len(loras) == 4 * TINY["num_hidden_layers"]
    assert all(isinstance(m.base, quantize.Int8Linear) and m.base.weight.dtype == torch.int8 for m in loras)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n in dict(model.named_parameters()) if ".lora_" in n}
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n or n.endswith(".bias"):  # (the checkpoint's biases are zero)
                p.normal_(0, 0.1)
        plain = copy.deepcopy(model)
        for m in [m for m in plain.modules() if isinstance(m, lora.LoRALinear)]:
            q = m.base
            m.base = torch.nn.Linear(q.weight.shape[1], q.weight.shape[0], bias=q.bias is not None)
            m.base.weight.copy_(q.weight.float() * q.scale.float()[:, None])
            if q.bias is not None:
                m.base.bias.copy_(q.bias)
        ids = ids_for(24, vocab=256)
        want = plain(ids)
        assert err(want, phi.Phi.from_pretrained(base)(ids)) > 10 * TOL  # (adapters and biases change the logits)
        assert record("lora on int8 base vs dequantized base", err(model(ids), want)) <= TOL


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
        lora.merge_adapter(model, adapter)
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


def test_phi3small_lora_trains_and_its_adapter_loads_back(tmp_path):
    """train.py --lora on a Phi-3-small base (blocks of 32 in 128-token windows: its block-sparse layers cut keys):
    the validation loss falls; the adapter names peft's modules of the checkpoint (query_key_value, dense, up_proj,
    down_proj); generate.load(base, adapter=) gives the logits of the merged model (--merge), not the base's."""
    base = saved(small_model(eos_token_id=256, bos_token_id=256, pad_token_id=256), tmp_path / "base")
    train.write_byte_tokenizer(base)
    args = ["--init", base, "--out", tmp_path / "out", "--lora", 4, "--merge", "--block-size", 128, "--batch-size", 2]
    r = run_train(tmp_path, *args, "--max-steps", 12, "--eval-every", 6, "--lr", "1e-2")
    assert r.returncode == 0, r.stderr
    val = [float(x) for x in re.findall(r"validation loss ([\d.]+)", r.stderr)]
    assert val[-1] < val[0], r.stderr
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["dense", "down_proj", "query_key_value", "up_proj"]
    ours, _ = generate.load(base, dtype="float32", adapter=tmp_path / "out" / "adapter")
    merged, plain = phi.Phi.from_pretrained(tmp_path / "out" / "model"), phi.Phi.from_pretrained(base)
    ids = ids_for(140, vocab=256)
    with torch.no_grad():
        assert err(ours(ids), plain(ids)) > 100 * TOL
        assert record("phi3small train --lora: adapter vs --merge", err(ours(ids), merged(ids))) <= TOL
