"""The OpenAI API's shapes, without HTTP: request bodies checked and turned into prompt tokens
plus SamplingParams, engine events turned into response objects and stream chunks.

transport.py moves bytes and routes.py calls this module, which decides what they mean. Every
problem with a request is an ApiError carrying its HTTP status and OpenAI's error fields, so
that the server answers `{"error": {"message", "type", "param", "code"}}` and carries on.

A new request field is one row in CHAT_FIELDS (or another endpoint's tuple): its JSON type,
default and limits, and if it needs more, a `convert(value, limits)` hook that checks it and
returns what the rest of the code uses. chat_prompt keeps every value read in `Prompt.fields`;
the answer is shaped by chat_message / chat_chunk over one `envelope`.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from . import tools
from .chat_request import ChatFeatures, ReasoningDefaults, chat_features, chat_messages
from .engine import Event, Usage
from .errors import ApiError
from .fields import Field, ModelLimits, kind_name, read_fields, sampling_params
from .grammar import SchemaError
from .sampler import MAX_LOGPROBS, SamplingParams
from .session import Loaded

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_EMBEDDING_INPUTS = 2048
MAX_EMBEDDING_TOKENS = 65536  # per request, all inputs together
MAX_EMBEDDING_VALUES = 1 << 20  # numbers in one answer (~20 MB of JSON floats)


# --- the body -------------------------------------------------------------------------------


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
            400, f"the body must be a JSON object, got {kind_name(body)}", code="invalid_json"
        )
    return body


@dataclass
class ServerDefaults:
    """What a request gets for the fields it leaves out: the command line's sampling options
    (one SamplingParams, whose own defaults are llama.cpp's) and its system message."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    reasoning: ReasoningDefaults = field(default_factory=ReasoningDefaults)


# --- the fields of each endpoint ------------------------------------------------------------


def _stop(value: Any, limits: ModelLimits) -> list[str]:
    stop = [value] if isinstance(value, str) else value
    if not all(isinstance(s, str) for s in stop):
        raise ApiError(
            400, "'stop' must be a string or an array of strings", code="invalid_type", param="stop"
        )
    return [s for s in stop if s]  # OpenAI ignores empty stop strings


def _logit_bias(bias: dict[str, Any], limits: ModelLimits) -> dict[str, Any]:
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"'logit_bias' key {key!r} is not a token id", code="invalid_value",
                           param="logit_bias") from None  # fmt: skip
        if not 0 <= token < limits.n_vocab:
            raise ApiError(400, f"'logit_bias' token id {token} is outside the vocabulary (0..{limits.n_vocab - 1})",
                           code="invalid_value", param="logit_bias")  # fmt: skip
        if type(value) not in (int, float) or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' values must be numbers from -100 to 100, got {value!r} for {key}",
                           code="invalid_value", param="logit_bias")  # fmt: skip
    return bias


def _include_usage(options: dict[str, Any], limits: ModelLimits) -> bool:
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", code="invalid_type",
                       param="stream_options")  # fmt: skip
    return include_usage


# Fields every generation takes. Ranges of the sampling ones are SamplingParams'.
GENERATION_FIELDS: tuple[Field, ...] = (
    Field("model", str),
    Field("n", int, default=1, low=1, high=1),  # one choice per request
    Field("stream", bool, default=False),
    Field("stream_options", dict, default=False, convert=_include_usage),
    Field("temperature", float, sampling="temperature"),
    Field("top_k", int, sampling="top_k"),
    Field("top_p", float, sampling="top_p"),
    Field("min_p", float, sampling="min_p"),
    Field("repeat_penalty", float, sampling="repeat_penalty"),
    Field("presence_penalty", float, sampling="presence_penalty"),
    Field("frequency_penalty", float, sampling="frequency_penalty"),
    Field("seed", int, sampling="seed"),
    Field("logit_bias", dict, convert=_logit_bias, sampling="logit_bias"),
    Field("stop", (str, list), convert=_stop, sampling="stop"),
    Field("max_tokens", int, low=1, high="n_ctx", sampling="max_tokens"),
)

CHAT_FIELDS: tuple[Field, ...] = (
    *GENERATION_FIELDS,
    Field("max_completion_tokens", int, low=1, high="n_ctx", sampling="max_tokens"),
    Field("messages", list, required=True),
    # Read further (tools, schema, reasoning) by chat_request.chat_features.
    Field("response_format", dict),
    Field("tools", list),
    Field("tool_choice", (str, dict)),
    Field("parallel_tool_calls", bool),
    Field("reasoning_format", str),
    Field("enable_thinking", bool),
    Field("chat_template_kwargs", dict),
    Field("logprobs", bool, default=False),
    Field("top_logprobs", int, low=0, high=MAX_LOGPROBS),
)

COMPLETION_FIELDS: tuple[Field, ...] = (
    *GENERATION_FIELDS,
    Field("prompt", (str, list), required=True),
    Field("logprobs", int, low=0, high=MAX_LOGPROBS),
    Field("echo", bool, default=False),
)

