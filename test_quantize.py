"""quantize.py: the CPU kernels (FastLinear, matvec, oneDNN) and int8/int4 weights, correctness only (bench.py measures
the speed)."""

import copy
import json
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

import generate
import phi
import quantize
from conftest import (
    BASE,
    CASES,
    HF_CLASSES,
    TOL,
    compiled_step,
    continuation,
    err,
    from_transformers,
    hf_model,
    ids_for,
    needs_reference,
    python_env,
    record,
    run_cli,
    saved,
    snapshot,
    stepped_logits,
    tiny_config,
    small_model,
)


def test_compiled_batch1_decode_streams_weights_and_matches(monkeypatch, fresh_compiler):
    """Batch-1 decoding under torch.compile (inductor) multiplies by every weight as multiply-and-sum (quantize.matvec):
    the logits equal the full forward pass, for biased Linears, a row longer than 4096 (summed in 4 chunks of 2050)
    and weight-only int8 weights. The caller's grad mode is left on: a compiled step run with grad enabled used to
    lose its cache writes after the first token (decode_one_token runs under no_grad)."""
    calls = []

    def counted(x, weight, scale=None):
        calls.append(tuple(weight.shape))
        return matvec(x, weight, scale)

    matvec = quantize.matvec
    monkeypatch.setattr(quantize, "matvec", counted)
    cfg = tiny_config(intermediate_size=8200, num_hidden_layers=1)
    torch.manual_seed(0)
    model = quantize.speed_up(phi.Phi.from_config(cfg).eval(), cpu_kernels=True)
    ids = ids_for(16, B=1)
    int8 = quantize.quantize_int8(
        quantize.speed_up(phi.Phi.from_config(cfg).eval(), cpu_kernels=True), weight_only=True
    )
    for m in (model, int8):
        torch._dynamo.reset()  # the int8 model: a new graph
        step = compiled_step()
        with torch.no_grad():
            full = m(ids)
        cache = phi.KVCache(cfg, 1, 16)
        got = stepped_logits(m, step, ids, 10, cache)  # > 8 rows: int8 prefill in fp32, like the full forward
        assert (64, 8200) in calls  # fc2: the chunked long row went through matvec
        calls.clear()
        assert (
            record(f"compiled batch-1 decode vs full forward ({type(m.lm_head).__name__})", err(got, full[:, 10:]))
            <= TOL
        )


