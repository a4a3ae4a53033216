"""serve.py: the OpenAI-compatible server, tested with the official openai client."""

import gc
import json
import re
import subprocess
import sys
import threading

import pytest
import torch
import transformers

import generate
import quantize
import serve
from conftest import GEN_CASES, PROMPT, ROOT, TOK, continuation, needs_reference, python_env, record, run_cli, snapshot

CHAT_ARGS = ("--max-new-tokens", 20, "--temperature", 0, "--dtype", "float32")


@pytest.fixture
def server(hub):
    """serve.py on a free loopback port, in a thread of this process, for a checkpoint of the hub fixture:
    yields start: start(name, **serve_kw) starts one on a checkpoint and returns (base_url, model, tok); steps may be
    a function of the model."""

    running = []

    def start(name, **kw):
        model, tok = generate.load(snapshot(hub[0], name), dtype="float32")
        if callable(kw.get("steps")):
            kw["steps"] = kw["steps"](model)
        httpd = serve.serve(model, tok, f"test/{name}", port=0, **kw)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        running.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1", model, tok

    yield start
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


def openai_client(url):
    import openai

    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)


@needs_reference("tokenizers")
@pytest.mark.parametrize("name", ["phi3-4k", "phi4-mini"])
def test_serve_chat_and_completions_equal_generate(name, server):
    """Greedy chat completion == generate.generate on the family's rendered prompt (as apply_chat_template renders
    it); streaming concatenates to the same text; /v1/completions likewise; stop strings; usage; /v1/models."""
    url, model, tok = server(name)
    client = openai_client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    template = transformers.AutoTokenizer.from_pretrained(TOK / GEN_CASES[name][1])
    ids = tok.encode(template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    end = tok.added["<|end|>"]["id"]
    want = list(generate.generate(model, ids, 12, temperature=0, eos_ids=model.eos_ids | {end}))
    text = tok.decode(want)  # a reply is the decode of its own tokens (a completion continues the prompt's text)
    r = client.chat.completions.create(model=f"test/{name}", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    chunks = client.chat.completions.create(
        model=f"test/{name}", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    stop = text[4:7]
    r = client.chat.completions.create(
        model=f"test/{name}", messages=messages, max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].message.content == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    prompt_ids = tok.encode(PROMPT, bos=tok.add_bos)
    plain = continuation(tok, prompt_ids, list(generate.generate(model, prompt_ids, 10, temperature=0)))
    r = client.completions.create(model=f"test/{name}", prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.choices[0].text == plain
    assert [m.id for m in client.models.list().data] == [f"test/{name}"]


@needs_reference("tokenizers")
def test_serve_usage_of_n_choices_a_string_stop_types_the_context_edge_and_the_last_chunk(server):
    """usage counts every choice of n (completion_tokens = n x max_tokens, total_tokens = prompt + that); a string
    stop is one stop string, not its characters; a bool is no number; a prompt must leave room for one token (as
    long as the context: 400; one shorter: served); a streamed chat's last chunk with a choice carries its
    finish_reason, and the usage chunk comes after it."""
    import openai

    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    msg = [{"role": "user", "content": "Name a prime."}]
    prompt = len(tok.encode(tok.render_chat(msg), bos=tok.add_bos))
    r = client.chat.completions.create(model="m", messages=msg, max_tokens=5, n=3, temperature=1.0, seed=3)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, 15, prompt + 15)
    text = client.completions.create(model="m", prompt="Once upon", max_tokens=12, temperature=0).choices[0].text
    c = next(ch for ch in text if ch.strip())  # a character the text has; with it, a string no text has
    r = client.completions.create(model="m", prompt="Once upon", max_tokens=12, temperature=0, stop=c + "\u2603")
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    for field in ("max_tokens", "n", "temperature", "top_p", "seed"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=msg, **{field: True})
        assert e.value.body["param"] == field
    context = model.config.max_position_embeddings
    with pytest.raises(openai.BadRequestError, match=f"is {context} tokens"):
        client.completions.create(model="m", prompt=[5] * context, max_tokens=1)
    assert client.completions.create(model="m", prompt=[5] * (context - 1), max_tokens=1).usage.completion_tokens == 1
    chunks = list(
        client.chat.completions.create(
            model="m", messages=msg, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    last = [ch for ch in chunks if ch.choices][-1]
    assert last.choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 4
    assert all(ch.choices[0].finish_reason is None for ch in chunks if ch.choices and ch is not last)


@needs_reference("tokenizers")
def test_serve_two_concurrent_clients_get_their_own_answers(server):
    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    prompts = ["Name a prime.", "Say hello in French."]
    want = [
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": p}], max_tokens=16, temperature=0
        )
        .choices[0]
        .message.content
        for p in prompts
    ]
    assert want[0] != want[1]
    got = [None, None]

    def ask(i):
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompts[i]}], max_tokens=16, temperature=0
        )
        got[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


@needs_reference("tokenizers")
def test_serve_bad_requests_are_400_and_the_server_keeps_serving(server):
    import http.client

    import openai

    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    msg = [{"role": "user", "content": "hi"}]
    for kw, param in [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens="many"), "max_tokens"),
        (dict(temperature="hot"), "temperature"),
        (dict(messages=[{"role": "user", "content": "word " * 300}]), "messages"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", **{"messages": msg, **kw})
        assert (
            e.value.status_code == 400
            and e.value.body["param"] == param
            and e.value.body["type"] == "invalid_request_error"
        )
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=b"{not json", headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400 and "not valid JSON" in json.loads(r.read())["error"]["message"]
    # a client that goes away mid-stream: its generation stops (few tokens sampled), the server still answers
    calls = []
    sample = generate.sample
    generate.sample = lambda *a, **kw: calls.append(1) or sample(*a, **kw)
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = json.dumps({"messages": msg, "max_tokens": 100, "temperature": 0, "stream": True})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.fp.readline()  # the first event, then hang up
        r.close()
        conn.close()
        r = client.chat.completions.create(model="m", messages=msg, max_tokens=4, temperature=0)
        assert r.choices[0].message.content is not None
    finally:
        generate.sample = sample
    assert len(calls) < 100 + 4
    assert client.with_options().models.list().data


@needs_reference("tokenizers")
def test_serve_phi4_mini_tool_call_round_trip(server, monkeypatch):
    """Tools on a Phi-4-mini-shaped model: the prompt the server builds from OpenAI messages (tools, an assistant's
    tool_calls, a tool result) is what the checkpoint's own chat template renders; a forced <|tool_call|> reply comes
    back as OpenAI tool_calls (finish_reason "tool_calls"), also when the model ends its turn without <|/tool_call|>;
    malformed JSON in it comes back as content; with tool_choice "none" neither the tools nor the calls apply."""
    url, model, tok = server("phi4-mini")
    client = openai_client(url)
    fn = {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "user", "content": "And in Rome?"},
    ]
    template = [  # the same conversation as Phi-4-mini's template takes it
        {"role": "system", "content": "You help.", "tools": json.dumps([fn])},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>',
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "user", "content": "And in Rome?"},
    ]
    want_prompt = transformers.AutoTokenizer.from_pretrained(TOK / "phi4mini").apply_chat_template(
        template, tokenize=False, add_generation_prompt=True
    )
    end = tok.added["<|end|>"]["id"]
    prompts, reply = [], []
    real_prefill = generate.prefill  # (every prompt the server runs is prefilled alone)
    monkeypatch.setattr(
        generate, "prefill", lambda m, ids, *a, **kw: prompts.append(ids[0].tolist()) or real_prefill(m, ids, *a, **kw)
    )
    monkeypatch.setattr(generate, "sample", lambda logits, *a, **kw: torch.full(logits.shape[:1], reply.pop(0)))
    no_tools = transformers.AutoTokenizer.from_pretrained(TOK / "phi4mini").apply_chat_template(
        [{k: v for k, v in m.items() if k != "tools"} for m in template], tokenize=False, add_generation_prompt=True
    )
    for text, calls, choice_of_tool in [
        ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Rome"}}]<|/tool_call|>', True, "auto"),
        ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": Rome}]<|/tool_call|>', False, "auto"),
        ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Rome"}}]', True, "auto"),  # ends at <|end|>
        ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Rome"}}]<|/tool_call|>', False, "none"),
    ]:
        reply[:] = tok.encode(text) + [end]
        r = client.chat.completions.create(
            model="m",
            messages=messages,
            tools=[{"type": "function", "function": fn}],
            tool_choice=choice_of_tool,
            max_tokens=40,
        )
        # tool_choice "none": the tools stay out of the prompt, and a call the model writes anyway is its text
        assert prompts[-1] == tok.encode(want_prompt if choice_of_tool == "auto" else no_tools)
        choice = r.choices[0]
        if calls:
            assert choice.finish_reason == "tool_calls" and not choice.message.content
            assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
                ("get_weather", {"city": "Rome"})
            ]
            assert choice.message.tool_calls[0].id.startswith("call_")
        else:
            assert choice.finish_reason == "stop" and choice.message.content == text and not choice.message.tool_calls


