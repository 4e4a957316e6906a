"""A chat answer's text split into what OpenAI's message carries: `reasoning_content` (the
model's `<think>...</think>`), `content`, and `tool_calls` — incrementally, so that a stream
sends the same pieces as deltas: reasoning and content text as it comes, each call's index, id
and name first, then its arguments in fragments.

Text that could still turn out to be a tag (`<thi`, `<tool_ca`) is held back until the next
piece decides it, as the stop-string matcher does. The calls themselves were held to their
format by grammar (runtime/tools.py), so the scanner reads well-formed JSON; a call cut short
by max_tokens is dropped rather than returned half-written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .tools import GENERIC, ToolFormat

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
REASONING_FORMATS = ("auto", "deepseek", "none")


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplit:
    """`<think>...</think>` at the start of an answer goes to reasoning, the rest to content.
    `open`: the prompt already opened the block (a template that ends with `<think>\\n`)."""

    def __init__(self, open: bool = False):
        self.state = "reasoning" if open else "start"
        self._held = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        """(kind, text) pieces, kind 'reasoning' or 'content'."""
        out: list[tuple[str, str]] = []
        buf = self._held + text
        self._held = ""
        while buf:
            if self.state == "start":
                stripped = buf.lstrip()
                if not stripped:
                    self._held = buf
                    break
                if stripped.startswith(THINK_OPEN):
                    buf = stripped[len(THINK_OPEN) :]
                    self.state = "reasoning"
                elif THINK_OPEN.startswith(stripped):
                    self._held = buf
                    break
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                at = buf.find(THINK_CLOSE)
                if at >= 0:
                    out.append(("reasoning", buf[:at]))
                    buf = buf[at + len(THINK_CLOSE) :]
                    self.state = "after"
                else:
                    keep = _held_prefix(buf, THINK_CLOSE)
                    out.append(("reasoning", buf[: len(buf) - keep]))
                    self._held = buf[len(buf) - keep :]
                    break
            elif self.state == "after":  # the blank lines after </think> belong to neither
                buf = buf.lstrip()
                if buf:
                    self.state = "content"
            else:
                out.append(("content", buf))
                break
        return [(k, t) for k, t in out if t]

    def flush(self) -> list[tuple[str, str]]:
        held, self._held = self._held, ""
        if not held:
            return []
        return [("reasoning" if self.state == "reasoning" else "content", held)]


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # the raw JSON text of the arguments so far
    complete: bool = False
    sent: int = 0  # characters of `arguments` already streamed


_CALL_HEAD = re.compile(
    r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)
_RESPONSE_HEAD = re.compile(r'^\s*\{\s*"response"\s*:\s*"')


def _json_value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array starting at text[start], None if unfinished."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _string_prefix(raw: str) -> tuple[str, bool]:
    """The decoded text of a JSON string body written so far, and whether it is closed."""
    i, out_end = 0, 0
    while i < len(raw):
        c = raw[i]
        if c == '"':
            return json.loads('"' + raw[:i] + '"'), True
        if c == "\\":
            need = 6 if raw[i + 1 : i + 2] == "u" else 2
            if i + need > len(raw):
                break
            i += need
        else:
            i += 1
        out_end = i
    try:
        return json.loads('"' + raw[:out_end] + '"'), False
    except ValueError:  # a lone surrogate escape waiting for its pair
        return "", False


class ToolCallScanner:
    """Finds the calls in the text of the tool-call region, in order."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._pos = 0  # where the next call may start

    def scan(self, text: str) -> None:
        while True:
            if self.calls and not self.calls[-1].complete:
                call = self.calls[-1]
                while self._args_at < len(text) and text[self._args_at].isspace():
                    self._args_at += 1  # whitespace before the arguments is not theirs
                end = _json_value_end(text, self._args_at)
                if end is None:
                    call.arguments = text[self._args_at :].rstrip()
                    return
                call.arguments = text[self._args_at : end]
                call.complete = True
                self._pos = end
            m = _CALL_HEAD.search(text, self._pos)
            if m is None:
                return
            name = json.loads('"' + m.group(1) + '"')
            self.calls.append(ToolCall(self.fmt.new_call_id(), name))
            self._args_at = m.end()


