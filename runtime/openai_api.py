"""The OpenAI API's shapes, without HTTP: request bodies checked and turned into prompt tokens
plus SamplingParams, engine events turned into response objects and stream chunks.

server.py moves bytes; this module decides what they mean. Every problem with a request is an
ApiError carrying its HTTP status and OpenAI's error fields, so that the server can answer
`{"error": {"message", "type", "param", "code"}}` and carry on.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from . import tools
from .chat_request import ChatFeatures, ReasoningDefaults, chat_features, chat_messages
from .engine import Event, Usage
from .grammar import SchemaError
from .sampler import MAX_LOGPROBS, SamplingParams, SamplingParamsError
from .session import Loaded

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOP_STRINGS = 16
MAX_EMBEDDING_INPUTS = 2048


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# --- reading fields -------------------------------------------------------------------------

_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "an object"}  # fmt: skip


def _kind_name(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in _KIND_NAMES.items():
        if type(value) is kind:
            return name
    return type(value).__name__


def _is_kind(value: Any, kind: type) -> bool:
    if type(value) is bool:  # bool is an int in Python, never in JSON
        return kind is bool
    if kind is float:
        return type(value) in (int, float)
    return isinstance(value, kind)


def get_field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None,
              required: bool = False) -> Any:  # fmt: skip
    """body[name] if it has the right JSON type; null counts as absent. bool is never taken
    for a number, and an integer is a fine float."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(
                400, f"'{name}' is required", code="missing_required_parameter", param=name
            )
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(_is_kind(value, k) for k in kinds)
    if not ok:
        wanted = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise ApiError(
            400,
            f"'{name}' must be {wanted}, got {_kind_name(value)}",
            code="invalid_type",
            param=name,
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number", code="invalid_value", param=name)
    return value


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says where it went wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(
            400, f"the body is not UTF-8 (byte {e.start})", code="invalid_json"
        ) from None

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"invalid JSON in the body: {e.msg} (line {e.lineno}, column {e.colno})",
                       code="invalid_json") from None  # fmt: skip
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"invalid JSON in the body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(
            400, f"the body must be a JSON object, got {_kind_name(body)}", code="invalid_json"
        )
    return body


# --- sampling parameters --------------------------------------------------------------------


