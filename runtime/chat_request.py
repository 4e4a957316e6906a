"""What a chat request asks beyond plain text — tools, a response format, reasoning — turned
into the template's inputs, the constraint the engine applies, and the splitter that reads
the answer back (runtime/chat_output.py).

Nothing here knows HTTP: problems are ToolRequestError / SchemaError (QpackErrors naming the
field or the schema keyword), which the API layer answers with a 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import grammar, tools
from .chat import ChatTemplate
from .chat_output import REASONING_FORMATS, THINK_OPEN, ChatOutput, ReasoningSplit
from .tools import ToolFormat, ToolRequest, ToolRequestError

JSON_OBJECT_INSTRUCTION = "Answer with one valid JSON object and nothing else."


@dataclass
class ReasoningDefaults:
    """The server's defaults for requests that do not say (`--reasoning-format`,
    `--no-thinking` on the command line or in .args)."""

    reasoning_format: str = "auto"  # auto | deepseek: split <think> out; none: leave it in
    enable_thinking: bool | None = None  # None: the template's own default


@dataclass
class ChatFeatures:
    """One request's tools, response format and reasoning, ready for the template and engine."""

    tools: ToolRequest
    fmt: ToolFormat  # how this template's model writes calls (generic if it has no tools)
    schema: dict[str, Any] | None = None  # response_format's schema (json_object: an object)
    schema_name: str = ""
    reasoning_format: str = "auto"
    enable_thinking: bool | None = None
    thinks: bool = False  # the template writes <think> blocks
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_opens_thinking: bool = False  # the rendered prompt ends inside <think>
    _grammar: str | None = None
    _trigger: tools.CallGrammar | None = None

    @property
    def constrained(self) -> bool:
        return self._grammar is not None

    def constraint(self, template: ChatTemplate, n_vocab: int) -> Any:
        """A fresh constraint for the engine, or None."""
        if self._grammar is None:
            return None
        tok = template.tokenizer
        call = self._trigger
        if call is not None and call.trigger is not None:
            # auto: free text (thinking included) until the model opens a call
            return grammar.TriggeredConstraint(
                tok, self._grammar, n_vocab, call.trigger,
                include_trigger=call.trigger_in_grammar, at_start=call.trigger_at_start,
            )  # fmt: skip
        if self.thinks and self.enable_thinking is not False:
            # The grammar holds for the answer, after the model's free <think> block.
            return grammar.ThinkingFirst(tok, self._grammar, n_vocab, self.prompt_opens_thinking)
        return grammar.GrammarConstraint(tok, self._grammar, n_vocab)

    def note_prompt(self, text: str) -> None:
        """The rendered prompt: a template that ends it with `<think>` (R1 distills, some
        Qwen3 settings) has the model start inside its reasoning."""
        self.prompt_opens_thinking = text.rstrip().endswith(THINK_OPEN)

    def output(self) -> ChatOutput:
        """A fresh splitter for the answer."""
        split = None
        if self.reasoning_format != "none":
            split = ReasoningSplit(open=self.prompt_opens_thinking)
        return ChatOutput(fmt=self.fmt if self.tools.active else None, reasoning=split)


def _response_format(body: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    fmt = body.get("response_format")
    if fmt is None:
        return None, ""
    if not isinstance(fmt, Mapping):
        raise ToolRequestError("response_format", "'response_format' must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return {"type": "object"}, ""
    if kind != "json_schema":
        raise ToolRequestError("response_format", "'response_format.type' must be 'text', 'json_object' or 'json_schema', "
                               f"got {kind!r}")  # fmt: skip
    spec = fmt.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
        raise ToolRequestError("response_format", "'response_format.json_schema' must be {\"name\", \"schema\": {...}, \"strict\"}")  # fmt: skip
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ToolRequestError("response_format", "'response_format.json_schema.strict' must be a boolean")  # fmt: skip
    name = spec.get("name") or ""
    if not isinstance(name, str):
        raise ToolRequestError("response_format", "'response_format.json_schema.name' must be a string")  # fmt: skip
    # Strict or not, the schema is enforced: a looser reading would only allow invalid output.
    return dict(spec.get("schema") or {}), name


def _reasoning(body: Mapping[str, Any], defaults: ReasoningDefaults) -> tuple[str, bool | None]:
    fmt = body.get("reasoning_format", defaults.reasoning_format)
    if fmt is None:
        fmt = defaults.reasoning_format
    if fmt not in REASONING_FORMATS:
        raise ToolRequestError("reasoning_format", f"'reasoning_format' must be one of {', '.join(REASONING_FORMATS)}")  # fmt: skip
    thinking = body.get("enable_thinking")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, Mapping) or set(kwargs) - {"enable_thinking"}:
            raise ToolRequestError("chat_template_kwargs", "'chat_template_kwargs' may only hold 'enable_thinking'")  # fmt: skip
        thinking = kwargs.get("enable_thinking", thinking)
    if thinking is None:
        thinking = defaults.enable_thinking
    if thinking is not None and not isinstance(thinking, bool):
        raise ToolRequestError("enable_thinking", "'enable_thinking' must be a boolean")
    return fmt, thinking


def chat_features(body: Mapping[str, Any], template: ChatTemplate,
                  defaults: ReasoningDefaults | None = None) -> ChatFeatures:  # fmt: skip
    """The request's features, checked. SchemaError if a schema cannot be enforced."""
    tool_req = tools.tool_request(body)
    schema, name = _response_format(body)
    if schema is not None and tool_req.active:
        raise ToolRequestError("response_format", "'response_format' json modes cannot be combined with 'tools' "
                               "(the answer is either a call or the format): pass one of them")  # fmt: skip
    reasoning_format, thinking = _reasoning(body, defaults or ReasoningDefaults())
    fmt = tools.detect_format(template.source)
    f = ChatFeatures(tool_req, fmt, schema, name, reasoning_format, thinking,
                     thinks=THINK_OPEN in template.source)  # fmt: skip
    if fmt.native and tool_req.active:
        f.template_kwargs["tools"] = [t.as_openai() for t in tool_req.offered]
    if thinking is not None:
        f.template_kwargs["enable_thinking"] = thinking
    if tool_req.active:
        call = tools.call_grammar(fmt, tool_req, template.tokenizer)
        f._grammar, f._trigger = call.grammar, call
    elif schema is not None:
        f._grammar = grammar.json_schema(schema)
    return f


def chat_messages(f: ChatFeatures, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checked messages as this template wants them: native tool formats get
    `tool_calls` and `tool_call_id` as OpenAI sends them; other templates the generic
    rendering; JSON modes an instruction in the system message."""
    if not f.fmt.native:
        messages = tools.generic_messages(messages, f.tools)
    instruction = None
    if f.schema is not None:
        instruction = JSON_OBJECT_INSTRUCTION
        if f.schema != {"type": "object"}:
            instruction = ("Answer with one JSON object that follows this JSON schema:\n"
                           + json.dumps(f.schema))  # fmt: skip
    if instruction:
        if messages and messages[0]["role"] == "system":
            messages = [{**messages[0], "content": messages[0]["content"] + "\n\n" + instruction},
                        *messages[1:]]  # fmt: skip
        else:
            messages = [{"role": "system", "content": instruction}, *messages]
    return messages
