"""
Run any Phi checkpoint: loading from the Hugging Face Hub or a local directory, tokenizers, chat formats, sampling.

Tokenizers are built on tiktoken from the files a checkpoint ships, for every family:
- phi-1/1.5/2 (CodeGen): GPT-2 byte-level BPE + added whitespace-run tokens   (tokenizer.json or vocab.json+merges.txt)
- Phi-3/3.5: Llama SentencePiece BPE with byte fallback                          (tokenizer.json or tokenizer.model)
- Phi-4 (cl100k-style), Phi-4-mini (o200k-style): byte-level BPE + specials     (tokenizer.json)
- Phi-3-small: OpenAI's cl100k_base ranks + specials                            (cl100k_base.tiktoken)
No `tokenizers`, `sentencepiece` or `transformers` at run time; the tests compare our ids with theirs.
"""

import argparse
import json
import math
import os
import re
import struct
import sys
import time
from functools import partial
from pathlib import Path

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

import phi

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
    def __init__(self, tok, context):
        self.tok, self.ids, self.prefix, self.read = tok, context, 0, len(context)

    def push(self, token_id) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        now = self.tok.decode(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
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
        d = _download(str(name_or_dir), TOKENIZER_FILES, revision)
    config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
    if (d / "chat_template.jinja").exists() and "chat_template" not in config:
        config["chat_template"] = (d / "chat_template.jinja").read_text()
    tj = _read_json(d / "tokenizer.json") if (d / "tokenizer.json").exists() else None
    added = _added_tokens(d, tj)
    if tj is not None:
        model = tj.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{d / 'tokenizer.json'}: model type {model.get('type')!r} is not supported (BPE only)")
        if model.get("byte_fallback"):  # SentencePiece converted to BPE (Phi-3)
            order = {}
            for m in model["merges"]:
                a, b = m.split(" ", 1) if isinstance(m, str) else m
                order.setdefault(a + b, len(order))  # priority = first merge that makes the piece
            return _sentencepiece(model["vocab"], list(order), added, config)
        return _bytelevel(model["vocab"], added, _split_pattern(tj, d), config)
    if (d / "vocab.json").exists() and (d / "merges.txt").exists():
        return _bytelevel(_read_json(d / "vocab.json"), added, GPT2_PATTERN, config)
    if (d / "tokenizer.model").exists():
        pieces = _read_sentencepiece_model(d / "tokenizer.model")
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        # SentencePiece merges by score: the higher a piece's score, the earlier it forms (NORMAL pieces, type 1);
        # ties (all the "▁▁…" whitespace pieces score -1e9) go by id, as in the merges of the converted tokenizer.json
        order = [
            pieces[i][0] for _, i in sorted((-s, i) for i, (p, s, t) in enumerate(pieces) if t == 1 and len(p) > 1)
        ]
        for content, a in added.items():
            if a["id"] is None:
                a["id"] = vocab[content]
        return _sentencepiece(vocab, order, added, config)
    tiktoken_files = sorted(d.glob("*.tiktoken"))
    if tiktoken_files:  # Phi-3-small: cl100k_base ranks
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(tiktoken_files[0]))
        decode = _decode_table({i: b for b, i in ranks.items()}, added)
        return Tokenizer(ranks, CL100K_PATTERN, added, decode, config=config)
    raise FileNotFoundError(
        f"{d}: no tokenizer files (looked for tokenizer.json, vocab.json + merges.txt, tokenizer.model, *.tiktoken)"
    )


def _split_pattern(tj, d):
    """The pre-tokenizer regex of a byte-level tokenizer.json: a Split pattern, or ByteLevel's own (GPT-2's)."""
    pre = tj.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            return p["pattern"]["Regex"]
        if p.get("type") == "ByteLevel" and p.get("use_regex", True):
            return GPT2_PATTERN
    raise ValueError(f"{d / 'tokenizer.json'}: pre_tokenizer {pre.get('type')!r} is not supported")


def _download(repo_id, patterns, revision=None) -> Path:
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
        if fmt == "phi3":
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
                "phi4": "<|im_start|>assistant<|im_sep|>",
                "phi4-mini": "<|assistant|>",
                "phi2": "Output:",
            }[fmt]
        )
    elif fmt in ("phi3", "phi4-mini"):
        out.append(eos)
    return "".join(out)


# -----------------------------------------------------------------------------------------------------------------
# Loading a checkpoint

MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json"]
LEGACY_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # read with torch.load(weights_only=True)


def checkpoint_dir(name_or_dir, revision=None) -> Path:
    """A local directory as it is, or a Hub id fetched (config, weights, tokenizer files only) into the cache."""
    d = Path(name_or_dir)
    if d.is_dir():
        return d
    d = _download(str(name_or_dir), MODEL_FILES + TOKENIZER_FILES, revision)
    if not list(d.glob("*.safetensors")):  # an old checkpoint without safetensors
        d = _download(str(name_or_dir), MODEL_FILES + LEGACY_FILES + TOKENIZER_FILES, revision)
    return d


