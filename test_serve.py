"""serve.py: the OpenAI-compatible server, tested with the official openai client."""

import json
import re
import subprocess
import sys
import threading

import pytest
import torch
import transformers

import generate
import serve
from conftest import GEN_CASES, PROMPT, ROOT, TOK, continuation, needs_reference, python_env, run_cli, snapshot

CHAT_ARGS = ("--max-new-tokens", 20, "--temperature", 0, "--dtype", "float32")


@pytest.fixture
def server(hub):
    """serve.py on a free loopback port, in a thread of this process, for a checkpoint of the hub fixture:
    yields (base_url, model, tok, start) where start(name) (re)starts it on another checkpoint."""

    running = []

    def start(name):
        model, tok = generate.load(snapshot(hub[0], name), dtype="float32")
        httpd = serve.serve(model, tok, f"test/{name}", port=0)
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
    back as OpenAI tool_calls (finish_reason "tool_calls"); malformed JSON in it comes back as content."""
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
    real_generate = generate.generate
    monkeypatch.setattr(
        generate, "generate", lambda m, ids, *a, **kw: prompts.append(list(ids)) or real_generate(m, ids, *a, **kw)
    )
    monkeypatch.setattr(generate, "sample", lambda logits, *a, **kw: torch.full(logits.shape[:1], reply.pop(0)))
    for text, calls in [
        ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Rome"}}]<|/tool_call|>', True),
        ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": Rome}]<|/tool_call|>', False),
    ]:
        reply[:] = tok.encode(text) + [end]
        r = client.chat.completions.create(
            model="m", messages=messages, tools=[{"type": "function", "function": fn}], max_tokens=40
        )
        assert prompts[-1] == tok.encode(want_prompt)
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
def test_serve_n_choices_and_seed_and_the_program(server, hub):
    """n=2 at temperature 1 gives two different choices, and a seed reproduces them; serve.py as a program listens on
    127.0.0.1 by default (port 0: a free one, printed) and answers /health."""
    url, model, tok = server("phi3-4k")
    client = openai_client(url)
    msg = [{"role": "user", "content": "Tell me a story."}]

    def texts(seed):
        r = client.chat.completions.create(model="m", messages=msg, max_tokens=12, temperature=1, n=2, seed=seed)
        return [c.message.content for c in r.choices]

    a = texts(3)
    assert a[0] != a[1] and texts(3) == a and texts(4) != a
    env = python_env(HF_HOME=hub[0], HF_HUB_OFFLINE=1)
    cmd = [sys.executable, str(ROOT / "serve.py"), "--model", "test/phi3-4k", "--port", "0", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        m = re.fullmatch(r"serve.py: test/phi3-4k on http://127\.0\.0\.1:(\d+)/v1\n", line)
        assert m, line
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{m[1]}/health", timeout=30) as r:
            assert json.loads(r.read()) == {"status": "ok"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