EMBEDDING_FIELDS: tuple[Field, ...] = (
    Field("model", str),
    Field("input", (str, list), required=True),
    Field("encoding_format", str, default="float", choices=("float", "base64")),
)

TOKENIZE_FIELDS: tuple[Field, ...] = (
    Field("content", str, required=True),
    Field("add_special", bool, default=False),
    Field("parse_special", bool, default=False),
    Field("with_pieces", bool, default=False),
)


def _token_ids(ids: list[Any], limits: ModelLimits) -> list[int]:
    for t in ids:
        if type(t) is not int or not 0 <= t < limits.n_vocab:
            raise ApiError(400, f"'tokens' must hold token ids 0..{limits.n_vocab - 1}, got {t!r}",
                           code="invalid_value", param="tokens")  # fmt: skip
    return ids


DETOKENIZE_FIELDS: tuple[Field, ...] = (Field("tokens", list, required=True, convert=_token_ids),)


def model_limits(loaded: Loaded) -> ModelLimits:
    return ModelLimits(n_ctx=loaded.model.n_ctx, n_vocab=loaded.model.n_vocab)


# --- prompts --------------------------------------------------------------------------------


@dataclass
class Prompt:
    """A request turned into what the engine needs, and how to shape the answer. `fields`
    holds every declared field as read (for hooks that shape the answer)."""

    tokens: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: bool
    features: ChatFeatures | None = None  # chat: tools, response format, reasoning
    echo: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


def _messages(messages: list[Any], defaults: ServerDefaults) -> list[dict[str, Any]]:
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
            raise ApiError(400, f"'{where}.content' must be a string or an array of text parts, got {kind_name(content)}",
                           code="invalid_type", param=f"{where}.content")  # fmt: skip
        # Only these keys reach the template: others (name ...) would be one more place for
        # text to slip into the prompt unescaped.
        message: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                   "content": content}  # fmt: skip
        if role == "assistant" and m.get("tool_calls"):
            try:
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


def _features(v: dict[str, Any], loaded: Loaded, defaults: ServerDefaults) -> ChatFeatures:
    """tools, tool_choice, response_format, reasoning: a 400 naming the field (or the schema
    keyword) that cannot be honoured."""
    try:
        return chat_features(v, loaded.template, defaults.reasoning)
    except tools.ToolRequestError as e:
        raise ApiError(400, str(e), code="invalid_value", param=e.param) from None
    except SchemaError as e:
        param = "tools" if str(e).startswith("tool ") else "response_format"
        raise ApiError(400, str(e), code="unsupported_schema", param=param) from None


def chat_prompt(body: dict[str, Any], loaded: Loaded, defaults: ServerDefaults) -> Prompt:
    v = read_fields(body, CHAT_FIELDS, model_limits(loaded))
    features = _features(v, loaded, defaults)
    messages = chat_messages(features, _messages(v["messages"], defaults))
    logprobs, top = v["logprobs"], v["top_logprobs"]
    if top is not None and not logprobs:
        raise ApiError(
            400, "'top_logprobs' needs 'logprobs': true", code="invalid_value", param="top_logprobs"
        )
    params = sampling_params(v, CHAT_FIELDS, defaults.sampling,
                             n_logprobs=(top or 0) if logprobs else None)  # fmt: skip
    tokens, text = chat_tokens_escaped(loaded, messages, features.template_kwargs)
    features.note_prompt(text)
    return Prompt(tokens, params, v["stream"], v["stream"] and v["stream_options"], logprobs,
                  features, fields=v)  # fmt: skip


