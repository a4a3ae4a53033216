"""
An OpenAI-compatible HTTP server for any Phi checkpoint (standard library HTTP server; the model and tokenizer from
generate.py).

    python serve.py --model microsoft/Phi-4-mini-instruct               # http://127.0.0.1:8000/v1
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Endpoints: POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, GET /v1/models, GET /v1/models/{id},
GET /health.
Requests are checked and tokenized as they come, then join one batch (continuous batching: every decode step runs
all of them; --max-batch sequences at once, more wait). A client that disconnects stops its generation and frees its
row. Bad input is an HTTP 4xx with an OpenAI-style error body, and the server keeps serving.
Completions as evaluation harnesses call them: a prompt is a string, token ids, or a batch of either; `echo` and
`logprobs` (tokens, token_logprobs, top_logprobs, text_offset) score a prompt. Chat: `logprobs`, `top_logprobs`.
Log-probabilities are the model's own distribution (before temperature and top-p), streamed too (not echo).
Phi-4-mini tool calls: `tools` go into the system turn as its chat template puts them
(<|system|>...<|tool|>[...]<|/tool|><|end|>); the model's <|tool_call|>[...]<|/tool_call|> comes back as OpenAI
`tool_calls` (streamed: as tool_calls deltas), and `role: "tool"` messages are rendered back for the next turn.
Limits: --api-key (Bearer), --max-body (larger bodies: 413, unread), --cors ORIGIN (else no cross-origin preflight);
on loopback the Host header must name this machine (DNS rebinding); a socket that waits over 15 s times out.
"""

import argparse
import base64
import copy
import queue
import hmac
import json
import os
import select
import socket
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import generate
import phi
import quantize
import tp as tensor_parallel


class BadRequest(ValueError):
    """A request we cannot serve: an HTTP error (400 unless said), {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message, param=None, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


# -----------------------------------------------------------------------------------------------------------------
# Requests: checked field by field (OpenAI's types and ranges), then turned into prompts and sampling settings

MAX_STOPS, MAX_STOP_CHARS = 16, 256  # stop strings are checked at every token: a request gets this many at most
MAX_PROMPTS = 128  # a completions request's batch of prompts

FIELDS = {  # name -> (types, check, what it must be)
    "max_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "max_completion_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "temperature": ((int, float), lambda v: 0 <= v <= 2, "a number in [0, 2]"),
    "top_p": ((int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "n": (int, lambda v: 1 <= v <= 16, "an integer in [1, 16]"),
    "seed": (int, lambda v: -(2**63) <= v < 2**64, "an integer in [-2**63, 2**64)"),
    "stream": (bool, lambda v: True, "true or false"),
    "stream_options": (dict, lambda v: isinstance(v.get("include_usage", False), bool), '{"include_usage": bool}'),
    "stop": (
        (str, list),
        lambda v: isinstance(v, str) or (len(v) <= MAX_STOPS and all(isinstance(s, str) for s in v)),
        f"a string or up to {MAX_STOPS} strings",
    ),
    "echo": (bool, lambda v: True, "true or false"),
    "top_logprobs": (int, lambda v: 0 <= v <= 20, "an integer in [0, 20]"),
    "tools": (list, lambda v: all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in v), "tools"),
    "tool_choice": ((str, dict), lambda v: True, '"none", "auto", "required" or a function'),
}
EMBEDDING_FIELDS = {  # /v1/embeddings' fields besides input (name -> (check, what it must be))
    "encoding_format": (lambda v: v in ("float", "base64"), '"float" or "base64"'),
    "pooling": (lambda v: v in ("last", "mean"), '"last" or "mean"'),
    "dimensions": (lambda v: False, "absent: this model's vectors are not shortened"),
}
LOGPROBS = {  # "logprobs" is a flag in chat, the number of alternatives to list in completions
    True: (bool, lambda v: True, "true or false"),
    False: (int, lambda v: 0 <= v <= 5, "an integer in [0, 5]"),
}


def checked(body: dict, chat: bool) -> dict:
    """The body, once every known field is of its type and in its range (null counts as absent)."""
    for name, (types, ok, what) in {**FIELDS, "logprobs": LOGPROBS[chat]}.items():
        value = body.get(name)
        if value is None:
            continue
        a_bool_for_a_number = isinstance(value, bool) and types is not bool  # (True is an int to isinstance)
        if a_bool_for_a_number or not isinstance(value, types) or not ok(value):
            raise BadRequest(f"'{name}' must be {what}, got {shown(value)}", name)
    stops = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"a stop string is at most {MAX_STOP_CHARS} characters", "stop")
    if body.get("stream") and body.get("echo"):
        raise BadRequest("echo is not served with stream: ask without stream", "echo")
    return body


def shown(value, limit=80) -> str:
    """A request's value as an error message quotes it: as JSON, cut to `limit` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


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
            texts = [part.get("text", "") for part in content if isinstance(part, dict)]
            if not all(isinstance(t, str) for t in texts):
                raise BadRequest(f"messages[{i}].content: a part's text must be a string", "messages")
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
        if m.get("tool_calls"):
            content += f"<|tool_call|>{json.dumps(tool_calls_of(m['tool_calls'], i))}<|/tool_call|>"
        out.append({"role": m["role"], "content": content})
    tools = body.get("tools")
    if tools and body.get("tool_choice") != "none":
        if out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": ""})
        out[0]["tools"] = json.dumps([t["function"] for t in tools])
    return out


