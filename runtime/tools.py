"""Tool calling: the request's `tools` / `tool_choice`, the format the model calls them in, the
prompt that offers them, and the grammar that makes a call well-formed.

The format comes from the chat template, as llama-server's chat handlers decide it: a template
that renders `tools` in Hermes/Qwen's `<tool_call>` tags, Llama 3.1-3.3's JSON, or Mistral's
`[TOOL_CALLS]` is given the tools and its model calls them its own way. Any other template
(SmolLM2's, Gemma 3's) gets the generic format: the tools described in a system message and the
whole answer a JSON object, `{"tool_calls": [...]}` or `{"response": "..."}`, forced by grammar.

A call's arguments always validate against the tool's `parameters`: the grammar holds them to
that schema, so a schema keyword the decoder cannot enforce refuses the request.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import grammar
from .errors import QpackError
from .tokenizer import Tokenizer

MAX_TOOLS = 128


class ToolRequestError(QpackError):
    """A tools-related request field is wrong; `param` names it (OpenAI's error field)."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


# --- formats --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes its calls.

    `open`: what precedes the calls (a tag, a control token) and sets the grammar going in
    `auto` mode; `call_open`/`call_close` wrap each call; `separator` sits between calls;
    `args_key`: the key holding the arguments in a call object. Generic has no `open`: its whole
    answer is one JSON object.
    """

    name: str
    open: str = ""
    call_open: str = ""
    call_close: str = ""
    separator: str = ""
    list_open: str = ""  # Mistral: the calls are one JSON array
    list_close: str = ""
    args_key: str = "arguments"
    native: bool = True  # the template renders `tools` itself

    def new_call_id(self) -> str:
        if self.name == "mistral":  # Mistral's template refuses any id but 9 alphanumerics
            alphabet = string.ascii_letters + string.digits
            return "".join(secrets.choice(alphabet) for _ in range(9))
        return "call_" + secrets.token_hex(12)


HERMES = ToolFormat("hermes", open="<tool_call>", call_open="<tool_call>",
                    call_close="</tool_call>", separator="\n")  # fmt: skip
LLAMA3 = ToolFormat("llama3", args_key="parameters")
MISTRAL = ToolFormat("mistral", open="[TOOL_CALLS]", list_open="[", list_close="]",
                     separator=", ")  # fmt: skip
GENERIC = ToolFormat("generic", native=False)


def detect_format(template_source: str) -> ToolFormat:
    """The template's own tool format, found by the marks it renders (as llama-server's
    common_chat_templates_apply does); generic when it renders none of them."""
    if "tools" not in template_source:
        return GENERIC
    if "<tool_call>" in template_source:
        return HERMES
    if "[TOOL_CALLS]" in template_source:
        return MISTRAL
    if "<|start_header_id|>" in template_source and "ipython" in template_source:
        return LLAMA3
    return GENERIC


# --- the request ----------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass
class ToolRequest:
    """What the request asks: the tools offered, whether and which to call, how many."""

    tools: list[Tool] = field(default_factory=list)
    choice: str = "auto"  # auto | none | required | function
    function: str | None = None  # the forced function's name when choice == "function"
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def offered(self) -> list[Tool]:
        """The tools the model may call: all, or the one `tool_choice` names."""
        if self.choice == "function":
            return [t for t in self.tools if t.name == self.function]
        return self.tools


def _tool(i: int, entry: Any) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(entry, Mapping) or entry.get("type", "function") != "function":
        raise ToolRequestError(
            where, f'\'{where}\' must be {{"type": "function", "function": {{...}}}}'
        )
    fn = entry.get("function")
    if not isinstance(fn, Mapping):
        raise ToolRequestError(where, f"'{where}.function' must be an object")
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ToolRequestError(
            f"{where}.function.name",
            f"'{where}.function.name' must be a non-empty string of at most 64 characters",
        )
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise ToolRequestError(
            f"{where}.function.description", f"'{where}.function.description' must be a string"
        )
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping):
        raise ToolRequestError(
            f"{where}.function.parameters",
            f"'{where}.function.parameters' must be a JSON schema object",
        )
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ToolRequestError(
            f"{where}.function.strict", f"'{where}.function.strict' must be a boolean"
        )
    return Tool(name, description, dict(parameters))


def tool_request(body: Mapping[str, Any]) -> ToolRequest:
    """`tools`, `tool_choice` and `parallel_tool_calls` checked; ToolRequestError names the
    field that is wrong."""
    raw_tools = body.get("tools")
    tools: list[Tool] = []
    if raw_tools is not None:
        if not isinstance(raw_tools, list):
            raise ToolRequestError("tools", "'tools' must be an array of function tools")
        if len(raw_tools) > MAX_TOOLS:
            raise ToolRequestError("tools", f"'tools' holds at most {MAX_TOOLS} tools")
        tools = [_tool(i, t) for i, t in enumerate(raw_tools)]
        names = [t.name for t in tools]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ToolRequestError("tools", f"'tools' names the function {dup!r} twice")
    choice, function = "auto" if tools else "none", None
    raw_choice = body.get("tool_choice")
    if isinstance(raw_choice, str):
        if raw_choice not in ("auto", "none", "required"):
            raise ToolRequestError("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}")  # fmt: skip
        choice = raw_choice
    elif isinstance(raw_choice, Mapping):
        fn = raw_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if raw_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolRequestError("tool_choice", "'tool_choice' object must be {\"type\": \"function\", \"function\": {\"name\": ...}}")  # fmt: skip
        choice, function = "function", name
    elif raw_choice is not None:
        raise ToolRequestError("tool_choice", "'tool_choice' must be a string or an object")
    if choice in ("required", "function") and not tools:
        raise ToolRequestError("tool_choice", f"'tool_choice' {choice!r} needs 'tools'")
    if choice == "function" and function not in {t.name for t in tools}:
        raise ToolRequestError("tool_choice", f"'tool_choice' names {function!r}, which is not in 'tools'")  # fmt: skip
    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise ToolRequestError("parallel_tool_calls", "'parallel_tool_calls' must be a boolean")
    return ToolRequest(tools, choice, function, parallel)


# --- messages -------------------------------------------------------------------------------


def _arguments_object(arguments: Any, where: str) -> Any:
    """A call's arguments as templates want them: parsed JSON (they apply `tojson`)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ToolRequestError(where, f"'{where}' is not valid JSON") from None
    if isinstance(arguments, Mapping):
        return dict(arguments)
    raise ToolRequestError(where, f"'{where}' must be a JSON string")