@dataclass
class ServerDefaults:
    """What a request gets for the fields it leaves out: the command line's sampling options."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    max_tokens: int | None = None
    system: str | None = None
    reasoning: ReasoningDefaults = field(default_factory=ReasoningDefaults)


def sampling_params(body: dict[str, Any], defaults: ServerDefaults, n_ctx: int, n_vocab: int,
                    n_logprobs: int | None) -> SamplingParams:  # fmt: skip
    n = get_field(body, "n", int, 1)
    if n != 1:
        raise ApiError(
            400, f"'n' must be 1 (one choice per request), got {n}", code="invalid_value", param="n"
        )
    max_tokens = get_field(body, "max_completion_tokens", int)
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens = get_field(body, "max_tokens", int)
        param = "max_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= n_ctx:
        raise ApiError(400, f"'{param}' must be between 1 and the context size {n_ctx}, got {max_tokens}",
                       code="invalid_value", param=param)  # fmt: skip
    if max_tokens is None:
        max_tokens = defaults.max_tokens
    stop = body.get("stop")
    if stop is None:
        stop = list(defaults.stop)
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(
            400, "'stop' must be a string or an array of strings", code="invalid_type", param="stop"
        )
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(
            400,
            f"'stop' holds at most {MAX_STOP_STRINGS} strings",
            code="invalid_value",
            param="stop",
        )
    stop = [s for s in stop if s]  # OpenAI ignores empty stop strings
    bias = get_field(body, "logit_bias", dict, {})
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"'logit_bias' key {key!r} is not a token id", code="invalid_value",
                           param="logit_bias") from None  # fmt: skip
        if not 0 <= token < n_vocab:
            raise ApiError(400, f"'logit_bias' token id {token} is outside the vocabulary (0..{n_vocab - 1})",
                           code="invalid_value", param="logit_bias")  # fmt: skip
        if type(value) not in (int, float) or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' values must be numbers from -100 to 100, got {value!r} for {key}",
                           code="invalid_value", param="logit_bias")  # fmt: skip

    def pick(name: str, default: Any) -> Any:
        value = body.get(name)
        return default if value is None else value

    try:
        return SamplingParams(
            temperature=pick("temperature", defaults.temperature),
            top_k=pick("top_k", defaults.top_k),
            top_p=pick("top_p", defaults.top_p),
            min_p=pick("min_p", defaults.min_p),
            repeat_penalty=pick("repeat_penalty", defaults.repeat_penalty),
            presence_penalty=pick("presence_penalty", 0.0),
            frequency_penalty=pick("frequency_penalty", 0.0),
            seed=pick("seed", defaults.seed),
            logit_bias=bias,
            n_logprobs=n_logprobs,
            stop=stop,
            max_tokens=max_tokens,
        )
    except SamplingParamsError as e:
        raise ApiError(400, str(e), code="invalid_value", param=e.param) from None


# --- prompts --------------------------------------------------------------------------------


@dataclass
class Prompt:
    """A request turned into what the engine needs, and how to shape the answer."""

    tokens: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: bool
    features: ChatFeatures | None = None  # chat: tools, response format, reasoning
    echo: str = ""


def _messages(body: dict[str, Any], defaults: ServerDefaults) -> list[dict[str, Any]]:
    messages = get_field(body, "messages", list, required=True)
    if not messages:
        raise ApiError(
            400, "'messages' must hold at least one message", code="invalid_value", param="messages"
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object", code="invalid_type", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}",
                           code="invalid_value", param=f"{where}.role")  # fmt: skip
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: only text ones
            texts = []
            for part in content:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise ApiError(400, f"'{where}.content': only text parts are supported by this model",
                                   code="invalid_value", param=f"{where}.content")  # fmt: skip
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string or an array of text parts, got {_kind_name(content)}",
                           code="invalid_type", param=f"{where}.content")  # fmt: skip
        # Only these keys reach the template: others (name ...) would be one more place for
        # text to slip into the prompt unescaped.
        message: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                   "content": content}  # fmt: skip
        try:
            if role == "assistant" and m.get("tool_calls"):
                message["tool_calls"] = tools.checked_tool_calls(m, where)
        except tools.ToolRequestError as e:
            raise ApiError(400, str(e), code="invalid_value", param=e.param) from None
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise ApiError(400, f"'{where}.tool_call_id' must be the id of the call this answers",
                               code="invalid_value", param=f"{where}.tool_call_id")  # fmt: skip
            message["tool_call_id"] = call_id
        out.append(message)
    if defaults.system and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": defaults.system})
    return out


def _features(body: dict[str, Any], loaded: Loaded, defaults: ServerDefaults) -> ChatFeatures:
    """tools, tool_choice, response_format, reasoning: a 400 naming the field (or the schema
    keyword) that cannot be honoured."""
    try:
        return chat_features(body, loaded.template, defaults.reasoning)
    except tools.ToolRequestError as e:
        raise ApiError(400, str(e), code="invalid_value", param=e.param) from None
    except SchemaError as e:
        param = "tools" if str(e).startswith("tool ") else "response_format"
        raise ApiError(400, str(e), code="unsupported_schema", param=param) from None


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = get_field(body, "stream", bool, False)
    options = get_field(body, "stream_options", dict, {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", code="invalid_type",
                       param="stream_options")  # fmt: skip
    return stream, stream and include_usage


def chat_prompt(body: dict[str, Any], loaded: Loaded, defaults: ServerDefaults) -> Prompt:
    get_field(body, "model", str)
    features = _features(body, loaded, defaults)
    messages = chat_messages(features, _messages(body, defaults))
    logprobs = get_field(body, "logprobs", bool, False)
    top = get_field(body, "top_logprobs", int)
    if top is not None and not logprobs:
        raise ApiError(
            400, "'top_logprobs' needs 'logprobs': true", code="invalid_value", param="top_logprobs"
        )
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise ApiError(400, f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}", code="invalid_value",
                       param="top_logprobs")  # fmt: skip
    params = sampling_params(
        body, defaults, loaded.model.n_ctx, loaded.model.n_vocab, (top or 0) if logprobs else None
    )
    stream, include_usage = _stream_flags(body)
    tokens, text = chat_tokens_escaped(loaded, messages, features.template_kwargs)
    features.note_prompt(text)
    return Prompt(tokens, params, stream, include_usage, logprobs, features)


def completion_prompt(body: dict[str, Any], loaded: Loaded, defaults: ServerDefaults) -> Prompt:
    get_field(body, "model", str)
    prompt = body.get("prompt")
    tok = loaded.tokenizer
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        tokens, text = tok.encode(prompt, parse_special=False), prompt
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        bad = [t for t in prompt if not 0 <= t < loaded.model.n_vocab]
        if bad:
            raise ApiError(
                400,
                f"'prompt' token id {bad[0]} is outside the vocabulary",
                code="invalid_value",
                param="prompt",
            )
        tokens, text = list(prompt), tok.decode(prompt)
    elif prompt is None:
        raise ApiError(
            400, "'prompt' is required", code="missing_required_parameter", param="prompt"
        )
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise ApiError(
            400,
            "'prompt' may hold one text only (one choice per request)",
            code="invalid_value",
            param="prompt",
        )
    else:
        raise ApiError(
            400,
            "'prompt' must be a string or an array of token ids",
            code="invalid_type",
            param="prompt",
        )
    logprobs = get_field(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ApiError(
            400,
            f"'logprobs' must be between 0 and {MAX_LOGPROBS}",
            code="invalid_value",
            param="logprobs",
        )
    params = sampling_params(body, defaults, loaded.model.n_ctx, loaded.model.n_vocab, logprobs)
    stream, include_usage = _stream_flags(body)
    echo = get_field(body, "echo", bool, False)
    return Prompt(
        tokens, params, stream, include_usage, logprobs is not None, echo=text if echo else ""
    )


def special_texts(loaded: Loaded) -> list[str]:
    """The text of every token that `parse_special=True` would turn into a control token."""
    tok = loaded.tokenizer
    cached = getattr(loaded, "_special_texts", None)
    if cached is None:
        cached = sorted(
            {tok.token_text(i) for i in range(tok.vocab_size) if tok.is_special(i)} - {""}
        )
        loaded._special_texts = cached
    return cached


def chat_tokens_escaped(
    loaded: Loaded, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None
) -> tuple[list[int], str]:
    """The chat prompt's tokens, with the template's own special tokens parsed but none taken
    from message text: "<|im_end|>" typed by a user stays plain text.

    When no message holds the text of a special token (the usual case) this is exactly the
    template rendered and encoded whole. Otherwise the rendered prompt is cut around those
    messages' text, which is encoded with parse_special=False.
    """
    from .chat import ChatTemplateError

    tok = loaded.tokenizer
    specials = special_texts(loaded)
    try:
        text = loaded.template.render(
            messages, add_generation_prompt=True, **(template_kwargs or {})
        )
    except ChatTemplateError as e:
        raise ApiError(400, str(e), code="invalid_value", param="messages") from None
    for m in messages:
        for call in m.get("tool_calls") or []:
            if any(s in json.dumps(call["function"], ensure_ascii=False) for s in specials):
                raise ApiError(400, "a tool call in 'messages' holds the text of a special token; remove it",
                               code="invalid_value", param="messages")  # fmt: skip
    risky = [m["content"] for m in messages if any(s in m["content"] for s in specials)]
    if not risky:
        return tok.encode(text, parse_special=True), text  # as ChatTemplate.encode
    # Pieces of (text, is_user_text), found in order in the rendered prompt.
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for content in risky:
        at = text.find(content, pos)
        if at < 0:
            raise ApiError(400, "a message holds the text of a special token and this model's chat "
                           "template changes it; remove that text", code="invalid_value", param="messages")  # fmt: skip
        pieces += [(text[pos:at], False), (content, True)]
        pos = at + len(content)
    pieces.append((text[pos:], False))
    tokens: list[int] = []
    last = len(pieces) - 1
    for i, (piece, is_user) in enumerate(pieces):
        if piece or i == 0:
            tokens += tok.encode(piece, add_bos=None if i == 0 else False,
                                 add_eos=None if i == last else False, parse_special=not is_user)  # fmt: skip
    return tokens, text


def embedding_inputs(body: dict[str, Any], loaded: Loaded) -> tuple[list[list[int]], str]:
    """Token lists to embed, and the encoding ('float' or 'base64') of the answer."""
    get_field(body, "model", str)
    encoding = get_field(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise ApiError(
            400,
            "'encoding_format' must be 'float' or 'base64'",
            code="invalid_value",
            param="encoding_format",
        )
    value = body.get("input")
    if value is None:
        raise ApiError(400, "'input' is required", code="missing_required_parameter", param="input")
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(type(t) is int for t in value)
    ):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        items = value
    else:
        raise ApiError(
            400,
            "'input' must be a string, an array of strings, or token ids",
            code="invalid_type",
            param="input",
        )
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise ApiError(
            400,
            f"'input' holds at most {MAX_EMBEDDING_INPUTS} items",
            code="invalid_value",
            param="input",
        )
    out = []
    n_ctx, n_vocab = loaded.model.n_ctx, loaded.model.n_vocab
    for i, item in enumerate(items):
        if isinstance(item, str):
            tokens = loaded.tokenizer.encode(item, parse_special=False)
        elif all(type(t) is int and 0 <= t < n_vocab for t in item):
            tokens = list(item)
        else:
            raise ApiError(
                400,
                f"'input[{i}]' must be a string or valid token ids",
                code="invalid_value",
                param="input",
            )
        if not tokens:
            raise ApiError(400, f"'input[{i}]' is empty", code="invalid_value", param="input")
        if len(tokens) > n_ctx:
            raise ApiError(400, f"'input[{i}]' has {len(tokens)} tokens but the context holds {n_ctx}",
                           code="context_length_exceeded", param="input")  # fmt: skip
        out.append(tokens)
    return out, encoding


# --- answers --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class Answer:
    """Collects a request's events: the text so far, token logprobs, the finish."""

    def __init__(self, loaded: Loaded, chat: bool, want_logprobs: bool, prefix: str):
        self.tokenizer = loaded.tokenizer
        self.chat = chat
        self.want_logprobs = want_logprobs
        self.id = new_id(prefix)
        self.created = int(time.time())
        self.text: list[str] = []
        self.logprobs: list[dict[str, Any]] = []  # chat shape, one per token
        self.finish_reason: str | None = None
        self.error: str | None = None

    def _piece(self, token: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def add(self, ev: Event) -> list[dict[str, Any]]:
        """Record the event; returns its logprob entries (chat shape) for a stream chunk."""
        self.text.append(ev.text)
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
            self.error = ev.error
        entries = []
        if self.want_logprobs and ev.token is not None and ev.logprob is not None:
            piece, raw = self._piece(ev.token)
            top = []
            for tid, lp in ev.top_logprobs or []:
                p, b = self._piece(tid)
                top.append({"token": p, "logprob": lp, "bytes": b})
            entries.append(
                {"token": piece, "logprob": ev.logprob, "bytes": raw, "top_logprobs": top}
            )
        self.logprobs += entries
        return entries

    @property
    def content(self) -> str:
        return "".join(self.text)


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape of the same logprobs."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def chat_response(a: Answer, model: str, fingerprint: str, usage: Usage, message: dict[str, Any],
                  finish_reason: str | None) -> dict[str, Any]:  # fmt: skip
    return {
        "id": a.id,
        "object": "chat.completion",
        "created": a.created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": {"content": a.logprobs, "refusal": None} if a.want_logprobs else None,
            "finish_reason": finish_reason,
        }],
        "usage": usage_object(usage),
    }  # fmt: skip


