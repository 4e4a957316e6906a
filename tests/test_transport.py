"""The HTTP transport against abusive clients, with a fake route table (no model): a deadline
for a request's head and body, an idle keep-alive timeout, a connection cap, descriptors past
select()'s 1024, and an accept loop that survives running out of descriptors.

Oracles: the status line the server sends (or the connection closing), and a well-behaved
request answered while the abuse goes on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from qpack.runtime.errors import ApiError
from qpack.runtime.transport import (
    EventStream,
    HttpServer,
    Limits,
    Policy,
    Response,
    Route,
    parse_head,
)


def make_server(**limits) -> HttpServer:
    def echo(req):
        return Response.json({"method": req.method, "body": req.body.decode()})

    def events(req):
        def gen():
            for i in range(3):
                yield {"i": i}
            raise ApiError(500, "broken on purpose", code="broken")

        return EventStream(gen())

    routes = {
        "/echo": Route(echo, methods=("GET", "POST"), public=True),
        "/json": Route(echo, methods=("POST",), json_body=True),
        "/events": Route(events),
    }
    counted: list[tuple[str, int]] = []
    s = HttpServer("127.0.0.1", 0, routes, Policy(max_body=1000), Limits(**limits),
                   ready=lambda: True, on_answer=lambda r, st: counted.append((r, st)),
                   server_name="test")  # fmt: skip
    s.counted = counted
    s.start()
    return s


@pytest.fixture
def server():
    s = make_server(request_seconds=1.0, idle_seconds=1.0, max_connections=40)
    yield s
    s.close()


def connect(s: HttpServer) -> socket.socket:
    sock = socket.create_connection(s.server_address[:2], timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def get(s: HttpServer, path: str = "/echo", extra: bytes = b"") -> bytes:
    with connect(s) as sock:
        sock.sendall(
            b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n%s\r\n"
            % (path.encode(), extra)
        )
        return read_all(sock)


def test_requests_keep_alive_and_pipeline(server):
    with connect(server) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n"
                     b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello"
                     b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")  # fmt: skip
        reply = read_all(sock)
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    assert b'"body":"hello"' in reply and reply.rstrip().endswith(b'"body":""}')


def test_header_drip_gets_408_at_the_deadline_while_others_are_served(server):
    slow = connect(server)
    slow.sendall(b"GET /echo HTTP/1.1\r\n")
    started = time.monotonic()
    for _ in range(5):  # a header byte every 0.3 s: each recv would time out never
        time.sleep(0.3)
        try:
            slow.sendall(b"X")
        except OSError:
            break
        assert get(server).startswith(b"HTTP/1.1 200")
    reply = read_all(slow)
    slow.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert time.monotonic() - started < 5
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


def test_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed by the server, no answer
        assert 0.5 < time.monotonic() - started < 5


def test_body_deadline(server):
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nabc")
        assert read_all(sock).startswith(b"HTTP/1.1 408")


def test_connection_cap_answers_503(server):
    held = [connect(server) for _ in range(40)]
    try:
        time.sleep(0.3)
        reply = get(server)
        assert reply.startswith(b"HTTP/1.1 503"), reply
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "server_busy"
    finally:
        for sock in held:
            sock.close()
    for _ in range(50):  # the held ones leave; the server takes clients again
        if get(server).startswith(b"HTTP/1.1 200"):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server did not recover after the held connections closed")


@pytest.mark.parametrize(
    "head, status",
    [
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
        (b"GET /echo HTTP/2.0\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\n folded: x\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"POST /echo HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", 413),
        (b"POST /json HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 415),
        (b"POST /json HTTP/1.1\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\n{}", 415),
        (b"GET /echo HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
        (b"GET /echo HTTP/1.1\r\nX-A: " + b"b" * 70000, 431),
        (b"DELETE /echo HTTP/1.1\r\n\r\n", 405),
    ],
)
def test_malformed_requests_get_a_clean_4xx(server, head, status):
    with connect(server) as sock:
        sock.sendall(head)
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 %d" % status), reply[:200]
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_error_mid_stream_is_an_event_then_done(server):
    reply = get(server, "/events")
    assert reply.startswith(b"HTTP/1.1 200")
    assert b'data: {"i":2}' in reply and b'"code":"broken"' in reply
    assert reply.rstrip().endswith(b"0")  # the chunked body is terminated


def test_head_parser_strictness():
    req = parse_head(b"POST /v1/x?y=1 HTTP/1.1\r\nHost: a\r\nX-Two: 1\r\nx-two: 2")
    assert req.path == "/v1/x" and req.header("X-TWO") == "1, 2" and req.header("host") == "a"


def test_many_descriptors_and_running_out_of_them():
    """In a child process: descriptors numbered past 1024 are served (select() would fail
    there), and with the descriptor limit reached the accept loop pauses rather than spins,
    then serves again once descriptors are free."""
    pytest.importorskip("resource")
    if not os.path.isdir("/proc/self"):
        pytest.skip("reads the child's CPU time from /proc")
    child = textwrap.dedent("""
        import os, resource, socket, sys, time
        from qpack.runtime.transport import HttpServer, Limits, Policy, Response, Route
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        pad = [socket.socket() for _ in range(1100)]  # push new descriptors past 1024
        routes = {"/echo": Route(lambda r: Response.json({"ok": True}), public=True)}
        s = HttpServer("127.0.0.1", 0, routes, Policy(), Limits(request_seconds=30),
                       ready=lambda: True, on_answer=lambda *a: None, server_name="t")
        s.start()
        print(s.server_address[1], flush=True)
        sys.stdin.readline()  # the parent made its request past 1024
        n = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))  # no descriptor left to accept
        print("full", flush=True)
        sys.stdin.readline()  # the parent connected; the server could not accept
        for p in pad[:50]:
            p.close()
        print("freed", flush=True)
        sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(proc.stdout.readline())
        addr = ("127.0.0.1", port)

        def ask() -> bytes:
            with socket.create_connection(addr, timeout=20) as sock:
                sock.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return read_all(sock)

        assert ask().startswith(b"HTTP/1.1 200")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "full"
        waiting = socket.create_connection(addr, timeout=20)  # queued in the backlog
        waiting.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        cpu_before = _cpu_seconds(proc.pid)
        time.sleep(2.0)
        spent = _cpu_seconds(proc.pid) - cpu_before
        assert spent < 0.5, f"the accept loop spun: {spent:.2f} s of CPU in 2 s"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "freed"
        assert read_all(waiting).startswith(b"HTTP/1.1 200")  # served once descriptors are free
        waiting.close()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
