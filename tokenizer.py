"""
Text in and out: tokenizers built on tiktoken from the files a checkpoint ships, the streaming decoder, chat formats.

- phi-1/1.5/2 (CodeGen): GPT-2 byte-level BPE + added whitespace-run tokens   (tokenizer.json or vocab.json+merges.txt)
- Phi-3/3.5: Llama SentencePiece BPE with byte fallback                          (tokenizer.json or tokenizer.model)
- Phi-4 (cl100k-style), Phi-4-mini (o200k-style): byte-level BPE + specials     (tokenizer.json)
- Phi-3-small: OpenAI's cl100k_base ranks + specials                            (cl100k_base.tiktoken)
No torch, and no `tokenizers`, `sentencepiece` or `transformers` at run time: the tests compare our ids with theirs.
"""

import json
import re
import struct
from pathlib import Path

import tiktoken

TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "tokenizer_module.json",
    "*.tiktoken",
]

# Unicode White_Space: what the reference (Rust's char::is_whitespace) strips next to lstrip/rstrip added tokens.
# (Python's str.isspace also counts \x1c-\x1f, which Rust does not.)
WHITESPACE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {
    chr(c) for c in range(0x2000, 0x200B)
}
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s"""
)
# SentencePiece pieces never hold "▁" after another character, so a run of "▁" plus the word after it is a unit
# that no merge crosses: splitting there keeps tiktoken's pieces short without changing the result.
SP_PATTERN = "\u2581*[^\u2581]+|\u2581+"


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable characters (how byte-level vocab files spell bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """encode/decode with the reference's ids. Text is first split on added tokens (longest match first, honouring
    their lstrip/rstrip flags, as the Hugging Face tokenizers library does); each piece in between goes through
    tiktoken. For SentencePiece vocabularies the tiktoken ids are our own ranks, mapped to real ids by `table`."""

    def __init__(self, ranks, pattern, added, decode_table, table=None, sentencepiece=False, config=None):
        self.enc = tiktoken.Encoding("phi", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.table, self.sentencepiece = table, sentencepiece
        self.added = added  # content -> dict(id, special, lstrip, rstrip)
        self.decode_table = decode_table  # id -> bytes
        self.special_ids = {a["id"] for a in added.values() if a["special"]}
        config = config or {}
        self.bos_id, self.eos_id, self.pad_id = (
            self.token_id(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")
        )
        self.add_bos = bool(config.get("add_bos_token", False))
        self.chat_template = config.get("chat_template")
        self._splitters = {}
        self.vocab_size = len(decode_table)

    def token_id(self, token):
        """Id of a special/added token given as text or as a tokenizer_config {"content": ...} dict."""
        if isinstance(token, dict):
            token = token.get("content")
        return self.added[token]["id"] if token in self.added else None

    def _splitter(self, allowed_special):
        """A regex matching the added tokens to split on, longest first (Python's re tries alternatives in order)."""
        key = "all" if allowed_special == "all" else frozenset(allowed_special)
        if key not in self._splitters:
            tokens = [c for c, a in self.added.items() if not a["special"] or key == "all" or c in key]
            tokens.sort(key=len, reverse=True)
            self._splitters[key] = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        return self._splitters[key]

    def _encode_text(self, text):
        if not text:
            return []
        if not self.sentencepiece:
            return self.enc.encode_ordinary(text)
        # SentencePiece: spaces become "▁" and every piece of text gets a "▁" in front (the "dummy prefix", also
        # right after an added token, as the reference's Prepend normalizer does); ranks map back to real ids
        return [i for r in self.enc.encode_ordinary("\u2581" + text.replace(" ", "\u2581")) for i in self.table[r]]

    def encode(self, text: str, bos: bool = False, allowed_special="all") -> list[int]:
        """Ids of text, like Hugging Face's tokenizer.encode(text, add_special_tokens=False). Added/special tokens
        written in the text are recognised; allowed_special=set() (or a set of allowed ones) encodes the others
        as plain text. bos=True puts the BOS id first."""
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        splitter, pos = self._splitter(allowed_special), 0
        m = splitter.search(text) if splitter else None
        while m:
            a, start, end = self.added[m.group()], m.start(), m.end()
            if a["lstrip"]:  # the token swallows the whitespace before it...
                while start > pos and text[start - 1] in WHITESPACE:
                    start -= 1
            if a["rstrip"]:  # ...or after it
                while end < len(text) and text[end] in WHITESPACE:
                    end += 1
            ids += self._encode_text(text[pos:start])
            ids.append(a["id"])
            pos = end
            m = splitter.search(text, pos)
        return ids + self._encode_text(text[pos:])

    def decode(self, ids, skip_special=False) -> str:
        """Text of ids (invalid UTF-8, e.g. half a character, becomes U+FFFD)."""
        n = len(self.decode_table)  # ids past the tokenizer (the model's padded vocab) decode to nothing
        text = b"".join(
            self.decode_table[i] if i < n else b"" for i in ids if not (skip_special and i in self.special_ids)
        )
        text = text.decode("utf-8", errors="replace")
        # SentencePiece: the dummy prefix of the first piece is not text (the reference's Strip decoder)
        return text[1:] if self.sentencepiece and text.startswith(" ") else text

    def stream(self, context=()):
        """An incremental decoder for streaming: push(id) returns the new text. It never returns half a UTF-8
        character and keeps SentencePiece spaces right: it decodes from a few tokens back (the prompt's last
        tokens, given as context) and returns only what is new (the prefix-offset trick of text-generation-inference)."""
        return StreamDecoder(self, list(context)[-4:])

    def render_chat(self, messages, add_generation_prompt=True) -> str:
        """The prompt text for a list of {"role": system|user|assistant, "content": str} messages."""
        return render_chat(chat_format(self), messages, add_generation_prompt, self)


class StreamDecoder:
    """Tokenizer.stream's decoder: push(id) returns the text the token adds, flush() what is still held back."""

    def __init__(self, tok, context):
        self.tok, self.ids, self.prefix, self.read = tok, context, 0, len(context)

    def push(self, token_id) -> str:
        self.ids.append(token_id)
        return self._new_text(wait=True)

    def flush(self) -> str:
        """At the end: the text held back (an incomplete character becomes U+FFFD, as decode gives it)."""
        return self._new_text(wait=False)

    def _new_text(self, wait: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        now = self.tok.decode(self.ids[self.prefix :])
        if len(now) <= len(before) or wait and now.endswith("\ufffd"):
            return ""  # wait: the character is not complete yet
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]


# -----------------------------------------------------------------------------------------------------------------
# Building tokenizers from checkpoint files


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _added_tokens(d: Path, tj):
    """content -> {id, special, lstrip, rstrip}, from tokenizer.json, else tokenizer_config.json's
    added_tokens_decoder, else added_tokens.json + special_tokens_map.json."""
    if tj is not None:
        entries = tj.get("added_tokens", [])
    elif (d / "tokenizer_config.json").exists() and "added_tokens_decoder" in _read_json(d / "tokenizer_config.json"):
        entries = [
            dict(v, id=int(k)) for k, v in _read_json(d / "tokenizer_config.json")["added_tokens_decoder"].items()
        ]
    elif (d / "tokenizer_module.json").exists():
        entries = _read_json(d / "tokenizer_module.json").get("added_tokens", [])
    else:
        specials = set()
        if (d / "special_tokens_map.json").exists():
            for v in _read_json(d / "special_tokens_map.json").values():
                specials.update(
                    x.get("content") if isinstance(x, dict) else x for x in (v if isinstance(v, list) else [v])
                )
        added = _read_json(d / "added_tokens.json") if (d / "added_tokens.json").exists() else {}
        entries = [dict(content=c, id=i, special=c in specials) for c, i in added.items()]
        entries += [dict(content=c, id=None, special=True) for c in specials if c not in added]
    return {
        e["content"]: dict(
            id=e["id"], special=bool(e.get("special", True)), lstrip=bool(e.get("lstrip")), rstrip=bool(e.get("rstrip"))
        )
        for e in entries
    }


def _bytelevel(vocab: dict, added, pattern, config):
    """GPT-2-style byte-level BPE: vocab ids are the merge ranks, as in tiktoken's own encodings."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for token, i in vocab.items():
        if token not in added:
            try:
                ranks[bytes(byte_of[c] for c in token)] = i
            except KeyError:
                raise ValueError(f"vocabulary token {token!r} (id {i}) is not byte-level BPE") from None
    for content, a in added.items():
        if a["id"] is None:  # named only in special_tokens_map: id from the vocab
            a["id"] = vocab[content]
    decode = _decode_table({i: b for b, i in ranks.items()}, added)
    return Tokenizer(ranks, pattern, added, decode, config=config)


def _decode_table(id_bytes: dict, added):
    id_bytes = dict(id_bytes)
    id_bytes.update({a["id"]: c.encode() for c, a in added.items()})
    table = [b""] * (max(id_bytes) + 1)
    for i, b in id_bytes.items():
        table[i] = b
    return table


def _sentencepiece(vocab: dict, merge_order: list, added, config):
    """Llama SentencePiece BPE (byte fallback) on tiktoken. tiktoken merges bytes, SentencePiece merges characters,
    so the bridge is a rank table in three blocks: the 256 single bytes; then, for every multi-byte character of
    the vocabulary, its byte prefixes (synthetic pieces, ranked before any real merge so that characters form
    first); then the real pieces in merge priority. `table` maps each rank to real ids: a piece to its id, a single
    byte or a synthetic prefix to the byte-fallback ids <0xXX> of its bytes (characters outside the vocabulary)."""
    fallback = {b: vocab.get(f"<0x{b:02X}>") for b in range(256)}
    if None in fallback.values():
        raise ValueError("SentencePiece vocabulary without the 256 byte-fallback pieces <0x00>..<0xFF>")
    ranks, table = {}, []

    def add(piece: bytes, ids):
        if piece not in ranks:
            ranks[piece] = len(table)
            table.append(ids)

    for b in range(256):
        add(bytes([b]), [vocab[chr(b)]] if b < 128 and chr(b) in vocab else [fallback[b]])
    for c in sorted({c for p in vocab for c in p if len(p) == 1 and len(c.encode()) > 1}):
        cb = c.encode()
        for k in range(2, len(cb) + 1):
            add(cb[:k], [vocab[c]] if k == len(cb) else [fallback[b] for b in cb[:k]])
    for piece in merge_order:
        add(piece.encode(), [vocab[piece]])
    decode = {
        i: (bytes([int(p[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", p) else p.replace("\u2581", " ").encode())
        for p, i in vocab.items()
    }
    return Tokenizer(ranks, SP_PATTERN, added, _decode_table(decode, added), table, sentencepiece=True, config=config)


def _read_sentencepiece_model(path: Path):
    """(piece, score, type) from a SentencePiece tokenizer.model, a protobuf ModelProto read by hand:
    field 1 = repeated piece {1: text, 2: score (float), 3: type}; field 3 = normalizer spec."""
    data = path.read_bytes()

    def fields(buf):
        pos = 0
        while pos < len(buf):
            key, pos = _varint(buf, pos)
            kind = key & 7
            if kind == 0:
                value, pos = _varint(buf, pos)
            elif kind == 1:
                value, pos = buf[pos : pos + 8], pos + 8
            elif kind == 2:
                n, pos = _varint(buf, pos)
                value, pos = buf[pos : pos + n], pos + n
            elif kind == 5:
                value, pos = buf[pos : pos + 4], pos + 4
            else:
                raise ValueError(f"{path}: not a SentencePiece model (protobuf wire type {kind})")
            yield key >> 3, value

    pieces = []
    for field, value in fields(data):
        if field == 1:
            p = dict(fields(value))
            pieces.append((p[1].decode(), struct.unpack("<f", p.get(2, b"\0\0\0\0"))[0], p.get(3, 1)))
        elif field == 3:
            spec = dict(fields(value))
            if spec.get(4, 1) or spec.get(1, b"identity") not in (b"identity",):  # remove_extra_whitespaces, name
                raise ValueError(
                    f"{path}: SentencePiece normalizer {spec.get(1)} / remove_extra_whitespaces is not "
                    f"supported (only the identity normalizer Llama and Phi-3 use)"
                )
    return pieces


def _varint(buf, pos):
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def load_tokenizer(name_or_dir, revision=None) -> Tokenizer:
    """A tokenizer from a local checkpoint directory or a Hub id (only the tokenizer files are fetched; works
    offline from the Hugging Face cache with HF_HUB_OFFLINE=1)."""
    d = Path(name_or_dir)
    if not d.is_dir():
        d = download(str(name_or_dir), TOKENIZER_FILES, revision)
    config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
    if (d / "chat_template.jinja").exists() and "chat_template" not in config:
        config["chat_template"] = (d / "chat_template.jinja").read_text()
    tj = _read_json(d / "tokenizer.json") if (d / "tokenizer.json").exists() else None
    added = _added_tokens(d, tj)
    if tj is not None:
        return _from_tokenizer_json(tj, d, added, config)
    if (d / "vocab.json").exists() and (d / "merges.txt").exists():
        return _bytelevel(_read_json(d / "vocab.json"), added, GPT2_PATTERN, config)
    if (d / "tokenizer.model").exists():
        return _from_sentencepiece_model(d / "tokenizer.model", added, config)
    tiktoken_files = sorted(d.glob("*.tiktoken"))
    if tiktoken_files:  # Phi-3-small: cl100k_base ranks; its specials are in its tokenizer's code, not in a file
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(tiktoken_files[0]))
        added = {
            c: dict(id=i, special=True, lstrip=False, rstrip=False) for c, i in PHI3_SMALL_SPECIALS.items()
        } | added
        config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"} | config
        decode = _decode_table({i: b for b, i in ranks.items()}, added)
        return Tokenizer(ranks, CL100K_PATTERN, added, decode, config=config)
    raise FileNotFoundError(
        f"{d}: no tokenizer files (looked for tokenizer.json, vocab.json + merges.txt, tokenizer.model, *.tiktoken)"
    )


# tokenization_phi3_small.py's SPECIAL_TOKENS (the Hub checkpoint ships no added tokens in its files): cl100k's own
# specials, the chat tokens, and dummy tokens that fill the vocabulary up to 100352
PHI3_SMALL_SPECIALS = {
    "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
    "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263, "<|end|>": 100266, "<|endofprompt|>": 100276,
    "<|dummy_id_0|>": 100264, "<|dummy_id_1|>": 100265, "<|dummy_id_2|>": 100256,
    **{f"<|dummy_id_{i}|>": 100264 + i for i in range(3, 12)},  # 100267 .. 100275
    **{f"<|dummy_id_{11 + i}|>": 100276 + i for i in range(1, 76)},  # 100277 .. 100351
}  # fmt: skip


def _from_tokenizer_json(tj: dict, d: Path, added, config) -> Tokenizer:
    """A tokenizer.json's BPE: SentencePiece converted to BPE (byte_fallback: Phi-3), or byte-level."""
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{d / 'tokenizer.json'}: model type {model.get('type')!r} is not supported (BPE only)")
    if model.get("byte_fallback"):
        order = {}
        for m in model["merges"]:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            order.setdefault(a + b, len(order))  # priority = first merge that makes the piece
        return _sentencepiece(model["vocab"], list(order), added, config)
    return _bytelevel(model["vocab"], added, _split_pattern(tj, d), config)


def _from_sentencepiece_model(path: Path, added, config) -> Tokenizer:
    """A SentencePiece tokenizer.model (Phi-3 without tokenizer.json)."""
    pieces = _read_sentencepiece_model(path)
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    # SentencePiece merges by score: the higher a piece's score, the earlier it forms (NORMAL pieces, type 1);
    # ties (all the "▁▁…" whitespace pieces score -1e9) go by id, as in the merges of the converted tokenizer.json
    order = [pieces[i][0] for _, i in sorted((-s, i) for i, (p, s, t) in enumerate(pieces) if t == 1 and len(p) > 1)]
    for content, a in added.items():
        if a["id"] is None:
            a["id"] = vocab[content]
    return _sentencepiece(vocab, order, added, config)


def _split_pattern(tj, d):
    """The pre-tokenizer regex of a byte-level tokenizer.json: a Split pattern, or ByteLevel's own (GPT-2's)."""
    pre = tj.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            return p["pattern"]["Regex"]
        if p.get("type") == "ByteLevel" and p.get("use_regex", True):
            return GPT2_PATTERN
    raise ValueError(f"{d / 'tokenizer.json'}: pre_tokenizer {pre.get('type')!r} is not supported")


def download(repo_id, patterns, revision=None) -> Path:
    """Fetch only the files matching patterns from the Hub (cached; offline with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"'{repo_id}' is neither a local directory nor a model on the Hugging Face Hub"
        ) from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"'{repo_id}' is not a local directory and is not in the Hugging Face cache "
            f"(offline, or the Hub is unreachable)"
        ) from None
    except (HfHubHTTPError, ValueError) as e:
        raise FileNotFoundError(f"'{repo_id}': {e}") from None


# -----------------------------------------------------------------------------------------------------------------
# Chat formats (written out per family; the checkpoint's chat_template picks the family when it has one)


def chat_format(tok: Tokenizer) -> str:
    t = tok.chat_template or ""
    if isinstance(t, list):  # several named templates: the default one
        t = next((x["template"] for x in t if x.get("name") == "default"), "")
    if "<|im_start|>" in t or "<|im_sep|>" in tok.added:
        return "phi4"  # <|im_start|>user<|im_sep|>...<|im_end|>
    if "<|end|>" in tok.added and "<|fim_prefix|>" in tok.added:  # Phi-3-small's cl100k tokenizer
        return "phi3small"  # <|endoftext|><|user|>\n...<|end|>\n
    if "'<|' + message['role'] + '|>'" in t or ("<|user|>" in tok.added and "<|tool|>" in tok.added):
        return "phi4-mini"  # <|user|>...<|end|>
    if "<|user|>" in tok.added:
        return "phi3"  # <|user|>\n...<|end|>\n
    return "phi2"  # Instruct: ...\nOutput:


def render_chat(fmt, messages, add_generation_prompt=True, tok=None) -> str:
    eos = tok.decode([tok.eos_id]) if tok is not None and tok.eos_id is not None else ""
    out = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role not in ("system", "user", "assistant") and not (role == "tool" and fmt in ("phi3", "phi4-mini")):
            raise ValueError(f"chat message role {role!r} is not one of system, user, assistant (tool: Phi-3/4-mini)")
        if fmt in ("phi3", "phi3small"):
            out.append(f"<|{role}|>\n{content}<|end|>\n")
        elif fmt == "phi4":
            out.append(f"<|im_start|>{role}<|im_sep|>{content}<|im_end|>")
        elif fmt == "phi4-mini":
            tools = f"<|tool|>{m['tools']}<|/tool|>" if role == "system" and m.get("tools") is not None else ""
            out.append(f"<|{role}|>{content}{tools}<|end|>")
        else:  # phi-2 is a base model: its documented QA format, system text as a plain first line
            out.append(
                {"system": f"{content}\n", "user": f"Instruct: {content}\n", "assistant": f"Output: {content}\n"}[role]
            )
    if add_generation_prompt:
        out.append(
            {
                "phi3": "<|assistant|>\n",
                "phi3small": "<|assistant|>\n",
                "phi4": "<|im_start|>assistant<|im_sep|>",
                "phi4-mini": "<|assistant|>",
                "phi2": "Output:",
            }[fmt]
        )
    elif fmt in ("phi3", "phi3small", "phi4-mini"):
        out.append(eos)
    bos = tok.decode([tok.bos_id]) if fmt == "phi3small" and tok is not None and tok.bos_id is not None else ""
    return bos + "".join(out)  # Phi-3-small's template starts with its bos token


def chat_prompt(tok: Tokenizer, user, system=None, history=()) -> str:
    """The prompt text for one more user message, after an optional system message and earlier turns."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    return tok.render_chat(messages + [{"role": "user", "content": user}], add_generation_prompt=True)
