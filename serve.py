"""
An OpenAI-compatible HTTP server for any Phi checkpoint (standard library HTTP server; the model and tokenizer from
generate.py).

    python serve.py --model microsoft/Phi-4-mini-instruct               # http://127.0.0.1:8000/v1
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Requests are queued: one
generation runs at a time (each client gets its own, complete answer; a second waits for the first). A client that
disconnects mid-stream stops its generation. Bad input is HTTP 400 with an OpenAI-style error body.
Phi-4-mini tool calls: `tools` go into the system turn as its chat template puts them
(<|system|>...<|tool|>[...]<|/tool|><|end|>); the model's <|tool_call|>[...]<|/tool_call|> comes back as OpenAI
`tool_calls`, and `role: "tool"` messages are rendered back for the next turn.
"""

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import generate


class BadRequest(ValueError):
    """A request we cannot serve: HTTP 400, {"error": {"message", "type": "invalid_request_error", "param"}}."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


# -----------------------------------------------------------------------------------------------------------------
# Requests: checked field by field (OpenAI's types and ranges), then turned into a prompt and sampling settings

FIELDS = {  # name -> (types, check, what it must be)
    "max_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "temperature": ((int, float), lambda v: 0 <= v <= 2, "a number in [0, 2]"),
    "top_p": ((int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "n": (int, lambda v: 1 <= v <= 16, "an integer in [1, 16]"),
    "seed": (int, lambda v: True, "an integer"),
    "stream": (bool, lambda v: True, "true or false"),
    "stop": ((str, list), lambda v: isinstance(v, str) or all(isinstance(s, str) for s in v), "a string or strings"),
    "tools": (list, lambda v: all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in v), "tools"),
    "tool_choice": ((str, dict), lambda v: True, '"none", "auto", "required" or a function'),
}


def checked(body: dict) -> dict:
    """The body, once every known field is of its type and in its range (null counts as absent)."""
    for name, (types, ok, what) in FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        a_bool_for_a_number = isinstance(value, bool) and types is not bool  # (True is an int to isinstance)
        if a_bool_for_a_number or not isinstance(value, types) or not ok(value):
            raise BadRequest(f"'{name}' must be {what}, got {json.dumps(value)}", name)
    return body


def chat_messages(body: dict) -> list:
    """OpenAI messages -> the {"role", "content"} list the family's template renders. Phi-4-mini: tools in the
    system turn, an assistant's tool_calls as <|tool_call|>[...]<|/tool_call|>, tool results as role "tool"."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}] must have a role of system, user, assistant or tool", "messages")
        content = m.get("content") or ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
        if m.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": json.loads(c["function"].get("arguments") or "{}")}
                for c in m["tool_calls"]
            ]
            content += f"<|tool_call|>{json.dumps(calls)}<|/tool_call|>"
        out.append({"role": m["role"], "content": content})
    tools = body.get("tools")
    if tools and body.get("tool_choice") != "none":
        if out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": ""})
        out[0]["tools"] = json.dumps([t["function"] for t in tools])
    return out


def parse_tool_calls(text: str):
    """(content, tool_calls) of a reply: <|tool_call|>[{"name", "arguments"}, ...]<|/tool_call|> becomes OpenAI
    tool_calls; text that does not parse stays content (the model's mistake is the client's to see, not a crash)."""
    start, end = text.find("<|tool_call|>"), text.find("<|/tool_call|>")
    if start < 0:
        return text, None
    try:
        calls = json.loads(text[start + len("<|tool_call|>") : end if end >= 0 else len(text)])
        calls = calls if isinstance(calls, list) else [calls]
        tool_calls = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", c.get("parameters", {})))},
            }
            for c in calls
        ]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return text, None
    return text[:start] or None, tool_calls


# -----------------------------------------------------------------------------------------------------------------
# The server