def tool_calls_of(calls, i) -> list:
    """An assistant message's OpenAI tool_calls as the model writes them: [{"name", "arguments": {...}}]."""
    try:
        return [
            {"name": c["function"]["name"], "arguments": json.loads(c["function"].get("arguments") or "{}")}
            for c in calls
        ]
    except (KeyError, TypeError, AttributeError, ValueError):
        raise BadRequest(
            f'messages[{i}].tool_calls must be [{{"function": {{"name", "arguments": a JSON string}}}}]', "messages"
        ) from None


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
                "function": {
                    "name": c["name"],
                    "arguments": arguments_json(c.get("arguments", c.get("parameters", {}))),
                },
            }
            for c in calls
        ]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return text, None
    return text[:start] or None, tool_calls


def arguments_json(arguments) -> str:
    """OpenAI's function.arguments, a JSON string: the model's object encoded, or the string it wrote as it is."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


# -----------------------------------------------------------------------------------------------------------------
# Continuous batching: one thread owns the model; every decode step runs all active sequences as one batch


@dataclass
class Sequence:
    """One choice being generated: its prompt, how it samples and stops; its tokens go to `out` as they come (None
    ends them). cancelled: set by its client's thread (a stop string, a client gone): its row is freed at once."""

    ids: list
    max_tokens: int
    eos: set
    sampling: generate.Sampling
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    top: int | None = None  # log-probabilities asked for: the number of alternatives (None: none asked)
    logprobs: list = field(default_factory=list)  # per token handed out: (its logprob, [(id, logprob)] likeliest)
    produced: int = 0
    failed: str | None = None  # the batch's error, if one ended it

    def tokens(self):
        """The tokens as they come (for generate.TextStream); cancels the sequence if the reader stops early."""
        try:
            while (token := self.out.get()) is not None:
                yield token
        finally:
            self.cancelled.set()


