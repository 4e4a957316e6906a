"""Chat messages -> prompt text, with the model's own Jinja template (`tokenizer.chat_template`).

A model file is untrusted input and its template is code: it runs in jinja2's
ImmutableSandboxedEnvironment (no attribute access to Python internals, no mutation of
lists/dicts), with the repetition and power operators bounded and the output size capped.
Every failure of a template, including the template's own `raise_exception(...)`, becomes a
ChatTemplateError (a QpackError) with a one-line message; nothing inside the template runs
outside the sandbox.

The environment matches Hugging Face transformers' (trim_blocks, lstrip_blocks, loop
controls, `tojson` without ASCII escaping, `raise_exception`, `strftime_now`, `bos_token`,
`eos_token`), so a template renders as it does there.

Models without a template get a documented fallback: Gemma's turn format when the
vocabulary has <start_of_turn>/<end_of_turn> (Gemma 3 270M's GGUF has no template),
ChatML otherwise — the same text as llama.cpp's built-in `gemma` and `chatml` formats.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from qpack.runtime.errors import QpackError
from qpack.runtime.tokenizer import Tokenizer

# Gemma's turns. A system message has no turn of its own: it is put, trimmed, at the start
# of the first user turn, followed by a blank line (as Gemma's official template does).
GEMMA_FALLBACK = """\
{{- bos_token -}}
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- set ns.system = ns.system + message['content'] | trim -%}
  {%- else -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<start_of_turn>' + role + '\n' -}}
    {%- if ns.system and role != 'model' -%}
      {{- ns.system + '\n\n' -}}
      {%- set ns.system = '' -%}
    {%- endif -%}
    {{- message['content'] | trim + '<end_of_turn>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""

CHATML_FALLBACK = """\
{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

MAX_OUTPUT_CHARS = 32 * 1024 * 1024  # a prompt longer than this is a runaway template
MAX_SEQUENCE_REPEAT = 1024 * 1024  # 'x' * n and [..] * n may build at most this many items
MAX_EXPONENT = 1024


class ChatTemplateError(QpackError):
    """A chat template could not be compiled or rendered (or refused the conversation)."""


class _TemplateRaised(Exception):
    """raise_exception() called by the template: the template refuses the messages."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): the
    body renders as if the tags were not there."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus bounds on `*` and `**` so that a template cannot ask for
    gigabytes ('x' * 10**10) or a number with millions of digits (9 ** 9 ** 9)."""

    intercepted_binops = frozenset(["*", "**"])

    def unsafe_undefined(self, obj, attribute):
        # jinja2 returns an Undefined that only fails when used ({{ f.__globals__ }} would
        # print ""); refuse at once instead, so that the attempt is reported.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe"
        )

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    if len(seq) * count > MAX_SEQUENCE_REPEAT:
                        raise jinja2.exceptions.SecurityError(
                            f"repetition to {len(seq) * count} items refused"
                        )
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise jinja2.exceptions.SecurityError(f"exponent {right} refused")
        return super().call_binop(context, operator, left, right)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:  # fmt: skip
    """transformers' `tojson`: real JSON, non-ASCII kept (jinja2's own escapes HTML)."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI-style messages as templates expect them: `content` a string (text parts of a
    list joined, None as empty); other keys (name, tool_calls ...) passed through."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatTemplateError("messages must be a list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, Sequence) and not isinstance(content, str):
            parts = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type", "text") == "text":
                    parts.append(str(part.get("text", "")))
                elif isinstance(part, str):
                    parts.append(part)
                else:
                    raise ChatTemplateError(
                        f"messages[{i}].content: only text parts are supported by this model"
                    )
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content must be a string or a list of parts")
        out.append({**message, "content": content})
    return out


class ChatTemplate:
    """A compiled chat template bound to a tokenizer (for its BOS/EOS text)."""

    def __init__(self, source: str, tokenizer: Tokenizer, name: str = "tokenizer.chat_template"):
        self.source = source
        self.name = name  # where the template came from, for messages
        self.tokenizer = tokenizer
        self.bos_token = _token_text(tokenizer, tokenizer.bos_id)
        self.eos_token = _token_text(tokenizer, tokenizer.eos_id)
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"{name}: the chat template does not compile (line {e.lineno}: {e.message})"
            ) from None
        except Exception as e:  # an untrusted template may break the compiler in other ways
            raise ChatTemplateError(f"{name}: the chat template does not compile ({e})") from None

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], tokenizer: Tokenizer) -> ChatTemplate:
        """The model's template, or the fallback when the file has none."""
        source = md.get("tokenizer.chat_template")
        if source is None or (isinstance(source, str) and not source.strip()):
            return cls.fallback(tokenizer)
        if not isinstance(source, str):
            raise ChatTemplateError(
                f"tokenizer.chat_template: expected a string, got {type(source).__name__}"
            )
        return cls(source, tokenizer)

    @classmethod
    def fallback(cls, tokenizer: Tokenizer) -> ChatTemplate:
        """Gemma turns if the vocabulary has them, else ChatML."""
        if (
            tokenizer.token_to_id("<start_of_turn>") is not None
            and tokenizer.token_to_id("<end_of_turn>") is not None
        ):
            return cls(GEMMA_FALLBACK, tokenizer, name="fallback template (gemma)")
        return cls(CHATML_FALLBACK, tokenizer, name="fallback template (chatml)")

    def render(self, messages: Any, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text, to be encoded with `tokenizer.encode(text, parse_special=True)`.

        As llama.cpp does, a BOS (EOS) text that the template puts at the start (end) is
        removed when the tokenizer adds that token itself, so it is not doubled. `extra`
        (tools, ...) is passed to the template.
        """
        context = {
            **extra,
            "messages": _normalize_messages(messages),
            "add_generation_prompt": bool(add_generation_prompt),
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        try:
            chunks = []
            size = 0
            for chunk in self._template.generate(context):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise ChatTemplateError(
                        f"{self.name}: the chat template produced more than "
                        f"{MAX_OUTPUT_CHARS} characters; refused"
                    )
                chunks.append(chunk)
        except _TemplateRaised as e:
            raise ChatTemplateError(f"{self.name} refused the conversation: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(
                f"{self.name}: the chat template tried an unsafe operation ({e}); refused"
            ) from None
        except QpackError:
            raise
        except Exception as e:  # untrusted code: any failure is the template's
            raise ChatTemplateError(
                f"{self.name}: the chat template failed ({type(e).__name__}: {e})"
            ) from None
        text = "".join(chunks)
        tok = self.tokenizer
        if tok.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token) :]
        if tok.add_eos and self.eos_token and text.endswith(self.eos_token):
            text = text[: -len(self.eos_token)]
        return text

    def encode(self, messages: Any, add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """Prompt token ids: render, then encode with special tokens parsed."""
        text = self.render(messages, add_generation_prompt, **extra)
        return self.tokenizer.encode(text, parse_special=True)


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.token_text(token_id)