def checked_tool_calls(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, checked, with arguments parsed."""
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise ToolRequestError(f"{where}.tool_calls", f"'{where}.tool_calls' must be an array")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ToolRequestError(at, f"'{at}' must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")  # fmt: skip
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ToolRequestError(f"{at}.id", f"'{at}.id' must be a string")
        args = _arguments_object(fn.get("arguments", "{}"), f"{at}.function.arguments")
        out.append({"id": call_id or "", "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})  # fmt: skip
    return out


def generic_messages(
    messages: list[dict[str, Any]], tools: ToolRequest | None
) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: the tools described in the system message,
    past calls written as the JSON the model answers with, tool results as user turns."""
    names = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if m["role"] == "assistant" and calls:
            for c in calls:
                names[c["id"]] = c["function"]["name"]
            text = json.dumps({"tool_calls": [{"name": c["function"]["name"],
                                               "arguments": c["function"]["arguments"]} for c in calls]})  # fmt: skip
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            result = {"tool_response": {"name": names.get(m.get("tool_call_id"), ""),
                                        "content": m["content"]}}  # fmt: skip
            out.append({"role": "user", "content": json.dumps(result)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools is not None and tools.active:
        described = _generic_instruction(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _generic_instruction(tools: ToolRequest) -> str:
    listed = json.dumps([t.as_openai()["function"] for t in tools.offered], indent=2)
    many = "one or more tools" if tools.parallel else "one tool"
    lines = [f"You can call these tools:\n{listed}\n",
             f'To call {many}, answer with the JSON object {{"tool_calls": [{{"name": <tool name>, '
             '"arguments": <the arguments object>}]}.']  # fmt: skip
    if tools.choice == "auto":
        lines.append('To answer without a tool, answer with {"response": <your answer>}.')
    return "\n".join(lines)


# --- grammars -------------------------------------------------------------------------------


def call_schema(tool: Tool, args_key: str = "arguments", with_id: bool = False) -> dict[str, Any]:
    """One call object: the name, then arguments valid against the tool's parameters (then,
    for Mistral, the 9-character id its models write, as llama-server's grammar has it)."""
    properties = {"name": {"const": tool.name}, args_key: tool.parameters}
    if with_id:
        properties["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _any_call(tools: list[Tool], args_key: str, with_id: bool = False) -> dict[str, Any]:
    schemas = [call_schema(t, args_key, with_id) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def generic_schema(tools: ToolRequest) -> dict[str, Any]:
    """The generic format's whole answer."""
    calls: dict[str, Any] = {"type": "array", "items": _any_call(tools.offered, "arguments"),
                             "minItems": 1}  # fmt: skip
    if not tools.parallel:
        calls["maxItems"] = 1
    call_answer = {"type": "object", "properties": {"tool_calls": calls},
                   "required": ["tool_calls"], "additionalProperties": False}  # fmt: skip
    if tools.choice != "auto":
        return call_answer
    text_answer = {"type": "object", "properties": {"response": {"type": "string"}},
                   "required": ["response"], "additionalProperties": False}  # fmt: skip
    return {"anyOf": [call_answer, text_answer]}


@dataclass
class CallGrammar:
    """The grammar for a request's calls. `trigger` None: it holds from the first token
    (forced calls, generic format). Else it starts once the output holds `trigger` and
    covers the text after it (`auto`: the model may answer in prose instead)."""

    grammar: str
    trigger: str | None = None
    trigger_in_grammar: bool = False  # the trigger is the grammar's own first text ("{")
    trigger_at_start: bool = False  # only a trigger at the start of the answer counts


def call_grammar(fmt: ToolFormat, tools: ToolRequest, tokenizer: Tokenizer) -> CallGrammar:
    """SchemaError when a tool's parameters use a keyword the decoder cannot enforce."""
    for t in tools.offered:
        try:
            grammar.json_schema(t.parameters)
        except grammar.SchemaError as e:
            raise grammar.SchemaError(f"tool {t.name!r} parameters: {e}", e.keyword) from None
    if fmt is GENERIC:
        return CallGrammar(grammar.json_schema(generic_schema(tools)))
    call = "%json " + json.dumps(_any_call(tools.offered, fmt.args_key, fmt is MISTRAL))
    lit = lambda text: grammar.lark_literal(tokenizer, text)  # noqa: E731
    ws = "/[ \\t\\n]*/"
    if fmt.call_open:  # hermes: <tool_call>{...}</tool_call>, repeated
        body = f"{ws} call {ws} {lit(fmt.call_close)}"
        more = f"({ws} {lit(fmt.call_open)} body)*" if tools.parallel else ""
        rest = f"start: body {more}\nbody: {body}\ncall: {call}\n"
    else:  # llama3: a bare object; mistral: an array of objects
        if fmt.list_open:
            many = f'("," {ws} call)*' if tools.parallel else ""
            rest = f'start: {ws} "[" {ws} call {many} {ws} "]"\ncall: {call}\n'
        else:
            rest = f"start: {ws} call\ncall: {call}\n"
    if tools.choice == "auto" and fmt.open:
        return CallGrammar(grammar.lark(rest), trigger=fmt.open)
    if fmt.open:  # forced: the opening mark first, then the calls
        forced = rest.replace("start:", f"start: {lit(fmt.open)} after\nafter:", 1)
        return CallGrammar(grammar.lark(forced))
    if tools.choice == "auto":  # llama3 in auto: the call is the whole answer when it comes
        return CallGrammar(
            grammar.lark(rest), trigger="{", trigger_in_grammar=True, trigger_at_start=True
        )
    return CallGrammar(grammar.lark(rest))
