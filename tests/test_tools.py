"""Tool calls and reasoning without a model: formats detected from stock chat templates
(tests/data/templates), conversations with calls rendered through them, and the calls each
template itself writes read back — allowed token by token by the call grammar, and split into
the same message whether whole or streamed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from qpack.runtime import grammar, tools
from qpack.runtime.chat import ChatTemplate
from qpack.runtime.chat_output import ChatOutput, ReasoningSplit
from qpack.runtime.chat_request import chat_features, chat_messages
from qpack.runtime.gguf import open_gguf
from qpack.runtime.tokenizer import Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
ARGS = {"city": "Paris", "unit": "c"}


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return Tokenizer.from_gguf(open_gguf(smollm2_path))


def template(tok, name):
    return ChatTemplate((TEMPLATES / name).read_text(), tok, name=name)


STOCK = {
    "hermes": "Qwen-Qwen3-0.6B.jinja",
    "llama3": "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "mistral": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}


def test_formats_are_detected_from_the_templates(tok, smollm2_path, gemma3_path):
    for fmt, name in STOCK.items():
        assert tools.detect_format(template(tok, name).source).name == fmt
    for path in (smollm2_path, gemma3_path):  # the real models' templates know no tools
        gf = open_gguf(path)
        t = ChatTemplate.from_metadata(gf.metadata, Tokenizer.from_gguf(gf))
        assert tools.detect_format(t.source) is tools.GENERIC


def call_id(fmt: str) -> str:
    return "abcDEF123" if fmt == "mistral" else "call_1"


def round_trip(fmt: str) -> list[dict]:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call_id(fmt),
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ARGS},
                }
            ],
        },  # fmt: skip
        {"role": "tool", "tool_call_id": call_id(fmt), "content": '{"temperature": 21}'},
    ]


@pytest.mark.parametrize("fmt", [*STOCK, "generic"])
def test_a_tool_round_trip_renders_through_the_template(tok, fmt):
    t = template(tok, STOCK[fmt]) if fmt in STOCK else ChatTemplate.fallback(tok)
    f = chat_features({"tools": [WEATHER]}, t)
    assert f.fmt.name == fmt
    text = t.render(chat_messages(f, round_trip(fmt)), **f.template_kwargs)
    # The tool's result reaches the model (Llama's template JSON-quotes it once more).
    assert '"temperature": 21' in text or '\\"temperature\\": 21' in text
    assert "get_weather" in text and "The weather in a city" in text  # so do the tools
    assert '"city": "Paris"' in text  # and the earlier call, in its format
    call_mark = {"hermes": "<tool_call>", "llama3": '"parameters"', "mistral": "[TOOL_CALLS]",
                 "generic": '{"tool_calls"'}[fmt]  # fmt: skip
    assert call_mark in text


def written_call(tok, fmt: str) -> str:
    """The call as the template itself writes an assistant's call: what its model emits."""
    t = template(tok, STOCK[fmt])
    f = chat_features({"tools": [WEATHER]}, t)
    msgs = chat_messages(f, round_trip(fmt)[:2])
    text = t.render(msgs, add_generation_prompt=False, **f.template_kwargs)
    head = {"hermes": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "mistral": "[/INST]"}[fmt]  # fmt: skip
    tail = {"hermes": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": t.eos_token}[fmt]
    written = text[text.rindex(head) + len(head) :]
    written = written[: written.rindex(tail)]
    if fmt == "hermes":  # Qwen3 writes an empty <think> block before the latest answer
        written = written.split("</think>\n\n")[-1]
    return written


def allowed_throughout(constraint, tok, text: str) -> bool:
    for t in tok.encode(text, add_bos=False, parse_special=True):
        if not np.isfinite(constraint.mask(np.zeros(tok.vocab_size, np.float32))[t]):
            return False
        constraint.advance(t)
    return True


def parse(fmt, text: str, tok, by_token: bool):
    out = ChatOutput(fmt=fmt)
    deltas = []
    if by_token:
        for t in tok.encode(text, add_bos=False, parse_special=True):
            deltas += out.feed(tok.decode([t], skip_special=False, from_start=False))
    else:
        deltas += out.feed(text)
    deltas += out.finish()
    return out, deltas


@pytest.mark.parametrize("fmt", list(STOCK))
@pytest.mark.parametrize("choice", ["required", "auto"])
def test_the_templates_own_call_is_allowed_and_read_back(tok, fmt, choice):
    written = written_call(tok, fmt)
    t = template(tok, STOCK[fmt])
    f = chat_features({"tools": [WEATHER, TIME], "tool_choice": choice}, t)
    assert allowed_throughout(f.constraint(t, tok.vocab_size), tok, written)
    for by_token in (False, True):
        out, deltas = parse(f.fmt, written, tok, by_token)
        [call] = out.tool_calls
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == ARGS
        assert out.finish_reason("stop") == "tool_calls"
        assert not (out.message()["content"] or "").strip()
        # The stream: index, id and name first, then fragments that add up to the arguments.
        parts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert parts[0]["id"] == call["id"] and parts[0]["function"]["name"] == "get_weather"
        assert "".join(p["function"]["arguments"] for p in parts) == call["function"]["arguments"]


def test_mistral_call_ids_fit_its_template():
    assert all(len(tools.MISTRAL.new_call_id()) == 9 for _ in range(20))
    assert tools.MISTRAL.new_call_id().isalnum()


def test_forced_calls_reject_prose_and_other_functions(tok):
    t = template(tok, STOCK["hermes"])
    named = {"type": "function", "function": {"name": "get_weather"}}
    f = chat_features({"tools": [WEATHER, TIME], "tool_choice": named}, t)
    assert not allowed_throughout(f.constraint(t, tok.vocab_size), tok, "Sure! ")
    other = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert not allowed_throughout(f.constraint(t, tok.vocab_size), tok, other)
    bad_args = '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}'
    assert not allowed_throughout(f.constraint(t, tok.vocab_size), tok, bad_args)


def test_auto_lets_prose_through_until_a_call_opens(tok):
    t = template(tok, STOCK["hermes"])
    f = chat_features({"tools": [WEATHER]}, t)
    text = "Let me check.\n" + written_call(tok, "hermes")
    assert allowed_throughout(f.constraint(t, tok.vocab_size), tok, text)
    out, _ = parse(f.fmt, text, tok, by_token=True)
    assert out.message()["content"] == "Let me check." and len(out.tool_calls) == 1
    prose, deltas = parse(f.fmt, "It is sunny < 30 degrees.", tok, by_token=True)
    assert prose.message()["content"] == "It is sunny < 30 degrees." and not prose.tool_calls
    assert "".join(d["content"] for d in deltas) == "It is sunny < 30 degrees."


def test_parallel_tool_calls_false_allows_one_call(tok):
    t = template(tok, STOCK["hermes"])
    one = written_call(tok, "hermes")
    f = chat_features({"tools": [WEATHER], "tool_choice": "required"}, t)
    assert allowed_throughout(f.constraint(t, tok.vocab_size), tok, one + "\n" + one)
    f = chat_features(
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}, t
    )
    assert not allowed_throughout(f.constraint(t, tok.vocab_size), tok, one + "\n" + one)


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_generic_calls_validate_against_the_parameters(tok, choice):
    t = ChatTemplate.fallback(tok)
    f = chat_features({"tools": [WEATHER, TIME], "tool_choice": choice}, t)
    text = json.dumps({"tool_calls": [{"name": "get_weather", "arguments": ARGS},
                                      {"name": "get_time", "arguments": {}}]})  # fmt: skip
    assert allowed_throughout(f.constraint(t, tok.vocab_size), tok, text)
    out, _ = parse(f.fmt, text, tok, by_token=True)
    assert [c["function"]["name"] for c in out.tool_calls] == ["get_weather", "get_time"]
    jsonschema.validate(json.loads(out.tool_calls[0]["function"]["arguments"]),
                        WEATHER["function"]["parameters"])  # fmt: skip
    bad = json.dumps({"tool_calls": [{"name": "get_weather", "arguments": {"unit": "k"}}]})
    assert not allowed_throughout(f.constraint(t, tok.vocab_size), tok, bad)
    answer = json.dumps({"response": 'It is "sunny" \u00e9t\u00e9 \\o/'}, ensure_ascii=False)
    assert allowed_throughout(f.constraint(t, tok.vocab_size), tok, answer) == (choice == "auto")
    out, deltas = parse(f.fmt, answer, tok, by_token=True)
    assert out.message()["content"] == 'It is "sunny" \u00e9t\u00e9 \\o/' and not out.tool_calls
    assert "".join(d.get("content", "") for d in deltas) == out.message()["content"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"reasoning_format": "loud"}, "reasoning_format"),
        ({"chat_template_kwargs": {"evil": 1}}, "chat_template_kwargs"),
    ],
)  # fmt: skip
def test_bad_tool_fields_are_named(tok, body, param):
    with pytest.raises(tools.ToolRequestError) as e:
        chat_features(body, ChatTemplate.fallback(tok))
    assert e.value.param == param