class Batcher:
    """Continuous batching over one KVCache of max_batch rows, the running sequences in its first rows. New sequences
    are prefilled (those that arrived together in one left-padded batch: generate.prefill) and placed in the next rows
    between steps, each prompt in the slots just before the shared fill level (all rows move right when it is longer
    than that); each step decodes one token
    for the running rows only (generate.decode_one_token on views of them; compiled with --compile) and samples each
    with its own settings. A sequence that ends (EOS, max_tokens, cancelled) gives its row to the last one at once;
    when the cache is full its rows move left past the slots no running row uses, and it grows (up to the context)
    when that is not enough. Positions come from each row's own tokens: a sequence computes what it computes alone.
    Everything that touches the model or the cache is an effect (see effect()): under tensor parallelism (tp.py)
    rank 0 decides and sends each effect to the other ranks, whose replicas (follow()) run it too."""

    def __init__(self, model, steps, max_batch=8, tp=False):
        # a LongRoPE model switches to its long factors for the whole batch at once (PhiModel.rerun_long): it decodes
        # one sequence at a time, so that each switches when it crosses the original context itself, as alone
        self.model, self.steps, self.max_batch = model, steps, 1 if model.rotary.scaled else max_batch
        self.waiting, self.rows = queue.Queue(), []  # rows[r]: the Sequence in the cache's row r
        self.cache, self.logits = None, None  # logits (max_batch, V): each running row's next-token logits
        self.admitting, self.tp = [], tp
        self.lock = threading.Lock()  # the model runs one thing at a time: a step, a prefill, a scoring pass
        if not (tp and torch.distributed.get_rank()):  # (another rank follows rank 0: follow())
            threading.Thread(target=self.run, daemon=True, name="batcher").start()

    def effect(self, name, *args, **local):
        """Run the effect self.name(*args, **local) on the model or the cache, one at a time (the lock). With tensor
        parallelism, rank 0 first sends (name, args) to the other ranks (local: what only rank 0 has)."""
        with self.lock:
            if self.tp:
                torch.distributed.broadcast_object_list([(name, args)], src=0)
            return getattr(self, name)(*args, **local)

    @torch.no_grad()
    def follow(self):
        """Another rank of a tensor-parallel server: run rank 0's effects as they come, for ever."""
        while True:
            message = [None]
            torch.distributed.broadcast_object_list(message, src=0)
            name, args = message[0]
            try:
                getattr(self, name)(*args)
            except Exception as e:  # noqa: BLE001 (rank 0 failed too, and resets: so does this replica)
                print(f"serve.py: rank {torch.distributed.get_rank()}: {name} failed: {e!r}", file=sys.stderr)

    def submit(self, seq: Sequence):
        self.waiting.put(seq)

    def run(self):
        """Steps for ever. An error ends every running and waiting sequence with it (their clients get an HTTP 500)
        and the batch starts over: the server keeps serving."""
        while True:
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 (whatever it was, no client may wait for ever)
                print(f"serve.py: the batch failed: {e!r}", file=sys.stderr)
                ended = self.rows + self.admitting + [self.waiting.get() for _ in range(self.waiting.qsize())]
                for seq in ended:
                    seq.failed = repr(e)
                    seq.out.put(None)
                self.effect("reset")

    def reset(self):
        self.rows, self.cache = [], None

    @torch.no_grad()
    def prompt_logits(self, prompt: list):
        """The logits (T - 1, V) of one prompt's tokens after the first (a scoring pass, beside the batch)."""
        return self.model(torch.tensor([prompt], device=self.model.embed.weight.device))[0, :-1]

    def embed(self, inputs: list, pooling):
        """generate.embed of token-id lists (a pass beside the batch)."""
        return generate.embed(self.model, None, inputs, pooling)

    def idle(self):
        """Nothing to do (rank 0 says so now and then: the other ranks' collectives would time out)."""

    @torch.no_grad()
    def step(self):
        """Admit waiting sequences, sample each running row's next token, run one decode step for those that go on."""
        self.admit(wait=not self.rows)
        if not self.rows:
            return self.effect("idle") if self.tp else None
        tokens = torch.zeros(len(self.rows), dtype=torch.long, device=self.cache.ids.device)
        for r in reversed(range(len(self.rows))):  # (from the last: a freed row takes the last one's place)
            token = self.next_token(r)
            if token < 0:
                self.effect("free", r, tokens=tokens)
            else:
                tokens[r] = token
        if self.rows:
            self.effect("decode", tokens[: len(self.rows)].tolist())

    def decode(self, tokens: list):
        """One decode step for the running rows, whose next tokens these are (their logits in self.logits)."""
        self.make_room(1)
        n, c = len(self.rows), self.cache
        running = running_rows(c, n)
        step = self.steps.decode if generate.compiled_step_ok(self.model, running) else generate.decode_one_token
        self.logits[:n] = step(self.model, torch.tensor(tokens, device=c.ids.device), running)  # (n, V)
        c.long = running.long

    def next_token(self, r) -> int:
        """Sample row r's next token and hand it out; -1 when its sequence has ended."""
        seq = self.rows[r]
        token = -1 if seq.cancelled.is_set() else int(generate.sample(self.logits[r : r + 1], None, seq.sampling)[0])
        seq.produced += 1
        if token >= 0 and token not in seq.eos:
            if seq.top is not None:  # (before the token is handed out: its reader finds them there)
                seq.logprobs.append(token_logprobs(self.logits[r], token, seq.top))
            seq.out.put(token)
        if token < 0 or token in seq.eos or seq.produced >= seq.max_tokens:
            seq.out.put(None)
            return -1
        return token

    def free(self, r, tokens=None):
        """Row r's sequence has ended: the last row moves into it (its cache slots, logits and next token)."""
        last, c = len(self.rows) - 1, self.cache
        if r != last:
            for t in c.k + c.v + [c.valid, c.pos, c.ids]:
                t[r] = t[last]
            self.logits[r], self.rows[r] = self.logits[last], self.rows[last]
            if tokens is not None:
                tokens[r] = tokens[last]
        self.rows.pop()

    def admit(self, wait):
        """Place the waiting sequences in free rows, their prompts prefilled together (blocking for one while
        nothing runs)."""
        new = self.admitting = []  # (being prefilled: if that fails, run() ends them too)
        while len(self.rows) + len(new) < self.max_batch:
            try:  # (tensor parallel: rank 0 says it is idle every minute, see idle())
                seq = self.waiting.get(block=wait and not new, timeout=60 if self.tp else None)
            except queue.Empty:
                break
            if seq.cancelled.is_set():
                seq.out.put(None)
                continue
            new.append(seq)
        if new:
            self.effect("prefill", [seq.ids for seq in new], seqs=new)
        self.admitting = []

    def prefill(self, prompts: list, seqs=None):
        """Prefill the prompts (token-id lists) together, left-padded (each row computes what it computes alone),
        and place each in the next row; seqs: their Sequences (another rank of a tensor-parallel server has none)."""
        dev, dtype = self.model.embed.weight.device, quantize.cache_dtype(self.model)
        ids, mask = generate.left_padded(prompts, dev)
        cache = phi.KVCache(self.model.config, len(prompts), ids.shape[1], dtype, dev)
        logits = generate.prefill(self.model, ids, mask if (mask == 0).any() else None, cache)  # (n, V)
        for i, p in enumerate(prompts):
            self.place(seqs[i] if seqs else Sequence(p, 0, set(), None), cache, i, logits[i])

    def place(self, seq, prompts, i, logits):
        """Put the sequence whose prompt is row i of the prefilled cache `prompts` (its last len(ids) slots) in the
        next row."""
        cfg, P, r, T = self.model.config, len(seq.ids), len(self.rows), prompts.ids.shape[1]
        dev, dtype = self.model.embed.weight.device, quantize.cache_dtype(self.model)
        if self.cache is None:
            self.cache = phi.KVCache(cfg, self.max_batch, min(cfg.max_position_embeddings, 128), dtype, dev)
            self.cache.padded, self.logits = True, logits.new_zeros(self.max_batch, logits.shape[-1])
        if not self.rows:  # nothing running: the cache starts over
            self.cache.slot.zero_()
            self.cache.long = False
        self.make_room(max(0, P - int(self.cache.slot)), at_least=P)
        c, S = self.cache, int(self.cache.slot)
        if P > S:  # every row moves right: the new prompt ends at the fill level too
            shift(c, P - S)
            S = P
        for layer in range(cfg.num_hidden_layers):
            c.k[layer][r, :, S - P : S], c.v[layer][r, :, S - P : S] = (
                prompts.k[layer][i, :, T - P :],
                prompts.v[layer][i, :, T - P :],
            )
        c.valid[r], c.ids[r, S - P : S], c.pos[r, S - P : S] = False, prompts.ids[i, T - P :], prompts.pos[i, T - P :]
        c.valid[r, S - P : S] = True
        self.logits[r] = logits
        self.rows.append(seq)

    def make_room(self, more, at_least=0):
        """Room for `more` slots past the fill level (and a cache of at least `at_least` slots): move the rows left
        past the slots no running row uses; grow the cache when that is not enough."""
        c = self.cache
        need = int(c.slot) + more
        if need <= c.ids.shape[1] and at_least <= c.ids.shape[1]:
            return
        used = c.valid[: len(self.rows)].any(0).nonzero()
        free = int(used[0]) if len(used) else int(c.slot)  # slots before the first one in use
        shift(c, -free)
        need -= free
        if need > c.ids.shape[1] or at_least > c.ids.shape[1]:
            self.cache = grown(c, self.model.config, max(need, at_least))


