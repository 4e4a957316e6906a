"""The endpoints: one plain function per route, taking the server and the request and returning
a Response or an EventStream (transport.py sends either). `table()` at the bottom lists them.

A route reads its body through openai_api's field declarations, submits work to the engine
and shapes the answer with openai_api's envelopes; it never touches a socket. While it waits
for the engine it asks `req.client_gone()`, so a client that hangs up frees its slot at once.
"""

from __future__ import annotations

import base64
import functools
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import openai_api as api
from .engine import Event, Request
from .errors import ApiError, ContextOverflow, QpackError
from .fields import read_fields
from .transport import ClientGone, EventStream, HttpRequest, Response, Route

if TYPE_CHECKING:
    from .server import Server

WEB_PAGE = Path(__file__).with_name("web") / "index.html"
POLL_SECONDS = 0.2  # how often a waiting route checks that its client is still there
MAX_PENDING_PER_SLOT = 32  # requests queued beyond this answer 503 instead of piling up


def _json_body(req: HttpRequest) -> dict[str, Any]:
    return api.parse_json_body(req.body)


# --- pages and facts --------------------------------------------------------------------------


def chat_page(app: Server, req: HttpRequest) -> Response:
    try:
        page = WEB_PAGE.read_bytes()
    except OSError:
        raise ApiError(404, "the chat page is missing from this build", type_="not_found_error",
                       code="not_found") from None  # fmt: skip
    return Response(200, page, "text/html; charset=utf-8", [
        ("Cache-Control", "no-cache"),
        # Everything the page needs is inline: it works offline and loads nothing else.
        ("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                    "style-src 'unsafe-inline'; img-src 'self' data:"),
        ("X-Content-Type-Options", "nosniff"),
    ])  # fmt: skip


def health(app: Server, req: HttpRequest) -> Response:
    if app.loaded is None:
        return Response.json({"status": "loading"}, 503)
    return Response.json({"status": "ok"})


def models(app: Server, req: HttpRequest) -> Response:
    model = app.loaded.model
    return Response.json({
        "object": "list",
        "data": [{
            "id": app.model_id,
            "object": "model",
            "created": int(app.metrics.started),
            "owned_by": "qpack",
            "meta": {"n_ctx": model.n_ctx, "n_vocab": model.n_vocab},
        }],
    })  # fmt: skip


def props(app: Server, req: HttpRequest) -> Response:
    return Response.json(app.facts)


def metrics(app: Server, req: HttpRequest) -> Response:
    body = app.metrics.exposition(
        app.loaded, app.transport.open_connections if app.transport else 0
    )
    return Response(200, body.encode(), "text/plain; version=0.0.4; charset=utf-8")


# --- generation -------------------------------------------------------------------------------


def chat_completions(app: Server, req: HttpRequest) -> Response | EventStream:
    prompt = api.chat_prompt(_json_body(req), app.loaded, app.options.defaults)
    return _generate(app, req, prompt, chat=True)


def completions(app: Server, req: HttpRequest) -> Response | EventStream:
    prompt = api.completion_prompt(_json_body(req), app.loaded, app.options.defaults)
    return _generate(app, req, prompt, chat=False)


def _check_queue(app: Server) -> None:
    limit = MAX_PENDING_PER_SLOT * len(app.loaded.engine.slots)
    if app.metrics.in_flight >= limit:
        raise ApiError(503, f"the server is busy ({limit} requests waiting); retry later",
                       type_="server_error", code="server_busy")  # fmt: skip


def _submit(app: Server, prompt: api.Prompt) -> Request:
    engine = app.loaded.engine
    _check_queue(app)
    constraint = None
    if prompt.features is not None:  # JSON schema, tool calls: llguidance's mask
        constraint = prompt.features.constraint(app.loaded.template, app.loaded.model.n_vocab)
    try:
        submitted = engine.submit(prompt.tokens, prompt.params, constraint)
    except ContextOverflow as e:
        raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None
    except QpackError as e:
        raise ApiError(400, str(e), code="invalid_value") from None
    app.metrics.generation(+1)
    return submitted


def _events(app: Server, req: HttpRequest, submitted: Request) -> Iterator[Event]:
    """The request's events; while none comes, make sure the client is still there."""
    times = app.metrics.token_times
    while True:
        try:
            for ev in submitted.events(timeout=POLL_SECONDS):
                if ev.token is not None:
                    times.append(time.monotonic())
                yield ev
            return
        except queue.Empty:
            if req.client_gone():
                raise ClientGone() from None


def _check_finish(answer: api.Answer) -> None:
    if answer.finish_reason == "error":
        raise ApiError(500, f"generation failed: {answer.error}", type_="server_error",
                       code="generation_error")  # fmt: skip


def _generate(
    app: Server, req: HttpRequest, prompt: api.Prompt, chat: bool
) -> Response | EventStream:
    submitted = _submit(app, prompt)
    answer = api.Answer(app.loaded, chat, prompt.logprobs, "chatcmpl" if chat else "cmpl")
    if prompt.stream:
        return EventStream(_stream(app, req, submitted, answer, prompt, chat),
                           on_close=functools.partial(_release, app, submitted))  # fmt: skip
    try:
        for ev in _events(app, req, submitted):
            answer.add(ev)
    finally:
        _release(app, submitted)
    _check_finish(answer)
    model, fp = app.model_id, app.fingerprint
    if not chat:
        return Response.json(
            api.completion_response(answer, model, fp, submitted.usage, prompt.echo)
        )
    out = prompt.features.output()  # reasoning, content and tool calls apart
    out.feed(answer.content)
    out.finish()
    return Response.json(api.chat_response(answer, model, fp, submitted.usage, out.message(),
                                           out.finish_reason(answer.finish_reason)))  # fmt: skip


def _release(app: Server, submitted: Request) -> None:
    if not submitted.done.is_set():
        submitted.cancel()
    app.metrics.generation(-1)


def _stream(app: Server, req: HttpRequest, submitted: Request, answer: api.Answer,
            prompt: api.Prompt, chat: bool) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The stream's chunks (the transport frees the slot however the stream ends)."""
    model, fp = app.model_id, app.fingerprint
    usage_field = prompt.include_usage
    if chat:
        yield api.chat_chunk(answer, model, fp, {"role": "assistant", "content": ""},
                             with_usage_field=usage_field)  # fmt: skip
    elif prompt.echo:
        yield api.completion_chunk(answer, model, fp, prompt.echo, with_usage_field=usage_field)
    pending: list[dict[str, Any]] = []  # logprobs of tokens whose text is still held back
    offset = len(prompt.echo)
    out = prompt.features.output() if chat else None
    tok = app.loaded.tokenizer
    for ev in _events(app, req, submitted):
        pending += answer.add(ev)
        if chat:  # deltas of reasoning, content and tool calls (index, id, name, arguments)
            token_text = tok.token_text(ev.token) if ev.token is not None else None
            deltas = out.feed(ev.text, token_text)
            if ev.finish_reason is not None:
                deltas += out.finish()
                if not deltas and pending:
                    deltas = [{}]  # the last tokens' logprobs, though their text was cut
            lp = pending if prompt.logprobs else None
            for i, delta in enumerate(deltas):
                yield api.chat_chunk(answer, model, fp, delta, logprobs=lp if i == 0 else None,
                                     with_usage_field=usage_field)  # fmt: skip
            if deltas:
                pending = []
            continue
        if not ev.text and ev.finish_reason is None:
            continue
        if ev.text or pending:
            clp = api.completion_logprobs(pending, offset) if prompt.logprobs else None
            yield api.completion_chunk(answer, model, fp, ev.text, logprobs=clp,
                                       with_usage_field=usage_field)  # fmt: skip
            offset += len(ev.text)
            pending = []
    _check_finish(answer)
    if chat:
        yield api.chat_chunk(answer, model, fp, {}, finish=out.finish_reason(answer.finish_reason),
                             with_usage_field=usage_field)  # fmt: skip
    else:
        yield api.completion_chunk(answer, model, fp, "", finish=answer.finish_reason,
                                   with_usage_field=usage_field)  # fmt: skip
    if prompt.include_usage:
        yield api.usage_chunk(answer, model, fp, submitted.usage, chat)


# --- embeddings and tokens --------------------------------------------------------------------


def embeddings(app: Server, req: HttpRequest) -> Response:
    inputs, encoding = api.embedding_inputs(_json_body(req), app.loaded)
    engine = app.loaded.engine
    _check_queue(app)
    try:
        submitted = engine.submit_embedding(inputs)
    except ContextOverflow as e:
        raise ApiError(400, str(e), code="context_length_exceeded", param="input") from None
    except QpackError as e:
        raise ApiError(400, str(e), code="invalid_value", param="input") from None
    app.metrics.generation(+1)
    try:
        while not submitted.done.wait(POLL_SECONDS):
            if req.client_gone():
                raise ClientGone()
    finally:
        if not submitted.done.is_set():
            submitted.cancel()  # the engine drops it at its next step
        app.metrics.generation(-1)
    if submitted.error is not None:
        raise ApiError(500, f"embedding failed: {submitted.error}", type_="server_error",
                       code="embedding_error")  # fmt: skip
    data = []
    for i, vector in enumerate(submitted.vectors):
        if encoding == "base64":
            value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            value = [float(x) for x in vector]
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = sum(len(t) for t in inputs)
    return Response.json({"object": "list", "data": data, "model": app.model_id,
                          "usage": {"prompt_tokens": n, "total_tokens": n}})  # fmt: skip


def tokenize(app: Server, req: HttpRequest) -> Response:
    v = read_fields(_json_body(req), api.TOKENIZE_FIELDS)
    tok = app.loaded.tokenizer
    follow_model = None if v["add_special"] else False  # None: BOS/EOS as the model says
    ids = tok.encode(v["content"], add_bos=follow_model, add_eos=follow_model,
                     parse_special=v["parse_special"])  # fmt: skip
    if v["with_pieces"]:
        tokens: list[Any] = [
            {"id": i, "piece": tok.token_bytes(i).decode("utf-8", errors="replace")} for i in ids
        ]
    else:
        tokens = ids
    return Response.json({"tokens": tokens})


def detokenize(app: Server, req: HttpRequest) -> Response:
    v = read_fields(_json_body(req), api.DETOKENIZE_FIELDS, api.model_limits(app.loaded))
    return Response.json({"content": app.loaded.tokenizer.decode(v["tokens"])})


# --- the table --------------------------------------------------------------------------------


def table(app: Server) -> dict[str, Route]:
    """Path -> Route, each handler bound to the server."""

    def bind(fn):
        return functools.partial(fn, app)

    page = Route(bind(chat_page), public=True)
    post = {"methods": ("POST",), "needs_model": True, "json_body": True}
    return {
        "/": page,
        "/index.html": page,
        "/health": Route(bind(health), public=True),
        "/v1/models": Route(bind(models), needs_model=True),
        "/props": Route(bind(props), needs_model=True),
        "/metrics": Route(bind(metrics)),
        "/v1/chat/completions": Route(bind(chat_completions), **post),
        "/v1/completions": Route(bind(completions), **post),
        "/v1/embeddings": Route(bind(embeddings), **post),
        "/tokenize": Route(bind(tokenize), **post),
        "/detokenize": Route(bind(detokenize), **post),
    }
