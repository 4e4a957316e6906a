"""Load on the server: total tokens/s with 1, 2, 4, 8 concurrent streams; one stream's latency
alone and while --slow-clients connections drip header bytes (slowloris); then a soak of mixed
valid and invalid requests from many clients with the server's RSS sampled throughout.

    python bench/serve_load.py [--model FILE.gguf] [--threads 1] [--requests 1000] [--clients 16]
                               [--slow-clients 1100]

The server runs as a subprocess on a free loopback port (`python -m qpack.runtime`), so the
numbers include HTTP, JSON and SSE, as a client sees them. Every stream generates exactly
--tokens tokens (the end-of-turn tokens are banned), so runs compare like with like.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_process import ServerProcess, SlowClients, raise_descriptor_limit  # noqa: E402

QUESTIONS = [
    "Tell me about the sea.", "Describe a forest in autumn.", "What makes a good cup of tea?",
    "Explain how bicycles work.", "Write about a city at night.", "What is interesting about bees?",
    "Describe a mountain village.", "Tell me about the moon.",
]  # fmt: skip


def post(server: ServerProcess, path: str, body: bytes, headers: dict[str, str] | None = None,
         timeout: float = 600) -> tuple[int, bytes]:  # fmt: skip
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request(
            "POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def stream_tokens(
    server: ServerProcess | PeerServer, question: str, n_tokens: int, stop_ids: list[int]
) -> tuple[int, float]:
    """One streamed chat answer of n_tokens; returns (content chunks, seconds to the first)."""
    body = json.dumps({
        "messages": [{"role": "user", "content": question}], "max_tokens": n_tokens, "stream": True,
        "temperature": 0, "logit_bias": {str(t): -100 for t in stop_ids},
    }).encode()  # fmt: skip
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    start = time.perf_counter()
    first = None
    chunks = 0
    try:
        conn.request(
            "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"}
        )
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"stream failed: {r.status} {r.read()[:200]!r}")
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    finally:
        conn.close()
    return chunks, first or 0.0


def throughput(server: ServerProcess, concurrency: int, n_tokens: int, stop_ids: list[int]) -> dict:
    results: list[tuple[int, float]] = []
    barrier = threading.Barrier(concurrency)

    def worker(i: int) -> None:
        barrier.wait()
        results.append(stream_tokens(server, QUESTIONS[i % len(QUESTIONS)], n_tokens, stop_ids))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    return {"streams": concurrency, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "first_token_s": statistics.median(r[1] for r in results)}  # fmt: skip


def stream_latency(
    server: ServerProcess, n_tokens: int, stop_ids: list[int], runs: int = 3
) -> tuple[float, float]:
    """Median (seconds to the first token, seconds for the whole stream) over `runs` streams."""
    firsts, totals = [], []
    for i in range(runs):
        start = time.perf_counter()
        chunks, first = stream_tokens(server, QUESTIONS[i % len(QUESTIONS)], n_tokens, stop_ids)
        totals.append(time.perf_counter() - start)
        firsts.append(first)
        if chunks < n_tokens // 2:
            raise RuntimeError(f"a stream ended early: {chunks} chunks")
    return statistics.median(firsts), statistics.median(totals)


def slow_clients_phase(server: ServerProcess | PeerServer, n: int, n_tokens: int,
                       stop_ids: list[int]) -> float:  # fmt: skip
    """Prints one stream's latency alone and under n dripping connections; returns the latter."""
    alone = stream_latency(server, n_tokens, stop_ids)
    slow = SlowClients(server.host, server.port, n, every=1.0)
    try:
        loaded = stream_latency(server, n_tokens, stop_ids)
        still = len(slow.socks)
    finally:
        slow.close()
    name = "llama.cpp" if isinstance(server, PeerServer) else "qpack"
    print(f"{name:>9}: {n} dripping connections ({still} still held after the streams): a {n_tokens}-token "
          f"stream takes {loaded[1]:.2f} s (first token {loaded[0]:.2f} s) vs {alone[1]:.2f} s "
          f"({alone[0]:.2f} s) alone: {loaded[1] / alone[1]:.2f}x", flush=True)  # fmt: skip
    return loaded[1]