class Server:
    """The model, its tokenizer, and the request being served: request_id and usage belong to the one request that
    holds the lock (requests are served one at a time)."""

    def __init__(self, model, tok, name, steps=None):
        self.model, self.tok, self.name = model, tok, name
        self.steps = steps or generate.Steps()  # generate.Steps.compiled(device) with --compile
        self.lock = threading.Lock()  # one generation at a time: concurrent requests queue here
        self.chat_eos = generate.end_of_turn_ids(model, tok)

    def prompt_ids(self, text):
        ids = self.tok.encode(text, bos=self.tok.add_bos)
        context = self.model.config.max_position_embeddings
        if len(ids) >= context:
            raise BadRequest(f"the prompt is {len(ids)} tokens; this model's context is {context}", "messages")
        return ids

    def choices(self, body, ids, chat):
        """Yields (index, text piece, finish_reason or None) as tokens come, for each of the n choices. A chat
        reply's text is the decode of its own tokens; a completion's continues the prompt's text."""
        stops = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []
        context = self.model.config.max_position_embeddings
        max_tokens = min(body.get("max_tokens") or context, context - len(ids))
        generator = torch.Generator(self.model.embed.weight.device)
        generator.manual_seed(body["seed"] if body.get("seed") is not None else int(time.time() * 1e6))
        sampling = generate.Sampling(body.get("temperature", 1.0), top_p=body.get("top_p") or 1.0, generator=generator)
        eos = self.chat_eos if chat else self.model.eos_ids
        for index in range(body.get("n") or 1):
            tokens = generate.generate(self.model, ids, max_tokens, eos_ids=eos, sampling=sampling, steps=self.steps)
            stream = generate.TextStream(self.tok, tokens, stops, context=() if chat else ids)
            for piece in stream:
                yield index, piece, None
            yield index, "", "stop" if stream.stopped or len(stream.ids) < max_tokens else "length"
            self.usage["completion_tokens"] += len(stream.ids)

    def complete(self, body, chat):
        """The whole response object (stream=False)."""
        ids = self.prompt(body, chat)
        texts, finish = {}, {}
        for index, piece, reason in self.choices(body, ids, chat):
            texts[index] = texts.get(index, "") + piece
            finish[index] = reason or finish.get(index)
        out = []
        for i in sorted(texts):
            if chat:
                content, calls = parse_tool_calls(texts[i]) if body.get("tools") else (texts[i], None)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                out.append({"index": i, "message": message, "finish_reason": "tool_calls" if calls else finish[i]})
            else:
                out.append({"index": i, "text": texts[i], "finish_reason": finish[i], "logprobs": None})
        return self.envelope(chat, choices=out, usage=self.totals())

    def prompt(self, body, chat):
        if chat:
            text = self.tok.render_chat(chat_messages(body))
        else:
            text = body.get("prompt")
            if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
                text = text[0]
            if not isinstance(text, str):
                raise BadRequest("'prompt' must be a string", "prompt")
        ids = self.prompt_ids(text)
        self.usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
        return ids

    def totals(self):
        return {**self.usage, "total_tokens": self.usage["prompt_tokens"] + self.usage["completion_tokens"]}

    def envelope(self, chat, **fields):
        kind = "chat.completion" if chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": int(time.time()), "model": self.name, **fields}


class Handler(BaseHTTPRequestHandler):
    """One HTTP request (a thread each: ThreadingHTTPServer); self.server.app is the Server that answers it."""

    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # one line per request on stderr, without the default's date noise
        print(f"serve.py: {self.command} {self.path} {args[1] if len(args) > 1 else ''}", file=sys.stderr)

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self.send_json(200, {"status": "ok"})
        if self.path == "/v1/models":
            model = {"id": self.server.app.name, "object": "model", "created": 0, "owned_by": "phi"}
            return self.send_json(200, {"object": "list", "data": [model]})
        self.send_json(404, error(f"no route {self.path}", "not_found_error"))

    def do_POST(self):
        chat, app = self.path == "/v1/chat/completions", self.server.app
        if not chat and self.path != "/v1/completions":
            return self.send_json(404, error(f"no route {self.path}", "not_found_error"))
        try:
            body = checked(self.read_body())
            with app.lock:
                app.request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
                if body.get("stream"):
                    return self.stream(body, chat)
                self.send_json(200, app.complete(body, chat))
        except BadRequest as e:
            self.send_json(400, error(str(e), "invalid_request_error", e.param))

    def read_body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def stream(self, body, chat):
        """Server-sent events: one chunk per piece of text, a last one per choice with its finish_reason, then
        data: [DONE]. A client gone mid-stream (broken pipe) ends the generation."""
        app = self.server.app
        ids = app.prompt(body, chat)  # a bad prompt is still a 400, before any event
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for index, piece, reason in app.choices(body, ids, chat):
                if chat:
                    choice = {"index": index, "delta": {"content": piece} if piece else {}, "finish_reason": reason}
                else:
                    choice = {"index": index, "text": piece, "finish_reason": reason, "logprobs": None}
                chunk = app.envelope(chat, choices=[choice])
                if chat:
                    chunk["object"] = "chat.completion.chunk"
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            print("serve.py: the client went away: generation stopped", file=sys.stderr)


def error(message, kind, param=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def serve(model, tok, name, host="127.0.0.1", port=8000, steps=None) -> ThreadingHTTPServer:
    """An HTTP server for (model, tok), not yet started: call serve_forever() (port 0: a free port,
    server.server_address tells which). steps: generate.Steps.compiled(device) for the compiled decode step."""
    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.app = Server(model, tok, name, steps)
    return httpd


def main(argv=None):
    p = argparse.ArgumentParser(description="An OpenAI-compatible server for a Phi checkpoint.")
    p.add_argument("--model", default="microsoft/Phi-4-mini-instruct", help="Hub id or local directory")
    p.add_argument("--adapter", help="a PEFT LoRA adapter merged into the weights at load")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    p.add_argument("--quantize", choices=["int8", "int4"])
    args = p.parse_args(argv)
    try:
        model, tok = generate.load(args.model, args.dtype, args.device, quantize=args.quantize, adapter=args.adapter)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 1
    steps = generate.Steps.compiled(model.embed.weight.device) if args.compile else None
    httpd = serve(model, tok, args.model, args.host, args.port, steps)
    print(f"serve.py: {args.model} on http://{args.host}:{httpd.server_address[1]}/v1", file=sys.stderr)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
