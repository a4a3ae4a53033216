"""tokenizer.py against the reference libraries (tokenizers, sentencepiece, llama.cpp vectors) on the real vocabularies
of each family; streaming decoding; chat rendering."""

import json
import types
import random
import shutil
import subprocess
import sys

import pytest
import transformers

import generate
import tokenizer
from conftest import ROOT, TOK, hub_repo, needs_reference, oracle, python_env


FAMILIES = ["codegen", "phi3", "phi4", "phi4mini"]


_tokenizers = {}


def our_tokenizer(family):
    if family not in _tokenizers:
        _tokenizers[family] = generate.load_tokenizer(TOK / family)
    return _tokenizers[family]


def oracle_encode(family, text, specials=True):
    ref = oracle(family)
    ref.encode_special_tokens = not specials  # True: special tokens in the text are plain text
    return ref.encode(text, add_special_tokens=False).ids


PIECES = {
    "code": [
        "def f(x):\n",
        "\treturn x\n",
        "    if a == b:\n",
        "        pass",
        "class A:\n\t\tpass\n",
        "x = [1, 2, 3]",
        "  # comment\n",
        "for (int i = 0; i < n; ++i) {\r\n",
        "}\r\n",
        "print(f'{x!r}')",
        "it's",
        "they'LL",
        "we've",
        "I'm",
        "...",
        "--",
        "::",
        "=>",
        "0x1F",
        "3.14159",
        "1234567890",
        "\\n",
        '"quoted"',
        "a_b",
        "CamelCase",
    ],
    "space": [
        " ",
        "  ",
        "   ",
        "    ",
        "     ",
        " " * 17,
        " " * 40,
        "\t",
        "\t\t",
        "\t\t\t\t",
        "\n",
        "\n\n",
        "\r\n",
        " \n ",
        "\u00a0",
        "\u3000",
        "\u2009",
        "\x0b",
        "\x0c",
        "\u2028",
    ],
    "words": [
        "hello",
        "Hello",
        " world",
        "The",
        " quick brown fox",
        "naïve café",
        "Привет мир",
        "Γειά σου",
        "生活的真谛是",
        "日本語のテキスト",
        "한국어 텍스트",
        "مرحبا بالعالم",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "שלום עולם",
        "Ünïcödé",
        "ß",
        "İstanbul",
        "ﬁ",
        "Z̤͔ͧ̑̓ä͖̭̈̇",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "½ ⅓ ∑ ∞ ≠",
        "Führer",
        "Äpfel",
    ],
    "emoji": ["🤗", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🙂🙃", "🐍"],
    "control": ["\x00", "\x01", "\x07", "\x17", "\x1b[0m", "\x7f", "\u200b", "\ufeff", "\x1c", "\x1f"],
    "lookalike": ["<|", "|>", "<|end", "<|user|", "<s>", "</s>", "<unk>", "<|im_start|", "<<|end|>>"],
}


def fuzz_strings(family, n=2000):
    """Deterministic random texts: code, whitespace runs, CRLF, many scripts, emoji, control characters, the
    family's own special tokens inside text, random code points, and the empty string."""
    rng = random.Random(family)
    specials = list(our_tokenizer(family).added)
    out = [""]
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.choice(list(PIECES) + ["special", "random"])
            if kind == "special":
                parts.append(rng.choice(specials))
            elif kind == "random":
                parts.append(
                    "".join(
                        chr(
                            rng.choice(
                                [rng.randint(0x20, 0x2FF), rng.randint(0x370, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]
                            )
                        )
                        for _ in range(rng.randint(1, 4))
                    )
                )
            else:
                parts.append(rng.choice(PIECES[kind]))
        out.append("".join(parts))
    return out


def read_vectors(name):
    texts = (TOK / "vectors" / f"{name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (TOK / "vectors" / f"{name}.out").read_text().split("\n")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]


@needs_reference("tokenizers")
@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_matches_reference_on_fuzz_strings(family):
    tok, mismatches = our_tokenizer(family), []
    for s in fuzz_strings(family):
        got, want = tok.encode(s), oracle_encode(family, s)
        if got != want:
            mismatches.append((s, got, want))
        assert tok.decode(want) == oracle(family).decode(want, skip_special_tokens=False), repr(s)
        plain = tok.encode(s, allowed_special=set())
        if plain != oracle_encode(family, s, specials=False):
            mismatches.append((s, plain, "specials as text"))
        # Round trip. Not through a non-special added token (matched even then) that eats whitespace (Phi-3's
        # "</s>", Phi-4-mini's "<|tool_call|>"), nor in SentencePiece, which puts a "▁" before the text after it.
        if not any(
            c in s
            for c, a in tok.added.items()
            if not a["special"] and (a["lstrip"] or a["rstrip"] or tok.sentencepiece)
        ):
            assert tok.decode(plain) == s, f"round trip of {s!r}"
    assert not mismatches, f"{len(mismatches)} of 2000 differ, e.g. {mismatches[0]}"


@needs_reference("tokenizers/vectors")
@pytest.mark.parametrize("name", ["ggml-vocab-phi-3.gguf", "llama-cpp-python-0.3.36.ggml-vocab-phi-3.gguf"])
def test_phi3_llama_cpp_vectors(name, tmp_path):
    """llama.cpp's Phi-3 vectors (SentencePiece's ids), through tokenizer.json and through tokenizer.model alone."""
    shutil.copy(TOK / "phi3" / "tokenizer.model", tmp_path)
    from_model = generate.load_tokenizer(tmp_path)
    for text, ids in read_vectors(name):
        assert our_tokenizer("phi3").encode(text) == ids, repr(text)
        assert from_model.encode(text) == ids, repr(text)


@needs_reference("tokenizers/vectors")
def test_gpt2_llama_cpp_vectors(tmp_path):
    """llama.cpp's GPT-2 vectors: plain GPT-2 BPE (codegen's vocab.json + merges.txt, without phi's added
    whitespace tokens) matches all of them; the full phi tokenizer matches the reference on the same texts."""
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(TOK / "codegen" / f, tmp_path)
    gpt2 = generate.load_tokenizer(tmp_path)
    for text, ids in read_vectors("ggml-vocab-gpt-2.gguf"):
        assert gpt2.encode(text) == ids, repr(text)
        assert our_tokenizer("codegen").encode(text) == oracle_encode("codegen", text), repr(text)


@needs_reference("tokenizers")
@pytest.mark.parametrize(
    "family,files",
    [
        ("codegen", ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json")),
        ("phi3", ("tokenizer.model", "tokenizer_config.json")),  # added tokens and rstrip flags from the config
    ],
)
def test_tokenizer_without_tokenizer_json_matches_reference(family, files, tmp_path):
    """The other files a checkpoint may ship instead of tokenizer.json give the same ids as tokenizer.json."""
    for f in files:
        shutil.copy(TOK / family / f, tmp_path)
    tok = generate.load_tokenizer(tmp_path)
    for s in fuzz_strings(family, 500):
        assert tok.encode(s) == oracle_encode(family, s), repr(s)


@needs_reference("tokenizers")
def test_phi3_tokenizer_model_against_sentencepiece(tmp_path):
    """tokenizer.model read by our own protobuf reader: same ids as the sentencepiece library."""
    import sentencepiece

    shutil.copy(TOK / "phi3" / "tokenizer.model", tmp_path)
    tok = generate.load_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOK / "phi3" / "tokenizer.model"))
    for s in fuzz_strings("phi3"):
        assert tok.encode(s) == sp.encode(s), repr(s)
        assert tok.decode(sp.encode(s)) == sp.decode(sp.encode(s)), repr(s)


@needs_reference("tokenizers/vectors")
def test_onnxruntime_extensions_vectors(tmp_path):
    cases = {
        c["name"]: c
        for c in json.loads((TOK / "vectors/onnxruntime-extensions.expected_ids.json").read_text())["cases"]
    }
    c = cases["phi3_blob_add_bos"]
    shutil.copy(TOK / "phi3/variants/phi-3.tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(TOK / "phi3/variants/phi-3.tokenizer_config.json", tmp_path / "tokenizer_config.json")
    variant = generate.load_tokenizer(tmp_path)
    assert variant.add_bos and variant.encode(c["text"], bos=True) == c["ids"]
    assert variant.encode(c["text"]) == cases["phi3_blob_no_special"]["ids"]
    c = cases["phi4_chat_template"]
    assert our_tokenizer("phi4").render_chat(c["messages"]) == c["text"]
    assert our_tokenizer("phi4").encode(c["text"]) == c["ids"]
    assert our_tokenizer("phi4").decode(c["ids"], skip_special=True) == c["decoded_skip_special"]
    c = cases["phi4_mini_reasoning_chat_template"]
    assert our_tokenizer("phi4mini").encode(c["text"]) == c["ids"]


@needs_reference("tokenizers")
@pytest.mark.parametrize("layout", ["hub", "onnxruntime-extensions"])
def test_phi3_small_cl100k(layout, tmp_path):
    """Phi-3-small: cl100k_base ranks + its specials, against tiktoken's own cl100k encoding of the same file. The
    Hub checkpoint has only cl100k_base.tiktoken (its specials are in its tokenizer's code); ORT-ext adds a file."""
    shutil.copy(TOK / "tiktoken" / "cl100k_base.tiktoken", tmp_path)
    if layout != "hub":
        shutil.copy(TOK / "phi3small" / "tokenizer_module.json", tmp_path)
    tok = generate.load_tokenizer(tmp_path)
    assert tok.encode("This is a test.") == [2028, 374, 264, 1296, 13]
    assert (tok.bos_id, tok.eos_id) == (100257, 100257)
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    module = json.loads((TOK / "phi3small" / "tokenizer_module.json").read_text())["added_tokens"]
    specials = {a["content"]: a["id"] for a in module} | {"<|end|>": 100266}  # (ORT-ext's file lacks <|end|>)
    assert tok.encode("<|user|>\nHi<|end|>\n<|assistant|>\n<|endoftext|>") == [
        100262, 198, 13347, 100266, 198, 100263, 198, 100257
    ]  # fmt: skip
    ref = tiktoken.Encoding(
        "cl100k",
        pat_str=tokenizer.CL100K_PATTERN,
        special_tokens=specials,
        mergeable_ranks=load_tiktoken_bpe(str(tmp_path / "cl100k_base.tiktoken")),
    )
    for s in fuzz_strings("phi4", 500) + ["<|user|>Hi <|end|>\n<|assistant|>", "a<|endoftext|> <|system|>"]:
        assert tok.encode(s) == ref.encode(s, allowed_special="all"), repr(s)


@needs_reference("tokenizers")
def test_phi3_small_chat_format(tmp_path):
    """<|endoftext|><|user|>\n...<|end|>\n<|assistant|>\n (its template starts with bos = <|endoftext|>), and
    <|end|> ends the assistant's turn."""
    shutil.copy(TOK / "tiktoken" / "cl100k_base.tiktoken", tmp_path)
    tok = generate.load_tokenizer(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.render_chat(messages)
    assert text == "<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert tok.encode(text)[:3] == [100257, 100261, 198] and tok.encode(text)[-2:] == [100263, 198]
    model = types.SimpleNamespace(eos_ids={100257})
    assert generate.end_of_turn_ids(model, tok) == {100257, 100266}


@needs_reference("tokenizers")
@pytest.mark.parametrize("family", FAMILIES)
def test_stream_decoder_never_splits_characters(family):
    tok = our_tokenizer(family)
    for s in fuzz_strings(family, 300)[1:]:
        ids = tok.encode(s, allowed_special=set())
        stream = tok.stream()
        chunks = [stream.push(i) for i in ids]
        assert "".join(chunks) == tok.decode(ids)
        assert not any("\ufffd" in c for c in chunks)
        # continuing after a prompt: the first new token keeps its leading space (SentencePiece "▁")
        prompt = tok.encode("Say:")
        stream = tok.stream(context=prompt)
        assert "".join(stream.push(i) for i in ids) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]


@needs_reference("tokenizers")
@pytest.mark.parametrize("family", ["phi3", "phi4", "phi4mini"])
def test_chat_rendering_matches_apply_chat_template(family):
    """Our per-family chat formats against transformers' apply_chat_template on the checkpoint's own template."""
    ref = transformers.AutoTokenizer.from_pretrained(TOK / family)
    tok = our_tokenizer(family)
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?\n  Explain."},
        ],
    ]
    if family == "phi4mini":
        conversations.append(
            [{"role": "system", "content": "Use tools.", "tools": '[{"name": "f"}]'}, {"role": "user", "content": "Go"}]
        )
    for messages in conversations:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.render_chat(messages, add_generation_prompt=gen) == want
            assert tok.encode(want) == oracle_encode(family, want)


@needs_reference("tokenizers")
def test_phi2_chat_format():
    tok = our_tokenizer("codegen")
    assert tokenizer.chat_format(tok) == "phi2"
    assert tok.render_chat([{"role": "user", "content": "Name a prime."}]) == "Instruct: Name a prime.\nOutput:"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files \(looked for tokenizer.json, vocab.json"):
        generate.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match=r"tokenizer.json: model type 'Unigram' is not supported \(BPE only\)"):
        generate.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer.json: not valid JSON"):
        generate.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"role 'robot' is not one of system, user, assistant"):
        tokenizer.render_chat("phi3", [{"role": "robot", "content": "x"}])


