"""Every bad request the API refuses, answered by a real server in this process over a tiny
random model (tests/tiny_models.py): no real model, fast. The status and OpenAI error code are
the oracle; the message must name the problem, never carry a traceback.
"""

from __future__ import annotations

import json

import pytest
from qpack.runtime.gguf import open_gguf
from qpack.runtime.server import Server, ServerOptions
from server_process import http_request
from tiny_models import tiny_model

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (name, method, path, JSON body or raw bytes, extra headers, status, error code)
    ("invalid json", "POST", CHAT, b"{not json", {}, 400, "invalid_json"),
    ("not utf-8", "POST", CHAT, b'{"messages": "\xff"}', {}, 400, "invalid_json"),
    ("json array", "POST", CHAT, b"[1, 2]", {}, 400, "invalid_json"),
    ("NaN constant", "POST", CHAT, b'{"messages": [], "temperature": NaN}', {}, 400, "invalid_json"),
    ("deep nesting", "POST", CHAT, b"[" * 100000 + b"]" * 100000, {}, 400, "invalid_json"),
    ("missing messages", "POST", CHAT, {"model": "m"}, {}, 400, "missing_required_parameter"),
    ("messages not list", "POST", CHAT, {"messages": "hi"}, {}, 400, "invalid_type"),
    ("empty messages", "POST", CHAT, {"messages": []}, {}, 400, "invalid_value"),
    ("bad role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, {}, 400, "invalid_value"),
    ("content number", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, {}, 400, "invalid_type"),
    ("image part", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {}, 400, "invalid_value"),
    ("model number", "POST", CHAT, {"messages": MSG, "model": 3}, {}, 400, "invalid_type"),
    ("temperature string", "POST", CHAT, {"messages": MSG, "temperature": "hot"}, {}, 400, "invalid_type"),
    ("temperature negative", "POST", CHAT, {"messages": MSG, "temperature": -1}, {}, 400, "invalid_value"),
    ("top_p > 1", "POST", CHAT, {"messages": MSG, "top_p": 1.5}, {}, 400, "invalid_value"),
    ("top_k float", "POST", CHAT, {"messages": MSG, "top_k": 2.5}, {}, 400, "invalid_type"),
    ("max_tokens negative", "POST", CHAT, {"messages": MSG, "max_tokens": -5}, {}, 400, "invalid_value"),
    ("max_tokens zero", "POST", CHAT, {"messages": MSG, "max_tokens": 0}, {}, 400, "invalid_value"),
    ("max_tokens absurd", "POST", CHAT, {"messages": MSG, "max_tokens": 10**30}, {}, 400, "invalid_value"),
    ("max_tokens string", "POST", CHAT, {"messages": MSG, "max_tokens": "10"}, {}, 400, "invalid_type"),
    ("max_completion_tokens bool", "POST", CHAT, {"messages": MSG, "max_completion_tokens": True}, {}, 400, "invalid_type"),
    ("n = 2", "POST", CHAT, {"messages": MSG, "n": 2}, {}, 400, "invalid_value"),
    ("stream string", "POST", CHAT, {"messages": MSG, "stream": "yes"}, {}, 400, "invalid_type"),
    ("stop number", "POST", CHAT, {"messages": MSG, "stop": 7}, {}, 400, "invalid_type"),
    ("seed negative", "POST", CHAT, {"messages": MSG, "seed": -1}, {}, 400, "invalid_value"),
    ("logit_bias outside vocab", "POST", CHAT, {"messages": MSG, "logit_bias": {"999999": 5}}, {}, 400, "invalid_value"),
    ("logit_bias bad key", "POST", CHAT, {"messages": MSG, "logit_bias": {"abc": 5}}, {}, 400, "invalid_value"),
    ("top_logprobs without logprobs", "POST", CHAT, {"messages": MSG, "top_logprobs": 2}, {}, 400, "invalid_value"),
    ("top_logprobs 99", "POST", CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 99}, {}, 400, "invalid_value"),
    ("json_schema", "POST", CHAT, {"messages": MSG, "response_format": {"type": "json_schema"}}, {}, 400, "invalid_value"),
    ("prompt too long", "POST", CHAT, {"messages": [{"role": "user", "content": "word " * 3000}]}, {}, 400, "context_length_exceeded"),
    ("completion without prompt", "POST", "/v1/completions", {"max_tokens": 3}, {}, 400, "missing_required_parameter"),
    ("completion prompt number", "POST", "/v1/completions", {"prompt": 3}, {}, 400, "invalid_type"),
    ("completion prompt bad ids", "POST", "/v1/completions", {"prompt": [1, -4]}, {}, 400, "invalid_value"),
    ("completion too long", "POST", "/v1/completions", {"prompt": "word " * 3000}, {}, 400, "context_length_exceeded"),
    ("embedding no input", "POST", "/v1/embeddings", {}, {}, 400, "missing_required_parameter"),
    ("embedding bad input", "POST", "/v1/embeddings", {"input": {"a": 1}}, {}, 400, "invalid_type"),
    ("embedding empty", "POST", "/v1/embeddings", {"input": ""}, {}, 400, "invalid_value"),
    ("embedding too long", "POST", "/v1/embeddings", {"input": "word " * 3000}, {}, 400, "context_length_exceeded"),
    ("tokenize no content", "POST", "/tokenize", {}, {}, 400, "missing_required_parameter"),
    ("detokenize bad id", "POST", "/detokenize", {"tokens": [1, 10**9]}, {}, 400, "invalid_value"),
    ("form content type", "POST", CHAT, b"messages=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ("unknown route", "GET", "/v2/everything", None, {}, 404, "not_found"),
    ("unknown POST route", "POST", "/v1/images", {"x": 1}, {}, 404, "not_found"),
    ("wrong method", "GET", CHAT, None, {}, 405, "method_not_allowed"),
    ("wrong method 2", "DELETE", "/v1/models", None, {}, 405, "method_not_allowed"),
    ("foreign Host", "GET", "/v1/models", None, {"Host": "evil.example:8080"}, 403, "forbidden_host"),
    # Hostile or careless HTTP (issue 11, item 6).
    ("no content type", "POST", CHAT, b'{"messages": []}', {"Content-Type": ""}, 415, "unsupported_media_type"),
    ("text/plain body", "POST", CHAT, b'{"messages": []}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("malformed Host", "GET", "/v1/models", None, {"Host": "[::1"}, 400, "invalid_host"),
    ("malformed Host 2", "GET", "/v1/models", None, {"Host": "a b"}, 400, "invalid_host"),
    ("Host bad IPv6", "GET", "/v1/models", None, {"Host": "[::zz]:80"}, 400, "invalid_host"),
    # Engine fairness (item 4): stop strings have a length limit; embeddings a size limit.
    ("stop too long", "POST", CHAT, {"messages": MSG, "stop": ["x" * 60000] * 16}, {}, 400, "invalid_value"),
    ("stop 17 strings", "POST", CHAT, {"messages": MSG, "stop": ["a"] * 17}, {}, 400, "invalid_value"),
    ("embedding 2049 inputs", "POST", "/v1/embeddings", {"input": ["a"] * 2049}, {}, 400, "invalid_value"),
    ("tokenize content number", "POST", "/tokenize", {"content": 5}, {}, 400, "invalid_type"),
    ("encoding_format bad", "POST", "/v1/embeddings", {"input": "a", "encoding_format": "hex"}, {}, 400, "invalid_value"),
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    path = tiny_model(tmp_path_factory.mktemp("tiny") / "m.gguf", "llama", "F32", n_layers=1)
    s = Server(ServerOptions(port=0, open_browser=False, ctx_size=256, parallel=2, threads=1))
    s.listen()
    s.load(open_gguf(str(path)))
    yield s
    s.close()


def request(s: Server, method, path, body=None, headers=None, raw=None):
    host, port = s.address
    return http_request(host, port, method, path, body, headers, raw, timeout=60)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(tiny_server, case):
    name, method, path, body, headers, want_status, want_code = case
    raw = body if isinstance(body, bytes) else None
    js = body if isinstance(body, dict) else None
    h = dict(headers)
    if raw is not None:
        h.setdefault("Content-Type", "application/json")
    h = {k: v for k, v in h.items() if v}  # "" = leave the header out
    status, heads, reply = request(tiny_server, method, path, js, h, raw)
    assert status == want_status, reply
    assert heads["content-type"].startswith("application/json")
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["code"] == want_code and reply["error"]["message"]
    assert "Traceback" not in reply["error"]["message"]
    if want_status == 405:
        assert heads.get("allow")


# --- answers and engine fairness on the tiny model -------------------------------------------


def test_chat_answer_and_stream_envelopes(tiny_server):
    body = {"messages": MSG, "max_tokens": 4, "temperature": 0, "logit_bias": {"2": -100}}
    status, _, r = request(tiny_server, "POST", CHAT, body)
    assert status == 200 and r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    assert r["choices"][0]["message"]["role"] == "assistant"
    assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["finish_reason"] == "length"
    status, heads, text = request(tiny_server, "POST", CHAT, {**body, "stream": True,
                                  "stream_options": {"include_usage": True}})  # fmt: skip
    assert status == 200 and heads["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(
        c["object"] == "chat.completion.chunk" for c in chunks
    )
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == r["choices"][0]["message"]["content"]  # greedy: the same answer
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_sampling_defaults_come_from_the_server_and_the_request_overrides_them(tiny_server):
    from qpack.runtime.fields import read_fields, sampling_params
    from qpack.runtime.openai_api import CHAT_FIELDS, model_limits
    from qpack.runtime.sampler import SamplingParams

    defaults = SamplingParams(temperature=0.3, top_k=7, stop=["END"], max_tokens=50)
    limits = model_limits(tiny_server.loaded)
    v = read_fields({"messages": MSG, "top_k": 3, "max_tokens": 9, "max_completion_tokens": 11},
                    CHAT_FIELDS, limits)  # fmt: skip
    p = sampling_params(v, CHAT_FIELDS, defaults)
    assert (p.temperature, p.top_k, p.stop, p.max_tokens) == (0.3, 3, ["END"], 11)
    assert sampling_params(read_fields({"messages": MSG}, CHAT_FIELDS, limits), CHAT_FIELDS,
                           defaults) == defaults  # fmt: skip


def test_embeddings_alone_equal_embeddings_batched(tiny_server):
    texts = ["hello world", "the a the", "world!"]
    _, _, batched = request(tiny_server, "POST", "/v1/embeddings", {"input": texts})
    for i, t in enumerate(texts):
        _, _, alone = request(tiny_server, "POST", "/v1/embeddings", {"input": t})
        a, b = alone["data"][0]["embedding"], batched["data"][i]["embedding"]
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
        assert abs(sum(x * x for x in a) - 1) < 1e-4


def test_embeddings_stop_when_the_client_leaves(tiny_server):
    """A long embedding request goes through the engine queue a chunk per step; a client that
    hangs up has it cancelled: far fewer tokens are processed than it asked for."""
    import socket
    import time

    engine = tiny_server.loaded.engine
    n_tokens = 250
    inputs = [[100 + i % 50 for i in range(n_tokens)]] * (65536 // n_tokens)
    body = json.dumps({"input": inputs}).encode()
    before = engine.stats["prompt_tokens"]
    host, port = tiny_server.address
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        for _ in range(200):
            if engine.stats["prompt_tokens"] > before:
                break
            time.sleep(0.02)
    for _ in range(500):  # bounded by count: until the slot is free again
        if all(s.request is None for s in engine.slots):
            break
        time.sleep(0.02)
    assert all(s.request is None for s in engine.slots)
    done = engine.stats["prompt_tokens"] - before
    assert 0 < done < n_tokens * len(inputs) / 2, (done, n_tokens * len(inputs))
    assert tiny_server.metrics.in_flight == 0


def test_props_has_no_file_paths(tiny_server):
    _, _, props = request(tiny_server, "GET", "/props")
    text = json.dumps(props)
    assert "path" not in props["model"] and "/" not in text.replace("/s", "")  # no directories


def test_non_loopback_without_a_key_refuses_to_start():
    from qpack.runtime.errors import QpackError

    with pytest.raises(QpackError, match="--no-api-key"):
        Server(ServerOptions(host="0.0.0.0", port=0, open_browser=False)).listen()
    for options in (ServerOptions(host="0.0.0.0", port=0, api_key="k", open_browser=False),
                    ServerOptions(host="0.0.0.0", port=0, no_api_key=True, open_browser=False)):  # fmt: skip
        s = Server(options)
        s.listen()
        s.close()


def test_embedding_answers_are_bounded_in_size(tiny_server):
    """The issue's 2048 tiny inputs: on a model with 4096-wide embeddings that answer would be
    ~180 MB of JSON; the request is refused up front instead, naming the bound."""
    from types import SimpleNamespace

    from qpack.runtime.errors import ApiError
    from qpack.runtime.openai_api import MAX_EMBEDDING_VALUES, embedding_inputs

    real = tiny_server.loaded
    wide = SimpleNamespace(tokenizer=real.tokenizer, model=SimpleNamespace(
        hp=SimpleNamespace(n_embd=4096), n_ctx=real.model.n_ctx, n_vocab=real.model.n_vocab))  # fmt: skip
    with pytest.raises(ApiError, match=f"at most {MAX_EMBEDDING_VALUES // 4096} items") as e:
        embedding_inputs({"input": ["a"] * 2048}, wide)
    assert e.value.status == 400
    inputs, _ = embedding_inputs({"input": ["a"] * (MAX_EMBEDDING_VALUES // 4096)}, wide)
    assert len(inputs) == MAX_EMBEDDING_VALUES // 4096