def test_bf16_matvec_widens_in_int32_pairs_exactly(monkeypatch, fresh_compiler):
    """bf16 weights and input: matvec widens them two at a time (quantize.bf16_halves, bit operations on int32 pairs), eager
    and compiled, from quantize.PAIRS_MIN_WEIGHTS weights on. Against fp32 products of the same bf16 numbers, the result is
    off by the final bf16 rounding only; rows whose chunks have an odd length (4097 = 17 x 241, and 63) and smaller
    weights take the plain widening, with the same result."""
    monkeypatch.setattr(quantize, "PAIRS_MIN_WEIGHTS", 2**20)  # (the AVX-512 rule's threshold, on any CPU)
    halves = []
    bf16_halves = quantize.bf16_halves
    monkeypatch.setattr(quantize, "bf16_halves", lambda t: halves.append(t.shape) or bf16_halves(t))
    compiled = torch.compile(quantize.matvec, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    for N, K, pairs in [(2**14, 64, True), (128, 8200, True), (40, 8200, False), (256, 4097, False), (40, 63, False)]:
        x, w = torch.randn(1, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
        want = x.float() @ w.float().T  # exact products of the bf16 numbers, fp32 sums
        bound = (want.abs() * 2**-8 + 1e-5 * (x.float().abs() @ w.float().abs().T)).max().item()  # rounding; sums
        for name, f in [("eager", quantize.matvec), ("compiled", compiled)]:
            halves.clear()
            got = f(x, w)
            assert got.dtype == torch.bfloat16 and got.shape == (1, N)
            assert record(f"bf16 matvec {name}, {N}x{K} (max err / bf16 rounding bound)", err(got, want) / bound) <= 1
            assert len(halves) == (2 if pairs else 0)  # x and the weight; the compiled call counts too


def test_bf16_prompts_multiply_in_fp32_where_the_cpu_has_no_bf16_instructions(monkeypatch):
    """A FastLinear given bf16 activations of 64 rows or more, on a CPU without bf16 dot products (quantize.BF16_NATIVE
    False: no AVX-512 BF16 or AMX), widens its weights to fp32 for the call (oneDNN's fp32 product from 1M weights)
    and rounds the result to bf16 once: within bf16's rounding of the exact product of the same numbers, as the bf16
    kernel is; fewer rows, or a CPU with bf16 instructions, keep the bf16 kernel; gradients flow either way."""
    calls, onednn = [], quantize.onednn_linear
    monkeypatch.setattr(quantize, "onednn_linear", lambda x, w, b: calls.append(x.dtype) or onednn(x, w, b))
    torch.manual_seed(0)
    lin = quantize.speed_up(torch.nn.Sequential(torch.nn.Linear(1024, 1024)).bfloat16(), cpu_kernels=True)[0]
    for native, rows, widened in ((False, 64, True), (False, 63, False), (True, 64, False)):
        monkeypatch.setattr(quantize, "BF16_NATIVE", native)
        calls.clear()
        x = torch.randn(rows, 1024).bfloat16().requires_grad_()
        got = lin(x)
        exact = x.detach().double() @ lin.weight.detach().double().T + lin.bias.detach().double()
        assert got.dtype == torch.bfloat16 and calls == ([torch.float32] if widened else [])
        assert err(got, exact) <= 2**-8 * exact.abs().max().item()
        got.sum().backward()
        assert lin.weight.grad is not None and x.grad.shape == x.shape
        lin.weight.grad = None


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("model_type", ["phi", "phi3"])
def test_compiled_batch1_decode_of_a_bf16_model_matches_eager(model_type, kernel, monkeypatch, fresh_compiler):
    """A bf16 model (parallel block with biases; Phi-3 block with GQA): the compiled batch-1 step is about as close
    to the exact result (the same bf16 weights in fp32) as the eager bf16 step is. Without the operator its products
    go through matvec's int32-pair widening (threshold at 0 here): the eager step rounds every op's output to bf16,
    inductor only what it stores, so its error may be smaller but not larger (bound: 1.1x the eager step's; measured
    0.75-0.77x; a wrong widening fails it: tried the low half shifted by 15 bits, the high half's last mantissa bit
    lost). With the operator (FastLinear.kernel) its Linears take bf16 inputs and round their outputs, as the eager
    step's (measured 1.09x and 1.16x; bound 1.5x)."""
    if kernel and not quantize.q8_kernel():
        pytest.skip("the CPU operators do not build here")
    monkeypatch.setattr(quantize, "PAIRS_MIN_WEIGHTS", 0)
    cfg = tiny_config(
        model_type=model_type,
        intermediate_size=192,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = quantize.speed_up(phi.Phi.from_config(cfg).eval().bfloat16(), cpu_kernels=True)
    exact = copy.deepcopy(model).float()
    for m in model.modules():
        if isinstance(m, quantize.FastLinear):
            m.kernel = kernel
    ids = ids_for(14, B=1)
    out = {}
    for name, m, step in [
        ("exact", exact, generate.decode_one_token),
        ("eager", model, generate.decode_one_token),
        ("compiled", model, compiled_step()),
    ]:
        cache = phi.KVCache(cfg, 1, 14, dtype=m.embed.weight.dtype)
        out[name] = stepped_logits(m, step, ids, 6, cache).float()
    eager, compiled = err(out["eager"], out["exact"]), err(out["compiled"], out["exact"])
    record(f"compiled bf16 batch-1 decode vs exact / eager vs exact ({model_type}, kernel {kernel})", compiled / eager)
    assert compiled <= (1.5 if kernel else 1.1) * eager


@pytest.mark.parametrize("weight_only", [True, False])
def test_compiled_int8_decode_of_several_rows_matches_eager(weight_only, fresh_compiler, monkeypatch):
    """int8 weights, compiled decode step with 3 rows (PyTorch's int8 kernel, or with rounded activations the q8
    kernel; each kept opaque to inductor as a custom op): the same tokens' logits as the eager step, and within 2% of
    the fp32 model. With rounded activations the decoded logits are also those of the full forward pass (the same
    kernel)."""
    monkeypatch.setattr(quantize, "CPU_KERNELS", True)  # (the rule that turns the q8 kernel on: AMD)
    cfg = tiny_config(intermediate_size=256)
    torch.manual_seed(0)
    fp32 = phi.Phi.from_config(cfg).eval()
    q = quantize.quantize_int8(copy.deepcopy(fp32), weight_only)
    assert q.layers[0].mlp.fc1.q8 == (not weight_only and quantize.q8_kernel())
    ids = ids_for(12, B=3)
    steps = {"eager": generate.decode_one_token, "compiled": compiled_step()}
    out = {}
    for name, step in steps.items():
        cache = phi.KVCache(cfg, 3, 12)  # (fp32: the kernel's numbers only; the fp16 cache: the test below)
        out[name] = stepped_logits(q, step, ids, 8, cache)
    with torch.no_grad():
        want = fp32(ids)[:, 8:]
    assert ((out["compiled"] - want).norm() / want.norm()).item() <= 0.02
    if weight_only:  # the same int8 kernel (an op inductor does not look into) both ways, fp32 around it
        assert record("compiled vs eager int8 decode, 3 rows, weight-only", err(out["compiled"], out["eager"])) <= TOL
        return
    # the kernel both ways, and in the full forward pass, equal but for fp32 reordering (~1e-7), which can move an
    # activation across a rounding boundary (one int16 step: 1/32767 of its block's max) now and then: 1.3e-4 at
    # most here, in norm 0.2% of what quantizing costs (decode vs full forward: 0.1%; 15% while prompts rounded as
    # 127 * (1 / amax))
    with torch.no_grad():
        full = q(ids)[:, 8:]
    for name, a, b in (("compiled vs eager", out["compiled"], out["eager"]), ("decode vs full", out["eager"], full)):
        ratio = ((a - b).norm() / (full - want).norm()).item()
        assert record(f"int8 rounded activations: {name} / full vs fp32 (norms)", ratio) <= 0.01, name


@pytest.mark.parametrize("weight_only", [True, False])
def test_compiled_int4_decode_matches_eager(weight_only, fresh_compiler, monkeypatch):
    """int4 weights, compiled decode step (batch 1 and 3 rows, a bf16 model): PyTorch's int4 kernel (or with int8
    activations the q8 kernel) both ways, so the logits equal the eager step's up to bf16 rounding of what inductor
    fuses around it, and are no farther from the fp32 model's than the eager step's."""
    cfg = tiny_config(intermediate_size=256)
    torch.manual_seed(0)
    fp32 = phi.Phi.from_config(cfg).eval()
    monkeypatch.setattr(quantize, "CPU_KERNELS", True)
    q = quantize.quantize_int4(copy.deepcopy(fp32).to(torch.bfloat16), weight_only=weight_only)
    assert isinstance(q.layers[0].mlp.fc1, quantize.Int4Linear)
    for B in (1, 3):
        ids, out = ids_for(12, B=B), {}
        for name, step in {"eager": generate.decode_one_token, "compiled": compiled_step()}.items():
            out[name] = stepped_logits(q, step, ids, 8, phi.KVCache(cfg, B, 12, dtype=torch.bfloat16)).float()
        with torch.no_grad():
            want = fp32(ids)[:, 8:]
        scale = want.abs().max().item()
        assert (
            record(f"compiled vs eager int4 decode, {B} rows / max|logit|", err(out["compiled"], out["eager"]) / scale)
            <= 2e-2
        )
        rel = {k: ((v - want).norm() / want.norm()).item() for k, v in out.items()}
        assert rel["compiled"] <= 1.1 * rel["eager"]  # no farther from fp32 than the eager int4 step


def test_speed_up_is_a_module_swap_chosen_by_the_cpu_rule(tmp_path, hub, monkeypatch):
    """phi.py builds plain nn.Linear; quantize.speed_up swaps in FastLinear (the CPU kernels) sharing each parameter:
    the state dict keeps its names, a tied lm_head stays tied, the logits stay the same. generate.load applies it
    where quantize.CPU_KERNELS says so (AMD CPUs; PHI_CPU_KERNELS=0/1 overrides), and not elsewhere."""
    path = saved(hf_model("phi4-mini"), tmp_path)
    plain = phi.Phi.from_pretrained(path)
    assert all(type(m) is torch.nn.Linear for m in plain.modules() if isinstance(m, torch.nn.Linear))
    assert quantize.speed_up(plain, cpu_kernels=False) is plain and not any(
        isinstance(m, quantize.FastLinear) for m in plain.modules()
    )
    fast = quantize.speed_up(phi.Phi.from_pretrained(path), cpu_kernels=True)
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * fast.config.num_hidden_layers + 1
    assert all(type(m) is quantize.FastLinear for m in linears)
    assert list(fast.state_dict()) == list(plain.state_dict()) and fast.lm_head.weight is fast.embed.weight
    ids = ids_for(20)
    with torch.no_grad():
        assert err(fast(ids), plain(ids)) <= TOL
    for rule in (False, True):
        monkeypatch.setattr(quantize, "CPU_KERNELS", rule)
        model, _ = generate.load(snapshot(hub[0], "phi-2"), dtype="float32", device="cpu")
        assert isinstance(model.layers[0].mlp.fc1, quantize.FastLinear) == rule
    for value, want in (("0", "False"), ("1", "True")):
        env = python_env(PHI_CPU_KERNELS=value)
        r = subprocess.run(
            [sys.executable, "-c", "import quantize; print(quantize.CPU_KERNELS)"],
            env=env,
            text=True,
            capture_output=True,
        )
        assert r.stdout.strip() == want, r.stderr


def transformers_init(name, path):
    """Case `name` with transformers' own random init (not hf_model's larger weights), saved to path."""
    kind, kw, _ = CASES[name]
    torch.manual_seed(0)
    hf_cfg = getattr(transformers, HF_CLASSES[kind] + "Config")(**{**BASE, **kw})
    return saved(getattr(transformers, HF_CLASSES[kind] + "ForCausalLM")(hf_cfg), path)


@pytest.mark.parametrize("name", ["phi-2", "phi3-4k", "phi4-mini", "phimoe"])
def test_int8_logits_close_to_fp32(name, tmp_path):
    """Weight-only int8 (per-channel symmetric) on transformers' own random init: logits within 2% of fp32
    (||int8 - fp32|| / ||fp32||), with fp32 and with bf16 activations."""
    path = transformers_init(name, tmp_path)
    ids = ids_for(48)
    with torch.no_grad():
        want = phi.Phi.from_pretrained(path)(ids)
        q = quantize.quantize_int8(phi.Phi.from_pretrained(path))
        assert q.layers[0].attn.qkv.weight.dtype == torch.int8
        rel = ((q(ids) - want).norm() / want.norm()).item()
        qb = quantize.quantize_int8(phi.Phi.from_pretrained(path, dtype=torch.bfloat16))
        rel_bf16 = ((qb(ids).float() - want).norm() / want.norm()).item()
    assert record(f"int8 logits relative error {name}", rel) < 0.02
    assert record(f"int8 (bf16) logits relative error {name}", rel_bf16) < 0.02


def test_int8_prompt_multiplies_the_expanded_weights_as_fast_linear_does(tmp_path, monkeypatch):
    """With fp32 activations on the CPU an int8 model's prompt expands each weight and takes FastLinear's matmul:
    oneDNN from quantize.ONEDNN_MIN_WEIGHTS on (F.linear, MKL, is 1.2-1.4x slower at 512 rows), the same logits."""
    model = quantize.speed_up(from_transformers("phi-2", tmp_path)[0], cpu_kernels=True)
    q = quantize.quantize_int8(model)
    ids, calls, op = ids_for(12), [], quantize.onednn_linear
    monkeypatch.setattr(quantize, "onednn_linear", lambda *a: calls.append(a[1].dtype) or op(*a))
    with torch.no_grad():
        want = q(ids)  # the tiny weights: all F.linear
        assert not calls
        monkeypatch.setattr(quantize, "ONEDNN_MIN_WEIGHTS", 0)
        got = q(ids)
    assert calls == [torch.float32] * (4 * q.config.num_hidden_layers + 1)
    assert record("int8 prompt, oneDNN vs F.linear logits", err(got, want)) <= TOL


def test_int8_cannot_be_saved_and_cli_equals_the_api(tmp_path, hub):
    """An int8 model refuses to be saved (its weights are not the checkpoint's); --quantize int8 on the command line
    generates the API's int8 tokens, whose logits differ from the unquantized model's (so the option is not ignored:
    the tokens of these random weights can be the same)."""
    q = quantize.quantize_int8(from_transformers("phi-1.5", tmp_path)[0])
    with pytest.raises(ValueError, match="an int8-quantized model is not saved"):
        q.save_pretrained(tmp_path / "no")
    home, _ = hub
    want, logits = {}, {}
    for bits in (None, "int8"):
        model, tok = generate.load(snapshot(home, "phi3-4k"), quantize=bits)
        prompt = tok.encode("def f(x):", bos=tok.add_bos)
        want[bits] = continuation(tok, prompt, list(generate.generate(model, prompt, 24)))
        with torch.no_grad():
            logits[bits] = model(torch.tensor([prompt]))
    assert err(logits[None], logits["int8"]) > 1e-3
    args = ("--model", "test/phi3-4k", "--prompt", "def f(x):", "--max-new-tokens", 24, "--temperature", 0)
    assert run_cli(home, *args, "--quantize", "int8").stdout == want["int8"] + "\n"


@pytest.mark.parametrize("name", ["phi-2", "phi4-mini"])
def test_onednn_linears_match_transformers_in_forward_backward_and_compiled_decode(
    name, tmp_path, monkeypatch, fresh_compiler
):
    """fp32 Linears on the CPU from quantize.ONEDNN_MIN_WEIGHTS weights on are oneDNN matmuls (a custom op with its own
    backward). With that threshold at 0, every one is: logits, loss and every parameter's gradient equal
    transformers' (phi4-mini: lm_head tied to the embedding), the compiled 3-row decode step equals the full forward,
    and under bf16 autocast the Linears are left to autocast (bf16 out)."""
    calls = []
    op = quantize.onednn_linear
    monkeypatch.setattr(quantize, "ONEDNN_MIN_WEIGHTS", 0)
    monkeypatch.setattr(quantize, "onednn_linear", lambda *a: calls.append(a[1].shape) or op(*a))
    ours, ref = from_transformers(name, tmp_path)
    ours, ref = quantize.speed_up(ours, cpu_kernels=True).train(), ref.train()
    ids = ids_for(12)
    logits, loss = ours(ids, labels=ids)
    n = 4 * ours.config.num_hidden_layers + 1  # qkv, out, fc1, fc2 per layer, lm_head
    assert len(calls) == n
    loss.backward()  # + each input's gradient
    assert len(calls) == 2 * n
    out = ref(ids, labels=ids)
    out.loss.backward()
    assert record(f"oneDNN logits {name}", err(logits, out.logits)) <= TOL
    assert record(f"oneDNN loss {name}", abs(loss.item() - out.loss.item())) <= TOL
    hf_params = dict(ref.named_parameters())
    for our, srcs in ours.hf_names(ours.config.model_type).items():
        want = torch.cat([hf_params[s].grad for s in srcs])
        got = ours.get_parameter(our).grad
        assert record(f"oneDNN gradients {name}", err(got, want)) <= TOL * max(1.0, want.abs().max().item()), our

    ours.eval()
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(ids).dtype == torch.bfloat16 and not calls
    ids3 = ids_for(12, B=3)
    step = compiled_step()
    cache = phi.KVCache(ours.config, 3, 12)
    got = stepped_logits(ours, step, ids3, 8, cache)
    with torch.no_grad():
        assert record(f"oneDNN compiled 3-row decode {name}", err(got, ours(ids3)[:, 8:])) <= TOL
    assert calls


def test_int4_linear_multiplies_by_its_dequantized_weights():
    """Int4Linear through PyTorch's CPU int4 kernel equals x @ W4.T, W4 the 4-bit weights dequantized by the scheme
    itself (q * scale + min per group of 64 columns), up to bf16 rounding; W4 is within a 15th of each group's range
    of the original weight."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    q = quantize.Int4Linear(lin, 64, weight_only=True)
    w = lin.weight.detach().reshape(96, 4, 64)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    w4 = (torch.round((w - lo) / step) * step + lo).reshape(96, 256)
    assert ((w4 - lin.weight).abs() <= step.repeat_interleave(64, 1).reshape(96, 256) / 2 + 1e-6).all()
    x = torch.randn(5, 3, 256)
    with torch.no_grad():
        want = x @ w4.T + lin.bias
        got = q(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert record("int4 kernel vs dequantized weights, relative", ((got - want).norm() / want.norm()).item()) <= 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (PyTorch's CUDA int4 kernel)")
def test_int4_linear_on_cuda_equals_the_cpu_kernel_and_dequantized_weights():
    """On CUDA, Int4Linear packs for PyTorch's CUDA int4 kernel (two 4-bit numbers a byte, then its tiles): the same
    product as the CPU kernel's and as the dequantized weights', up to bf16 rounding; a model quantized there decodes
    greedily as its own full forward."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    cpu, cuda = quantize.Int4Linear(lin, 64, weight_only=True), quantize.Int4Linear(copy.deepcopy(lin).cuda(), 64)
    x = torch.randn(5, 256)
    with torch.no_grad():
        want, got = cpu(x), cuda(x.cuda()).cpu()
    assert record("int4 CUDA vs CPU kernel, relative", ((got - want).norm() / want.norm()).item()) <= 1e-2
    model = quantize.quantize_int4(phi.Phi.from_config(tiny_config(intermediate_size=256), device="cuda").bfloat16())
    assert isinstance(model.layers[0].mlp.fc1, quantize.Int4Linear)
    prompt = ids_for(8, B=1)[0].tolist()
    out = list(generate.generate(model, prompt, max_new_tokens=4, eos_ids=set()))
    with torch.no_grad():
        full = model(torch.tensor([prompt + out[:-1]], device="cuda"))[0, 7:].argmax(-1).tolist()
    assert out == full


@pytest.mark.parametrize("name", ["phi-2", "phi3-4k", "phi4-mini"])
def test_int4_logits_close_to_fp32(name, tmp_path):
    """Weight-only int4 (groups of 128, 64 or 32 columns; asymmetric) on transformers' own random init: logits within
    15% of fp32 (||int4 - fp32|| / ||fp32||; measured 6-13% on these tiny models, where a group is a Linear's whole
    row; int8 is within 2%)."""
    path = transformers_init(name, tmp_path)
    ids = ids_for(48)
    with torch.no_grad():
        want = phi.Phi.from_pretrained(path)(ids)
        q = quantize.quantize_int4(phi.Phi.from_pretrained(path))
        assert any(isinstance(m, quantize.Int4Linear) for m in q.modules())
        rel = ((q(ids) - want).norm() / want.norm()).item()
    assert record(f"int4 logits relative error {name}", rel) < 0.15
    # a bf16 model, a batch: the activations reach PyTorch's int4 kernel as they are (the prompts' last rows: a
    # strided slice); greedy decoding equals the forward's argmax, as one kernel serves both (with int8 activations
    # the prompt takes a GEMM and fp32 reordering can flip a rounding, and so a near-tie of bf16 logits)
    qb = quantize.quantize_int4(phi.Phi.from_pretrained(path, dtype=torch.bfloat16), weight_only=True)
    out = torch.stack(list(generate.generate_batch(qb, ids[:, :8].tolist(), 4, eos_ids=set())), 1)
    with torch.no_grad():
        assert torch.equal(out, qb(torch.cat((ids[:, :8], out[:, :-1]), 1))[:, 7:].argmax(-1))


def test_int4_takes_the_largest_group_that_divides_and_scales_each_group():
    """quantize_int4's group per Linear: 128, else 64, else 32 input columns (a Linear none divides stays a Linear);
    one scale and zero point per group and output (scales_and_zeros (in / group, out, 2)); every weight within half a
    step of its group's scale once dequantized."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(*(torch.nn.Linear(i, 16) for i in (256, 192, 96, 64, 40)))
    want = [lin.weight.detach().clone() for lin in m]
    quantize.quantize_int4(m, weight_only=True)
    assert [getattr(lin, "group", None) for lin in m] == [128, 64, 32, 64, None]
    assert isinstance(m[4], torch.nn.Linear)
    for lin, w in zip(list(m)[:4], want):
        sz = lin.scales_and_zeros.float()
        assert sz.shape == (w.shape[1] // lin.group, 16, 2)
        x = torch.eye(w.shape[1])  # the identity through the kernel: its dequantized weight, transposed
        dequant = (lin(x) - lin.bias.detach()).T
        step = sz[..., 0].T.repeat_interleave(lin.group, 1)  # (out, in): each weight's group's scale
        assert ((dequant - w).abs() <= 0.5 * step + 1e-2).all()


needs_q8 = pytest.mark.skipif(
    platform.machine() != "x86_64" or torch.backends.cpu.get_cpu_capability() == "DEFAULT",
    reason="quantize.Q8_SOURCE is for x86-64 CPUs with AVX2",
)


def rounded_activations(x, levels):
    """x rounded per block of 32 columns to an integer times max|block| / levels (127: int8, llama.cpp's q8_0;
    32767: int16), halves to even."""
    b = x.view(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    return (torch.round(b / (amax / levels)) * (amax / levels)).view(x.shape)


def near_halves(x, levels):
    """x with its values moved to about halfway between two steps of their block (max|block| / levels; the largest
    values stay): there x / step and x * (levels / max) round differently for ~1 in 6 values."""
    b = x.view(*x.shape[:-1], -1, 32)
    step = b.abs().amax(-1, keepdim=True) / levels
    return torch.where(b.abs() < (levels - 1) * step, (torch.floor(b / step) + 0.5) * step, b).view(x.shape)


@needs_q8
@pytest.mark.parametrize("K", [192, 2048])
def test_q8_kernel_multiplies_rounded_activations_by_the_quantized_weights(K, monkeypatch):
    """The C++ kernel (quantize.Q8_SOURCE, built here: on an x86-64 CPU with a compiler it must; with AVX-512 VNNI's
    multiply-adds where the CPU has them, quantize.AVX512_VNNI) computes, for 1 to 37 rows (its tiles of 4 rows and
    the 1 to 3 left over; over 8 rows int8 weights widened once per tile; 72 columns: 9 tiles of 8, the last 16
    columns a thread takes at a time half full), the activations rounded per block of 32 times the weights
    dequantized by their scheme: int8 with an fp16 scale per block of 32 (q8_0), the activations to int16; int4 per
    group of 32, 64 or 128 columns (q * scale + min, both fp16), the activations to int8; bias added; written out
    here in float64. Under autograd the product takes the GEMM path (quantize.rounded and the weights expanded) to the
    same result."""
    assert quantize.q8_kernel()
    monkeypatch.setattr(quantize, "CPU_KERNELS", True)  # (the rule that turns it on: AMD)
    calls = []
    product = quantize.q8_linear
    monkeypatch.setattr(quantize, "q8_linear", lambda *a, **k: calls.append(a[0].shape[0]) or product(*a, **k))
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, 72)
    w = lin.weight.detach()
    b = w.view(72, -1, 32)
    s = (b.abs().amax(-1, keepdim=True) / 127).half().float()
    want = {quantize.Int8Linear(lin): ((torch.round(b / s) * s).view(72, K), 32767)}
    for group in (32, 64, 128)[: 3 if K % 128 == 0 else 2]:
        g = w.view(72, -1, group)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        step, lo = ((hi - lo) / 15).half().float(), lo.half().float()
        want[quantize.Int4Linear(lin, group)] = (torch.round((g - lo) / step).clamp(0, 15) * step + lo).view(72, K), 127
    for q, (dequantized, levels) in want.items():
        assert q.q8
        for rows in (1, 2, 3, 4, 5, 7, 8, 20, 37, -20):  # -20: 20 rows under autograd
            n = abs(rows)
            x = torch.randn(n, K) * torch.rand(n, K // 32, 1).repeat_interleave(32, 1).view(n, K)  # block scales
            x = near_halves(x, levels) if n % 2 else x  # (odd row counts: values where a rounding formula shows)
            with torch.set_grad_enabled(rows < 0):
                got = q(x.requires_grad_(rows < 0)).detach()
            expected = rounded_activations(x, levels).double() @ dequantized.double().T + lin.bias.detach().double()
            name = f"{type(q).__name__} {getattr(q, 'group', '')}"
            assert record(f"q8 kernel vs float64, {name} K {K}", err(got, expected.float())) <= TOL, (name, rows)
        assert calls == [1, 2, 3, 4, 5, 7, 8, 20, 37]  # (autograd: the GEMM path)
        calls.clear()
    for levels in (127, quantize.INT16):  # (the GEMM path's rounding, exactly)
        x = near_halves(torch.randn(64, K), levels)
        assert torch.equal(quantize.rounded(x, levels), rounded_activations(x, levels))


@needs_q8
def test_q8_kernel_without_a_compiler_is_one_line_and_checks_its_inputs(monkeypatch, tmp_path, capsys):
    """Where the kernel cannot build (no compiler), q8_kernel is False with one line on stderr (PyTorch's kernels
    serve instead), not an error. The operator names what is wrong with its inputs; a Linear whose shape it does not
    take (in % 64, out % 8) keeps PyTorch's kernels."""
    assert quantize.q8_kernel()  # (built, with the real compiler)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # (no cached build there)
    monkeypatch.setenv("CXX", "false")
    assert quantize.q8_kernel.__wrapped__() is False
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "the int8 CPU kernel did not build" in lines[0], lines
    x, w, s = torch.randn(2, 64), torch.randint(-127, 128, (8, 64), dtype=torch.int8), torch.ones(8, 2).half()
    assert torch.ops.phi_cpu.linear(x, w, s, None, 32).shape == (2, 8)
    y = torch.ops.phi_cpu.linear(x, w, s, None, 32, torch.arange(8.0))  # (a bias; x of any rank)
    plain = torch.ops.phi_cpu.linear(x.view(2, 1, 64), w, s, None, 32)
    assert plain.shape == (2, 1, 8) and torch.allclose(y, plain[:, 0] + torch.arange(8.0), atol=1e-5)
    for args, what in (
        ((x.double(), w, s, None, 32), "x: .*fp32"),
        ((x, w.float(), s, None, 32), "weight: int8"),
        ((x, w, s.float(), None, 32), "scales, lows: fp16"),
        ((x[:, :32].contiguous(), w[:, :32].contiguous(), s[:, :1].contiguous(), None, 32), "in % 64"),
        ((x, w[:6], s[:6], None, 32), "out % 8"),
        ((x, w, s, None, 32, torch.zeros(8).half()), "bias: fp32"),
        ((x, w, s, None, 32, torch.zeros(6)), "bias: fp32"),
    ):
        with pytest.raises(RuntimeError, match=what):
            torch.ops.phi_cpu.linear(*args)
    monkeypatch.setattr(quantize, "CPU_KERNELS", True)
    assert [quantize.Int8Linear(torch.nn.Linear(i, o)).q8 for i, o in ((64, 8), (64, 12), (96, 8))] == [
        True,
        False,
        False,
    ]


def attention_reference(q, k, v, mask):
    """One query per (row, head) over the slots the mask allows, in float64: softmax(q.k / sqrt(hd)) . v."""
    G = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(G, 1) for t in (k, v))  # (B, H, S, hd)
    att = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return att.masked_fill(~mask, float("-inf")).softmax(-1) @ v


CACHES = [
    (torch.float32, None),
    (torch.bfloat16, None),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
]


@needs_q8
@pytest.mark.parametrize("dtype, cache", CACHES, ids=["fp32", "bf16", "fp32-fp16-cache", "fp32-bf16-cache"])
def test_decode_attention_operator_matches_softmax_attention(dtype, cache):
    """phi_cpu::decode_attention (quantize.Q8_SOURCE), which FastAttention calls for a decode step's single query:
    GQA (8 heads on 2 KV heads), a mask per row (pads) or per head (Phi-3-small's block-sparse layers), keys and
    values a slice of a longer cache (strided), head dims 40 (an odd number of 8-lane registers) and 64, against the
    softmax written out in float64 and phi.Attention.decode_attention. bf16 inputs: fp32 inside, one rounding of the
    output; fp32 q over an fp16 or bf16 cache (quantize.cache_dtype): the cache's numbers widened exactly. A row with
    no key allowed is NaN, as the softmax of only -inf is."""
    assert quantize.q8_kernel()
    g = torch.Generator().manual_seed(0)
    for hd, heads_mask in ((40, False), (64, True)):
        cfg = tiny_config(
            model_type="phi3", hidden_size=8 * hd, num_attention_heads=8, num_key_value_heads=2, head_dim=hd
        )
        attn = phi.Attention(cfg, 0)
        q = torch.randn(3, 8, 1, hd, generator=g).to(dtype)
        cache_k, cache_v = (torch.randn(3, 2, 50, hd, generator=g).to(cache or dtype) for _ in range(2))
        k, v = cache_k[:, :, :37], cache_v[:, :, :37]  # (the filled slots: a strided view)
        mask = torch.rand(3, 8 if heads_mask else 1, 1, 37, generator=g) < 0.6
        mask[..., 5] = True
        mask[2] = False  # (no slot allowed)
        got = torch.ops.phi_cpu.decode_attention(q, k, v, mask, hd**-0.5)
        assert got.dtype == dtype and got.shape == q.shape
        want = attention_reference(q, k, v, mask)
        assert got[2].isnan().all() and want[2].isnan().all()
        bound = 1e-6 if dtype == torch.float32 else 2**-8 * want[:2].abs().max().item()
        assert record(f"decode attention {dtype} hd {hd} vs float64", err(got[:2], want[:2])) <= bound
        if dtype == torch.float32:
            assert err(got[:2], attn.decode_attention(q, k, v, mask)[:2]) <= 1e-6
    for args, what in (
        ((q.double(), k, v, mask), "q: float32 or bfloat16"),
        ((q, k.float() if dtype == torch.bfloat16 else k.double(), v, mask), "k, v: .* one dtype: q's"),
        ((q, k, v.float() if k.dtype != torch.float32 else v.half(), mask), "k, v: .* one dtype"),
        ((q[..., :60].contiguous(), k[..., :60], v[..., :60], mask), "head_dim: a multiple of 8"),
        ((q, k, v, mask.float()), "mask: bool"),
        ((q, k[:, :1].expand(3, 3, 37, 64), v[:, :1].expand(3, 3, 37, 64), mask), "kv_heads dividing heads"),
    ):
        with pytest.raises(RuntimeError, match=what):
            torch.ops.phi_cpu.decode_attention(*args, 0.125)


@needs_q8
@pytest.mark.parametrize("model_type, cache", [("phi", None), ("phi3", None), ("phi", torch.float16)])
def test_fast_attention_decodes_as_phi_attention(model_type, cache, monkeypatch):
    """speed_up swaps phi.Attention for quantize.FastAttention (a subclass: same parameters and state dict): its
    decode steps (generate.decode_step's, masked over every slot of the cache; a forward whose window cuts the
    cache) give the plain model's logits, and the operator is what runs them; with an fp16 cache too (cache_dtype's
    for int8/int4 weights), which phi.py's paths widen and the operators read as it is."""
    cfg = tiny_config(model_type=model_type, num_key_value_heads=2, sliding_window=6 if model_type == "phi3" else None)
    torch.manual_seed(0)
    plain = phi.Phi.from_config(cfg).eval()
    fast = quantize.speed_up(copy.deepcopy(plain), cpu_kernels=True)
    assert all(type(layer.attn) is quantize.FastAttention for layer in fast.layers)
    assert list(fast.state_dict()) == list(plain.state_dict())
    ids = ids_for(14, B=2)
    with torch.no_grad():
        for step in (generate.decode_one_token, lambda m, t, c: m(t[:, None], cache=c)[:, -1]):
            caches = [phi.KVCache(cfg, 2, 14, cache or torch.float32) for _ in range(2)]
            want = stepped_logits(plain, step, ids, 5, caches[0])
            calls = {name: [] for name in ("decode_attention", "rotary_cache")}
            for name, op in [(n, getattr(torch.ops.phi_cpu, n)) for n in calls]:  # (counted)
                monkeypatch.setattr(torch.ops.phi_cpu, name, lambda *a, n=name, op=op: calls[n].append(1) or op(*a))
            got = stepped_logits(fast, step, ids, 5, caches[1])
            monkeypatch.undo()
            assert record(f"FastAttention decode ({model_type}) vs phi.Attention", err(got, want)) <= TOL
            assert max(err(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v)) <= TOL
            # a forward takes SDPA unless a mask is needed: phi3's window of 6 cuts the cache from 7 slots on
            masked = 9 if step is generate.decode_one_token else 8 if cfg.sliding_window else 0
            assert len(calls["decode_attention"]) == masked * cfg.num_hidden_layers
            # decode_step's (eager): rotary and the cache write in one call too
            assert len(calls["rotary_cache"]) == (9 if step is generate.decode_one_token else 0) * cfg.num_hidden_layers


@needs_q8
def test_int8_and_int4_models_decode_with_an_fp16_cache(monkeypatch, fresh_compiler):
    """cache_dtype: fp16 for an fp32 model whose int8/int4 Linears take the kernel, else the model's dtype; generate
    makes its cache so. Decoding through the fp16 cache stays within 1e-3 of the fp32 cache's logits (relative to the
    largest), a small share of what int8 weights move them."""
    monkeypatch.setattr(quantize, "CPU_KERNELS", True)
    cfg = tiny_config(intermediate_size=256)
    torch.manual_seed(0)
    fp32 = phi.Phi.from_config(cfg).eval()
    q8, q4 = quantize.quantize_int8(copy.deepcopy(fp32)), quantize.quantize_int4(copy.deepcopy(fp32), group=32)
    assert quantize.cache_dtype(q8) == quantize.cache_dtype(q4) == torch.float16
    assert quantize.cache_dtype(fp32) == quantize.cache_dtype(quantize.quantize_int8(copy.deepcopy(fp32), True))
    assert quantize.cache_dtype(fp32) == torch.float32 and quantize.cache_dtype(fp32.bfloat16()) == torch.bfloat16
    made = []
    monkeypatch.setattr(phi, "KVCache", lambda *a, f=phi.KVCache: made.append(f(*a)) or made[-1])
    list(generate.generate(q8, [1, 2, 3], 2, temperature=0))
    list(generate.generate_beam(q8, [[1, 2, 3]], 2, num_beams=2))
    list(generate.generate_speculative(q8, [1, 2, 3], 2, draft=q4))
    assert [c.k[0].dtype for c in made] == [torch.float16] * 4  # (speculative: the model's and the draft's)
    monkeypatch.undo()
    ids = ids_for(12, B=2)
    with torch.no_grad():
        want = fp32(ids)[:, 6:]
        for step in (generate.decode_one_token, compiled_step()):
            wide, narrow = (
                stepped_logits(q8, step, ids, 6, phi.KVCache(cfg, 2, 12, t)) for t in (torch.float32, torch.float16)
            )
            off = record("int8 decode: fp16 vs fp32 cache / max|logit|", err(narrow, wide) / wide.abs().max().item())
            assert 0 < off <= 1e-3 and err(narrow, wide) < 0.05 * err(wide, want)


@needs_q8
@pytest.mark.parametrize("model_type", ["phi", "phi3"])
def test_fast_block_decodes_as_phi_block(model_type, monkeypatch):
    """speed_up swaps phi.Block for quantize.FastBlock (a subclass, no state of its own). An eager decode step
    through its lean path (parallel phi, sequential phi3 with its gated MLP) gives the same model's logits and caches
    with phi.Block's forward, exactly (phi.Block's ops in its order) in fp32 and bf16 (the bf16 Linears' operator
    called directly: in bf16 the steps call only the lm_head's module); int8 and int4 blocks are one operator call
    (decode_block: its own norms, gelu and silu), within 1% (int8) or 0.01% (int4) of what the weights' quantization
    moves the logits.
    Where a forward hook is on the attention, the MLP or a Linear, or a global one, or in training mode (dropout),
    phi.Block's forward runs: the hooks see every call they see without FastBlock, dropout applies. decode_block
    names bad input."""
    act = "silu" if model_type == "phi3" else "gelu_new"  # (as their checkpoints)
    cfg = tiny_config(
        model_type=model_type, num_key_value_heads=2, intermediate_size=128, resid_pdrop=0.5, hidden_act=act
    )
    torch.manual_seed(0)
    base = quantize.speed_up(phi.Phi.from_config(cfg).eval(), cpu_kernels=True)
    assert all(type(layer) is quantize.FastBlock for layer in base.layers)
    ids, lean = ids_for(9, B=2), []
    monkeypatch.setattr(
        quantize.FastBlock, "lean", lambda *a, f=quantize.FastBlock.lean: lean.append(f(*a)) or lean[-1]
    )

    def decode(model, hook=None):  # logits and caches of 5 decode steps; the hooked calls' module names
        calls, caches = [], phi.KVCache(cfg, 2, 9, quantize.cache_dtype(model))  # (int8, int4: fp16)
        if hook is not None:
            handle = hook(model, lambda m, args, out: calls.append(type(m).__name__.removeprefix("Fast")) or out * 2)
        with torch.no_grad():
            logits = stepped_logits(model, generate.decode_one_token, ids, 4, caches)
        if hook is not None:
            handle.remove()
        return logits, caches.k + caches.v, calls

    def plain(model, attention=quantize.FastAttention):  # the same model, phi.Block's forward
        model = copy.deepcopy(model)
        for layer in model.layers:
            layer.__class__, layer.attn.__class__ = phi.Block, attention
        return model

    steps, blocks = [], []  # a bf16 Linear's module calls in decode steps (one position); decode_block's calls
    forward, op = quantize.FastLinear.forward, torch.ops.phi_cpu.decode_block
    monkeypatch.setattr(quantize.FastLinear, "forward", lambda m, x: steps.append(x.shape[1] == 1) or forward(m, x))
    monkeypatch.setattr(torch.ops.phi_cpu, "decode_block", lambda *a: blocks.append(a) or op(*a))
    with torch.no_grad():
        exact = base(ids)
    for make in (copy.deepcopy, lambda m: m.bfloat16(), quantize.quantize_int8, quantize.quantize_int4):
        fast = make(copy.deepcopy(base))
        lean.clear(), steps.clear(), blocks.clear()
        got = decode(fast)
        if fast.embed.weight.dtype == torch.bfloat16:
            assert steps.count(True) == 5  # (the lm_head's; the blocks' Linears called as operators)
        want = decode(plain(fast))
        assert lean.count(True) == 5 * cfg.num_hidden_layers  # (and False in the prefill's forward)
        if make in (quantize.quantize_int8, quantize.quantize_int4):
            assert len(blocks) == 5 * cfg.num_hidden_layers
            # (int8 weights' int16 activations have a rounding boundary every 1/32767 of a block's max: the block's own
            # norms and activation, equal to ~1e-7, move some of them across; int4's int8 activations, hardly any)
            kind = type(fast.layers[0].mlp.fc1).__name__
            off = err(got[0], want[0]) / err(want[0], exact[:, 4:])
            assert record(f"decode_block ({model_type}, {kind}) / quantized", off) <= (1e-2 if "8" in kind else 1e-4)
            assert max(err(a, b) for a, b in zip(got[1], want[1])) <= 1e-2 * max(a.abs().max() for a in want[1])
            continue
        assert not blocks and torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    x, p, *rest = blocks[0]
    for args, what in (
        ((x.bfloat16(), p, *rest), "x: fp32"),
        ((x, p[:-1], *rest), "p: 4 norm tensors"),
        ((x, p, *rest[:-1], 2), "act: 0 or 1"),
        ((x, p[:5] + p[7:8] + p[6:], *rest), "a Linear's weight, scales, lows, bias"),
        ((x, p[:4] + p[8:12] + p[4:8] + p[12:], *rest), "the Linears' shapes"),
    ):
        with pytest.raises(RuntimeError, match=what):
            op(*args)
    for hook in (
        lambda m, f: m.layers[1].attn.register_forward_hook(f),
        lambda m, f: m.layers[1].mlp.register_forward_hook(f),
        lambda m, f: m.layers[1].mlp.fc2.register_forward_hook(f),
        lambda m, f: m.layers[1].attn.qkv.register_forward_pre_hook(lambda mod, args: f(mod, None, args[0])),
        lambda m, f: torch.nn.modules.module.register_module_forward_hook(lambda mod, a, out: f(mod, a, out) / 2),
    ):
        got, want = decode(fast, hook), decode(plain(fast, phi.Attention), hook)  # (no FastAttention.decode either)
        assert err(got[0], want[0]) <= TOL and got[2] == want[2] and got[2]
    fast.train()  # (under no_grad, as decode_one_token's: the operators still take the step)
    torch.manual_seed(1)
    got = decode(fast)[0]
    torch.manual_seed(1)
    assert torch.equal(got, decode(plain(fast))[0]) and err(got, decode(plain(fast.eval()))[0]) > 1e-3


@needs_q8
@pytest.mark.parametrize("dtype, cache", CACHES, ids=["fp32", "bf16", "fp32-fp16-cache", "fp32-bf16-cache"])
def test_rotary_cache_operator_rotates_and_writes_as_phi(dtype, cache):
    """phi_cpu::rotary_cache (quantize.Q8_SOURCE), FastAttention's eager decode step: from the qkv Linear's output
    (B, 1, (H + 2 KV) hd), the queries rotated as phi.apply_rotary rotates them, and the rotated keys and the values
    written into one slot of each cache as KVCache.update writes them, the other slots as they were; partial (16 of
    32 dims) and full rotary; bf16 equal (each product and sum rounded as torch's ops round); an fp16 or bf16 cache
    beside fp32 qkv: the values rounded as torch rounds them, the keys rotated in fp32 first (a last fp32 bit may move
    their rounding by one step). Bad input is named."""
    assert quantize.q8_kernel()
    torch.manual_seed(0)
    B, H, KV, S, hd, at = 3, 4, 2, 9, 32, torch.tensor([4])
    for d in (16, 32):
        angles = torch.tensor([5.0, 0.0, 700.0])[:, None] * 10000 ** -(torch.arange(0, d, 2) / d)  # (B, d / 2)
        cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype)[:, None, None] for f in (torch.cos, torch.sin))
        qkv = torch.randn(B, 1, (H + 2 * KV) * hd).to(dtype)
        k, v = torch.randn(B, KV, S, hd).to(cache or dtype), torch.randn(B, KV, S, hd).to(cache or dtype)
        want_k, want_v = k.clone(), v.clone()
        q_, k_, v_ = (t.view(B, 1, -1, hd).transpose(1, 2) for t in qkv.split([H * hd, KV * hd, KV * hd], -1))
        want_k[:, :, 4:5], want_v[:, :, 4:5] = phi.apply_rotary(k_, cos, sin), v_
        q = torch.ops.phi_cpu.rotary_cache(qkv, cos, sin, k, v, at, H)
        want_q = phi.apply_rotary(q_, cos, sin)
        if dtype == torch.bfloat16:
            assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(v, want_v)
        elif cache:
            step = (2**-10 if cache == torch.float16 else 2**-7) * want_k.abs().max().item()  # (one step of the cache)
            assert err(q, want_q) <= 1e-6 and err(k, want_k) <= step and torch.equal(v, want_v)
            assert (
                record(f"rotary_cache {cache} cache: keys off by a rounding step", (k != want_k).float().mean()) < 0.01
            )
        else:
            assert max(err(q, want_q), err(k, want_k)) <= 1e-6 and torch.equal(v, want_v)
    for args, what in (
        ((qkv, cos, sin, k, v, torch.tensor([9]), H), "at: a slot of the cache"),
        ((qkv, cos.float() if dtype != torch.float32 else cos.double(), sin, k, v, at, H), "cos, sin"),
        ((qkv[..., :-1].contiguous(), cos, sin, k, v, at, H), "qkv: "),
        ((qkv, cos, sin, k.transpose(1, 2), v, at, H), "k_cache, v_cache"),
        ((qkv, cos, sin, k.double(), v.double(), at, H), "k_cache, v_cache: .* one dtype: qkv's"),
    ):
        with pytest.raises(RuntimeError, match=what):
            torch.ops.phi_cpu.rotary_cache(*args)