@needs_reference("tokenizers")
def test_serve_chat_reply_is_the_decode_of_its_tokens_and_keeps_its_end(server, hub, monkeypatch):
    """A Phi-3 (SentencePiece) chat reply whose first token is a word with its space ("▁certific") is the reply's
    own decode, as transformers decodes it: no leading space, streamed or not, and the CLI's --chat prints the same.
    A stop string that never completes does not eat the reply's end (the tail held back for it is sent when the
    generation ends), in a chat reply and in a completion, streamed or not."""
    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    end, reply = tok.added["<|end|>"]["id"], []
    ids = tok.encode("certific Answer: 7\n")
    want = transformers.AutoTokenizer.from_pretrained(TOK / "phi3").decode(ids)
    assert want == tok.decode(ids) == "certific Answer: 7\n" and tok.decode(ids[:1]) == "certific"
    monkeypatch.setattr(generate, "sample", lambda logits, *a, **kw: torch.full(logits.shape[:1], reply.pop(0)))
    msg = [{"role": "user", "content": "Spell it."}]
    for stop in (None, ["\n\n"]):  # "\n\n": the final "\n" is held back until the reply ends
        reply[:] = ids + [end]
        r = client.chat.completions.create(model="m", messages=msg, max_tokens=20, stop=stop)
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        reply[:] = ids + [end]
        chunks = client.chat.completions.create(model="m", messages=msg, max_tokens=20, stop=stop, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    prompt = tok.encode("Say:", bos=tok.add_bos)
    for stream in (False, True):
        reply[:] = ids + [tok.eos_id]
        r = client.completions.create(model="m", prompt="Say:", max_tokens=20, stop=["\n\n"], stream=stream)
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        assert text == continuation(tok, prompt, ids)  # a completion continues the prompt's text
    reply[:] = ids + [end]
    r = run_cli(hub[0], "--model", "test/phi3-4k", "--chat", "--prompt", "Spell it.", "--stop", "\n\n", *CHAT_ARGS)
    assert r.returncode == 0 and r.stdout == want + "\n", r.stderr


@needs_reference("tokenizers")
def test_serve_n_choices_and_seed_and_the_program(server, hub, tmp_path):
    """n=2 at temperature 1 gives two different choices, and a seed reproduces them; serve.py as a program listens on
    127.0.0.1 by default (port 0: a free one, printed) and answers /health; on a CPU where the exported step applies
    it says, as generate.py, that it decodes with the plain step for want of one and builds it when it stops."""
    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    msg = [{"role": "user", "content": "Tell me a story."}]

    def texts(seed):
        r = client.chat.completions.create(model="m", messages=msg, max_tokens=12, temperature=1, n=2, seed=seed)
        return [c.message.content for c in r.choices]

    a = texts(3)
    assert a[0] != a[1] and texts(3) == a and texts(4) != a
    env = python_env(HF_HOME=hub[0], HF_HUB_OFFLINE=1, PHI_CPU_KERNELS=1, XDG_CACHE_HOME=tmp_path)
    cmd = [sys.executable, str(ROOT / "serve.py"), "--model", "test/phi3-4k", "--port", "0", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:  # (terminated below: no build)
        line = proc.stderr.readline()
        assert line.startswith("decode: the plain step; after this run, the step compiled ahead of time"), line
        line = proc.stderr.readline()
        m = re.fullmatch(r"serve.py: test/phi3-4k on http://127\.0\.0\.1:(\d+)/v1\n", line)
        assert m, line
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{m[1]}/health", timeout=30) as r:
            assert json.loads(r.read()) == {"status": "ok"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -----------------------------------------------------------------------------------------------------------------
# Completions as evaluation harnesses call them; logprobs; what else clients send


def log_softmax_of(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    return (logits if isinstance(logits, torch.Tensor) else logits.logits)[0].float().log_softmax(-1)


@needs_reference("tokenizers")
def test_serve_scores_token_id_prompts_as_lm_evaluation_harness_asks(server, hub):
    """lm-evaluation-harness's local-completions loglikelihood request: a batch of token-id prompts, max_tokens 1,
    logprobs 1, echo, temperature 0. Each choice (index in order) echoes its prompt; token_logprobs has one entry
    per prompt token (the first null) and one for the generated token, each equal to the log-softmax of our logits
    and of transformers' on the same weights; top_logprobs' best is the greedy token (its is_greedy test)."""
    url, model, tok = server("phi3-4k")
    ref = hub[1]["phi3-4k"]
    prompts = [tok.encode("def add(a, b):\n    return a + b"), tok.encode("The capital of France is Paris")]
    r = openai_client(url).completions.create(
        model="m", prompt=prompts, max_tokens=1, logprobs=1, echo=True, temperature=0, seed=1234
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c, ids in zip(r.choices, prompts):
        new = list(generate.generate(model, ids, 1, eos_ids=set()))
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        full = ids + new
        for oracle in (model, ref):
            want = log_softmax_of(oracle, full)[:-1].gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
            got = torch.tensor(lp.token_logprobs[1:])
            assert record("serve logprobs vs log-softmax", (got - want).abs().max().item()) <= 1e-4
        assert max(lp.top_logprobs[-1].values()) == lp.token_logprobs[-1]  # greedy: the best is the token taken
        assert c.text == tok.decode(ids) + continuation(tok, ids, new)
        offsets = lp.text_offset
        assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[len(ids)] == len(tok.decode(ids))
    assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 2


@needs_reference("tokenizers")
def test_serve_prompt_forms_logprobs_without_echo_and_chat_logprobs(server):
    """A prompt as a string, a list of strings (choices in order, n each), token ids: each choice equals the same
    prompt asked alone. Without echo, logprobs cover the completion only. Chat: logprobs.content per reply token,
    with top_logprobs (the likeliest first), equal to the log-softmax of our logits."""
    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    alone = [
        client.completions.create(model="m", prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in ("Once upon", "def f(x):")
    ]
    r = client.completions.create(model="m", prompt=["Once upon", "def f(x):"], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and [c.text for c in r.choices] == [alone[0]] * 2 + [
        alone[1]
    ] * 2
    ids = tok.encode("Once upon", bos=tok.add_bos)
    r = client.completions.create(model="m", prompt=ids, max_tokens=6, temperature=0, logprobs=3)
    lp, new = r.choices[0].logprobs, list(generate.generate(model, ids, 6, eos_ids=set()))
    assert r.choices[0].text == alone[0] and len(lp.token_logprobs) == len(lp.tokens) == 6
    want = log_softmax_of(model, ids + new)[len(ids) - 1 : -1].gather(-1, torch.tensor(new)[:, None])[:, 0]
    assert (torch.tensor(lp.token_logprobs) - want).abs().max() <= 1e-4
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs) and lp.text_offset[0] == len(tok.decode(ids))
    msg = [{"role": "user", "content": "Name a prime."}]
    r = client.chat.completions.create(
        model="m", messages=msg, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    prompt = tok.encode(tok.render_chat(msg), bos=tok.add_bos)
    new = list(generate.generate(model, prompt, 6, eos_ids=generate.end_of_turn_ids(model, tok)))
    want = log_softmax_of(model, prompt + new)[len(prompt) - 1 : -1]
    assert [e.logprob for e in content] == pytest.approx(
        want.gather(-1, torch.tensor(new)[:, None])[:, 0].tolist(), abs=1e-4
    )
    for e, row in zip(content, want):
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token


@needs_reference("tokenizers")
def test_serve_streams_logprobs_chunk_by_chunk_as_the_whole_reply_has_them(server):
    """stream with logprobs: each chunk carries its own tokens' log-probabilities; joined they are the non-streamed
    reply's (chat: logprobs.content; completions with n 2: tokens, token_logprobs, top_logprobs, text_offset per
    choice), which equal the log-softmax of our logits."""
    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    msg = [{"role": "user", "content": "Name a prime."}]
    ask = dict(model="m", messages=msg, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**ask).choices[0].logprobs.content
    chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    streamed = [e for c in chunks if c.logprobs for e in c.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole] and len(whole) == 8
    assert sum(1 for c in chunks if c.logprobs and c.logprobs.content) > 1  # (spread over the chunks)
    prompt = tok.encode(tok.render_chat(msg), bos=tok.add_bos)
    new = list(generate.generate(model, prompt, 8, eos_ids=generate.end_of_turn_ids(model, tok)))
    want = log_softmax_of(model, prompt + new)[len(prompt) - 1 : -1].gather(-1, torch.tensor(new)[:, None])[:, 0]
    assert [e.logprob for e in streamed] == pytest.approx(want.tolist(), abs=1e-4)
    ask = dict(model="m", prompt="Once upon", max_tokens=7, temperature=0, logprobs=2, n=2)
    whole = client.completions.create(**ask).choices
    joined = {i: {key: [] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")} for i in (0, 1)}
    for c in client.completions.create(**ask, stream=True):
        for choice in c.choices:
            for key, values in (choice.logprobs.model_dump() if choice.logprobs else {}).items():
                joined[choice.index][key] += values
    for choice in whole:
        assert joined[choice.index] == choice.logprobs.model_dump() and len(choice.logprobs.tokens) == 7


@needs_reference("tokenizers")
def test_serve_embeddings_equal_generate_embed_in_both_encodings(server):
    """POST /v1/embeddings with the openai client (which asks for base64 by default) and as float lists: strings,
    token ids and a batch, in order, equal to generate.embed's vectors; our pooling field; usage; the refusals."""
    import openai

    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    texts = ["Hello world", "def f(x):", "x"]
    want = generate.embed(model, tok, texts)
    r = client.embeddings.create(model="m", input=texts)
    assert [d.index for d in r.data] == [0, 1, 2] and torch.equal(torch.tensor([d.embedding for d in r.data]), want)
    ids = [tok.encode(t, bos=tok.add_bos) for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    r = client.embeddings.create(model="m", input=ids[1], encoding_format="float")  # alone, as embed of it alone (a
    # batch of 3 multiplies other row counts: the CPU kernels' blocking, and so the last bits, differ on AMD)
    assert torch.equal(torch.tensor(r.data[0].embedding), generate.embed(model, tok, texts[1:2])[0])
    r = client.embeddings.create(model="m", input=ids, extra_body={"pooling": "mean"})
    assert torch.equal(torch.tensor([d.embedding for d in r.data]), generate.embed(model, tok, texts, pooling="mean"))
    for bad, param in [
        (dict(input=[]), "input"),
        (dict(input="hi", encoding_format="int8"), "encoding_format"),
        (dict(input="hi", dimensions=8), "dimensions"),
        (dict(input=[[1] * 129]), "input"),
        (dict(input=[5, 10**9]), "input"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="m", **bad)
        assert e.value.body["param"] == param, (bad, e.value.body)


@needs_reference("tokenizers")
def test_serve_stream_usage_max_completion_tokens_and_the_model_route(server):
    """stream_options.include_usage: every chunk has usage null and a last one (no choices) the totals;
    max_completion_tokens caps the reply (over max_tokens); GET /v1/models/{id}, and 404 for another id."""
    import openai

    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    msg = [{"role": "user", "content": "Count to ten."}]
    chunks = list(
        client.chat.completions.create(
            model="m", messages=msg, max_tokens=9, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    prompt = len(tok.encode(tok.render_chat(msg), bos=tok.add_bos))
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt, 9)
    assert chunks[-1].usage.total_tokens == prompt + 9
    r = client.chat.completions.create(model="m", messages=msg, max_tokens=9, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    assert client.models.retrieve("test/phi3-4k").id == "test/phi3-4k"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


@needs_reference("tokenizers")
def test_serve_streamed_tool_calls_arrive_as_deltas_the_client_assembles(server, monkeypatch):
    """A streamed reply with tools: the text before <|tool_call|> as content, then tool_calls deltas that the openai
    client's stream assembles into the non-streamed reply's calls, finish_reason "tool_calls"; arguments the model
    wrote as a JSON string are that string, not encoded twice."""
    url, model, tok = server("phi4-mini")
    client = openai_client(url)
    fn = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    end, reply = tok.added["<|end|>"]["id"], []
    monkeypatch.setattr(generate, "sample", lambda logits, *a, **kw: torch.full(logits.shape[:1], reply.pop(0)))
    msg, tools = [{"role": "user", "content": "Weather in Rome?"}], [{"type": "function", "function": fn}]
    text = 'Let me look.<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Rome"}}]<|/tool_call|>'
    reply[:] = tok.encode(text) + [end]
    whole = client.chat.completions.create(model="m", messages=msg, tools=tools, max_tokens=60).choices[0]
    reply[:] = tok.encode(text) + [end]
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model="m", messages=msg, tools=tools, max_tokens=60, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            calls.setdefault(c.index, {"name": "", "arguments": ""})
            calls[c.index]["name"] += c.function.name or ""
            calls[c.index]["arguments"] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == whole.message.content == "Let me look." and finish == whole.finish_reason == "tool_calls"
    assert [calls[0]["name"], json.loads(calls[0]["arguments"])] == ["get_weather", {"city": "Rome"}]
    assert calls[0]["arguments"] == whole.message.tool_calls[0].function.arguments
    reply[:] = tok.encode(
        '<|tool_call|>[{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]<|/tool_call|>'
    ) + [end]
    r = client.chat.completions.create(model="m", messages=msg, tools=tools, max_tokens=60)
    assert r.choices[0].message.tool_calls[0].function.arguments == '{"city": "Oslo"}'


def raw(url, data: bytes, wait=10.0) -> bytes:
    """What the server sends back for these bytes, read until it closes the connection (or `wait` seconds pass)."""
    import socket

    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def post(path, body: bytes, **headers) -> bytes:
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body))}
    head |= {"Connection": "close", **headers}
    return (
        f"POST {path} HTTP/1.1\r\n".encode()
        + "".join(f"{k}: {v}\r\n" for k, v in head.items() if v is not None).encode()
        + b"\r\n"
        + body
    )


def status_and_body(reply: bytes):
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@needs_reference("tokenizers")
def test_serve_refuses_what_it_cannot_frame_or_parse_with_one_answer_each(server):
    """Hostile or careless requests, each one HTTP answer with an OpenAI error body, and the server keeps serving:
    bodies it cannot frame (no or a bad Content-Length: 411; over --max-body: 413 unread; not JSON's Content-Type:
    415), bodies it cannot parse (nested 100k deep, a 5,000-digit integer), values out of range (seed 2**70, too many
    stop strings), malformed messages; a POST to an unknown path does not run the request hidden in its body; a
    malformed request line; error messages quote a bad value cut short."""
    url, model, tok = server("phi3-4k", max_body=1 << 20)
    chat = "/v1/chat/completions"
    hello = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    cases = [
        (post(chat, b"", **{"Content-Length": None}), 411),
        (post(chat, b"", **{"Content-Length": "abc"}), 411),
        (post(chat, b"", **{"Content-Length": str(10**12)}), 413),
        (post(chat, hello, **{"Content-Type": "text/plain"}), 415),
        (post(chat, hello, Host="evil.example:80"), 403),
        (post(chat, b"[" * 100_000 + b"]" * 100_000), 400),
        (post(chat, b'{"n": ' + b"7" * 5000 + b"}"), 400),
        (post(chat, json.dumps({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}).encode()), 400),
        (post(chat, json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["x"] * 17}).encode()), 400),
        (
            post(chat, json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}).encode()),
            400,
        ),
        (
            post(
                chat,
                json.dumps({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"f": 1}]}]}).encode(),
            ),
            400,
        ),
        (post("/v1/completions", json.dumps({"prompt": "hi", "echo": True, "stream": True}).encode()), 400),
    ]
    for data, want in cases:
        status, body = status_and_body(raw(url, data))
        assert status == want and "message" in json.loads(body)["error"], (data[:80], status, body[:200])
    # a POST to an unknown path: 404, and the request in its body is not run as the next one
    smuggled = post(chat, hello)
    reply = raw(url, post("/v1/nothing", smuggled, Connection="keep-alive"))
    assert status_and_body(reply)[0] == 404 and reply.count(b"HTTP/1.1") == 1
    assert raw(url, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage\r\n\r\n").startswith(
        b"HTTP/1"
    )  # a TLS hello
    status, body = status_and_body(
        raw(url, post(chat, json.dumps({"messages": "x" * 500_000, "max_tokens": "y" * 500_000}).encode()))
    )
    assert status == 400 and len(body) < 400
    r = openai_client(url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.usage.completion_tokens == 2  # still serving
    null = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": None, "top_p": None}
    assert status_and_body(raw(url, post(chat, json.dumps(null).encode())))[0] == 200  # null: the defaults


@needs_reference("tokenizers")
def test_serve_api_key_and_cors(server):
    """--api-key: /v1 without `Authorization: Bearer KEY` is 401 (an OpenAI error body, the openai client's
    AuthenticationError), with it 200; /health stays open. --cors ORIGIN: its headers on answers, preflight 204;
    without --cors a preflight is refused."""
    import openai

    url, model, tok = server("phi3-4k", api_key="s3cret", cors="https://app.example")
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as e:
        openai_client(url).chat.completions.create(model="m", messages=msg, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=120)
    assert good.chat.completions.create(model="m", messages=msg, max_tokens=2).usage.completion_tokens == 2
    assert status_and_body(raw(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"))[0] == 200
    preflight = b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example\r\nConnection: close\r\n\r\n"
    reply = raw(url, preflight)
    assert status_and_body(reply)[0] == 204 and b"Access-Control-Allow-Origin: https://app.example" in reply
    plain_url = server("phi3-4k")[0]
    assert status_and_body(raw(plain_url, preflight))[0] == 405


@needs_reference("tokenizers")
def test_serve_stops_generating_for_a_client_that_left_without_reading(server, monkeypatch):
    """A non-streamed request whose client hangs up mid-generation: the generation stops at its next token (not after
    its max_tokens), and the next request is served."""
    import socket

    url, model, tok = server("phi3-4k")
    calls, sample = [], generate.sample
    monkeypatch.setattr(generate, "sample", lambda *a, **kw: calls.append(1) or sample(*a, **kw))
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(post("/v1/chat/completions", body))
        while not calls:  # (no timing: wait until the generation has begun)
            threading.Event().wait(0.01)
    r = openai_client(url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert r.usage.completion_tokens == 3 and len(calls) < 100


# -----------------------------------------------------------------------------------------------------------------
# Continuous batching


@needs_reference("tokenizers")
@pytest.mark.parametrize("step", ["plain", "exported"])
def test_serve_batches_concurrent_requests_and_each_equals_its_answer_alone(step, server, monkeypatch):
    """Requests at once (greedy chat and completions of different lengths, a stop string, n 2) with 3 rows for 7
    sequences: some wait for a row, rows are freed and refilled mid-way, the shared cache moves its rows left when
    full (context 128): every answer equals the same request served alone, and several ran in one batch. So with
    the step compiled ahead of time (serve.py's on an AMD CPU, where a run built it), which runs every decode step
    (on the running rows' views of the cache)."""
    monkeypatch.setattr(quantize, "CPU_KERNELS", True)
    exported = []

    def steps(model):  # the package built once per source (~/.cache/phi/steps); its runner's calls counted
        s = generate.Steps.exported(model)
        runner = s.decode.runner
        s.decode.runner = lambda *a: exported.append(len(a[0])) or runner(*a)  # (a[0]: the rows' tokens)
        return s

    url, model, tok = server("phi3-4k", max_batch=3, **({"steps": steps} if step == "exported" else {}))
    client = openai_client(url)
    asks = [
        ("chat", dict(messages=[{"role": "user", "content": "Name a prime."}], max_tokens=70)),
        ("chat", dict(messages=[{"role": "user", "content": "Say hello in French, then count."}], max_tokens=50, n=2)),
        ("completions", dict(prompt="def fib(n):", max_tokens=90)),
        ("completions", dict(prompt="Once upon a time", max_tokens=30, stop=["e"])),
        ("chat", dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=100)),
        ("completions", dict(prompt=tok.encode("The end", bos=tok.add_bos), max_tokens=80)),
    ]

    def ask(kind, kw):
        if kind == "chat":
            r = client.chat.completions.create(model="m", temperature=0, **kw)
            return [(c.message.content, c.finish_reason) for c in r.choices], r.usage.completion_tokens
        r = client.completions.create(model="m", temperature=0, **kw)
        return [(c.text, c.finish_reason) for c in r.choices], r.usage.completion_tokens

    alone = [ask(*a) for a in asks]
    busiest, next_token = [], serve.Batcher.next_token
    monkeypatch.setattr(
        serve.Batcher,
        "next_token",
        lambda self, r: busiest.append(sum(s is not None for s in self.rows)) or next_token(self, r),
    )
    shifts, shift = [], serve.shift
    monkeypatch.setattr(serve, "shift", lambda c, d: shifts.append(d) or shift(c, d))
    got, start = [None] * len(asks), threading.Barrier(len(asks))

    def run(i):
        start.wait()
        got[i] = ask(*asks[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone
    if step == "exported":
        assert len(exported) > 100 and max(exported) == 3
    assert max(busiest) == 3  # full batches
    assert min(shifts) < 0 < max(shifts)  # rows moved left (the cache full) and right (a longer prompt joined)


@needs_reference("tokenizers")
def test_serve_frees_the_rows_of_clients_that_left_and_keeps_no_threads(server, monkeypatch):
    """50 streaming clients that hang up after their first event: their sequences stop (a step takes a few ms here:
    together they cost far fewer tokens than 100 each), their rows are freed (the batch empties), the server's
    threads go back to what they were, and the next request is served."""
    import http.client

    batchers = []
    real_init = serve.Batcher.__init__
    monkeypatch.setattr(
        serve.Batcher, "__init__", lambda self, *a, **kw: batchers.append(self) or real_init(self, *a, **kw)
    )
    url, model, tok = server("phi3-4k", max_batch=4)
    client = openai_client(url)
    msg = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="m", messages=msg, max_tokens=2)
    threads, calls, sample = threading.active_count(), [], generate.sample
    monkeypatch.setattr(generate, "sample", lambda *a, **kw: calls.append(1) or sample(*a, **kw))  # a token sampled
    batchers[0].steps = generate.Steps(decode=lambda *a: threading.Event().wait(0.002) or generate.decode_one_token(*a))
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    body = json.dumps({"messages": msg, "max_tokens": 100, "temperature": 0, "stream": True})
    for _ in range(50):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.fp.readline()  # the first event, then hang up
        r.close()
        conn.close()
    assert client.chat.completions.create(model="m", messages=msg, max_tokens=3).usage.completion_tokens == 3
    for _ in range(500):  # (no timing: wait until the handlers' threads have seen their clients go)
        if threading.active_count() <= threads and not any(batchers[0].rows):
            break
        threading.Event().wait(0.02)
    assert threading.active_count() <= threads and not any(batchers[0].rows)
    assert len(calls) < 50 * 100 / 4  # the tokens the 50 clients cost: far from 100 each
    gc.collect()  # no memory kept: no sequence left alive, nothing waiting, the cache as large as one request needs
    assert not [x for x in gc.get_objects() if type(x) is serve.Sequence] and batchers[0].waiting.empty()
    assert batchers[0].cache.ids.shape[1] == 128


HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@needs_reference("tokenizers")
def test_serve_caps_open_connections_with_a_503_and_serves_again_once_they_close(server):
    """--max-connections 3: three idle connections hold their threads; a fourth gets an HTTP 503 with an OpenAI
    error body at once; once the three close, requests are served again."""
    import socket

    url, model, tok = server("phi3-4k", max_connections=3)
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(3)]
    status, body = status_and_body(raw(url, HEALTH))
    assert status == 503 and "3 connections" in json.loads(body)["error"]["message"]
    for s in idle:
        s.close()
    for _ in range(500):  # (no timing: until the three threads have seen their clients go)
        if (status := status_and_body(raw(url, HEALTH))[0]) == 200:
            break
        threading.Event().wait(0.02)
    assert status == 200


@needs_reference("tokenizers")
def test_serve_a_failed_batch_is_a_500_and_the_server_keeps_serving(server, monkeypatch):
    """An error inside the batch (here its sampling raises once): the request in it gets an HTTP 500 with an OpenAI
    error body, and the next request is served."""
    import openai

    url, model, tok = server("phi3-4k")
    client, msg = openai_client(url), [{"role": "user", "content": "hi"}]
    fail, sample = [True], generate.sample

    def once(*a, **kw):
        if fail and fail.pop():
            raise RuntimeError("out of memory (a test)")
        return sample(*a, **kw)

    monkeypatch.setattr(generate, "sample", once)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="m", messages=msg, max_tokens=5)
    assert e.value.status_code == 500 and "out of memory (a test)" in e.value.body["message"]
    assert client.chat.completions.create(model="m", messages=msg, max_tokens=5).usage.completion_tokens == 5