def load(name_or_dir, dtype="auto", device=None, revision=None, attn="sdpa", quantize=None, adapter=None):
    """(model, tokenizer) from a Hub id or a local directory. dtype "auto" takes the checkpoint's own (float16
    becomes bfloat16 on the CPU, where float16 matmuls are slow); device None picks CUDA when there is one;
    quantize="int8" stores the weights as int8 (weight-only, per channel); with dtype "auto" on the CPU the rest of
    the model and the activations are then float32 (converting bf16 activations costs more than it saves).
    adapter: a PEFT LoRA adapter (Hub id or directory), merged into the weights before any quantization."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = checkpoint_dir(name_or_dir, revision)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: no config.json (is this a model checkpoint?)")
    if quantize == "int8" and dtype == "auto" and device.type == "cpu":
        dtype = "float32"
    dtype = resolve_dtype(dtype, phi.PhiConfig.from_hf(phi._read_json(d / "config.json")).torch_dtype, device)
    model = phi.Phi.from_pretrained(d, dtype=dtype, device=device, attn=attn)
    if adapter is not None:
        merge_adapter(model, adapter)
    model = speed_up(model)
    if quantize == "int8":
        quantize_int8(model)
    elif quantize == "int4":
        quantize_int4(model)
    elif quantize is not None:
        raise ValueError(f"quantize '{quantize}' is unknown (int8, int4 or none)")
    tok = load_tokenizer(d)
    model.eos_ids = eos_ids(d, model.config, tok)
    return model, tok


# -----------------------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), merged into the weights
#
# A LoRA adds scale * B @ A to a Linear's weight (A: r x in, B: out x r; scale = lora_alpha / r, or / sqrt(r) with
# use_rslora). PEFT names each by the Hugging Face module it adapts: "base_model.model.<module>.lora_A.weight".
# phi's q_proj, k_proj and v_proj are row slices of our one qkv Linear: each one's B @ A lands on its rows.

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
PEFT_PREFIX = "base_model.model."


def lora_modules(model: nn.Module) -> dict:
    """Hugging Face module name -> (our Linear's module name, first row, rows) for every Linear of the model."""
    with torch.device("meta"):  # a plain copy: the names do not depend on swapped-in modules
        plain = type(model)(model.config)
    out = {}
    for ours, hf in plain.hf_names(model.config.model_type).items():
        module = plain.get_submodule(ours.rpartition(".")[0])
        if not isinstance(module, nn.Linear) or not ours.endswith(".weight"):
            continue
        # phi's q, k, v are rows of qkv (of GQA's sizes: its Attention's); phimoe's w1 and w3 the halves of an fc1
        split = [module.out_features // len(hf)] * len(hf)
        sizes = plain.get_submodule(ours.rsplit(".", 2)[0]).sizes if len(hf) == 3 else split
        for name, first, rows in zip(hf, [sum(sizes[:i]) for i in range(len(sizes))], sizes):
            out[name.removesuffix(".weight")] = (ours.removesuffix(".weight"), first, rows)
    return out


def read_adapter(name_or_dir, revision=None):
    """(adapter_config.json as a dict, its tensors, directory) of a PEFT adapter, from a directory or the Hub."""
    d = Path(name_or_dir)
    if not d.is_dir():
        d = _download(str(name_or_dir), ADAPTER_FILES, revision)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{d}: no adapter_config.json (is this a PEFT adapter?)")
    cfg = _read_json(d / "adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{d}: peft_type {cfg.get('peft_type')!r} is not supported (LoRA adapters only)")
    for key in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(key):
            raise ValueError(f"{d}: {key} is not supported (plain LoRA only)")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{d}: bias {cfg['bias']!r} is not supported (LoRA adapters with bias 'none' only)")
    if (d / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(d / "adapter_model.safetensors")
    elif (d / "adapter_model.bin").is_file():
        tensors = torch.load(d / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{d}: no adapter_model.safetensors or adapter_model.bin")
    return cfg, tensors, d


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key that matches the module name's end."""
    return next((v for k, v in patterns.items() if re.search(rf"(^|\.){k}$", module)), default)


@torch.no_grad()
def merge_adapter(model: nn.Module, name_or_dir, revision=None):
    """Add a PEFT LoRA adapter to the model's weights, in place (modules_to_save, e.g. a classifier's score, are
    replaced). Anything that does not fit this model is one ValueError naming it, raised before any weight changes."""
    cfg, tensors, d = read_adapter(name_or_dir, revision)
    modules = lora_modules(model)
    kind = model.config.model_type
    targets = cfg.get("target_modules") or []
    if isinstance(targets, list):
        for t in targets:
            if not any(m == t or m.endswith("." + t) for m in modules):
                raise ValueError(
                    f"{d}: target module {t!r} does not exist in this {kind} model (an adapter for "
                    f"another architecture?); its Linears: {sorted({m.rsplit('.', 1)[-1] for m in modules})}"
                )
    pairs, params, saves, deltas = {}, dict(model.named_parameters()), [], []
    single = {hf[0]: ours for ours, hf in model.hf_names(kind).items() if len(hf) == 1}  # modules to save
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", name)
        if m:
            pairs.setdefault(m[1], {})[m[2]] = value
            continue
        ours = single.get(name)
        if ours is None or ours not in params:
            raise ValueError(f"{d}: {key} has no counterpart in this {kind} model")
        if params[ours].shape != value.shape:
            raise ValueError(
                f"{d}: {key} has shape {tuple(value.shape)}, this model's {ours} {tuple(params[ours].shape)}"
            )
        saves.append((params[ours], value))
    for module, ab in pairs.items():
        if module not in modules:
            raise ValueError(
                f"{d}: the adapter adapts {module}, which this {kind} model does not have (an adapter "
                "for another architecture?)"
            )
        if set(ab) != {"A", "B"}:
            have, lack = ("A", "B") if "A" in ab else ("B", "A")
            raise ValueError(f"{d}: {module} has a lora_{have} but no lora_{lack}")
        ours, first, rows = modules[module]
        weight = model.get_submodule(ours).weight
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r"))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
        want_a, want_b = (r, weight.shape[1]), (rows, r)
        if tuple(ab["A"].shape) != want_a or tuple(ab["B"].shape) != want_b:
            raise ValueError(
                f"{d}: {module}: lora_A {tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)}, expected {want_a} "
                f"and {want_b} (rank {r} from adapter_config.json, this model's {rows} x {weight.shape[1]} weight)"
            )
        deltas.append((weight[first : first + rows], alpha / (math.sqrt(r) if cfg.get("use_rslora") else r), ab))
    for param, value in saves:  # everything fits: change the weights
        param.copy_(value)
    for rows, scale, ab in deltas:  # rows of the weight += scale * B @ A, computed in fp32
        delta = ab["B"].to(rows.device, torch.float32) @ ab["A"].to(rows.device, torch.float32)
        rows.copy_(rows.float() + scale * delta)
    return model


def resolve_dtype(dtype, checkpoint_dtype, device):
    if dtype == "auto":
        dtype = checkpoint_dtype or "float32"
        if dtype == "float16" and device.type == "cpu":
            dtype = "bfloat16"
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype '{dtype}' is not one of auto, float32, bfloat16, float16")
        dtype = getattr(torch, dtype)
    try:  # can this device compute in this dtype at all?
        x = torch.ones(4, 4, dtype=dtype, device=device)
        (x @ x).sum().item()
    except (RuntimeError, TypeError, AssertionError) as e:  # a torch built without CUDA raises AssertionError
        raise ValueError(f"{dtype} is not supported on {device}: {str(e).splitlines()[0]}") from None
    return dtype


def eos_ids(d: Path, cfg, tok) -> set:
    """Where generation stops: generation_config.json's eos_token_id (an int or a list: Phi-3 has 32000, 32001,
    32007), else config.json's; plus the tokenizer's eos token."""
    ids = set()
    gen = _read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
    for value in (gen.get("eos_token_id"), None if "eos_token_id" in gen else cfg.eos_token_id, tok.eos_id):
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


# -----------------------------------------------------------------------------------------------------------------
# The speed layer: modules swapped in for phi.py's plain nn.Linear after loading (gpt-fast's quantize.py pattern)
#
# speed_up(model) turns every nn.Linear into a FastLinear (same parameters) where the CPU kernels below measure faster;
# quantize_int8(model) turns them into Int8Linear. generate.load, train.py and bench.py apply them; phi.py never sees
# them. The CPU kernels are kept where they were measured faster than nn.Linear (the README's speed section):
# - matvec: a batch-1 Linear inside the compiled decode step as multiply-and-sum, which inductor compiles into one
#   streaming pass over the weights (a GEMM library called with one row reads them at about half the bandwidth);
# - oneDNN for fp32 matmuls instead of MKL, which nn.Linear calls: MKL dispatches on the CPU vendor and takes slower
#   code paths on AMD (1.2x slower at 512 rows, 1.5-2.7x at 1-8 rows on an AMD EPYC).
# Both were measured faster on AMD EPYC; on an Intel Xeon with AMX the compiled matvec step was slower than the eager
# one and MKL is Intel's own: there nn.Linear stays (CPU_KERNELS; PHI_CPU_KERNELS=0/1 overrides the rule).


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


CPU_KERNELS = {"0": False, "1": True}.get(os.environ.get("PHI_CPU_KERNELS", ""), cpu_vendor() == "AuthenticAMD")


def one_row_compiled(x) -> bool:  # one row (batch-1 decoding) on the CPU inside torch.compile: see matvec
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]


def bf16_halves(t):
    """bf16 (..., 2m) -> two fp32 (..., m) of alternate columns: a bf16 is an fp32's top half, so of an int32 pair one
    is the low half shifted up, one the high half masked (one op per two numbers; .float() takes two each)."""
    i = t.view(torch.int32)
    return (i << 16).view(torch.float32), (i & -65536).view(torch.float32)


PAIRS_MIN_WEIGHTS = 2**20  # matvec widens bf16 in pairs from this many weights on


def matvec(x, weight, scale=None):
    """x (..., in), one row, times weight (out, in).T as multiply-and-sum in fp32 (scale: int8's per-channel (out,)).
    Inductor compiles it into one pass over the weight; rows > 4096 in equal chunks (summed faster). bf16 from 1M
    weights widens in int32 pairs (one by one, 1.4b ran out of compute at ~35 GB/s of weights); below, the pairs'
    two views, Python calls in inductor's wrapper, cost more than they save."""
    N, K = weight.shape
    n = next((n for n in range(1, K + 1) if K % n == 0 and K // n <= 4096), 1)
    w, xs = weight.view(N, n, K // n), x.reshape(n, K // n)
    if weight.dtype == x.dtype == torch.bfloat16 and K % (2 * n) == 0 and N * K >= PAIRS_MIN_WEIGHTS:
        (w0, w1), (x0, x1) = bf16_halves(w), bf16_halves(xs)
        y = (w0 * x0 + w1 * x1).sum(-1).sum(-1)  # (out,)
    else:
        y = (w.float() * xs.float()).sum(-1).sum(-1)
    return (y if scale is None else y * scale.float()).to(x.dtype).view(*x.shape[:-1], -1)


# A custom op, so that autograd and torch.compile see one opaque matmul; it costs ~20 us more per call than F.linear,
# more than it saves below ~1M weights (ONEDNN_MIN_WEIGHTS).
@torch.library.custom_op("phi_speed::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # x @ weight.T + bias


def _onednn_linear_backward(ctx, dy):  # dy (..., out)
    x, weight = ctx.saved_tensors
    dx = onednn_linear(dy, weight.t(), None) if ctx.needs_input_grad[0] else None
    dy, x = dy.flatten(0, -2), x.flatten(0, -2)  # the weight's gradient: MKL is as fast at it
    return dx, dy.t() @ x if ctx.needs_input_grad[1] else None, dy.sum(0) if ctx.needs_input_grad[2] else None


onednn_linear.register_fake(lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))
onednn_linear.register_autograd(
    _onednn_linear_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs[:2])
)
ONEDNN_MIN_WEIGHTS = 2**20 if torch.backends.mkldnn.is_available() else math.inf  # math.inf: F.linear always


def linear(x, weight, bias=None):  # x @ weight.T + bias; oneDNN: fp32 on the CPU, not autocast (F.linear's bf16)
    onednn = x.dtype == torch.float32 and x.device.type == "cpu" and weight.numel() >= ONEDNN_MIN_WEIGHTS
    return (onednn_linear if onednn and not torch.is_autocast_enabled("cpu") else F.linear)(x, weight, bias)


class FastLinear(nn.Linear):
    """nn.Linear, with matvec for one row in the compiled CPU decode step, and oneDNN for other fp32 CPU products."""

    def forward(self, x):
        if one_row_compiled(x):
            y = matvec(x, self.weight)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)


def swap_linears(model: nn.Module, make, skip=()):
    """Replace every nn.Linear child of model (but those named in skip) by make(linear), in place."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(module, name, make(child))
    return model


def speed_up(model: nn.Module, cpu_kernels: bool | None = None):
    """Swap the CPU kernels into a model on the CPU (FastLinear, sharing each nn.Linear's parameters: tied weights
    stay tied, and the state dict keeps its names) where the CPU kind measured faster with them: CPU_KERNELS, or
    cpu_kernels if given. A model on another device is left as it is."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not on_cpu or not (CPU_KERNELS if cpu_kernels is None else cpu_kernels):
        return model

    def fast(lin):
        f = FastLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        f.weight, f.bias = lin.weight, lin.bias
        return f

    return swap_linears(model, lambda lin: lin if isinstance(lin, FastLinear) else fast(lin))


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8 with one scale per output channel (symmetric: w ≈ q * scale, q in
    -127..127): decoding reads 1 byte per weight instead of 2 (bf16) or 4 (fp32). Activations keep their dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.cpu_kernels = isinstance(linear, FastLinear)  # speed_up ran: matvec and oneDNN here too

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if self.cpu_kernels and one_row_compiled(x) and x.dtype == torch.float32:
            y = matvec(x, self.weight, self.scale)  # (with bf16 x inductor's loop is not vectorized: 3x slower)
        elif x.device.type == "cpu" and rows <= 8 and x.shape[-1] % 16 == 0:
            # decoding: PyTorch's CPU kernel multiplies bf16 activations by the int8 weights without expanding them
            # (it crashes unless in_features % 16 == 0, true of every Phi); expanding them would move 2-4x the bytes.
            xb, s = x.reshape(rows, -1).to(torch.bfloat16), self.scale.to(torch.bfloat16)
            y = int8_mm(xb, self.weight, s).view(*x.shape[:-1], -1).to(x.dtype)
        else:  # a prompt, or another device: the weights expanded, multiplied as FastLinear does (fp32: oneDNN)
            y = (linear if self.cpu_kernels else F.linear)(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


# PyTorch's int8-weight kernel as a custom op: torch.compile keeps it as it is (it fails to lower the bare call, and
# its own bf16 product with the weights expanded ran the compiled batch-8 step at half the eager speed).
@torch.library.custom_op("phi_speed::int8_mm", mutates_args=())
def int8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x, weight, scale)  # x (rows, in) bf16 @ weight (out, in) int8 .T * scale (out,)


int8_mm.register_fake(lambda x, weight, scale: x.new_empty(x.shape[0], weight.shape[0]))


NOT_QUANTIZED = ("score", "router")  # a classifier's score; a MoE router (a small matrix whose rounding would move
# near-ties between experts: llama.cpp keeps it unquantized too)


def quantize_int8(model: nn.Module):
    """Replace every Linear of the blocks (experts included, not a MoE router) and the lm_head (not a classifier's
    score) by an Int8Linear, in place."""
    return swap_linears(model, Int8Linear, skip=NOT_QUANTIZED)


class Int4Linear(nn.Module):
    """A Linear whose weight is stored as 4-bit numbers in groups of `group` input columns, each group with a bf16
    scale and zero point (gpt-fast's scheme: w ≈ (q - 8) * scale + zero, q in 0..15, asymmetric per group), packed
    for PyTorch's int4 kernel of the weight's device (CPU; CUDA: tinygemm, bf16 tensor cores, its own tile layout),
    which multiplies bf16 activations by them without expanding the weight: half a byte per weight (plus 4 bytes a
    group)."""

    def __init__(self, linear: nn.Linear, group: int):
        super().__init__()
        w = linear.weight.detach().float()
        out_features, in_features = w.shape
        g = w.reshape(out_features, in_features // group, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo).clamp(min=1e-6) / 15
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).flatten(1)  # (out, in)
        if w.is_cuda:  # from two 4-bit numbers a byte (the even column high), into tiles of 16 x inner_k_tiles
            tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.register_buffer("weight", packed)
        zeros = lo + 8 * scale  # (the kernel computes (q - 8) * scale + zero)
        sz = torch.stack([scale, zeros], -1).transpose(0, 1).contiguous()  # (in / group, out, 2)
        self.register_buffer("scales_and_zeros", sz.bfloat16())
        self.bias, self.group, self.in_features = linear.bias, group, in_features

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (the kernel needs it contiguous)
        mm = torch.ops.aten._weight_int4pack_mm if rows.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(rows, self.weight, self.group, self.scales_and_zeros)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_int4(model: nn.Module, group: int = 128):
    """Replace the blocks' and the lm_head's Linears by Int4Linear (groups of `group` columns, or the largest of 128,
    64, 32 that divides a Linear's inputs; a Linear none divides stays as it is), in place. CPU or CUDA (the CUDA
    kernel also wants outputs in multiples of 8)."""
    if next(model.parameters()).device.type not in ("cpu", "cuda"):
        raise ValueError("int4 weights need the CPU or CUDA (PyTorch's int4 kernels)")

    def int4(linear):
        fits = [g for g in (group, 64, 32) if linear.in_features % g == 0]
        fits = fits if linear.weight.device.type == "cpu" or linear.out_features % 8 == 0 else []
        return Int4Linear(linear, fits[0]) if fits else linear

    return swap_linears(model, int4, skip=NOT_QUANTIZED)


# -----------------------------------------------------------------------------------------------------------------
# Sampling (the same steps, in the same order, as transformers' logits processors)


def process_logits(logits, prev_ids, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    """logits (B, V) -> filtered logits in fp32: repetition penalty over prev_ids (B, S), then temperature, top-k,
    top-p (removed entries become -inf). Matches RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper and TopPLogitsWarper."""
    logits = logits.float()
    if repetition_penalty != 1.0:  # seen tokens: positive logits divided, negative multiplied
        seen = logits.gather(1, prev_ids)
        logits = logits.scatter(
            1, prev_ids, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        )
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # drop the least likely tokens holding 1 - top_p of the mass
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(logits, prev_ids, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """Next token (B,) from logits (B, V): argmax at temperature 0, else a draw from the filtered distribution."""
    logits = process_logits(logits, prev_ids, temperature or 1.0, top_k, top_p, repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def prefill(model, ids, mask, cache):
    """Run the prompt (B, T) through the model, filling the cache; logits of the last position (B, V) (the lm_head
    runs on that position only)."""
    return model.lm_head(phi.PhiModel.forward(model, ids, mask, None, cache)[:, -1])


def can_decode_step(model, cache) -> bool:
    """Can a one-token decode on this cache take decode_step? Not with flash-attn, nor while a LongRoPE model can
    still cross its original context (a cache no longer than that never does)."""
    long_ok = not model.rotary.scaled or cache.long or cache.ids.shape[1] <= model.rotary.original
    return model.flash_attn is None and long_ok


def compiled_step_ok(model, cache) -> bool:
    """Can a compiled step (decode, or speculative verify) run on this cache? Where decode_step can, but for a
    mixture of experts, whose routing picks the experts to run on the host."""
    return can_decode_step(model, cache) and not model.config.moe


def decode_step(model, input_ids, cache):
    """New tokens (B, T) -> hidden states (B, T, C), with shapes that depend on T only, not on how full the cache
    is: the tokens attend over all max_len slots under a mask, and the fill level (cache.slot) is read on the device
    only. This is the step torch.compile compiles once (gpt-fast's decode_one_token): T = 1 for decoding, T = k + 1
    for a speculative verify step."""
    T = input_ids.shape[1]
    at = cache.slot.view(1) + torch.arange(T, device=input_ids.device)  # (T,) the next T slots
    last = (cache.slot.view(1) - 1).clamp(min=0)
    pos = torch.where(cache.slot > 0, cache.pos.index_select(1, last) + 1, 0) + torch.arange(T, device=at.device)
    cache.ids.index_copy_(1, at, input_ids)
    cache.pos.index_copy_(1, at, pos)  # (B, T)
    cache.valid.index_fill_(1, at, True)
    cache.slot += T
    allowed = cache.valid[:, None, :] & (cache.slots <= at[:, None])  # (B, T, S): causal, no pads
    if model.config.sliding_window is not None:
        allowed = allowed & (cache.slots > at[:, None] - model.config.sliding_window)
    cos, sin = model.rotary(pos, model.embed.weight.dtype, cache.long)
    return model.blocks(model.embed(input_ids), phi.AttentionInputs(cos, sin, allowed[:, None], cache, at))


@torch.no_grad()  # also under torch.compile: a compiled step run with grad enabled loses its cache writes
def decode_tokens(model, tokens, cache):
    """New tokens (B, T) -> logits (B, T, V): decode_step where it can run, else the model's forward."""
    if can_decode_step(model, cache):
        return model.lm_head(decode_step(model, tokens, cache))
    return model(tokens, cache=cache)


@torch.no_grad()
def decode_one_token(model, token, cache):
    """One new token per row (B,) -> logits (B, V)."""
    return decode_tokens(model, token[:, None], cache)[:, -1]


verify_tokens = decode_tokens  # speculative decoding's verify step; --compile rebinds it (compile_verify)
eager_decode_one_token = decode_one_token  # the plain step, kept when --compile rebinds decode_one_token


def compile_decode(device):
    """decode_one_token under torch.compile: static shapes, so it is traced once for a whole generation (gpt-fast).
    On CUDA it is also captured as a CUDA graph (mode "reduce-overhead"): a token is one graph replay instead of
    hundreds of kernel launches from Python, which otherwise bound small-batch decoding there (the KV cache's
    tensors keep fixed addresses for it, see phi.KVCache). Measured on an H100, 1.4b bf16 batch 1: 204 tok/s
    compiled without graphs, 433 with them."""
    cuda = torch.device(device).type == "cuda"
    return torch.compile(eager_decode_one_token, fullgraph=True, mode="reduce-overhead" if cuda else None)


def compile_verify(device):
    """decode_tokens under torch.compile, for speculative decoding's verify step (the last token and up to k
    proposals, 1 to k + 1 tokens as the drafts follow the acceptance): compiled for the first size, then once more
    with the size as a symbol (torch.compile's automatic dynamic shapes); every other shape is fixed."""
    cuda = torch.device(device).type == "cuda"
    return torch.compile(decode_tokens, fullgraph=True, mode="reduce-overhead" if cuda else None)


def stop_ids(model, eos_ids=None) -> set:
    """The ids that end a row: eos_ids when given, else the model's own (set by load())."""
    return set(eos_ids if eos_ids is not None else getattr(model, "eos_ids", ()))


@torch.no_grad()
def generate_batch(
    model,
    prompts,
    max_new_tokens=128,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    repetition_penalty=1.0,
    eos_ids=None,
    generator=None,
    stats=None,
):
    """Generate for a batch of prompts (lists of ids, left-padded together). Yields a (B,) tensor of new tokens
    per step; a row that has produced an EOS id keeps yielding -1. Stops when every row is done."""
    dev = model.embed.weight.device
    eos = torch.tensor(sorted(stop_ids(model, eos_ids)), dtype=torch.long, device=dev)
    B, T = len(prompts), max(map(len, prompts))
    context = model.config.max_position_embeddings
    if T > context:
        raise ValueError(f"the prompt is {T} tokens, longer than the model's context of {context}")
    if T + max_new_tokens > context:
        print(f"note: generating {context - T} tokens, not {max_new_tokens}: the context is {context}", file=sys.stderr)
        max_new_tokens = context - T
    ids = torch.zeros(B, T, dtype=torch.long, device=dev)
    mask = torch.zeros(B, T, dtype=torch.long, device=dev)
    for r, p in enumerate(prompts):  # left padding: every row's last token sits at T - 1
        ids[r, T - len(p) :], mask[r, T - len(p) :] = torch.tensor(p, dtype=torch.long), 1
    cache = phi.KVCache(model.config, B, T + max_new_tokens, dtype=model.embed.weight.dtype, device=dev)
    # tokens seen so far per row, for the repetition penalty; a pad slot repeats the row's first real token
    seen = torch.where(mask.bool(), ids, ids.gather(1, (mask == 0).sum(1, keepdim=True).clamp(max=T - 1)))
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=int(mask.sum()), new_tokens=0)
    produced = torch.zeros((), dtype=torch.long, device=dev)
    t0 = time.perf_counter()
    try:
        logits = prefill(model, ids, mask if (mask == 0).any() else None, cache)
        for step in range(max_new_tokens):
            token = sample(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)
            if step == 0:
                stats["prefill_s"], t0 = time.perf_counter() - t0, time.perf_counter()
            token = token.masked_fill(done, -1)
            done |= torch.isin(token, eos)
            produced += (token >= 0).sum()
            yield token
            if step == max_new_tokens - 1 or done.all():
                break
            if repetition_penalty != 1.0:
                seen = torch.cat((seen, token.clamp(min=0)[:, None]), 1)
            # the compiled step traces the fixed-shape decode_step only: flash-attn, a LongRoPE model that can still
            # cross its original context in this cache, and a mixture of experts take the plain step
            step_fn = decode_one_token if compiled_step_ok(model, cache) else eager_decode_one_token
            logits = step_fn(model, token.clamp(min=0), cache)
            if step == 0:  # with --compile this first step also compiles
                stats["first_step_s"] = time.perf_counter() - t0
            elif step == 1:  # tokens the steps after it produce: new_tokens - this
                stats["first_tokens"] = int(produced)
    finally:  # also when the caller stops early (EOS, stop string)
        stats["decode_s"], stats["new_tokens"] = time.perf_counter() - t0, int(produced)


def generate(
    model,
    prompt_ids,
    max_new_tokens=128,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    repetition_penalty=1.0,
    eos_ids=None,
    generator=None,
    stats=None,
):
    """Yields one int per new token for one prompt (a list of ints or a (1, T) LongTensor); stops at an EOS id
    (not yielded) or after max_new_tokens. Greedy at temperature 0."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    stops = stop_ids(model, eos_ids)
    for token in generate_batch(
        model, [prompt_ids], max_new_tokens, temperature, top_k, top_p, repetition_penalty, stops, generator, stats
    ):
        t = int(token[0])
        if t < 0 or t in stops:
            return
        yield t


# -----------------------------------------------------------------------------------------------------------------
# Speculative decoding (batch 1, greedy): cheap drafts, verified by the model in one forward over the KV cache


def lookup_draft(context: list, k: int, max_ngram=3) -> list:
    """Prompt lookup: the (up to) k tokens that followed the latest earlier occurrence of the context's last n-gram,
    for n = max_ngram .. 1 (no second model: text that repeats what came before drafts itself)."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        tail = context[-n:]
        for i in range(len(context) - n - 1, -1, -1):
            if context[i : i + n] == tail:
                return context[i + n : i + n + k]
    return []


def catch_up(model, cache, ids):
    """Make the cache hold exactly ids: roll it back past what differs or is extra, run what is missing."""
    have = int(cache.slot)
    if have > len(ids):
        cache.slot.fill_(len(ids))
    elif have < len(ids):
        model(torch.tensor([ids[have:]], device=model.embed.weight.device), cache=cache)


def verdict(logits, proposals, q, temperature, top_k, top_p, generator):
    """(n, token): how many proposals the model keeps, given its logits (n + 1, V) after `last` and each proposal,
    and its own token after the kept ones. Greedy: proposals up to the first that is not the model's argmax. Sampling:
    the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023), under which the tokens are distributed as
    the model's own samples: a proposal d drawn from q is kept with probability min(1, p(d) / q(d)); the first one
    rejected is replaced by a draw from max(p - q, 0), renormalised; all kept, one more draw from p. q is None for
    prompt lookup: a draft taken for certain (q(d) = 1, so max(p - q, 0) is p without d)."""
    if temperature == 0:
        wanted = logits.argmax(-1).tolist()
        n = next((i for i, (d, w) in enumerate(zip(proposals, wanted)) if d != w), len(proposals))
        return n, wanted[n]
    p = process_logits(logits, None, temperature, top_k, top_p).softmax(-1)  # (n + 1, V)
    for i, d in enumerate(proposals):
        qd = 1.0 if q is None else q[i][d].item()
        if torch.rand((), generator=generator, device=p.device).item() * qd < p[i, d].item():
            continue  # kept
        residual = p[i].clone() if q is None else (p[i] - q[i]).clamp(min=0)
        if q is None:
            residual[d] = 0
        if residual.sum() <= 0:  # (only if p(d) = 1, where d was kept: never divide by 0)
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(proposals), int(torch.multinomial(p[-1], 1, generator=generator))


@torch.no_grad()
def generate_speculative(
    model,
    prompt_ids,
    max_new_tokens=128,
    k=4,
    draft=None,
    eos_ids=None,
    stats=None,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    generator=None,
    **_,
):
    """Decoding of one prompt in fewer model calls, with the output of generate(): greedy, token for token; sampled,
    the same distribution (see verdict). Each step proposes up to k tokens (the draft model's continuation, or prompt
    lookup when draft is None), runs the last token and the proposals through the model in one forward over the KV
    cache, keeps the proposals up to the first the model rejects plus a token of its own, and rolls the cache back
    past the rest. A LongRoPE model's verify step never crosses the original context part-way (a rejected token
    past it would leave keys rotated with the long factors before the sequence got there). The number of drafts
    follows how many were accepted (one more than the last step kept, up to k); after two steps that kept none it
    drafts nothing for four steps (plain one-token steps), so text that does not repeat costs little extra."""
    stops, ids = stop_ids(model, eos_ids), list(prompt_ids)
    dev, context = model.embed.weight.device, model.config.max_position_embeddings
    if len(ids) > context:
        raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's context of {context}")
    max_new_tokens = min(max_new_tokens, context - len(ids))
    if max_new_tokens < 1:
        return
    cache = phi.KVCache(model.config, 1, len(ids) + max_new_tokens, dtype=model.embed.weight.dtype, device=dev)
    dcache = draft and phi.KVCache(
        draft.config, 1, len(ids) + max_new_tokens, dtype=draft.embed.weight.dtype, device=dev
    )
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(ids), new_tokens=0, drafted=0, accepted=0)
    size, misses, rest = k, 0, 0  # drafts to propose next; steps in a row that kept none; steps left without
    t0 = time.perf_counter()
    logits = prefill(model, torch.tensor([ids], device=dev), None, cache)
    last = int(sample(logits, None, temperature, top_k, top_p, 1.0, generator))
    stats["prefill_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    try:
        while True:
            if last in stops:
                return
            yield last
            ids.append(last)
            stats["new_tokens"] += 1
            start = int(cache.slot)  # the cache holds ids[:-1]; `last` goes in with the proposals
            budget = min(0 if rest else size, max_new_tokens - stats["new_tokens"] - 1, cache.ids.shape[1] - start - 1)
            if budget < 0:
                return
            if model.rotary.scaled and not cache.long and start < model.rotary.original:
                budget = min(budget, model.rotary.original - start - 1)
            q = None  # the draft model's distributions, when it samples its proposals
            if draft is None:
                proposals = lookup_draft(ids, budget)
            else:
                catch_up(draft, dcache, ids[:-1])
                proposals, q, token = [], [], last
                for _ in range(budget):
                    dl = draft(torch.tensor([[token]], device=dev), cache=dcache)[0, -1:]  # (1, V)
                    if temperature:
                        q.append(process_logits(dl, None, temperature, top_k, top_p).softmax(-1)[0])
                    token = int(sample(dl, None, temperature, top_k, top_p, 1.0, generator))
                    proposals.append(token)
            verify = verify_tokens if compiled_step_ok(model, cache) else decode_tokens
            logits = verify(model, torch.tensor([[last] + proposals], device=dev), cache)[0]
            n, after = verdict(logits, proposals, q, temperature, top_k, top_p, generator)
            stats["drafted"], stats["accepted"] = stats["drafted"] + len(proposals), stats["accepted"] + n
            if proposals:  # follow the acceptance: back off when drafts keep failing
                size = min(k, n + 1)  # one more than this step kept
                misses = 0 if n else misses + 1
                if misses == 2:  # two steps in a row kept none: four plain steps
                    rest, misses = 4, 0
            elif rest:
                rest -= 1
            cache.slot.fill_(start + 1 + n)  # keep `last` and the accepted proposals
            for token in proposals[:n]:
                if token in stops:
                    return
                yield token
                ids.append(token)
                stats["new_tokens"] += 1
            last = after
    finally:
        stats["decode_s"] = time.perf_counter() - t0


def cut_at_stop(text, stops):
    """(text to show, stopped): text up to the first stop string; while none has appeared, hold back a tail that
    could still become one."""
    hits = [text.index(s) for s in stops if s in text]
    if hits:
        return text[: min(hits)], True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False


# -----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate text with a Phi checkpoint (Hub id or local directory).")
    p.add_argument("--model", default="microsoft/phi-2", help="Hub id or local directory (default microsoft/phi-2)")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--prompt-file", help="a file with one prompt per line, run as a padded batch")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model family's chat format")
    p.add_argument("--system", help="system message for --chat/--interactive")
    p.add_argument("--interactive", action="store_true", help="chat loop on stdin, keeping the conversation")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "flash"])
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    p.add_argument(
        "--quantize", choices=["int8", "int4"], help="weight-only int8 (per channel) or int4 (groups of 128)"
    )
    p.add_argument("--adapter", help="a PEFT LoRA adapter (Hub id or directory), merged into the weights at load")
    p.add_argument("--speculate", type=int, default=0, metavar="K", help="speculative decoding, K drafts a step")
    p.add_argument("--draft", help="with --speculate: a smaller checkpoint that drafts (default: prompt lookup)")

    def error(message):  # argparse's own errors too: one line on stderr, exit code 1
        print(f"generate.py: error: {message}", file=sys.stderr)
        sys.exit(1)

    p.error = error
    args = p.parse_args(argv)
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?"
    try:
        run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def check_args(args):
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError("--max-new-tokens and --num-samples must be >= 1")
    if args.speculate < 0 or args.draft and not args.speculate:
        raise ValueError("--speculate K needs K >= 1 (and --draft needs --speculate)")
    if args.speculate and args.repetition_penalty != 1.0:
        raise ValueError("--speculate does not take a --repetition-penalty")
    if args.attn == "flash":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not device.startswith("cuda"):
            raise ValueError(f"--attn flash needs a CUDA device, got {device}")
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ValueError("--attn flash needs the flash-attn package (pip install flash-attn)") from None
        if args.dtype == "float32":
            raise ValueError("--attn flash needs --dtype bfloat16 or float16")


def run(args):
    global decode_one_token, verify_tokens
    check_args(args)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [line.rstrip("\n") for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    if not prompts and not args.interactive:
        prompts = ["def print_prime(n):"]
    model, tok = load(args.model, args.dtype, args.device, args.revision, args.attn, args.quantize, args.adapter)
    print(
        f"loaded {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{model.embed.weight.dtype}, {model.embed.weight.device}",
        file=sys.stderr,
    )
    if args.compile and model.config.moe:  # generate_batch would take the plain step at every token
        print("note: --compile is not used: a mixture of experts picks its experts on the host", file=sys.stderr)
    elif args.compile:  # static shapes: compiled once for the whole generation (and per verify size)
        decode_one_token = compile_decode(model.embed.weight.device)
        verify_tokens = compile_verify(model.embed.weight.device)
    generator = None
    if args.seed is not None:
        torch.manual_seed(args.seed)
        generator = torch.Generator(model.embed.weight.device).manual_seed(args.seed)
    eos = set(model.eos_ids)
    if args.chat or args.interactive:  # the family's end-of-turn token ends a reply too
        eos |= {tok.added[t]["id"] for t in ("<|end|>", "<|im_end|>") if t in tok.added}
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        eos_ids=eos,
        generator=generator,
    )
    if args.interactive:
        return interactive(model, tok, args, sampling)
    texts = [chat_prompt(tok, p, args.system) if args.chat else p for p in prompts]
    batch = [tok.encode(t, bos=tok.add_bos) for t in texts for _ in range(args.num_samples)]
    stats = {}
    if args.speculate:
        if len(batch) != 1:
            raise ValueError("--speculate decodes one prompt at a time (batch 1)")
        draft = load(args.draft, args.dtype, args.device, args.revision)[0] if args.draft else None
        if draft is not None and draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"--draft {args.draft}: vocabulary {draft.config.vocab_size}, the model's {model.config.vocab_size}"
            )
        produce = partial(generate_speculative, k=args.speculate, draft=draft)
        stream_one(model, tok, batch[0], sampling, args.stop, stats, produce)
        print(f"speculative: {stats['accepted']} of {stats['drafted']} drafts accepted", file=sys.stderr)
    elif len(batch) == 1:
        stream_one(model, tok, batch[0], sampling, args.stop, stats)
    else:
        outs = [[] for _ in batch]
        for step in generate_batch(model, batch, stats=stats, **sampling):
            for r, t in enumerate(step.tolist()):
                if t >= 0 and t not in eos:
                    outs[r].append(t)
        for r, ids in enumerate(outs):
            text, _ = cut_at_stop(tok.decode(ids), args.stop)
            print(f"=== {r} ===\n{text}", flush=True)
    report(stats, args.compile)


def chat_prompt(tok, user, system=None, history=()):
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    return tok.render_chat(messages + [{"role": "user", "content": user}], add_generation_prompt=True)


def stream_one(model, tok, prompt_ids, sampling, stops, stats, produce=None):
    """Print the continuation as it comes (tokens from generate, or produce); returns its text (cut at a stop)."""
    stream, text, shown = tok.stream(context=prompt_ids), "", 0
    for t in (produce or generate)(model, prompt_ids, stats=stats, **sampling):
        text += stream.push(t)
        visible, stopped = cut_at_stop(text, stops)
        print(visible[shown:], end="", flush=True)
        shown = len(visible)
        if stopped:
            break
    print(flush=True)
    return cut_at_stop(text, stops)[0]


def interactive(model, tok, args, sampling):
    history = []
    print("chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        ids = tok.encode(chat_prompt(tok, line.rstrip("\n"), args.system, history), bos=tok.add_bos)
        stats = {}
        reply = stream_one(model, tok, ids, sampling, args.stop, stats)
        history += [{"role": "user", "content": line.rstrip("\n")}, {"role": "assistant", "content": reply}]
        report(stats, args.compile)


def report(stats, compiled=False):
    if stats.get("prefill_s"):
        n, s = stats["new_tokens"], stats["decode_s"]
        rate = f"{n / max(s, 1e-9):.1f} tokens/s"
        if compiled and "first_tokens" in stats:  # the one-off compile is not the speed of decoding
            rate = (
                f"{(n - stats['first_tokens']) / max(s - stats['first_step_s'], 1e-9):.1f} tokens/s after "
                f"the first step (which compiles: {stats['first_step_s']:.1f} s)"
            )
        print(
            f"prompt: {stats['prompt_tokens']} tokens, {stats['prompt_tokens'] / stats['prefill_s']:.1f} tokens/s; "
            f"generation: {n} tokens, {rate}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