def token_logprobs(logits, token, k):
    """(token's log-probability, [(id, logprob)] of the k likeliest) in the distribution of one position's logits."""
    logprobs = logits.float().log_softmax(-1)
    top = logprobs.topk(k) if k else None
    return logprobs[token].item(), [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))


def running_rows(c: phi.KVCache, n) -> phi.KVCache:
    """The cache's first n rows as a KVCache of views: a step on it writes into c."""
    view = copy.copy(c)
    view.k, view.v = [t[:n] for t in c.k], [t[:n] for t in c.v]
    view.valid, view.pos, view.ids = c.valid[:n], c.pos[:n], c.ids[:n]
    return view


def shift(c: phi.KVCache, d: int):
    """Move every row's slots d places right (d > 0) or left (d < 0), in place; the slots moved in hold nothing."""
    for t in c.k + c.v:  # (B, KV, L, hd)
        t.copy_(t.roll(d, 2))
    for t in (c.valid, c.pos, c.ids):  # (B, L)
        t.copy_(t.roll(d, 1))
    (c.valid[:, :d] if d > 0 else c.valid[:, d:]).fill_(False)
    c.slot += d


def grown(c: phi.KVCache, cfg, need) -> phi.KVCache:
    """A larger cache (double, up to the context) holding c's slots."""
    L = c.ids.shape[1]
    size = min(cfg.max_position_embeddings, max(need, 2 * L))
    new = phi.KVCache(cfg, c.ids.shape[0], size, c.k[0].dtype, c.k[0].device)
    for a, b in zip(new.k + new.v, c.k + c.v):
        a[:, :, :L] = b
    new.valid[:, :L], new.pos[:, :L], new.ids[:, :L] = c.valid, c.pos, c.ids
    new.slot.fill_(int(c.slot))
    new.padded, new.long = True, c.long
    return new


# -----------------------------------------------------------------------------------------------------------------
# The server


@dataclass
class Request:
    """One request, checked and tokenized before it waits for the model."""

    body: dict
    chat: bool
    prompts: list  # token ids of each prompt (a chat: one; a completions batch: several)
    id: str
    usage: dict = field(default_factory=dict)


