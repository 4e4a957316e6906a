"""Tool calls, JSON-schema answers and refusals end to end: the official `openai` client
against a live server on the two real models (SmolLM2 and Gemma 3, whose templates know no
tools: the generic format). Oracles: the client's own parsing (`parse()` into a pydantic
model, the tool-call types), and the `jsonschema` package for every argument and answer."""

from __future__ import annotations

import json

import jsonschema
import pytest
from server_process import ServerProcess

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

pytestmark = pytest.mark.slow

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
                                      "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                                                     "required": ["zone"], "additionalProperties": False}}},
]  # fmt: skip
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module", params=["smollm2_path", "gemma3_path"])
def client(request):
    s = ServerProcess(
        request.getfixturevalue(request.param), "-t", "1", "-c", "1024", "--parallel", "1"
    )
    yield openai.OpenAI(base_url=s.api_base, api_key="unused", max_retries=0, timeout=300)
    s.stop()
    log = "".join(s.log)
    assert "Traceback" not in log and "internal error" not in log, log


def ask(client, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 96)
    kw.setdefault("messages", ASK)
    return client.chat.completions.create(model="m", **kw)


def check_calls(calls, allowed=tuple(PARAMS)):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id and c.function.name in allowed
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def test_a_forced_call(client):
    r = ask(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
            parallel_tool_calls=False)  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    check_calls(choice.message.tool_calls, allowed=("get_time",))


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_required_calls_some_tool_with_valid_arguments(client, temperature):
    r = ask(client, tools=TOOLS, tool_choice="required", temperature=temperature, seed=3,
            max_tokens=160)  # fmt: skip
    choice = r.choices[0]
    if choice.finish_reason == "length":  # a small model may repeat calls until max_tokens
        assert choice.message.tool_calls is None or check_calls(choice.message.tool_calls) is None
    else:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls)


def test_auto_answers_with_a_call_or_text(client):
    r = ask(client, tools=TOOLS, tool_choice="auto", max_tokens=160)
    choice = r.choices[0]
    if choice.message.tool_calls:
        check_calls(choice.message.tool_calls)
        assert choice.finish_reason in ("tool_calls", "length")
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_none_never_calls(client):
    r = ask(client, tools=TOOLS, tool_choice="none", max_tokens=24)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"


def test_streamed_calls_add_up_to_the_plain_answer(client):
    kw = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=160)
    plain = ask(client, **kw).choices[0]
    chunks = list(ask(client, stream=True, **kw))
    parts = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    first = parts[0]  # index, id and name first, then argument fragments
    assert first.index == 0 and first.id and first.function.name and first.function.arguments == ""
    assert all(p.id is None and p.function.name is None for p in parts[1:])
    assert len(parts) > 2  # the arguments came in several fragments
    assert first.function.name == plain.message.tool_calls[0].function.name
    arguments = "".join(p.function.arguments for p in parts)
    assert arguments == plain.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason == "tool_calls"


def test_a_tool_result_round_trip(client):
    first = ask(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                parallel_tool_calls=False).choices[0].message  # fmt: skip
    call = first.tool_calls[0]
    messages = [*ASK, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 31})}]  # fmt: skip
    r = ask(client, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=48)
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
    # The model saw the result: its prompt grew by the call and the result.
    assert r.usage.prompt_tokens > ask(client, max_tokens=1).usage.prompt_tokens + 20


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population_millions: float = pydantic.Field(ge=0, le=100)
    landmarks: list[str] = pydantic.Field(max_length=3)


def test_parse_into_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model="m", temperature=0, max_tokens=200, response_format=City,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
    )  # fmt: skip
    choice = r.choices[0]
    if choice.finish_reason == "length":
        pytest.skip(
            "the model wrote until max_tokens"
        )  # not seen with these models at temperature 0
    assert isinstance(choice.message.parsed, City)
    jsonschema.validate(json.loads(choice.message.content), City.model_json_schema())


def test_json_schema_stream_validates(client):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "sum", "schema": schema, "strict": True}}
    chunks = list(ask(client, messages=[{"role": "user", "content": "What is 2+2?"}],
                      response_format=fmt, stream=True))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    "kw, param, word",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}}, "response_format", "'not'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}]}, "tools", "'uniqueItems'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ],
)  # fmt: skip
def test_unsupported_schemas_and_choices_are_refused(client, kw, param, word):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, **kw)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and word in err["message"]
