"""The HTTP server: OpenAI-compatible API, chat page, health and metrics, on the standard
library's ThreadingHTTPServer.

One engine thread owns the model (`Engine.serve_forever`). Each connection has its own handler
thread, which submits work and reads the request's events; the engine only ever puts into
queues, so a slow or vanished client costs nobody else anything. A client that hangs up is
noticed on the next write (or while waiting, by peeking at its socket) and its request is
cancelled at once, freeing the slot.

The socket is bound before the model loads: /health answers 503 until it is ready.
"""

from __future__ import annotations

import base64
import errno
import hmac
import ipaddress
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
import webbrowser
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import numpy as np

from . import cpu, session
from . import openai_api as api
from .errors import ContextOverflow, QpackError
from .openai_api import ApiError, ServerDefaults
from .version import __version__

WEB_PAGE = Path(__file__).with_name("web") / "index.html"
POLL_SECONDS = 0.2  # how often a waiting handler checks that its client is still there
SOCKET_TIMEOUT = 300.0  # a client silent this long (mid-request or mid-stream) is dropped
MAX_PENDING_PER_SLOT = 32  # requests queued beyond this answer 503 instead of piling up
EMBED_WAIT_SECONDS = 120.0
LINGER_SECONDS = 2.0  # after refusing a body unread, how long to drop what still arrives
LINGER_BYTES = 64 << 20


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    cors_origin: str | None = None
    max_body: int = 1 << 20
    parallel: int = 4
    ctx_size: int | None = None
    threads: int | None = None
    cpu_choice: str = "auto"
    open_browser: bool = True
    verbose: bool = False
    defaults: ServerDefaults = field(default_factory=ServerDefaults)


class ClientGone(Exception):
    """The client closed its connection: stop working for it."""


class Metrics:
    """Counters for /metrics. Handler threads update them; a lock keeps the counts exact."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.in_flight = 0  # generations submitted and not finished
        self.token_times: deque[float] = deque(maxlen=1 << 16)
        self.started = time.time()

    def count(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def generation(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = sum(1 for t in list(self.token_times) if now - t <= window)
        return recent / window


class Server:
    """The server's state: the listening socket, the loaded model once there, counters."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.loaded: session.Loaded | None = None
        self.model_id = "model"
        self.fingerprint = f"qpack-{__version__}"
        self.facts: dict[str, Any] = {}
        self.metrics = Metrics()
        self.httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---------------------------------------------------------------------------

    def listen(self) -> str:
        """Bind and start answering (503 for model routes until `load`). Returns the URL."""
        o = self.options
        family = socket.AF_INET6 if ":" in o.host else socket.AF_INET
        _HTTPServer.address_family = family
        try:
            self.httpd = _HTTPServer((o.host, o.port), Handler, self)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise QpackError(
                    f"cannot listen on {o.host}:{o.port}: the port is already in use (another "
                    f"server?); choose another with --port"
                ) from None
            raise QpackError(f"cannot listen on {o.host}:{o.port}: {e.strerror or e}") from None
        thread = threading.Thread(target=self.httpd.serve_forever, name="qpack-http", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self.url

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    def load(self, gguf: Any) -> None:
        """Load the model and start the engine thread; model routes answer from then on."""
        o = self.options
        loaded = session.load(gguf, o.ctx_size, o.threads, o.cpu_choice, n_parallel=o.parallel,
                              verbose=o.verbose)  # fmt: skip
        api.special_texts(loaded)  # built once now, not on the first request
        self.model_id = _model_id(gguf)
        self.fingerprint = f"qpack-{__version__}-{loaded.model.report.variant}"
        self.facts = _model_facts(gguf, loaded, o)
        thread = threading.Thread(
            target=loaded.engine.serve_forever, name="qpack-engine", daemon=True
        )
        thread.start()
        self._threads.append(thread)
        self.loaded = loaded

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded.engine.shutdown()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, app: Server):
        self.app = app
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        # A connection that broke outside a handler's own care: one line, not a traceback.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError, ClientGone)):
            click.echo(f"qpack: server: {type(exc).__name__}: {exc}", err=True)


