"""The stock chat templates of the families qpack runs (tests/data/chat_templates/) render with
qpack's sandboxed chat code exactly as with jinja2 directly, in the environment Hugging Face
transformers renders them in (trim_blocks, lstrip_blocks, loop controls, its `tojson` and
`raise_exception`): the oracle here is plain jinja2, not qpack's code."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from qpack.runtime.chat import ChatTemplate, ChatTemplateError
from qpack.runtime.tokenizer import Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
# model file -> (BOS text, EOS text) of its tokenizer
SPECIALS = {
    "Qwen3-0.6B.jinja": (None, "<|im_end|>"),
    "Phi-3-mini-4k-instruct.jinja": ("<s>", "<|endoftext|>"),
    "Phi-3.5-mini-instruct.jinja": ("<s>", "<|endoftext|>"),
    "gemma-2-2b-it.jinja": ("<bos>", "<eos>"),
}

SYSTEM = {"role": "system", "content": "You are terse."}
HI = {"role": "user", "content": "Hi there "}
REPLY = {"role": "assistant", "content": " Hello! "}
AGAIN = {"role": "user", "content": "Capital of France? (ünïcode ✓)"}
CONVERSATIONS = {
    "one turn": [HI],
    "system": [SYSTEM, HI],
    "multi-turn": [HI, REPLY, AGAIN],
    "system multi-turn": [SYSTEM, HI, REPLY, AGAIN],
    "empty system": [{"role": "system", "content": ""}, HI],
}
THINKING = [  # Qwen3: a past answer's reasoning is dropped, the last one's kept
    HI,
    {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nHello!"},
    AGAIN,
    {"role": "assistant", "content": "<think>\nParis.\n</think>\n\nParis."},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_TURNS = [
    SYSTEM,
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": '{"temp": 21}'},
]


class _Raised(Exception):
    pass


def jinja2_render(source: str, **context) -> str:
    """Hugging Face's way (transformers' _compile_jinja_template), with jinja2 directly."""

    def raise_exception(message):
        raise _Raised(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(**context)


@functools.cache
def tokenizer(bos: str | None, eos: str) -> Tokenizer:
    """A small vocabulary holding the family's special tokens (no BOS added by the tokenizer,
    so that the rendered text is compared whole)."""
    specials = [t for t in (bos, eos) if t]
    tokens = specials + ["a", "b"]
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1, 1],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": tokens.index(eos),
        "tokenizer.ggml.add_bos_token": False,
    }
    if bos:
        md["tokenizer.ggml.bos_token_id"] = tokens.index(bos)
    return Tokenizer.from_metadata(md)


@functools.cache
def compiled(name: str) -> ChatTemplate:
    return ChatTemplate((TEMPLATES / name).read_text(), tokenizer(*SPECIALS[name]))


def both(name: str, messages, add_generation_prompt: bool, **extra) -> tuple[str, str]:
    source = (TEMPLATES / name).read_text()
    bos, eos = SPECIALS[name]
    ours = compiled(name).render(messages, add_generation_prompt, **extra)
    theirs = jinja2_render(
        source,
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos or "",
        eos_token=eos,
        **extra,
    )
    return ours, theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", [n for n in SPECIALS if not n.startswith("gemma")])
def test_stock_templates_render_as_jinja2(name, conversation, add_generation_prompt):
    ours, theirs = both(name, CONVERSATIONS[conversation], add_generation_prompt)
    assert ours == theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", ["one turn", "multi-turn"])
def test_gemma2_renders_as_jinja2(conversation, add_generation_prompt):
    ours, theirs = both("gemma-2-2b-it.jinja", CONVERSATIONS[conversation], add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<bos><start_of_turn>user\nHi there<end_of_turn>\n")


@pytest.mark.parametrize("conversation", ["system", "system multi-turn"])
def test_gemma2_refuses_a_system_turn_as_jinja2_does(conversation):
    with pytest.raises(_Raised, match="System role not supported"):
        jinja2_render(
            (TEMPLATES / "gemma-2-2b-it.jinja").read_text(), messages=CONVERSATIONS[conversation]
        )
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        both("gemma-2-2b-it.jinja", CONVERSATIONS[conversation], True)


@pytest.mark.parametrize("enable_thinking", [True, False, None])
@pytest.mark.parametrize("messages", [[HI], THINKING, [SYSTEM, *THINKING, AGAIN]])
def test_qwen3_thinking_switch_renders_as_jinja2(messages, enable_thinking):
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ours, theirs = both("Qwen3-0.6B.jinja", messages, True, **extra)
    assert ours == theirs
    closed = ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert closed == (enable_thinking is False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen3_tools_render_as_jinja2(add_generation_prompt):
    ours, theirs = both("Qwen3-0.6B.jinja", TOOL_TURNS, add_generation_prompt, tools=TOOLS)
    assert ours == theirs
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in ours
    )