@dataclass
class ChatOutput:
    """Incremental split of one answer. `feed` and `finish` return OpenAI deltas."""

    fmt: ToolFormat | None = None  # None: no tools in play
    reasoning: ReasoningSplit | None = None
    content: str = ""
    reasoning_content: str = ""
    _region: str | None = None  # text of the tool-call region once it began
    _held: str = ""
    _scanner: ToolCallScanner | None = None
    _response_sent: int = 0  # generic: characters of "response" already sent
    deltas: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fmt is not None:
            self._scanner = ToolCallScanner(self.fmt)
            if self.fmt is GENERIC:
                self._region = ""  # the whole answer is the JSON object

    def feed(self, text: str, token_text: str | None = None) -> list[dict[str, Any]]:
        """The next piece of the answer; `token_text`: the vocabulary text of the token it
        came from, which brings back a call-opening control token (Mistral's [TOOL_CALLS])
        that decoding leaves out of the text."""
        if self.fmt is not None and self.fmt.open and token_text == self.fmt.open:
            if self.fmt.open not in text:
                text = self.fmt.open + text
        pieces = self.reasoning.feed(text) if self.reasoning else [("content", text)]
        return self._take(pieces)

    def finish(self) -> list[dict[str, Any]]:
        pieces = self.reasoning.flush() if self.reasoning else []
        out = self._take(pieces)
        if self._held:
            held, self._held = self._held, ""
            out += self._content(held)
        if self.fmt is GENERIC and self._region is not None and not self.tool_calls:
            out += self._generic_response(final=True)
        return out

    def _take(self, pieces: list[tuple[str, str]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for kind, text in pieces:
            if kind == "reasoning":
                self.reasoning_content += text
                out.append({"reasoning_content": text})
            elif self._scanner is None:
                out += self._content(text)
            else:
                out += self._tool_text(text)
        return out

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        self.content += text
        return [{"content": text}]

    def _tool_text(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._region is None:  # still prose: look for the format's opening mark
            buf = self._held + text
            self._held = ""
            opener = self.fmt.open or "{"
            at = buf.find(opener)
            if self.fmt.open == "" and at >= 0 and (self.content + buf[:at]).strip():
                at = -1  # llama3: a JSON call is the whole answer, not an object mid-prose
            if at < 0:
                keep = _held_prefix(buf, opener)
                out += self._content(buf[: len(buf) - keep])
                self._held = buf[len(buf) - keep :]
                return out
            out += self._content(buf[:at].rstrip() if at else "")
            self._region = buf[at:]
        else:
            self._region += text
        return out + self._call_deltas()

    def _call_deltas(self) -> list[dict[str, Any]]:
        scanner = self._scanner
        before = len(scanner.calls)
        scanner.scan(self._region)
        out = []
        for index, call in enumerate(scanner.calls):
            if index >= before:
                out.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})  # fmt: skip
            fragment = call.arguments[call.sent :]
            if fragment:
                call.sent = len(call.arguments)
                out.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
        if self.fmt is GENERIC and not scanner.calls:
            out += self._generic_response(final=False)
        return out

    def _generic_response(self, final: bool) -> list[dict[str, Any]]:
        """Generic format, `{"response": "..."}`: the string streams as content."""
        m = _RESPONSE_HEAD.match(self._region)
        if m is None:
            if final and not self.content:  # not the agreed shape (cut short?): as it is
                return self._content(self._region)
            return []
        text, _ = _string_prefix(self._region[m.end() :])
        new = text[self._response_sent :]
        self._response_sent = len(text)
        return self._content(new)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The complete calls, in OpenAI's message shape."""
        if self._scanner is None:
            return []
        return [{"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in self._scanner.calls if c.complete]  # fmt: skip

    def message(self) -> dict[str, Any]:
        """The assistant message of a non-streamed answer."""
        calls = self.tool_calls
        msg: dict[str, Any] = {"role": "assistant",
                               "content": self.content.strip() if calls else self.content}  # fmt: skip
        if calls and not msg["content"]:
            msg["content"] = None
        if self.reasoning is not None and self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        if calls:
            msg["tool_calls"] = calls
        msg["refusal"] = None
        return msg

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """OpenAI's: `tool_calls` when the answer ended by calling tools."""
        if engine_reason == "stop" and self.tool_calls:
            return "tool_calls"
        return engine_reason
