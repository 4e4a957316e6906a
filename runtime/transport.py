"""HTTP/1.1 for the server: connections, request parsing, limits, keep-alive, responses and
server-sent events, and the checks every request passes before its route runs (Host, API key,
CORS preflight, method, body size and type). What a route means lives in routes.py.

One I/O thread watches every connection with `selectors` (epoll/kqueue: no descriptor limit)
and collects each request's head and body without a thread per connection, so a thousand
clients dripping header bytes cost a descriptor and a small buffer each, nothing more. Every
request has a deadline for its whole head and body; an idle keep-alive connection is closed
after a while; beyond the connection cap a client gets 503 at once. Only a complete request
gets a thread, which runs its route and writes the answer with ordinary blocking sends; the
connection then goes back to the I/O thread for the next request.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import os
import re
import select
import selectors
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import click

from .errors import ApiError, QpackError

MAX_HEAD_BYTES = 64 * 1024  # request line + headers
MAX_HEADERS = 100
LINGER_SECONDS = 2.0  # after refusing a body unread, how long to drop what still arrives
LINGER_BYTES = 64 << 20
ACCEPT_PAUSE_SECONDS = 0.5  # out of descriptors: stop accepting this long instead of spinning
SWEEP_SECONDS = 0.25  # how often deadlines are checked
RESERVED_FDS = 64  # descriptors kept for the model file, the engine, logs ...


class ClientGone(Exception):
    """The client closed its connection (or stopped reading): stop working for it."""


@dataclass
class Limits:
    """What one client may cost the server."""

    max_connections: int = 2048  # open connections; beyond this a new one gets 503
    request_seconds: float = 60.0  # the whole head and body of one request
    idle_seconds: float = 30.0  # a keep-alive connection with no new request
    write_seconds: float = 120.0  # a client that reads nothing this long is dropped


# --- requests and responses -------------------------------------------------------------------


class HttpRequest:
    """A complete request: method, path, headers (lower-case names), body."""

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]):
        self.method = method
        self.target = target
        self.path = urlsplit(target).path if target.startswith("/") else target
        self.version = version
        self.headers = headers
        self.body = b""
        self._sock: socket.socket | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    @property
    def content_length(self) -> int:
        return int(self.headers.get("content-length", "0"))

    def client_gone(self) -> bool:
        """True once the client has closed its end (readable with nothing to read). Polls the
        one socket, so that any descriptor number works (select() stops at 1024)."""
        sock = self._sock
        if sock is None:
            return False
        try:
            if not _readable(sock):
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True


@dataclass
class Response:
    """A whole answer: status, body, content type, extra headers."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, json_bytes(obj))


@dataclass
class EventStream:
    """An answer sent as server-sent events: each item of `events` becomes one `data: {json}`
    event, then `data: [DONE]`. An ApiError raised while iterating is sent as an error event
    that ends the stream. `on_close` runs however the stream ends, even if it never started."""

    events: Iterator[Any]
    on_close: Callable[[], None] | None = None


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def error_response(e: ApiError, route: Route | None = None) -> Response:
    headers = []
    if e.status == 401:
        headers.append(("WWW-Authenticate", "Bearer"))
    if e.status == 405:
        headers.append(("Allow", ", ".join(route.allowed() if route else ("GET",))))
    return Response(e.status, json_bytes(e.body()), headers=headers)


# --- routes and the checks before them --------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One endpoint: the function answering it, its methods, and what it needs."""

    handler: Callable[[HttpRequest], Response | EventStream]
    methods: tuple[str, ...] = ("GET",)
    needs_model: bool = False  # 503 while the model loads
    public: bool = False  # answered without the API key
    json_body: bool = False  # the body must be a JSON object (Content-Type: application/json)

    def allowed(self) -> tuple[str, ...]:
        return (*self.methods, "HEAD") if "GET" in self.methods else self.methods


@dataclass
class Policy:
    """Who may ask: the API key, the browser origin allowed, the address bound."""

    host: str = "127.0.0.1"
    api_key: str | None = None
    cors_origin: str | None = None
    max_body: int = 1 << 20


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]{0,5})?$")


def host_name(value: str) -> str:
    """The name in a Host header, or a 400 when it is not one (`[::1` is not)."""
    m = _HOST.match(value)
    if m is None:
        raise ApiError(400, f"malformed Host header {value!r}", code="invalid_host")
    name = m.group(1)
    if name.startswith("["):
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            raise ApiError(400, f"malformed Host header {value!r}", code="invalid_host") from None
        return name[1:-1]
    return name