@needs_reference("tokenizers")
def test_load_tokenizer_from_offline_hub_cache(tmp_path):
    """A Hub id resolves from a pre-filled Hugging Face cache with HF_HUB_OFFLINE=1 (no network here); an id
    missing from the cache is one clear error."""
    snap = hub_repo(tmp_path, "microsoft/phi-2", "0" * 40)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(TOK / "codegen" / f, snap)
    script = (
        "import generate, sys\n"
        "print(generate.load_tokenizer('microsoft/phi-2').encode('def print_prime(n):'))\n"
        "try:\n    generate.load_tokenizer('microsoft/not-cached')\n"
        "except FileNotFoundError as e:\n    print(e)\n"
    )
    env = python_env(HF_HOME=tmp_path, HF_HUB_OFFLINE=1)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ids, err_line = r.stdout.strip().split("\n")
    assert json.loads(ids) == oracle_encode("codegen", "def print_prime(n):")
    assert (
        err_line
        == "'microsoft/not-cached' is not a local directory and is not in the Hugging Face cache (offline, or the Hub is unreachable)"
    )


def test_tokenizer_module_needs_no_torch():
    """tokenizer.py is text in and out: importing it loads no torch (a tokenizer-only user needs none)."""
    code = "import sys, tokenizer; assert 'torch' not in sys.modules, 'torch was imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=python_env())
    assert r.returncode == 0, r.stderr