def completion_prompt(body: dict[str, Any], loaded: Loaded, defaults: ServerDefaults) -> Prompt:
    v = read_fields(body, COMPLETION_FIELDS, model_limits(loaded))
    prompt = v["prompt"]
    tok = loaded.tokenizer
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        tokens, text = tok.encode(prompt, parse_special=False), prompt
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        bad = [t for t in prompt if not 0 <= t < loaded.model.n_vocab]
        if bad:
            raise ApiError(400, f"'prompt' token id {bad[0]} is outside the vocabulary",
                           code="invalid_value", param="prompt")  # fmt: skip
        tokens, text = list(prompt), tok.decode(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise ApiError(400, "'prompt' may hold one text only (one choice per request)",
                       code="invalid_value", param="prompt")  # fmt: skip
    else:
        raise ApiError(400, "'prompt' must be a string or an array of token ids",
                       code="invalid_type", param="prompt")  # fmt: skip
    logprobs = v["logprobs"]
    params = sampling_params(v, COMPLETION_FIELDS, defaults.sampling, n_logprobs=logprobs)
    return Prompt(tokens, params, v["stream"], v["stream"] and v["stream_options"],
                  logprobs is not None, echo=text if v["echo"] else "", fields=v)  # fmt: skip


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
    messages' text, which is encoded with parse_special=False. Returns the tokens and the
    rendered text.
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
    """Token lists to embed, and the encoding ('float' or 'base64') of the answer. Bounded so
    that one request cannot hold the engine (tokens) or the server's memory (answer size)."""
    v = read_fields(body, EMBEDDING_FIELDS, model_limits(loaded))
    value = v["input"]
    if isinstance(value, str) or (value and all(type(t) is int for t in value)):
        items = [value]
    elif value and all(isinstance(x, (str, list)) for x in value):
        items = value
    else:
        raise ApiError(400, "'input' must be a string, an array of strings, or token ids",
                       code="invalid_type", param="input")  # fmt: skip
    n_embd = loaded.model.hp.n_embd
    most = min(MAX_EMBEDDING_INPUTS, max(1, MAX_EMBEDDING_VALUES // n_embd))
    if len(items) > most:
        raise ApiError(400, f"'input' holds at most {most} items for this model (answers are bounded "
                       f"to {MAX_EMBEDDING_VALUES} numbers)", code="invalid_value", param="input")  # fmt: skip
    out = []
    total = 0
    n_ctx, n_vocab = loaded.model.n_ctx, loaded.model.n_vocab
    for i, item in enumerate(items):
        if not item:
            raise ApiError(400, f"'input[{i}]' is empty", code="invalid_value", param="input")
        if isinstance(item, str):
            if len(item) > MAX_EMBEDDING_TOKENS * 64:  # no tokenizer makes tokens longer
                raise ApiError(400, f"'input' holds more than {MAX_EMBEDDING_TOKENS} tokens",
                               code="invalid_value", param="input")  # fmt: skip
            tokens = loaded.tokenizer.encode(item, parse_special=False)
        elif all(type(t) is int and 0 <= t < n_vocab for t in item):
            tokens = list(item)
        else:
            raise ApiError(400, f"'input[{i}]' must be a string or valid token ids",
                           code="invalid_value", param="input")  # fmt: skip
        if len(tokens) > n_ctx:
            raise ApiError(400, f"'input[{i}]' has {len(tokens)} tokens but the context holds {n_ctx}",
                           code="context_length_exceeded", param="input")  # fmt: skip
        total += len(tokens)
        if total > MAX_EMBEDDING_TOKENS:
            raise ApiError(400, f"'input' holds more than {MAX_EMBEDDING_TOKENS} tokens in all; "
                           "split it over several requests", code="invalid_value", param="input")  # fmt: skip
        out.append(tokens)
    return out, v["encoding_format"]


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


def envelope(a: Answer, model: str, fingerprint: str, obj: str, choices: list[dict[str, Any]],
             usage: Usage | None = None) -> dict[str, Any]:  # fmt: skip
    """The fields every response and chunk shares; `usage` only when given."""
    out = {"id": a.id, "object": obj, "created": a.created, "model": model,
           "system_fingerprint": fingerprint, "choices": choices}  # fmt: skip
    if usage is not None:
        out["usage"] = usage_object(usage)
    return out


def chat_response(a: Answer, model: str, fingerprint: str, usage: Usage, message: dict[str, Any],
                  finish_reason: str | None) -> dict[str, Any]:  # fmt: skip
    """`message` and `finish_reason` as chat_output.ChatOutput splits the answer."""
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": a.logprobs, "refusal": None} if a.want_logprobs else None,
        "finish_reason": finish_reason,
    }
    return envelope(a, model, fingerprint, "chat.completion", [choice], usage)


def completion_response(
    a: Answer, model: str, fingerprint: str, usage: Usage, echo: str
) -> dict[str, Any]:
    choice = {
        "index": 0,
        "text": echo + a.content,
        "logprobs": completion_logprobs(a.logprobs, len(echo)) if a.want_logprobs else None,
        "finish_reason": a.finish_reason,
    }
    return envelope(a, model, fingerprint, "text_completion", [choice], usage)


def chat_chunk(a: Answer, model: str, fingerprint: str, delta: dict[str, Any], finish: str | None = None,
               logprobs: list[dict[str, Any]] | None = None, with_usage_field: bool = False) -> dict[str, Any]:  # fmt: skip
    choice = {
        "index": 0,
        "delta": delta,
        "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
        "finish_reason": finish,
    }
    chunk = envelope(a, model, fingerprint, "chat.completion.chunk", [choice])
    if with_usage_field:
        chunk["usage"] = None  # as OpenAI: every chunk but the last has "usage": null
    return chunk


def completion_chunk(a: Answer, model: str, fingerprint: str, text: str, finish: str | None = None,
                     logprobs: dict[str, Any] | None = None, with_usage_field: bool = False) -> dict[str, Any]:  # fmt: skip
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
    chunk = envelope(a, model, fingerprint, "text_completion", [choice])
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def usage_chunk(
    a: Answer, model: str, fingerprint: str, usage: Usage, chat: bool
) -> dict[str, Any]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    return envelope(a, model, fingerprint, obj, [], usage)