def _is_loopback_name(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name == "localhost" or name.endswith(".localhost")


def check_host(req: HttpRequest, policy: Policy) -> None:
    """A malformed Host is a 400. On a loopback address without an API key, a request named
    for another host is refused (DNS rebinding: a web page whose name resolves to 127.0.0.1
    must not reach the API). Behind a reverse proxy, pass Host as localhost or set --api-key."""
    header = req.header("host")
    if header is None:
        return
    name = host_name(header.strip())
    if policy.api_key or not _is_loopback_name(policy.host):
        return
    if not _is_loopback_name(name):
        raise ApiError(403, f"Host {header!r} is not this server's address", code="forbidden_host")


def check_key(req: HttpRequest, policy: Policy) -> None:
    key = policy.api_key
    if not key:
        return
    given = req.header("x-api-key")
    auth = req.header("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        what = "no API key given" if given is None else "incorrect API key"
        raise ApiError(401, f"{what}: send 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'",
                       type_="authentication_error", code="invalid_api_key")  # fmt: skip


def check_body(req: HttpRequest, route: Route, policy: Policy) -> None:
    """The body's framing, size and type, from the head alone (refused before it is read)."""
    if "transfer-encoding" in req.headers:
        raise ApiError(411, "send the body with a Content-Length (chunked bodies are not accepted)",
                       code="length_required")  # fmt: skip
    length = req.header("content-length")
    if length is None:
        if route.json_body:
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        return
    if not length.isdigit() or len(length) > 18:
        raise ApiError(400, f"bad Content-Length {length!r}", code="invalid_request")
    n = int(length)
    if n > policy.max_body:
        raise ApiError(413, f"the body is {n} bytes; this server takes at most {policy.max_body} (--max-body)",
                       code="request_too_large")  # fmt: skip
    if route.json_body:
        ctype = (req.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            # A web page can send text/plain, forms or a Blob with no type to localhost without
            # a CORS preflight; a JSON body it cannot. Refusing the others keeps such pages out.
            raise ApiError(415, f"send the body as Content-Type: application/json, not {ctype or 'none'}",
                           code="unsupported_media_type")  # fmt: skip


def preflight(route: Route) -> Response:
    return Response(204, b"", "", [
        ("Access-Control-Allow-Methods", ", ".join((*route.allowed(), "OPTIONS"))),
        ("Access-Control-Allow-Headers", "Authorization, Content-Type, X-Api-Key"),
        ("Access-Control-Max-Age", "600"),
    ])  # fmt: skip


# --- the server -------------------------------------------------------------------------------


class _Conn:
    """One client connection as the I/O thread sees it."""

    __slots__ = ("sock", "buf", "state", "deadline", "request", "route", "dropped")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.buf = bytearray()
        self.state = "idle"  # idle | head | body | busy | linger
        self.deadline = deadline
        self.request: HttpRequest | None = None
        self.route: Route | None = None
        self.dropped = 0


class HttpServer:
    """Listens, reads requests, hands each complete one to `dispatch` on its own thread.

    `routes` maps paths to Routes; `ready()` says whether the model is loaded; `on_answer(label,
    status)` counts answers (label = the path if it is a route, else "other")."""

    def __init__(self, host: str, port: int, routes: dict[str, Route], policy: Policy,
                 limits: Limits, ready: Callable[[], bool], on_answer: Callable[[str, int], None],
                 server_name: str, verbose: bool = False):  # fmt: skip
        self.routes = routes
        self.policy = policy
        self.limits = limits
        self.ready = ready
        self.on_answer = on_answer
        self.server_name = server_name
        self.verbose = verbose
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if os.name != "nt":  # on Windows this would let two servers share the port
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(512)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.server_address = self.sock.getsockname()
        self.limits.max_connections = min(limits.max_connections, _descriptor_budget())
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # Connections handed back by request threads: (connection, keep it open). Only the
        # I/O thread touches the selector and the set of connections.
        self._returned: list[tuple[_Conn, bool]] = []
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._accept_paused_until = 0.0
        self._accept_failing = False
        self._running = True
        self._thread: threading.Thread | None = None

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="qpack-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._running = False
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        for conn in list(self._conns):
            _close(conn.sock)
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # --- the I/O thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        sel = self._selector
        sel.register(self.sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        listening = True
        last_sweep = time.monotonic()
        while self._running:
            now = time.monotonic()
            if not listening and now >= self._accept_paused_until:
                sel.register(self.sock, selectors.EVENT_READ, None)
                listening = True
            for key, _ in sel.select(SWEEP_SECONDS):
                if key.data is None:
                    if not self._accept():
                        sel.unregister(self.sock)
                        listening = False
                elif key.data == "wake":
                    self._guarded(self._take_returned)
                else:
                    self._guarded(self._on_readable, key.data)
            now = time.monotonic()
            if now - last_sweep >= SWEEP_SECONDS:
                last_sweep = now
                for conn in [c for c in self._conns if c.state != "busy" and c.deadline < now]:
                    self._expire(conn)
        sel.close()

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """The I/O thread must outlive any one connection's surprise (no thread left to
        start, a socket in a strange state): that connection is dropped, the loop goes on."""
        try:
            fn(*args)
        except Exception as e:
            click.echo(f"qpack: server: {type(e).__name__}: {e}", err=True)
            if args and isinstance(args[0], _Conn):
                self._drop(args[0])

    def _accept(self) -> bool:
        """Accept what is waiting. False when out of descriptors: the caller stops listening
        for a moment (retrying at once would spin: the pending connection stays pending)."""
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
                    if not self._accept_failing:  # once per episode, not every pause
                        click.echo(f"qpack: server: cannot accept connections ({e.strerror}); "
                                   f"retrying every {ACCEPT_PAUSE_SECONDS} s", err=True)  # fmt: skip
                    self._accept_failing = True
                    return False
                return True  # ECONNABORTED and the like: that client is gone
            sock.setblocking(False)
            self._accept_failing = False
            cap = self.limits.max_connections
            if len(self._conns) >= cap:
                busy = ApiError(503, f"too many connections (at most {cap}); retry later",
                                type_="server_error", code="server_busy")  # fmt: skip
                self._send_now(sock, error_response(busy), close=True)
                self.on_answer("other", 503)
                if len(self._conns) < cap + cap // 4 + 1:  # room to let it read the answer
                    conn = _Conn(sock, 0.0)
                    self._conns.add(conn)
                    self._selector.register(sock, selectors.EVENT_READ, conn)
                    self._linger(conn)
                else:
                    _close(sock)
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            conn = _Conn(sock, time.monotonic() + self.limits.request_seconds)
            self._conns.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _take_returned(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            returned, self._returned = self._returned, []
        for conn, keep in returned:
            self._guarded(self._resume, conn, keep)

    def _resume(self, conn: _Conn, keep: bool) -> None:
        """A connection back from its request thread: closed, or waiting for the next one."""
        if not keep:
            self._drop(conn)
            return
        conn.state = "idle"
        conn.request = conn.route = None
        conn.deadline = time.monotonic() + self.limits.idle_seconds
        conn.sock.setblocking(False)
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        if conn.buf:  # a pipelined request already arrived
            self._advance(conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        if conn.state == "linger":
            conn.dropped += len(data)
            if conn.dropped > LINGER_BYTES:
                self._drop(conn)
            return
        conn.buf += data
        self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Move the connection on with what its buffer holds."""
        if conn.state == "idle":
            conn.state = "head"
            conn.deadline = time.monotonic() + self.limits.request_seconds
        if conn.state == "head":
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.buf) > MAX_HEAD_BYTES:
                    self._refuse(conn, ApiError(431, "the request head is too large",
                                                code="request_header_fields_too_large"))  # fmt: skip
                elif conn.buf[:1] not in (b"", b"\r", b"\n") and not conn.buf[:1].isalpha():
                    self._refuse(conn, ApiError(400, "not an HTTP request", code="invalid_request"))
                return
            head = bytes(conn.buf[:end])
            del conn.buf[: end + 4]
            try:
                conn.request = parse_head(head)
                conn.route = self._check_head(conn.request)
            except ApiError as e:
                self._refuse(conn, e, self.routes.get(conn.request.path) if conn.request else None)
                return
            if isinstance(conn.route, Response):  # the CORS preflight, answered from the head
                self._reply_from_io(conn, conn.route)
                return
            conn.state = "body"
            if (
                conn.request.header("expect", "").lower() == "100-continue"
                and conn.request.content_length
            ):
                self._send_now(conn.sock, None, raw=b"HTTP/1.1 100 Continue\r\n\r\n")
        if conn.state == "body":
            n = conn.request.content_length
            if len(conn.buf) < n:
                return
            conn.request.body = bytes(conn.buf[:n])
            del conn.buf[:n]
            conn.state = "busy"
            self._selector.unregister(conn.sock)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _check_head(self, req: HttpRequest) -> Route | Response:
        """Everything decidable from the head, before reading the body."""
        check_host(req, self.policy)
        route = self.routes.get(req.path)
        if route is None:
            raise ApiError(404, f"no route {req.method} {req.path}", type_="not_found_error",
                           code="not_found")  # fmt: skip
        if req.method == "OPTIONS" and self.policy.cors_origin:
            return preflight(route)
        if req.method not in route.allowed():
            raise ApiError(405, f"{req.path} takes {', '.join(route.methods)}, not {req.method}",
                           code="method_not_allowed")  # fmt: skip
        if not route.public:
            check_key(req, self.policy)
        check_body(req, route, self.policy)
        if route.needs_model and not self.ready():
            raise ApiError(503, "the model is still loading; retry shortly (GET /health says when)",
                           type_="server_error", code="model_loading")  # fmt: skip
        return route

    def _refuse(self, conn: _Conn, e: ApiError, route: Route | None = None) -> None:
        """Answer from the I/O thread and close; a body still coming is read and dropped for a
        moment, so that closing does not reset the connection before the client reads."""
        self._reply_from_io(conn, error_response(e, route), close=True)

    def _reply_from_io(self, conn: _Conn, response: Response, close: bool = False) -> None:
        req = conn.request
        unread_body = req is not None and req.header("content-length", "0") not in ("0", None)
        close = close or unread_body or req is None or not _keep_alive(req)
        self._count(req, response.status)
        head_only = req is not None and req.method == "HEAD"
        if not self._send_now(conn.sock, response, close=close, head_only=head_only):
            self._drop(conn)
            return
        if not close:
            conn.state, conn.request, conn.route = "idle", None, None
            conn.deadline = time.monotonic() + self.limits.idle_seconds
            if conn.buf:
                self._advance(conn)
            return
        self._linger(conn)

    def _linger(self, conn: _Conn) -> None:
        """Send FIN, then drop what the client still sends for a moment: closing with unread
        data would reset the connection before the client reads the answer."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)
            return
        conn.state = "linger"
        conn.buf.clear()
        conn.deadline = time.monotonic() + LINGER_SECONDS

    def _send_now(self, sock: socket.socket, response: Response | None, close: bool = False,
                  head_only: bool = False, raw: bytes | None = None) -> bool:  # fmt: skip
        """A small answer written without blocking the I/O thread (it fits the socket buffer;
        if the client does not take it, it loses it)."""
        data = (
            raw
            if raw is not None
            else self._head(response, close) + (b"" if head_only else response.body)
        )
        try:
            sent = sock.send(data)
            return sent == len(data)
        except OSError:
            return False

    def _expire(self, conn: _Conn) -> None:
        if conn.state in ("head", "body"):
            self._count(conn.request, 408)
            self._send_now(conn.sock, error_response(ApiError(
                408, f"the request did not arrive within {self.limits.request_seconds:g} s",
                code="request_timeout")), close=True)  # fmt: skip
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self._conns.discard(conn)
        _close(conn.sock)

    def _count(self, req: HttpRequest | None, status: int) -> None:
        label = req.path if req is not None and req.path in self.routes else "other"
        self.on_answer(label, status)
        if self.verbose:  # --verbose: one access-log line per answer
            what = f"{req.method} {req.target[:200]}" if req is not None else "(unparsed request)"
            click.echo(f"qpack: {what} {status}", err=True)

    # --- a request's own thread ---------------------------------------------------------------

    def _serve(self, conn: _Conn) -> None:
        req, route = conn.request, conn.route
        sock = conn.sock
        req._sock = sock
        sock.setblocking(True)
        sock.settimeout(self.limits.write_seconds)
        keep = _keep_alive(req)
        status = 0
        try:
            try:
                answer = route.handler(req)
            except ApiError as e:
                answer = error_response(e, route)
            if isinstance(answer, EventStream):
                status = 200
                keep = self._stream(sock, answer) and keep
            else:
                status = answer.status
                data = self._head(answer, close=not keep)
                if req.method != "HEAD":
                    data += answer.body
                _send(sock, data)
        except ClientGone:
            keep = False
        except Exception:
            keep = False
            click.echo(f"qpack: internal error on {req.method} {req.path}:\n"
                       f"{traceback.format_exc()}", err=True)  # fmt: skip
            if status == 0:
                status = 500
                e = ApiError(500, "internal server error (see the server's log)",
                             type_="server_error", code="internal_error")  # fmt: skip
                try:
                    _send(sock, self._head(error_response(e), close=True) + json_bytes(e.body()))
                except ClientGone:
                    pass
        finally:
            self._count(req, status)
        if not keep:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            self._returned.append((conn, keep))
        self._wake()

    def _stream(self, sock: socket.socket, stream: EventStream) -> bool:
        """Send the events; True if the stream ended cleanly (the connection may be reused)."""
        head = self._head(Response(200, b"", "text/event-stream; charset=utf-8", [
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),
            ("Transfer-Encoding", "chunked"),
        ]), close=False, with_length=False)  # fmt: skip
        events = stream.events
        clean = True
        try:
            _send(sock, head)
            try:
                for obj in events:
                    _send_chunk(sock, b"data: " + json_bytes(obj) + b"\n\n")
            except ApiError as e:  # mid-stream: report in the stream, then end it
                _send_chunk(sock, b"data: " + json_bytes(e.body()) + b"\n\n")
                clean = False
            _send_chunk(sock, b"data: [DONE]\n\n")
            _send(sock, b"0\r\n\r\n")
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            if stream.on_close is not None:
                stream.on_close()
        return clean

    def _head(self, r: Response, close: bool, with_length: bool = True) -> bytes:
        try:
            reason = HTTPStatus(r.status).phrase
        except ValueError:
            reason = ""
        lines = [f"HTTP/1.1 {r.status} {reason}", f"Server: {self.server_name}",
                 f"Date: {formatdate(usegmt=True)}"]  # fmt: skip
        if r.content_type:
            lines.append(f"Content-Type: {r.content_type}")
        if with_length:
            lines.append(f"Content-Length: {len(r.body)}")
        origin = self.policy.cors_origin
        if origin:
            lines.append(f"Access-Control-Allow-Origin: {origin}")
            if origin != "*":
                lines.append("Vary: Origin")
        lines += [f"{name}: {value}" for name, value in r.headers]
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- bytes ------------------------------------------------------------------------------------

_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_head(head: bytes) -> HttpRequest:
    """The request line and headers (RFC 9112), strictly: anything odd is a 400."""
    lines = head.lstrip(b"\r\n").split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ApiError(400, "malformed request line", code="invalid_request")
    method, target, version = (p.decode("latin-1") for p in parts)
    if not target.startswith("/") and not (method == "OPTIONS" and target == "*"):
        raise ApiError(400, "the request target must be a path", code="invalid_request")
    if len(lines) - 1 > MAX_HEADERS:
        raise ApiError(
            431, f"more than {MAX_HEADERS} headers", code="request_header_fields_too_large"
        )
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):  # also refuses obsolete line folding
            raise ApiError(400, "malformed header line", code="invalid_request")
        key = name.decode("latin-1").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "host") and headers[key] != text:
                raise ApiError(400, f"conflicting {key} headers", code="invalid_request")
            if key not in ("content-length", "host"):
                text = headers[key] + ", " + text
        headers[key] = text
    return HttpRequest(method, target, version, headers)


def _keep_alive(req: HttpRequest) -> bool:
    connection = req.header("connection", "").lower()
    if req.version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (OSError, ValueError):
        raise ClientGone() from None


def _send_chunk(sock: socket.socket, data: bytes) -> None:
    if _readable(sock):  # readable mid-stream: data (a pipelined request) or the client left
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                raise ClientGone()
        except (OSError, ValueError):
            raise ClientGone() from None
    _send(sock, b"%x\r\n%s\r\n" % (len(data), data))


if hasattr(select, "poll"):

    def _readable(sock: socket.socket) -> bool:
        p = select.poll()
        p.register(sock, select.POLLIN)
        return bool(p.poll(0))

else:  # Windows: select() there takes any socket handle, up to 512 at once; we pass one

    def _readable(sock: socket.socket) -> bool:
        return bool(select.select([sock], [], [], 0)[0])


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _descriptor_budget() -> int:
    """How many connections the descriptor limit allows; raises the soft limit to the hard
    one first (the default soft limit, often 1024, is far below what a server needs)."""
    try:
        import resource
    except ImportError:  # Windows: selectors there is select(), at most 512 sockets
        return 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(soft - RESERVED_FDS, 16)


def listen_error(host: str, port: int, e: OSError) -> QpackError:
    if e.errno == errno.EADDRINUSE:
        return QpackError(
            f"cannot listen on {host}:{port}: the port is already in use (another server?); "
            f"choose another with --port"
        )
    return QpackError(f"cannot listen on {host}:{port}: {e.strerror or e}")