def test_tool_parameters_that_cannot_be_enforced_are_refused(tok):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}  # fmt: skip
    with pytest.raises(grammar.SchemaError) as e:
        chat_features({"tools": [bad]}, ChatTemplate.fallback(tok))
    assert e.value.keyword == "uniqueItems" and "'f'" in str(e.value)


# --- reasoning ------------------------------------------------------------------------------

THOUGHT = "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nThe answer is 4."


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_think_blocks_split_into_reasoning_whatever_the_pieces(step):
    out = ChatOutput(reasoning=ReasoningSplit())
    deltas = []
    for i in range(0, len(THOUGHT), step):
        deltas += out.feed(THOUGHT[i : i + step])
    deltas += out.finish()
    msg = out.message()
    assert msg["reasoning_content"] == "\nThe user wants 2+2. That is 4.\n"
    assert msg["content"] == "The answer is 4."
    assert "".join(d.get("reasoning_content", "") for d in deltas) == msg["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == msg["content"]


def test_a_prompt_that_opens_the_block_and_answers_without_one():
    out = ChatOutput(reasoning=ReasoningSplit(open=True))
    out.feed("thinking...</think>done")
    out.finish()
    assert (out.message()["reasoning_content"], out.message()["content"]) == ("thinking...", "done")
    plain = ChatOutput(reasoning=ReasoningSplit())
    plain.feed("<thin")
    plain.feed("king is fun")
    plain.finish()
    assert (
        plain.message()["content"] == "<thinking is fun"
        and "reasoning_content" not in plain.message()
    )


def test_reasoning_format_none_and_enable_thinking_reach_the_template(tok):
    t = template(tok, STOCK["hermes"])
    f = chat_features({"reasoning_format": "none"}, t)
    assert f.output().reasoning is None
    f = chat_features({"chat_template_kwargs": {"enable_thinking": False}}, t)
    text = t.render(chat_messages(f, [{"role": "user", "content": "hi"}]), **f.template_kwargs)
    assert text.endswith("<think>\n\n</think>\n\n")
    f = chat_features({}, t)
    assert not t.render(chat_messages(f, [{"role": "user", "content": "hi"}]),
                        **f.template_kwargs).endswith("</think>\n\n")  # fmt: skip
