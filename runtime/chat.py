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

import ctypes
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
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

# Limits on what a template may build or spend. A chat prompt is at most a few MB (the
# request body limit); a template that goes far past these is a runaway or an attack.
MAX_OUTPUT_CHARS = 8 * 1024 * 1024  # the rendered prompt, and any one string built on the way
MAX_SEQUENCE_REPEAT = 1024 * 1024  # 'x' * n and [..] * n may build at most this many items
MAX_EXPONENT = 1024
MAX_RANGE = 10_000  # items of one range(); nested loops are the time limit's
MAX_WIDTH = 1024  # center/indent/format widths, in characters
MAX_JSON_INDENT = 16
RENDER_SECONDS = 2.0  # one render; a normal one takes milliseconds


SAMPLE_SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
SAMPLE_CONVERSATION = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]


class ChatTemplateError(QpackError):
    """A chat template could not be compiled or rendered (or refused the conversation:
    `refused` is then True, the template's own raise_exception)."""

    refused = False


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

    intercepted_binops = frozenset(["*", "**", "%"])

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
        if operator == "%" and isinstance(left, str):
            _check_percent_format(left, right if isinstance(right, tuple) else (right,))
        return _bounded(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
        for a in (*args, *kwargs.values()):
            _bounded(a)
        return _bounded(super().call(__context, __obj, *args, **kwargs))

    def format_string(self, s, args, kwargs, format_func=None):
        # str.format / format_map: widths in the spec ('{:>100000000}') are bounded first.
        for spec in re.findall(r"\{[^{}]*:([^{}]*)\}", str(s)):
            _check_width(spec)
        if re.search(r"\{[^{}]*:[^{}]*\{", str(s)):
            raise jinja2.exceptions.SecurityError("nested format specs refused")
        return _bounded(super().format_string(s, args, kwargs, format_func))


def _bounded(value: Any) -> Any:
    """A string the template built, refused past the output limit."""
    if isinstance(value, str) and len(value) > MAX_OUTPUT_CHARS:
        raise jinja2.exceptions.SecurityError(f"a string of {len(value)} characters refused")
    return value


def _check_width(spec: str) -> None:
    for digits in re.findall(r"\d+", spec):
        if len(digits) > 6 or int(digits) > MAX_WIDTH:
            raise jinja2.exceptions.SecurityError(f"format width {digits[:12]} refused")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?([-#0 +]*)(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent_format(fmt: str, args: tuple) -> None:
    """'%*s' and '%100000000s' build strings of any width: bound the widths, given or taken
    from the arguments."""
    numbers = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    for m in _PERCENT_SPEC.finditer(fmt):
        for width in m.group(2, 3):
            if width == "*":
                if any(abs(n) > MAX_WIDTH for n in numbers):
                    raise jinja2.exceptions.SecurityError("format width refused")
            elif width is not None:
                _check_width(width)


class _BoundedNamespace(Namespace):
    """namespace() whose attributes cannot grow past the output limit ('~' doubling)."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, _bounded(value))


def _bounded_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise jinja2.exceptions.SecurityError(
            f"range of {len(r)} items refused (at most {MAX_RANGE})"
        )
    return r


def _guard(check: Callable[..., None], fn: Callable[..., Any]) -> Callable[..., Any]:
    """A filter with its arguments checked first and its result bounded."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        check(*args, **kwargs)
        return _bounded(fn(*args, **kwargs))

    guarded.__name__ = getattr(fn, "__name__", "filter")
    for marker in ("jinja_pass_arg",):  # keep pass_context / pass_eval_context markers
        if hasattr(fn, marker):
            setattr(guarded, marker, getattr(fn, marker))
    return guarded


def _width_arg(name: str, position: int, limit: int = MAX_WIDTH):
    def check(*args: Any, **kwargs: Any) -> None:
        width = kwargs.get(name, args[position] if len(args) > position else None)
        size = len(width) if isinstance(width, str) else width
        if isinstance(size, int) and abs(size) > limit:
            raise jinja2.exceptions.SecurityError(f"{name} {size} refused (at most {limit})")

    return check


def _check_format_filter(*args: Any, **kwargs: Any) -> None:
    # do_format(value, *args): args[0] may be the eval context (pass_eval_context)
    rest = [a for a in args if not isinstance(a, jinja2.nodes.EvalContext)]
    if rest and isinstance(rest[0], str):
        _check_percent_format(rest[0], tuple(rest[1:]) + tuple(kwargs.values()))


def _check_replace(*args: Any, **kwargs: Any) -> None:
    rest = [a for a in args if not isinstance(a, jinja2.nodes.EvalContext)]
    if len(rest) >= 3:
        text, old, new = (str(x) for x in rest[:3])
        count = rest[3] if len(rest) > 3 else kwargs.get("count")
        hits = len(text) + 1 if old == "" else text.count(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        if len(text) + hits * (len(new) - len(old)) > MAX_OUTPUT_CHARS:
            raise jinja2.exceptions.SecurityError("replace() result too large, refused")


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
    f = env.filters
    f["tojson"] = _guard(_width_arg("indent", 2, MAX_JSON_INDENT), _tojson)
    f["center"] = _guard(_width_arg("width", 1), f["center"])
    f["indent"] = _guard(_width_arg("width", 1), f["indent"])
    f["wordwrap"] = _guard(lambda *a, **k: None, f["wordwrap"])
    f["format"] = _guard(_check_format_filter, f["format"])
    f["replace"] = _guard(_check_replace, f["replace"])
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_BoundedNamespace, range=_bounded_range)  # fmt: skip
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
        template = cls(source, tokenizer)
        template.check()
        return template

    def check(self) -> None:
        """Render a plain conversation once, at load: a template that is broken (or a
        runaway) fails here, naming itself, not on every request. A template may refuse the
        sample's shape (some want a system turn or no assistant turn); one that refuses even
        a single user message cannot chat at all."""
        samples = [
            SAMPLE_CONVERSATION,
            SAMPLE_CONVERSATION[:1],
            [SAMPLE_SYSTEM, *SAMPLE_CONVERSATION],
        ]
        refusal = None
        for messages in samples:
            try:
                self.render(messages, add_generation_prompt=True)
                return
            except ChatTemplateError as e:
                if not e.refused:
                    raise ChatTemplateError(
                        f"{e} (while rendering a sample conversation at load)"
                    ) from None
                refusal = e
        raise ChatTemplateError(f"{refusal} (every sample conversation, at load)")

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

        def produce() -> list[str]:
            chunks = []
            size = 0
            for chunk in self._template.generate(context):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:  # checked as it grows, not after
                    raise ChatTemplateError(
                        f"{self.name}: the chat template produced more than "
                        f"{MAX_OUTPUT_CHARS} characters; refused"
                    )
                chunks.append(chunk)
            return chunks

        try:
            chunks = _with_time_limit(produce, RENDER_SECONDS, self.name)
        except _TemplateRaised as e:
            error = ChatTemplateError(f"{self.name} refused the conversation: {e}")
            error.refused = True
            raise error from None
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


class _RenderTimeout(BaseException):
    """Raised inside a template render that ran out of time (never seen by the caller)."""


def _with_time_limit(fn: Callable[[], Any], seconds: float, name: str) -> Any:
    """fn() on its own thread; past `seconds` the caller gets a ChatTemplateError at once and
    the render is stopped by an exception raised in its thread at its next bytecode (a loop
    cannot run on: every string it could build is bounded, so no single step is long)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e

    thread = threading.Thread(target=target, name="qpack-template", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        try:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(thread.ident), ctypes.py_object(_RenderTimeout)
            )
        except (AttributeError, OSError):  # no C API here: the bounded render ends by itself
            pass
        raise ChatTemplateError(
            f"{name}: the chat template ran for more than {seconds:g} s; refused"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.token_text(token_id)