@needs_q8
@pytest.mark.parametrize("K", [2048, 256, 264])
def test_bf16_operator_multiplies_a_few_rows_as_float64(K, monkeypatch):
    """phi_cpu::matvec_bf16 (quantize.Q8_SOURCE), which FastLinear takes for bf16 weights and up to 8 rows (decoding;
    any rows inside a compiled step): fp32 products of the bf16 weights (76 rows of weights: 9 blocks of 8 and one of
    4; K 256: the next block prefetched, 2048: not), against float64, for fp32 x and for x of bf16 numbers (in
    bf16 or fp32: with AVX-512 BF16 a row at a time in bf16 pairs, K 264 ending in a masked block; the same fp32
    sums either way), and the Linear's bf16 output within its rounding; 9 rows, or gradients on, keep PyTorch's
    kernel. With the bias, bf16 or fp32 x of any leading dimensions, it equals the product rounded to x's dtype, then
    the bias added (the ops it replaces, in one call). The operator names what is wrong with its inputs."""
    assert quantize.q8_kernel()
    calls, op = [], torch.ops.phi_cpu.matvec_bf16
    monkeypatch.setattr(torch.ops.phi_cpu, "matvec_bf16", lambda x, w, b=None: calls.append(len(x)) or op(x, w, b))
    torch.manual_seed(0)
    lin = quantize.speed_up(torch.nn.Sequential(torch.nn.Linear(K, 76)).bfloat16(), cpu_kernels=True)[0]
    w = lin.weight.detach()
    for rows in (1, 3, 8, 9):
        x = torch.randn(rows, K)
        assert record("bf16 operator vs float64", err(op(x, w), x.double() @ w.double().T)) <= 1e-4
        xb = x.bfloat16()
        y = op(xb.float(), w)
        assert record("bf16 operator vs float64", err(y, xb.double() @ w.double().T)) <= 1e-4
        assert torch.equal(op(xb, w), y.bfloat16())
        with torch.no_grad():  # (decoding; with gradients on, PyTorch's kernel)
            got = lin(x.bfloat16())
        exact = x.bfloat16().double() @ w.double().T + lin.bias.detach().double()
        bound = 2**-7 * exact.abs().max().item()  # (rounded to bf16 twice: the product, then the bias added)
        assert got.dtype == torch.bfloat16 and err(got, exact) <= bound
        assert calls == ([rows] if rows <= 8 else [])
        calls.clear()
        lin(x.bfloat16())
        assert calls == []
        for dtype in (torch.bfloat16, torch.float32):
            x3 = x.to(dtype).view(1, rows, K)
            want = (op(x3.float().view(rows, K), w).to(dtype) + lin.bias.detach()).view(1, rows, -1)
            assert torch.equal(op(x3, w, lin.bias.detach()), want) and op(x3, w).dtype == dtype
    for args, what in (
        ((x.double(), w), "x: .*fp32"),
        ((x, w, lin.bias.detach().float()), "bias: bf16"),
        ((x, w.float()), "weight: bf16"),
        ((x, w[:70].contiguous()), "out % 4"),
        ((x[:, : K - 4].contiguous(), w[:, : K - 4].contiguous()), "in % 8"),
    ):
        with pytest.raises(RuntimeError, match=what):
            op(*args)