class Server:
    """The model and its tokenizer. Each request is checked and tokenized in its client's thread, then its choices
    join the Batcher's batch; its thread turns their tokens into text and writes them to its client."""

    def __init__(self, model, tok, name, steps=None, api_key=None, cors=None, max_body=4 << 20, max_batch=8, tp=False):
        self.model, self.tok, self.name = model, tok, name
        self.batcher = Batcher(model, steps or generate.Steps(), max_batch, tp)  # (main: generate.command_line_steps)
        self.chat_eos = generate.end_of_turn_ids(model, tok)
        self.api_key, self.cors, self.max_body = api_key, cors, max_body

    def request(self, body, chat) -> Request:
        """A Request of a parsed body: its fields checked, its prompts tokenized and within the context."""
        checked(body, chat)
        prompts = [self.checked_ids(ids, "messages" if chat else "prompt") for ids in self.prompt_ids(body, chat)]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        return Request(body, chat, prompts, rid, {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0})

    def prompt_ids(self, body, chat) -> list:
        """Each prompt's token ids. A completion's prompt is a string, a list of strings, a list of token ids, or a
        list of token-id lists (a batch, as evaluation harnesses send: one choice each, n with n)."""
        if chat:
            return [self.tok.encode(self.tok.render_chat(chat_messages(body)), bos=self.tok.add_bos)]
        return self.texts_ids(body.get("prompt"), "prompt")

    def texts_ids(self, p, param) -> list:
        """A string, a list of token ids, or a list of either (a batch) -> each one's token ids."""
        batch = [p] if isinstance(p, str) or (isinstance(p, list) and p and all(map(is_int, p))) else p
        if not isinstance(batch, list) or not 0 < len(batch) <= MAX_PROMPTS:
            raise BadRequest(
                f"'{param}' must be a string, a list of token ids, or a list of up to {MAX_PROMPTS} of either", param
            )
        if not all(isinstance(x, str) or (isinstance(x, list) and all(map(is_int, x))) for x in batch):
            raise BadRequest(f"'{param}' must be a string, a list of token ids, or a list of either", param)
        return [self.tok.encode(x, bos=self.tok.add_bos) if isinstance(x, str) else x for x in batch]

    def checked_ids(self, ids, param, room=1):
        """ids, once they are token ids of this model that leave `room` tokens in its context (a BadRequest else)."""
        context, vocab = self.model.config.max_position_embeddings, self.model.config.vocab_size
        if not ids:
            raise BadRequest(f"a '{param}' is empty", param)
        if not all(0 <= i < vocab for i in ids):
            raise BadRequest(f"a '{param}''s token ids must be in [0, {vocab})", param)
        if len(ids) > context - room:
            raise BadRequest(f"a '{param}' is {len(ids)} tokens; this model's context is {context}", param)
        return ids

    def embeddings(self, body) -> dict:
        """POST /v1/embeddings: one vector per input (generate.embed: the last hidden states, pooled "last" or, with
        our "pooling" field, "mean"), as OpenAI shapes them; float lists, or base64 of little-endian float32."""
        for name, (ok, what) in EMBEDDING_FIELDS.items():
            if body.get(name) is not None and not ok(body[name]):
                raise BadRequest(f"'{name}' must be {what}, got {shown(body[name])}", name)
        inputs = [self.checked_ids(ids, "input", room=0) for ids in self.texts_ids(body.get("input"), "input")]
        vectors = self.batcher.effect("embed", inputs, body.get("pooling") or "last")
        base64_ = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v.tolist())).decode()
                if base64_
                else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        n = sum(map(len, inputs))
        return {"object": "list", "data": data, "model": self.name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    def choices(self, r: Request, alive=lambda: True):
        """Yields (index, text piece, finish_reason or None, the choice's tokens so far, their log-probabilities if
        asked) as tokens come: for each prompt, n choices (index = prompt * n + j), all generated at once in the
        batch, handed out in order. A chat reply's text is the decode of its own tokens; a completion's continues its
        prompt's text. alive(): False once the client has gone (its choices stop)."""
        body, context = r.body, self.model.config.max_position_embeddings
        stops = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or context
        eos, n, seqs = self.chat_eos if r.chat else self.model.eos_ids, body.get("n") or 1, []
        seed = body["seed"] if body.get("seed") is not None else int.from_bytes(os.urandom(8))
        top = ((body.get("top_logprobs") or 0) if body.get("logprobs") else None) if r.chat else body.get("logprobs")
        for p, ids in enumerate(r.prompts):
            for index in range(p * n, p * n + n):
                generator = torch.Generator(self.model.embed.weight.device).manual_seed((seed + index) % 2**64)
                temperature = 1.0 if body.get("temperature") is None else body["temperature"]  # (null: absent)
                top_p = body.get("top_p") or 1.0
                sampling = generate.Sampling(temperature, top_p=top_p, generator=generator)
                seqs.append((index, Sequence(ids, min(limit, context - len(ids)), eos, sampling, top=top)))
                self.batcher.submit(seqs[-1][1])
        try:
            for index, seq in seqs:
                stream = generate.TextStream(self.tok, seq.tokens(), stops, context=() if r.chat else seq.ids)
                for piece in stream:
                    if not alive():
                        raise ClientGone
                    yield index, piece, None, stream.ids, seq.logprobs
                seq.cancelled.set()  # (a stop string ends it here)
                if seq.failed:
                    raise ServerError(f"the generation failed: {seq.failed}")
                reason = "stop" if stream.stopped or len(stream.ids) < seq.max_tokens else "length"
                yield index, "", reason, stream.ids, seq.logprobs
                r.usage["completion_tokens"] += len(stream.ids)
        finally:  # the client gone, or an error: every choice of the request stops
            for _, seq in seqs:
                seq.cancelled.set()

    def complete(self, r: Request, alive=lambda: True):
        """The whole response object (stream=False)."""
        texts, finish, ids, scores = {}, {}, {}, {}
        for index, piece, reason, tokens, logprobs in self.choices(r, alive):
            texts[index] = texts.get(index, "") + piece
            finish[index], ids[index], scores[index] = reason or finish.get(index), tokens, logprobs
        out, n = [], r.body.get("n") or 1
        for i in sorted(texts):
            prompt = r.prompts[i // n]
            if r.chat:
                tools = r.body.get("tools") and r.body.get("tool_choice") != "none"  # ("none": no tools, no calls)
                content, calls = parse_tool_calls(texts[i]) if tools else (texts[i], None)
                message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
                logprobs = {"content": self.chat_logprobs(ids[i], scores[i])} if r.body.get("logprobs") else None
                reason = "tool_calls" if calls else finish[i]
                out.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
            else:
                echo = r.body.get("echo")
                text = (self.tok.decode(prompt) if echo else "") + texts[i]
                k = r.body.get("logprobs")
                logprobs = None if k is None else self.completion_logprobs(prompt, ids[i], scores[i], k, echo)
                out.append({"index": i, "text": text, "finish_reason": finish[i], "logprobs": logprobs})
        return self.envelope(r, choices=out, usage=totals(r.usage))

    # Log-probabilities: the model's own distribution (log-softmax of its logits, before temperature and top-p). A
    # generated token's come from the batch's step that chose it (Sequence.logprobs); an echoed prompt's from one
    # forward pass over it

    @torch.no_grad()
    def scored(self, prompt, k):
        """For each prompt token after the first: (its log-probability, [(id, logprob)] of the k likeliest)."""
        logits = self.batcher.effect("prompt_logits", prompt)  # position t - 1 predicts token t
        return [token_logprobs(row, token, k) for row, token in zip(logits, prompt[1:])]

    def token_bytes(self, i) -> bytes:
        table = self.tok.decode_table  # (ids past the tokenizer, in a model's padded vocabulary, are no text)
        return table[i] if i < len(table) else b""

    def token_text(self, i) -> str:
        return self.token_bytes(i).decode("utf-8", errors="replace")

    def completion_logprobs(self, prompt, new, scores, k, echo, start=0):
        """Completions' logprobs of new[start:] (with echo the prompt's tokens first): tokens, token_logprobs (the
        prompt's first token's is null), top_logprobs (a {token: logprob} per position: the k likeliest and the token
        itself), text_offset (where each token's text starts in the prompt's text followed by the completion's)."""
        ids, decoder, offsets, at = prompt + new, self.tok.stream(), [], 0
        for i in ids:
            offsets.append(at)
            at += len(decoder.push(i))
        scores = ([(None, None)] + self.scored(prompt, k) if echo else []) + scores[start : len(new)]
        shown = range(0 if echo else len(prompt) + start, len(ids))
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, (logprob, alts) in zip(shown, scores):
            top = None if logprob is None else {}
            for a, lp in [] if logprob is None else alts + [(ids[t], logprob)]:  # (the likeliest first: a text two
                top.setdefault(self.token_text(a), lp)  # tokens share keeps its best)
            out["tokens"].append(self.token_text(ids[t]))
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offsets[t])
        return out

    def chat_logprobs(self, new, scores):
        """Chat's logprobs.content: per reply token {token, logprob, bytes, top_logprobs: the likeliest}."""

        def entry(i, lp):
            return {"token": self.token_text(i), "logprob": lp, "bytes": list(self.token_bytes(i))}

        return [dict(entry(i, lp), top_logprobs=[entry(a, x) for a, x in alts]) for i, (lp, alts) in zip(new, scores)]

    def chunk_logprobs(self, r: Request, index, tokens, scores, start):
        """A streamed chunk's logprobs, those of tokens[start:] (None when not asked)."""
        if r.chat:
            return {"content": self.chat_logprobs(tokens[start:], scores[start:])} if r.body.get("logprobs") else None
        k, prompt = r.body.get("logprobs"), r.prompts[index // (r.body.get("n") or 1)]
        return None if k is None else self.completion_logprobs(prompt, tokens, scores, k, False, start)

    def envelope(self, r: Request, **fields):
        kind = "chat.completion" if r.chat else "text_completion"
        return {"id": r.id, "object": kind, "created": int(time.time()), "model": self.name, **fields}


class ClientGone(Exception):
    """The client closed its connection: its generation stops."""


class ServerError(Exception):
    """The batch failed (an HTTP 500 for a request not yet answered; a stream just ends)."""


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def totals(usage):
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection (a thread each: ThreadingHTTPServer); self.server.app is the Server that answers it.
    Every request is framed by its Content-Length (a body over --max-body is refused unread, and the connection
    closed); a client that sends or reads too slowly times out (`timeout`, on the socket)."""

    protocol_version = "HTTP/1.1"
    timeout = 15  # seconds a read or write on this client's socket may wait

    def log_message(self, fmt, *args):  # one line per request on stderr, without the default's date noise
        what = f"{getattr(self, 'command', None) or '-'} {getattr(self, 'path', '-')[:200]!r}"
        print(f"serve.py: {what} {args[1] if len(args) > 1 else ''}", file=sys.stderr)

    def send_json(self, status, obj, close=False):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_cors()
        if close:  # the rest of what the client sent cannot be framed (or was not read): no next request from it
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a malformed request line, headers too long, a TLS hello) as the
        others: a status line and a JSON error body, then the connection closed."""
        self.request_version = "HTTP/1.1"  # (what it could not parse left "HTTP/0.9": no status line at all)
        self.send_json(code, error(message or "bad request", "invalid_request_error"), close=True)

    def send_error_json(self, e: BadRequest, close=False):
        self.send_json(e.status, error(str(e), e.kind, e.param), close=close)

    def send_cors(self):
        if self.server.app.cors:
            self.send_header("Access-Control-Allow-Origin", self.server.app.cors)
            self.send_header("Vary", "Origin")

    def refused(self):
        """Why this request is refused before its route runs (a BadRequest), or None."""
        app, host = self.server.app, (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if self.server.loopback and host not in ("localhost", "127.0.0.1", "::1"):  # DNS rebinding
            return BadRequest(f"Host {shown(host)} is not this machine (the server listens on loopback)", status=403)
        given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if (
            app.api_key
            and self.path.startswith("/v1")
            and not hmac.compare_digest(given.encode(), app.api_key.encode())
        ):
            return BadRequest("invalid API key (Authorization: Bearer KEY)", status=401, kind="authentication_error")
        return None

    def do_GET(self):
        if (e := self.refused()) is not None:
            return self.send_error_json(e)
        app = self.server.app
        model = {"id": app.name, "object": "model", "created": 0, "owned_by": "phi"}
        if self.path == "/health":
            return self.send_json(200, {"status": "ok"})
        if self.path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [model]})
        if urllib.parse.unquote(self.path) == f"/v1/models/{app.name}":  # (a Hub id's "/" comes as %2F)
            return self.send_json(200, model)
        self.send_json(404, error(f"no route {shown(self.path)}", "not_found_error"))

    def do_OPTIONS(self):
        """A browser's CORS preflight: answered only with --cors."""
        if not self.server.app.cors:
            return self.send_json(
                405, error("OPTIONS: this server answers no cross-origin requests", "invalid_request_error")
            )
        self.send_response(204)
        self.send_cors()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        chat, app = self.path == "/v1/chat/completions", self.server.app
        try:
            if (e := self.refused()) is not None:
                raise e
            if self.path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
                raise BadRequest(f"no route {shown(self.path)}", status=404, kind="not_found_error")
            body = self.read_body()
            if self.path == "/v1/embeddings":
                return self.send_json(200, app.embeddings(body))
            r = app.request(body, chat)  # checked and tokenized before it waits for the model
        except BadRequest as e:  # (a refusal before the body was read closes the connection: the body stays unread)
            return self.send_error_json(e, close=e.status != 400)
        if body.get("stream"):
            return self.stream(r)
        try:
            response = app.complete(r, self.client_alive)
        except ClientGone:
            return print("serve.py: the client went away: generation stopped", file=sys.stderr)
        except ServerError as e:
            return self.send_json(500, error(str(e), "server_error"), close=True)
        self.send_json(200, response)

    def read_body(self) -> dict:
        """The JSON object the request carries: its Content-Length read, no more (one clear error otherwise)."""
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if kind != "application/json":  # (a browser page may POST text/plain to any server without asking)
            raise BadRequest(f"Content-Type must be application/json, got {shown(kind)}", status=415)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest(f"Content-Length must be a number of bytes, got {shown(length)}", status=411)
        if int(length) > self.server.app.max_body:
            raise BadRequest(
                f"the body is {length} bytes; this server takes up to {self.server.app.max_body}", status=413
            )
        try:
            body = json.loads(self.rfile.read(int(length)) or b"null")
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, a 5,000-digit integer, nesting too deep
            raise BadRequest(f"the body is not valid JSON ({shown(str(e))})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def client_alive(self) -> bool:
        """False once the client has closed its connection (its socket reads as at its end)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def stream(self, r: Request):
        """Server-sent events: one chunk per piece of text, a last one per choice with its finish_reason (with
        stream_options.include_usage, then one with the usage), then data: [DONE]. Chat with tools: text from a
        <|tool_call|> on is held back and sent as tool_calls deltas at the end, as OpenAI streams them. A client
        gone mid-stream (broken pipe, or a write that times out) ends the generation."""
        app, usage = self.server.app, (r.body.get("stream_options") or {}).get("include_usage")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_cors()
        self.end_headers()
        self.close_connection = True
        tools, held = r.chat and r.body.get("tools") and r.body.get("tool_choice") != "none", {}
        sent = {}  # index -> the choice's tokens whose log-probabilities went out
        try:
            for index, piece, reason, tokens, scores in app.choices(r):
                if tools:
                    piece, calls, reason = tool_call_delta(held, index, piece, reason)
                    if calls:
                        self.send_event(
                            app.envelope(r, choices=[{"index": index, "delta": {"tool_calls": calls}}]), r, usage
                        )
                choice = {"index": index, "finish_reason": reason}
                choice |= {"delta": {"content": piece} if piece else {}} if r.chat else {"text": piece}
                choice["logprobs"] = app.chunk_logprobs(r, index, tokens, scores, sent.get(index, 0))
                sent[index] = len(tokens)
                self.send_event(app.envelope(r, choices=[choice]), r, usage)
            if usage:
                self.send_event(app.envelope(r, choices=[], usage=totals(r.usage)), r, False)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            print("serve.py: the client went away: generation stopped", file=sys.stderr)
        except ServerError as e:  # (the 200 is sent: the stream ends without its [DONE])
            print(f"serve.py: {e}", file=sys.stderr)

    def send_event(self, chunk, r, usage):
        if r.chat:
            chunk["object"] = "chat.completion.chunk"
        if usage:
            chunk.setdefault("usage", None)
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()


def tool_call_delta(held: dict, index, piece, reason):
    """Streamed chat with tools: (the text to send now, tool_calls deltas or None, finish_reason). Text from a
    <|tool_call|> on is held (held[index]); at the choice's end it is sent as tool_calls (finish_reason "tool_calls")
    if it parses, else as the text it is."""
    text = held.get(index, "") + piece
    if index not in held and "<|tool_call|>" not in text:
        return piece, None, reason
    start = text.find("<|tool_call|>") if index not in held else 0
    before, held[index] = text[:start], text[start:]
    if reason is None:
        return before, None, None
    content, calls = parse_tool_calls(held.pop(index))
    if not calls:
        return before + (content or ""), None, reason
    return before, [dict(c, index=k) for k, c in enumerate(calls)], "tool_calls"


def error(message, kind, param=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class HTTPServer(ThreadingHTTPServer):
    """A thread per connection, up to max_connections at once: one more gets an HTTP 503 and is closed (an idle
    connection holds its thread until its socket times out: Handler.timeout)."""

    request_queue_size = 64  # connections waiting to be accepted (the standard library's default is 5)
    daemon_threads = True

    def __init__(self, address, handler, max_connections=256):
        self.max_connections, self.open_slots = max_connections, threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if self.open_slots.acquire(blocking=False):
            return super().process_request(request, client_address)  # (released when its thread ends)
        data = json.dumps(error(f"this server holds {self.max_connections} connections at most", "server_error"))
        head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        try:
            request.settimeout(1)  # (this is the thread that accepts: it may not wait on one client)
            request.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n{data}".encode())
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.open_slots.release()


def serve(
    model,
    tok,
    name,
    host="127.0.0.1",
    port=8000,
    steps=None,
    api_key=None,
    cors=None,
    max_body=4 << 20,
    max_batch=8,
    max_connections=256,
    tp=False,
):
    """An HTTP server for (model, tok), not yet started: call serve_forever() (port 0: a free port,
    server.server_address tells which). steps: generate.Steps.compiled(device) for the compiled decode step;
    api_key: the Bearer key every /v1 request needs; cors: the one Origin browsers may call it from; max_body: bytes;
    max_batch: sequences decoded together (more wait); max_connections: open at once (more: 503); tp: rank 0 of a
    tensor-parallel model (tp.py), whose other ranks run Batcher(..., tp=True).follow()."""
    httpd = HTTPServer((host, port), Handler, max_connections)
    httpd.app = Server(model, tok, name, steps, api_key, cors, max_body, max_batch, tp)
    httpd.loopback = host in ("127.0.0.1", "localhost", "::1")  # then the Host header must name this machine
    return httpd


def build_parser():
    p = argparse.ArgumentParser(description="An OpenAI-compatible server for a Phi checkpoint.")
    p.add_argument("--model", default="microsoft/Phi-4-mini-instruct", help="Hub id or local directory")
    p.add_argument("--adapter", help="a PEFT LoRA adapter merged into the weights at load")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="the decode step as generate.py takes it: compiled now (CPU: ahead of time, kept in ~/.cache/phi; "
        "CUDA: torch.compile); without it the one a run built before, else the plain step and a build in the "
        "background when the server stops; --no-compile: the plain step, nothing built",
    )
    p.add_argument("--quantize", choices=list(generate.QUANTIZERS))
    p.add_argument(
        "--api-key",
        default=os.environ.get("PHI_API_KEY"),
        help="the Bearer key every /v1 request needs (default: $PHI_API_KEY; none: open)",
    )
    p.add_argument(
        "--cors", metavar="ORIGIN", help="the one Origin browsers may call this server from (CORS headers, preflight)"
    )
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8); more wait")
    p.add_argument(
        "--max-body", type=int, default=4 << 20, help="largest request body in bytes (default 4 MiB; larger: 413)"
    )
    p.add_argument("--max-connections", type=int, default=256, help="open connections at once (default 256; more: 503)")
    p.add_argument("--tp", action="store_true", help="tensor parallel under torchrun: rank 0 serves, every rank steps")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.tp:
            args.device = str(tensor_parallel.init())
        model, tok = generate.load(
            args.model, args.dtype, args.device, quantize=args.quantize, adapter=args.adapter, tp=args.tp
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 1
    steps = generate.command_line_steps(model, args.compile, args.tp)  # (one line on stderr says which)
    if args.tp and torch.distributed.get_rank():  # the other ranks run every step rank 0 decides
        Batcher(model, steps, args.max_batch, tp=True).follow()
    httpd = serve(
        model,
        tok,
        args.model,
        args.host,
        args.port,
        steps,
        args.api_key,
        args.cors,
        args.max_body,
        args.max_batch,
        args.max_connections,
        args.tp,
    )
    print(f"serve.py: {args.model} on http://{args.host}:{httpd.server_address[1]}/v1", file=sys.stderr)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    generate.build_later(model, args, steps)  # (where it decoded with the plain step for want of a package)
    return 0


if __name__ == "__main__":
    sys.exit(main())