class PeerServer:
    """llama-cpp-python's OpenAI server on the same model, for the same measurements."""

    def __init__(self, python: str, extra_path: str | None, model: str, threads: int):
        import os
        import socket
        import subprocess

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.host = "127.0.0.1"
        env = dict(os.environ)
        if extra_path:
            env["PYTHONPATH"] = extra_path
        self.proc = subprocess.Popen(
            [python, "-m", "llama_cpp.server", "--model", model, "--host", self.host,
             "--port", str(self.port), "--n_threads", str(threads), "--n_ctx", "1024"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the llama.cpp server did not start (llama_cpp.server and "
                                   "its uvicorn/fastapi/sse-starlette extras are needed)")  # fmt: skip
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("the llama.cpp server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def soak(server: ServerProcess, n_requests: int, n_clients: int, seed: int = 7) -> dict:
    """Mixed requests; each valid one must succeed, each invalid one must get its 4xx."""
    rng = random.Random(seed)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    big = b'{"x": "' + b"a" * (2 << 20) + b'"}'
    kinds = [
        # (name, weight, method, path, raw body, expected status)
        ("chat", 4, "POST", "/v1/chat/completions", json.dumps(chat).encode(), 200),
        ("chat-stream", 2, "POST", "/v1/chat/completions", json.dumps({**chat, "stream": True}).encode(), 200),
        ("completion", 2, "POST", "/v1/completions", b'{"prompt": "Once upon a time", "max_tokens": 4}', 200),
        ("embedding", 1, "POST", "/v1/embeddings", b'{"input": "a short text"}', 200),
        ("tokenize", 1, "POST", "/tokenize", b'{"content": "hello world"}', 200),
        ("models", 1, "GET", "/v1/models", None, 200),
        ("bad-json", 2, "POST", "/v1/chat/completions", b"{nope", 400),
        ("bad-type", 2, "POST", "/v1/chat/completions", b'{"messages": "x"}', 400),
        ("bad-max-tokens", 1, "POST", "/v1/chat/completions",
         json.dumps({**chat, "max_tokens": -1}).encode(), 400),
        ("too-long", 1, "POST", "/v1/completions", json.dumps({"prompt": "word " * 3000}).encode(), 400),
        ("too-big", 1, "POST", "/v1/chat/completions", big, 413),
        ("not-found", 1, "GET", "/nowhere", None, 404),
        ("wrong-method", 1, "GET", "/v1/chat/completions", None, 405),
    ]  # fmt: skip
    plan = rng.choices(kinds, weights=[k[1] for k in kinds], k=n_requests)
    lock = threading.Lock()
    outcome = {
        "valid_ok": 0,
        "valid_failed": 0,
        "invalid_ok": 0,
        "invalid_wrong": 0,
        "failures": [],
    }
    rss: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.is_set():
            rss.append((time.perf_counter() - t0, rss_kib(server.proc.pid)))
            done.wait(0.5)

    def client(items: list) -> None:
        for name, _, method, path, body, want in items:
            try:
                conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                status = r.status
                conn.close()
            except OSError as e:
                status = f"{type(e).__name__}"
                # A refused 2 MiB body may be cut off by the server's early answer (it reads
                # no further): a reset while sending it counts as the refusal it is.
                if want == 413 and isinstance(e, ConnectionError):
                    status = 413
            with lock:
                valid = want == 200
                ok = status == want
                key = ("valid_" if valid else "invalid_") + (
                    "ok" if ok else ("failed" if valid else "wrong")
                )
                outcome[key] += 1
                if not ok:
                    outcome["failures"].append((name, status))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(plan[i::n_clients],)) for i in range(n_clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    values = [v for _, v in rss]
    half = values[len(values) // 2 :]
    outcome.update(seconds=seconds, rss_first_mib=values[0] / 1024, rss_max_mib=max(values) / 1024,
                   rss_last_mib=values[-1] / 1024, rss_second_half_growth_mib=(half[-1] - half[0]) / 1024,
                   rss_samples=len(values))  # fmt: skip
    return outcome


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=1, help="server threads (the machine is shared)")
    ap.add_argument(
        "--tokens", type=int, default=64, help="tokens per stream in the throughput runs"
    )
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--slow-clients", type=int, default=1100, help="0: skip that phase")
    ap.add_argument("--llama-python", default="/opt/refenv/bin/python",
                    help="python with llama-cpp-python, for the slow-clients peer ('' : none)")  # fmt: skip
    ap.add_argument("--llama-path", default=None,
                    help="extra PYTHONPATH holding llama_cpp.server's extras (uvicorn, fastapi ...)")  # fmt: skip
    ap.add_argument("--skip-soak", action="store_true")
    args = ap.parse_args()
    if args.slow_clients:
        raise_descriptor_limit(args.slow_clients + 1024)  # the server inherits it
    model = args.model
    if model is None:
        from qpack.builder import models

        model = str(models.default_model_path())
    server = ServerProcess(model, "-t", str(args.threads), "-c", "1024", "--parallel", "8")
    try:
        from qpack.runtime.gguf import open_gguf
        from qpack.runtime.tokenizer import Tokenizer

        stop_ids = sorted(Tokenizer.from_gguf(open_gguf(model)).stop_ids)
        stream_tokens(server, QUESTIONS[0], 4, stop_ids)  # warm up
        print(
            f"server: {model}, {args.threads} thread(s), --parallel 8; {args.tokens} tokens per stream"
        )
        print(
            f"{'streams':>7} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs 1':>6} {'first token s':>14}"
        )
        base = None
        for c in (1, 2, 4, 8):
            r = throughput(server, c, args.tokens, stop_ids)
            base = base or r["tok_s"]
            print(f"{c:>7} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tok_s']:>8.1f} {r['tok_s'] / base:>5.2f}x "
                  f"{r['first_token_s']:>14.2f}", flush=True)  # fmt: skip
        if args.slow_clients:
            ours = slow_clients_phase(server, args.slow_clients, 32, stop_ids)
            if args.llama_python:
                try:
                    peer = PeerServer(args.llama_python, args.llama_path, model, args.threads)
                except RuntimeError as e:
                    print(f"llama.cpp: skipped ({e})")
                else:
                    try:
                        theirs = slow_clients_phase(peer, args.slow_clients, 32, stop_ids)
                        print(f"under the slow clients, qpack's stream takes {ours / theirs:.2f}x "
                              "llama.cpp's (llama-cpp-python's server)")  # fmt: skip
                    except OSError as e:
                        print(f"llama.cpp: the stream failed under the slow clients ({e!r})")
                    finally:
                        peer.stop()
        if not args.skip_soak:
            s = soak(server, args.requests, args.clients)
            print(f"soak: {args.requests} requests from {args.clients} clients in {s['seconds']:.1f} s: "
                  f"valid {s['valid_ok']} ok / {s['valid_failed']} failed, invalid {s['invalid_ok']} refused "
                  f"as expected / {s['invalid_wrong']} otherwise")  # fmt: skip
            print(f"RSS: first {s['rss_first_mib']:.1f} MiB, max {s['rss_max_mib']:.1f}, last "
                  f"{s['rss_last_mib']:.1f}, growth over the second half {s['rss_second_half_growth_mib']:+.1f} MiB "
                  f"({s['rss_samples']} samples)")  # fmt: skip
            if s["failures"]:
                print("failures:", s["failures"][:20])
            if not server.alive():
                print("the server died")
                return 1
            return 1 if s["valid_failed"] or s["invalid_wrong"] else 0
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