@needs_q8
def test_int8_activations_pass_gradients_through_the_rounding(monkeypatch):
    """With autograd the products take the GEMM path (the kernel has no backward), whose rounding passes gradients
    through unchanged: the input's gradient of sum(y) is the dequantized weight's column sums."""
    monkeypatch.setattr(quantize, "CPU_KERNELS", True)
    torch.manual_seed(0)
    q = quantize.Int8Linear(torch.nn.Linear(128, 16))
    assert q.q8
    x = torch.randn(2, 128, requires_grad=True)
    q(x).sum().backward()
    assert err(x.grad, q.dequantized().sum(0).expand(2, -1)) <= TOL


@needs_reference("tokenizers")
def test_load_quantize_names_pick_the_kernel_and_the_dtype(hub, monkeypatch, tmp_path):
    """generate.load's quantize names: "int8" and "int4" take the q8 kernel where quantize.q8_on() (the rule forced
    on here), and then the model around them is fp32 on the CPU; "-weight-only" keeps PyTorch's kernels (int4 in the
    checkpoint's dtype); an unknown name is one error that lists the known ones."""
    monkeypatch.setattr(quantize, "CPU_KERNELS", True)
    path = tmp_path / "bf16"  # a checkpoint whose own dtype is bfloat16
    shutil.copytree(snapshot(hub[0], "phi3-4k"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"torch_dtype": "bfloat16"}))
    own = generate.load(path)[0].embed.weight.dtype
    assert own == torch.bfloat16
    kernel = quantize.q8_kernel()
    for name, q8, dtype in (
        ("int8", kernel, torch.float32),
        ("int8-weight-only", False, torch.float32),
        ("int4", kernel, torch.float32 if kernel else own),
        ("int4-weight-only", False, own),
    ):
        model = generate.load(path, quantize=name)[0]
        qs = [m for m in model.modules() if isinstance(m, (quantize.Int8Linear, quantize.Int4Linear))]
        fits = [getattr(m, "in_features", m.weight.shape[-1]) % 64 == 0 for m in qs]  # (the kernel's inputs)
        assert any(fits) and [m.q8 for m in qs] == [q8 and f for f in fits], name
        assert model.embed.weight.dtype == dtype, name
    with pytest.raises(ValueError, match="quantize 'int3' is unknown .*int8-weight-only"):
        generate.load(path, quantize="int3")