def run(gguf: Any, options: ServerOptions) -> None:
    """Listen, print the URL, load the model, open the page; serve until interrupted."""
    server = Server(options)
    url = server.listen()
    click.echo(f"qpack: listening on {url} (loading the model)", err=True)
    try:
        server.load(gguf)
    except BaseException:
        server.close()
        raise
    key_note = "; API key required" if options.api_key else ""
    click.echo(f"qpack: ready: {server.model_id}, context {server.loaded.model.n_ctx}, "
               f"{options.parallel} parallel{key_note}. Chat page: {url}", err=True)  # fmt: skip
    if options.open_browser and _desktop_present():
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("qpack: stopped", err=True)
    finally:
        server.close()


def _desktop_present() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _model_id(gguf: Any) -> str:
    path = str(getattr(gguf, "path", "") or "")
    if path.endswith(".gguf"):
        return os.path.basename(path)[: -len(".gguf")]
    try:  # the model inside this executable: the GGUF file name it was built from
        from . import embedded

        member = embedded.own_model()
        if member is not None and os.path.realpath(member.path) == os.path.realpath(path):
            return member.manifest()["model"]["file"].removesuffix(".gguf")
    except (QpackError, KeyError, TypeError, AttributeError, OSError):
        pass
    name = gguf.metadata.get("general.name")
    return name if isinstance(name, str) and name else os.path.basename(path) or "model"


def _model_facts(gguf: Any, loaded: session.Loaded, o: ServerOptions) -> dict[str, Any]:
    md = gguf.metadata
    report = loaded.model.report
    forced = o.cpu_choice not in ("auto", None)
    supported = cpu.supported_variants()
    return {
        "model": {
            "id": _model_id(gguf),
            "name": md.get("general.name"),
            "architecture": md.get("general.architecture"),
            "path": str(getattr(gguf, "path", "")),
            "n_vocab": loaded.model.n_vocab,
            "n_ctx_train": loaded.model.hp.n_ctx_train,
            "n_layer": loaded.model.hp.n_layer,
            "n_embd": loaded.model.hp.n_embd,
            "weights_bytes": report.weights_bytes,
            "chat_template": loaded.template.name,
        },
        "cpu": {
            "variant": report.variant,
            "why": "forced by --cpu" if forced else "the best variant this CPU supports",
            "supported": supported,
        },
        "n_ctx": report.n_ctx,
        "parallel": report.n_seq,
        "threads": report.threads,
        "kv_cache_bytes": report.kv_bytes,
        "version": __version__,
    }


# --- the handler ------------------------------------------------------------------------------

