"""The server: its options, lifecycle and counters. HTTP itself is transport.py; what each
endpoint answers is routes.py.

One engine thread owns the model (`Engine.serve_forever`). Each request being answered has its
own thread, which submits work and reads the request's events; the engine only ever puts into
queues, so a slow or vanished client costs nobody else anything. A client that hangs up is
noticed on the next write (or while waiting, by polling its socket) and its request is
cancelled at once, freeing the slot.

The socket is bound before the model loads: /health answers 503 until it is ready.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
import time
import webbrowser
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import click

from . import cpu, routes, session
from . import openai_api as api
from .errors import QpackError
from .openai_api import ServerDefaults
from .terminal import printable
from .transport import HttpServer, Limits, Policy, listen_error
from .version import __version__


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    no_api_key: bool = False  # explicitly serve a non-loopback address without a key
    cors_origin: str | None = None
    max_body: int = 1 << 20
    limits: Limits = field(default_factory=Limits)
    parallel: int = 4
    ctx_size: int | None = None
    threads: int | None = None
    cpu_choice: str = "auto"
    cache_types: tuple[str, str] = ("f16", "f16")  # keys, values
    open_browser: bool = True
    verbose: bool = False
    defaults: ServerDefaults = field(default_factory=ServerDefaults)


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

    def exposition(self, loaded: session.Loaded | None, connections: int) -> str:
        """The counters in Prometheus' text format."""
        lines = [
            "# HELP qpack_requests_total HTTP requests answered, by route and status.",
            "# TYPE qpack_requests_total counter",
        ]
        with self._lock:
            counts = sorted(self.requests.items())
        for (route, status), n in counts:
            lines.append(f'qpack_requests_total{{route="{route}",status="{status}"}} {n}')
        stats = loaded.engine.stats if loaded else {}
        busy = sum(1 for s in loaded.engine.slots if s.request is not None) if loaded else 0
        slots = len(loaded.engine.slots) if loaded else 0
        gauges = [
            ("qpack_prompt_tokens_total", "counter", "Prompt tokens processed (cached ones not counted).",
             stats.get("prompt_tokens", 0)),
            ("qpack_generated_tokens_total", "counter", "Tokens generated.", stats.get("generated_tokens", 0)),
            ("qpack_tokens_per_second", "gauge", "Tokens sent to clients per second, last 10 s.",
             round(self.tokens_per_second(), 3)),
            ("qpack_requests_processing", "gauge", "Generations decoding in a slot.", busy),
            ("qpack_requests_queued", "gauge", "Generations waiting for a slot.", max(self.in_flight - busy, 0)),
            ("qpack_slots", "gauge", "Sequences decoded together (--parallel).", slots),
            ("qpack_connections", "gauge", "Open client connections.", connections),
            ("qpack_model_loaded", "gauge", "1 once the model is loaded.", int(loaded is not None)),
        ]  # fmt: skip
        for name, kind, help_, value in gauges:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


class Server:
    """The server's state: the listening socket, the loaded model once there, counters."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.loaded: session.Loaded | None = None
        self.model_id = "model"
        self.fingerprint = f"qpack-{__version__}"
        self.facts: dict[str, Any] = {}
        self.metrics = Metrics()
        self.transport: HttpServer | None = None
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---------------------------------------------------------------------------

    def listen(self) -> str:
        """Bind and start answering (503 for model routes until `load`). Returns the URL."""
        o = self.options
        if not _is_loopback(o.host) and not o.api_key and not o.no_api_key:
            raise QpackError(
                f"refusing to serve {o.host} without an API key: anyone who can reach it could "
                f"use the model. Set --api-key KEY (or QPACK_API_KEY), or pass --no-api-key to "
                f"serve it open on purpose"
            )
        policy = Policy(
            host=o.host, api_key=o.api_key, cors_origin=o.cors_origin, max_body=o.max_body
        )
        try:
            self.transport = HttpServer(o.host, o.port, routes.table(self), policy, o.limits,
                                        ready=lambda: self.loaded is not None,
                                        on_answer=self.metrics.count,
                                        server_name=f"qpack/{__version__}",
                                        verbose=o.verbose)  # fmt: skip
        except OSError as e:
            raise listen_error(o.host, o.port, e) from None
        self.transport.start()
        return self.url

    @property
    def address(self) -> tuple[str, int]:
        return self.transport.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    def load(self, gguf: Any) -> None:
        """Load the model and start the engine thread; model routes answer from then on."""
        o = self.options
        loaded = session.load(gguf, o.ctx_size, o.threads, o.cpu_choice, n_parallel=o.parallel,
                              verbose=o.verbose, cache_types=o.cache_types)  # fmt: skip
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
        if self.transport is not None:
            self.transport.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
    click.echo(f"qpack: ready: {printable(server.model_id)}, context {server.loaded.model.n_ctx}, "
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
        "kv_cache_types": {"k": report.cache_type_k, "v": report.cache_type_v},
        "version": __version__,
    }
