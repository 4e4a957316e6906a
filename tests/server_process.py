"""Start `python -m qpack.runtime` as a server subprocess on a free loopback port, for the
server and chat page tests and bench/serve_load.py."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit


def http_request(host: str, port: int, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None, raw: bytes | None = None,
                 timeout: float = 300.0) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    """One request on a fresh connection: (status, headers, JSON or text)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        h = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        payload = resp.read()
        heads = {k.lower(): v for k, v in resp.getheaders()}
        ctype = heads.get("content-type", "")
        if ctype.startswith("application/json") and payload:
            return resp.status, heads, json.loads(payload)
        return resp.status, heads, payload.decode("utf-8", errors="replace")
    finally:
        conn.close()


class ServerProcess:
    """A running server: its URL, its stderr so far, and a way to stop it."""

    def __init__(self, model: str | None, *args: str, ready_timeout: float = 180.0,
                 command: list[str] | None = None, cwd: str | None = None):  # fmt: skip
        """`command`: what to run instead of `python -m qpack.runtime -m model` (a built
        executable, say), with `cwd`."""
        if command is None:
            command = [sys.executable, "-m", "qpack.runtime", "-m", str(model)]
        cmd = [*command, "--host", "127.0.0.1", "--port", "0", "--nobrowser", *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.url = ""
        deadline = time.monotonic() + ready_timeout
        for line in self.proc.stderr:  # the URL comes first, before the model loads
            self.log.append(line)
            m = re.search(r"listening on (http://\S+/)", line)
            if m:
                self.url = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()
        u = urlsplit(self.url)
        self.host, self.port = u.hostname, u.port
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server died while loading:\n" + "".join(self.log))
            try:
                status, _, _ = self.request("GET", "/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the server did not become ready:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.proc.stderr:  # keep the pipe from filling; kept for failure reports
            self.log.append(line)

    @property
    def api_base(self) -> str:
        return self.url + "v1"

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None, timeout: float = 300.0) -> tuple[int, dict[str, str], Any]:  # fmt: skip
        """One request on a fresh connection: (status, headers, JSON or text)."""
        return http_request(self.host, self.port, method, path, body, headers, raw, timeout)

    def metric(self, name: str) -> float:
        _, _, text = self.request("GET", "/metrics")
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else float("nan")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SlowClients:
    """n connections that send a request head one byte at a time (a byte each `every`
    seconds per connection, from one thread) and never finish it: the slowloris attack.
    Raises this process's descriptor limit as needed (a server started after inherits it)."""

    def __init__(self, host: str, port: int, n: int, every: float = 1.0):
        raise_descriptor_limit(n + 256)
        self.socks: list[socket.socket] = []
        for _ in range(n):
            s = socket.create_connection((host, port), timeout=10)
            s.setblocking(False)
            s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
            self.socks.append(s)
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, args=(every,), daemon=True)
        self._thread.start()

    def _drip(self, every: float) -> None:
        while not self._stop.wait(every):
            for s in list(self.socks):
                try:
                    s.send(b"x")
                except BlockingIOError:
                    pass
                except OSError:  # the server gave up on it (its request deadline)
                    self.socks.remove(s)
                    self.closed_by_server += 1
                    s.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.socks:
            s.close()
        self.socks = []


def raise_descriptor_limit(want: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise RuntimeError(f"the descriptor limit is {hard}; {want} are needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