# route -> (methods, needs the model, public without the API key)
ROUTES: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "/": (("GET",), False, True),
    "/index.html": (("GET",), False, True),
    "/health": (("GET",), False, True),
    "/v1/models": (("GET",), True, False),
    "/props": (("GET",), True, False),
    "/metrics": (("GET",), False, False),
    "/v1/chat/completions": (("POST",), True, False),
    "/v1/completions": (("POST",), True, False),
    "/v1/embeddings": (("POST",), True, False),
    "/tokenize": (("POST",), True, False),
    "/detokenize": (("POST",), True, False),
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"qpack/{__version__}"
    timeout = SOCKET_TIMEOUT
    server: _HTTPServer

    # Every method goes through one dispatcher (unknown ones answer 405 or 404 there).
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    @property
    def app(self) -> Server:
        return self.server.app

    def log_message(self, format: str, *args: Any) -> None:
        if self.app.options.verbose:
            super().log_message(format, *args)

    # --- dispatch -----------------------------------------------------------------------------

    def handle_expect_100(self) -> bool:
        """A body over the limit is refused before the client sends it (Expect: 100-continue)."""
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            n = 0
        if n > self.app.options.max_body:
            self._dispatch(self.command)  # answers 413 (or an earlier refusal), body unread
            self.close_connection = True
            return False
        return super().handle_expect_100()

    def finish(self) -> None:
        super().finish()
        if getattr(self, "_linger", False):
            self._discard_unread_body()

    def _discard_unread_body(self) -> None:
        """After refusing a body unread: send FIN, then drop what the client still sends for a
        moment, so that closing does not reset the connection before it reads the answer."""
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(LINGER_SECONDS)
            deadline = time.monotonic() + LINGER_SECONDS
            dropped = 0
            while time.monotonic() < deadline and dropped < LINGER_BYTES:
                data = sock.recv(65536)
                if not data:
                    break
                dropped += len(data)
        except OSError:
            pass

    def _dispatch(self, method: str) -> None:
        self._status = 0
        self._linger = False
        self._headers_sent = False
        self._body_read = False
        route = urlsplit(self.path).path
        label = route if route in ROUTES else "other"
        try:
            self._check_host()
            entry = ROUTES.get(route)
            if entry is None:
                raise ApiError(
                    404, f"no route {method} {route}", type_="not_found_error", code="not_found"
                )
            methods, needs_model, public = entry
            if method == "OPTIONS" and self.app.options.cors_origin:
                self._preflight(methods)
                return
            if method == "HEAD" and "GET" in methods:
                methods = (*methods, "HEAD")  # GET's answer without its body
            if method not in methods:
                raise ApiError(405, f"{route} takes {', '.join(methods)}, not {method}",
                               code="method_not_allowed")  # fmt: skip
            if not public:
                self._check_key()
            if needs_model and self.app.loaded is None:
                raise ApiError(503, "the model is still loading; retry shortly (GET /health says when)",
                               type_="server_error", code="model_loading")  # fmt: skip
            getattr(self, "route_" + route.strip("/").replace("/", "_").replace(".", "_"))()
        except ApiError as e:
            self._try_send_error(e)
        except ClientGone:
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            click.echo(
                f"qpack: internal error on {method} {route}:\n{traceback.format_exc()}", err=True
            )
            self._try_send_error(ApiError(500, "internal server error (see the server's log)",
                                          type_="server_error", code="internal_error"))  # fmt: skip
        finally:
            self.app.metrics.count(label, self._status)

    def _check_host(self) -> None:
        """On a loopback address without an API key, refuse requests named for another host
        (DNS rebinding: a web page whose name resolves to 127.0.0.1 must not reach the API).
        Behind a reverse proxy, pass Host as localhost or set --api-key."""
        host = self.app.options.host
        if self.app.options.api_key:
            return
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            if host != "localhost":
                return
        header = self.headers.get("Host")
        if header is None:
            return
        name = urlsplit("//" + header).hostname or ""
        try:
            ok = ipaddress.ip_address(name).is_loopback
        except ValueError:
            ok = name == "localhost" or name.endswith(".localhost")
        if not ok:
            raise ApiError(
                403, f"Host {header!r} is not this server's address", code="forbidden_host"
            )

    def _check_key(self) -> None:
        key = self.app.options.api_key
        if not key:
            return
        given = self.headers.get("X-Api-Key")
        auth = self.headers.get("Authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), key.encode()):
            what = "no API key given" if given is None else "incorrect API key"
            raise ApiError(401, f"{what}: send 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'",
                           type_="authentication_error", code="invalid_api_key")  # fmt: skip

    def _preflight(self, methods: tuple[str, ...]) -> None:
        self._start_response(204, [
            ("Access-Control-Allow-Methods", ", ".join(methods + ("OPTIONS",))),
            ("Access-Control-Allow-Headers", "Authorization, Content-Type, X-Api-Key"),
            ("Access-Control-Max-Age", "600"),
            ("Content-Length", "0"),
        ])  # fmt: skip

    # --- reading and writing ------------------------------------------------------------------

    def _read_json(self) -> dict[str, Any]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are not accepted)",
                           code="length_required")  # fmt: skip
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length!r}", code="invalid_request") from None
        limit = self.app.options.max_body
        if n > limit:
            raise ApiError(413, f"the body is {n} bytes; this server takes at most {limit} (--max-body)",
                           code="request_too_large")  # fmt: skip
        ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            # A web page can send text/plain or forms to localhost without asking (no CORS
            # preflight); JSON it cannot. Refusing other types keeps such pages out.
            raise ApiError(415, f"send the body as Content-Type: application/json, not {ctype}",
                           code="unsupported_media_type")  # fmt: skip
        raw = self.rfile.read(n)
        if len(raw) < n:
            raise ClientGone()
        self._body_read = True
        return api.parse_json_body(raw)

    def _start_response(self, status: int, headers: list[tuple[str, str]]) -> None:
        self._status = status
        self.send_response(status)
        origin = self.app.options.cors_origin
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            if origin != "*":
                self.send_header("Vary", "Origin")
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True

    def _send_bytes(
        self, status: int, body: bytes, ctype: str, extra: list[tuple[str, str]] = ()
    ) -> None:
        if self.command in ("POST", "PUT", "PATCH") and not self._body_read:
            self.close_connection = True  # the unread body would be taken for the next request
            self._linger = True
        self._start_response(
            status, [("Content-Type", ctype), ("Content-Length", str(len(body))), *extra]
        )
        if self.command != "HEAD":
            self._write(body)

    def _send_json(self, obj: Any, status: int = 200) -> None:
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        self._send_bytes(status, body, "application/json")

    def _try_send_error(self, e: ApiError) -> None:
        try:
            self._send_error(e)
        except (ClientGone, OSError):  # nobody left to tell
            self.close_connection = True

    def _send_error(self, e: ApiError) -> None:
        if self._headers_sent:  # mid-stream: report in the stream, then end it
            try:
                self._sse(e.body())
                self._end_stream()
            except (ClientGone, OSError):
                pass
            self.close_connection = True
            return
        extra = [("WWW-Authenticate", "Bearer")] if e.status == 401 else []
        if e.status == 405:
            entry = ROUTES.get(urlsplit(self.path).path)
            extra.append(("Allow", ", ".join(entry[0]) if entry else "GET"))
        body = json.dumps(e.body(), ensure_ascii=False, separators=(",", ":")).encode()
        self._send_bytes(e.status, body, "application/json", extra)

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except (OSError, ValueError):
            raise ClientGone() from None

    def _client_gone(self) -> bool:
        """True once the client has closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _start_stream(self) -> None:
        self._start_response(200, [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),
            ("Transfer-Encoding", "chunked"),
        ])  # fmt: skip

    def _sse(self, obj: Any) -> None:
        data = (
            b"data: "
            + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
            + b"\n\n"
        )
        self._chunk(data)

    def _chunk(self, data: bytes) -> None:
        if self._client_gone():
            raise ClientGone()
        self._write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_stream(self) -> None:
        self._chunk(b"data: [DONE]\n\n")
        self._write(b"0\r\n\r\n")

    # --- generation ---------------------------------------------------------------------------

    def _submit(self, tokens: list[int], params, constraint=None) -> Any:
        engine = self.app.loaded.engine
        limit = MAX_PENDING_PER_SLOT * len(engine.slots)
        if self.app.metrics.in_flight >= limit:
            raise ApiError(503, f"the server is busy ({limit} requests waiting); retry later",
                           type_="server_error", code="server_busy")  # fmt: skip
        try:
            req = engine.submit(tokens, params, constraint)
        except ContextOverflow as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None
        except QpackError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        self.app.metrics.generation(+1)
        return req

    def _events(self, req):
        """The request's events; while none comes, make sure the client is still there."""
        times = self.app.metrics.token_times
        while True:
            try:
                for ev in req.events(timeout=POLL_SECONDS):
                    if ev.token is not None:
                        times.append(time.monotonic())
                    yield ev
                return
            except queue.Empty:
                if self._client_gone():
                    raise ClientGone() from None

    def _generate(self, prompt: api.Prompt, chat: bool) -> None:
        loaded = self.app.loaded
        constraint = None
        if prompt.features is not None:
            constraint = prompt.features.constraint(loaded.template, loaded.model.n_vocab)
        req = self._submit(prompt.tokens, prompt.params, constraint)
        answer = api.Answer(loaded, chat, prompt.logprobs, "chatcmpl" if chat else "cmpl")
        try:
            if prompt.stream:
                self._stream_answer(req, answer, prompt, chat)
            else:
                for ev in self._events(req):
                    answer.add(ev)
                self._finish_answer(req, answer, prompt, chat)
        finally:
            if not req.done.is_set():
                req.cancel()
            self.app.metrics.generation(-1)

    def _check_finish(self, answer: api.Answer) -> None:
        if answer.finish_reason == "error":
            raise ApiError(
                500,
                f"generation failed: {answer.error}",
                type_="server_error",
                code="generation_error",
            )

    def _finish_answer(self, req, answer: api.Answer, prompt: api.Prompt, chat: bool) -> None:
        self._check_finish(answer)
        model, fp = self.app.model_id, self.app.fingerprint
        if not chat:
            self._send_json(api.completion_response(answer, model, fp, req.usage, prompt.echo))
            return
        out = prompt.features.output()
        out.feed(answer.content)
        out.finish()
        self._send_json(api.chat_response(answer, model, fp, req.usage, out.message(),
                                          out.finish_reason(answer.finish_reason)))  # fmt: skip

    def _stream_answer(self, req, answer: api.Answer, prompt: api.Prompt, chat: bool) -> None:
        model, fp = self.app.model_id, self.app.fingerprint
        usage_field = prompt.include_usage
        self._start_stream()
        if chat:
            self._sse(api.chat_chunk(answer, model, fp, {"role": "assistant", "content": ""},
                                     with_usage_field=usage_field))  # fmt: skip
        elif prompt.echo:
            self._sse(
                api.completion_chunk(answer, model, fp, prompt.echo, with_usage_field=usage_field)
            )
        pending: list[dict[str, Any]] = []  # logprobs of tokens whose text is still held back
        offset = len(prompt.echo)
        out = prompt.features.output() if chat else None
        tok = self.app.loaded.tokenizer
        for ev in self._events(req):
            pending += answer.add(ev)
            if chat:
                deltas = out.feed(
                    ev.text, tok.token_text(ev.token) if ev.token is not None else None
                )
                if ev.finish_reason is not None:
                    deltas += out.finish()
                if not deltas and pending and ev.finish_reason is not None:
                    deltas = [{}]  # the last tokens' logprobs, though their text was cut
                lp = pending if prompt.logprobs else None
                for i, delta in enumerate(deltas):
                    self._sse(api.chat_chunk(answer, model, fp, delta, logprobs=lp if i == 0 else None,
                                             with_usage_field=usage_field))  # fmt: skip
                if deltas:
                    pending = []
                continue
            if ev.text or pending and ev.finish_reason is not None:
                clp = api.completion_logprobs(pending, offset) if prompt.logprobs else None
                self._sse(api.completion_chunk(answer, model, fp, ev.text, logprobs=clp,
                                               with_usage_field=usage_field))  # fmt: skip
                offset += len(ev.text)
                pending = []
        self._check_finish(answer)
        if chat:
            self._sse(api.chat_chunk(answer, model, fp, {}, finish=out.finish_reason(answer.finish_reason),
                                     with_usage_field=usage_field))  # fmt: skip
        else:
            self._sse(api.completion_chunk(answer, model, fp, "", finish=answer.finish_reason,
                                           with_usage_field=usage_field))  # fmt: skip
        if prompt.include_usage:
            self._sse(api.usage_chunk(answer, model, fp, req.usage, chat))
        self._end_stream()

    # --- routes -------------------------------------------------------------------------------

    def route_(self) -> None:
        try:
            page = WEB_PAGE.read_bytes()
        except OSError:
            raise ApiError(404, "the chat page is missing from this build", type_="not_found_error",
                           code="not_found") from None  # fmt: skip
        self._send_bytes(200, page, "text/html; charset=utf-8", [
            ("Cache-Control", "no-cache"),
            # Everything the page needs is inline: it works offline and loads nothing else.
            ("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                        "style-src 'unsafe-inline'; img-src 'self' data:"),
            ("X-Content-Type-Options", "nosniff"),
        ])  # fmt: skip

    route_index_html = route_

    def route_health(self) -> None:
        if self.app.loaded is None:
            self._send_json({"status": "loading"}, 503)
        else:
            self._send_json({"status": "ok"})

    def route_v1_models(self) -> None:
        self._send_json({
            "object": "list",
            "data": [{
                "id": self.app.model_id,
                "object": "model",
                "created": int(self.app.metrics.started),
                "owned_by": "qpack",
                "meta": {"n_ctx": self.app.loaded.model.n_ctx, "n_vocab": self.app.loaded.model.n_vocab},
            }],
        })  # fmt: skip

    def route_props(self) -> None:
        self._send_json(self.app.facts)

    def route_metrics(self) -> None:
        m = self.app.metrics
        lines = [
            "# HELP qpack_requests_total HTTP requests answered, by route and status.",
            "# TYPE qpack_requests_total counter",
        ]
        with m._lock:
            counts = sorted(m.requests.items())
        for (route, status), n in counts:
            lines.append(f'qpack_requests_total{{route="{route}",status="{status}"}} {n}')
        loaded = self.app.loaded
        stats = loaded.engine.stats if loaded else {}
        busy = sum(1 for s in loaded.engine.slots if s.request is not None) if loaded else 0
        slots = len(loaded.engine.slots) if loaded else 0
        gauges = [
            ("qpack_prompt_tokens_total", "counter", "Prompt tokens processed (cached ones not counted).",
             stats.get("prompt_tokens", 0)),
            ("qpack_generated_tokens_total", "counter", "Tokens generated.", stats.get("generated_tokens", 0)),
            ("qpack_tokens_per_second", "gauge", "Tokens sent to clients per second, last 10 s.",
             round(m.tokens_per_second(), 3)),
            ("qpack_requests_processing", "gauge", "Generations decoding in a slot.", busy),
            ("qpack_requests_queued", "gauge", "Generations waiting for a slot.", max(m.in_flight - busy, 0)),
            ("qpack_slots", "gauge", "Sequences decoded together (--parallel).", slots),
            ("qpack_model_loaded", "gauge", "1 once the model is loaded.", int(loaded is not None)),
        ]  # fmt: skip
        for name, kind, help_, value in gauges:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        body = ("\n".join(lines) + "\n").encode()
        self._send_bytes(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def route_v1_chat_completions(self) -> None:
        body = self._read_json()
        self._generate(api.chat_prompt(body, self.app.loaded, self.app.options.defaults), chat=True)

    def route_v1_completions(self) -> None:
        body = self._read_json()
        self._generate(
            api.completion_prompt(body, self.app.loaded, self.app.options.defaults), chat=False
        )

    def route_v1_embeddings(self) -> None:
        body = self._read_json()
        loaded = self.app.loaded
        inputs, encoding = api.embedding_inputs(body, loaded)
        data = []
        for i, tokens in enumerate(inputs):
            vector = self._embed(tokens)
            if encoding == "base64":
                value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            else:
                value = [float(x) for x in vector]
            data.append({"object": "embedding", "index": i, "embedding": value})
        n = sum(len(t) for t in inputs)
        self._send_json({"object": "list", "data": data, "model": self.app.model_id,
                         "usage": {"prompt_tokens": n, "total_tokens": n}})  # fmt: skip

    def _embed(self, tokens: list[int]) -> np.ndarray:
        """One embedding on the engine thread; waits for a free slot while all are busy."""
        engine = self.app.loaded.engine
        deadline = time.monotonic() + EMBED_WAIT_SECONDS
        while True:
            if any(s.request is None for s in engine.slots):
                try:
                    return engine.run_job(lambda: engine.embed(tokens))
                except ContextOverflow as e:
                    raise ApiError(
                        400, str(e), code="context_length_exceeded", param="input"
                    ) from None
                except QpackError as e:
                    if "no free sequence slot" not in str(e):
                        raise ApiError(400, str(e), code="invalid_value", param="input") from None
            if time.monotonic() > deadline:
                raise ApiError(503, "every sequence slot stayed busy; retry later", type_="server_error",
                               code="server_busy")  # fmt: skip
            if self._client_gone():
                raise ClientGone()
            time.sleep(POLL_SECONDS)

    def route_tokenize(self) -> None:
        body = self._read_json()
        content = api.get_field(body, "content", str, required=True)
        add_special = api.get_field(body, "add_special", bool, False)
        parse_special = api.get_field(body, "parse_special", bool, False)
        with_pieces = api.get_field(body, "with_pieces", bool, False)
        tok = self.app.loaded.tokenizer
        follow_model = None if add_special else False  # None: BOS/EOS as the model's metadata says
        ids = tok.encode(
            content, add_bos=follow_model, add_eos=follow_model, parse_special=parse_special
        )
        if with_pieces:
            tokens: list[Any] = [
                {"id": i, "piece": tok.token_bytes(i).decode("utf-8", errors="replace")}
                for i in ids
            ]
        else:
            tokens = ids
        self._send_json({"tokens": tokens})

    def route_detokenize(self) -> None:
        body = self._read_json()
        ids = api.get_field(body, "tokens", list, required=True)
        n_vocab = self.app.loaded.model.n_vocab
        for t in ids:
            if type(t) is not int or not 0 <= t < n_vocab:
                raise ApiError(400, f"'tokens' must hold token ids 0..{n_vocab - 1}, got {t!r}",
                               code="invalid_value", param="tokens")  # fmt: skip
        self._send_json({"content": self.app.loaded.tokenizer.decode(ids)})