@needs_reference("tokenizers")
def test_cli_quantize_int4_equals_the_api(hub):
    home, _ = hub
    model, tok = generate.load(snapshot(home, "phi3-4k"), dtype="float32", quantize="int4")
    prompt = tok.encode("def f(x):", bos=tok.add_bos)
    want = continuation(tok, prompt, list(generate.generate(model, prompt, 16)))
    plain = generate.load(snapshot(home, "phi3-4k"), dtype="float32")[0]
    assert want != continuation(tok, prompt, list(generate.generate(plain, prompt, 16)))  # int4 shows
    args = ("--model", "test/phi3-4k", "--prompt", "def f(x):", "--max-new-tokens", 16, "--temperature", 0)
    assert run_cli(home, *args, "--dtype", "float32", "--quantize", "int4").stdout == want + "\n"


def test_phimoe_int8_quantizes_the_experts_not_the_router(tmp_path):
    """--quantize int8 on a phimoe model stores every expert's Linears as int8 and keeps the router in its dtype;
    greedy generation still runs through the cache (and equals the int8 model's own full forward)."""
    path = transformers_init("phimoe", tmp_path)
    q = quantize.quantize_int8(phi.Phi.from_pretrained(path))
    experts = [m for layer in q.layers for e in layer.mlp.experts for m in (e.fc1, e.fc2)]
    assert experts and all(isinstance(m, quantize.Int8Linear) for m in experts)
    assert all(type(layer.mlp.router) is torch.nn.Linear for layer in q.layers)
    prompt = ids_for(8, B=1)[0].tolist()
    out = list(generate.generate(q, prompt, max_new_tokens=6, eos_ids=set()))
    with torch.no_grad():
        full = q(torch.tensor([prompt + out[:-1]]))[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert out == full


def test_phi3small_int8_and_int4_logits_close_to_fp32():
    """Phi-3-small's Linears (qkv with its head-major rows, up_proj's interleaved gate/linear columns; the tied
    lm_head quantized apart from the embedding): int8 within 2% of fp32, int4 within 15%, as the other families."""
    ids = torch.randint(0, 100256, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = small_model()(ids)
        for q, bound in ((quantize.quantize_int8(small_model()), 0.02), (quantize.quantize_int4(small_model()), 0.15)):
            got = q(ids)
            assert not isinstance(q.lm_head, torch.nn.Linear) and isinstance(q.embed, torch.nn.Embedding)
            keep = want > torch.finfo(want.dtype).min  # (the dummy ids' lowest logit)
            rel = ((got[keep] - want[keep]).norm() / want[keep].norm()).item()
            assert record(f"{type(q.lm_head).__name__} logits relative error phi3small", rel) < bound


@needs_q8
def test_compiled_bf16_decoding_gives_the_operator_bf16_x(fresh_compiler):
    """Inside a compiled step a bf16 FastLinear hands the operator its bf16 x as it is, not widened to fp32: inductor
    would skip the rounding to bf16 of the op that made x, fused with the widening (a product here, the same number
    in eager and compiled code once rounded), and an x whose numbers are not bf16 takes the operator's fma path, not
    AVX-512 BF16's pairs. The eager call's numbers."""
    assert quantize.q8_kernel()
    torch.manual_seed(0)
    lin = quantize.speed_up(torch.nn.Sequential(torch.nn.Linear(512, 256)).bfloat16(), cpu_kernels=True)[0]
    x = torch.randn(1, 1, 512).bfloat16()
    with torch.no_grad():
        eager = lin(x * 1.1)
        compiled = torch.compile(lambda x: lin(x * 1.1))(x)
    assert torch.equal(compiled, eager)