def completion_response(
    a: Answer, model: str, fingerprint: str, usage: Usage, echo: str
) -> dict[str, Any]:
    return {
        "id": a.id,
        "object": "text_completion",
        "created": a.created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{
            "index": 0,
            "text": echo + a.content,
            "logprobs": completion_logprobs(a.logprobs, len(echo)) if a.want_logprobs else None,
            "finish_reason": a.finish_reason,
        }],
        "usage": usage_object(usage),
    }  # fmt: skip


def chat_chunk(a: Answer, model: str, fingerprint: str, delta: dict[str, Any], finish: str | None = None,
               logprobs: list[dict[str, Any]] | None = None, with_usage_field: bool = False) -> dict[str, Any]:  # fmt: skip
    chunk = {
        "id": a.id,
        "object": "chat.completion.chunk",
        "created": a.created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
            "finish_reason": finish,
        }],
    }  # fmt: skip
    if with_usage_field:
        chunk["usage"] = None  # as OpenAI: every chunk but the last has "usage": null
    return chunk


def completion_chunk(a: Answer, model: str, fingerprint: str, text: str, finish: str | None = None,
                     logprobs: dict[str, Any] | None = None, with_usage_field: bool = False) -> dict[str, Any]:  # fmt: skip
    chunk = {
        "id": a.id,
        "object": "text_completion",
        "created": a.created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def usage_chunk(
    a: Answer, model: str, fingerprint: str, usage: Usage, chat: bool
) -> dict[str, Any]:
    return {
        "id": a.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": a.created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [],
        "usage": usage_object(usage),
    }
