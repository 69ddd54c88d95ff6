"""Bad requests, refusals and disconnects: always the protocol's error shape, never a 5xx for bad input."""

import json
import re
import time
import uuid

import httpx
import pytest
from conftest import Server

from mlx_tui.api.server import create_app

HELLO = [{"role": "user", "content": "Good morning!"}]
ROUTES = {
    "anthropic": ("/v1/messages", {"model": "m", "max_tokens": 20, "messages": HELLO}),
    "openai": ("/v1/chat/completions", {"model": "m", "max_tokens": 20, "messages": HELLO}),
}


def assert_error(response: httpx.Response, protocol: str, status: int, kind: str | None = None) -> str:
    """The response is `protocol`'s error body with `status`; its message."""
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"]
    if protocol == "anthropic":
        assert body["type"] == "error" and set(error) == {"type", "message"}
    else:
        assert set(error) == {"message", "type", "param", "code"}
    assert kind is None or error["type"] == kind
    return error["message"]


def post(server, protocol, content=None, **changes):
    path, body = ROUTES[protocol]
    if content is not None:
        return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    body = {k: v for k, v in (body | changes).items() if v is not None}
    return httpx.post(server.url + path, json=body, timeout=60)


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b"",
        b"[" * 10000 + b"]" * 10000,
    ],
    ids=["bad-json", "not-utf8", "empty", "deep"],
)
def test_unreadable_bodies(server, protocol, content):
    assert_error(post(server, protocol, content=content), protocol, 400, "invalid_request_error")


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
@pytest.mark.parametrize(
    "changes",
    [
        {"messages": "hello"},
        {"messages": None},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
        {"max_tokens": "20"},
        {"max_tokens": 0},
        {"temperature": -1},
        {"model": None},
        {"stop": 7, "stop_sequences": 7},
    ],
    ids=[
        "messages-str",
        "no-messages",
        "empty",
        "unknown-role",
        "content-int",
        "block-untyped",
        "max-str",
        "max-zero",
        "temp",
        "no-model",
        "stop",
    ],
)
def test_invalid_requests(server, protocol, changes):
    assert_error(post(server, protocol, **changes), protocol, 400, "invalid_request_error")


def test_n_above_one(server):
    message = assert_error(post(server, "openai", n=2), "openai", 400)
    assert message.startswith("n:")


def test_openai_tool_message_needs_its_call_id(server):
    messages = HELLO + [{"role": "tool", "content": "result"}]
    assert_error(post(server, "openai", messages=messages), "openai", 400)


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_prompt_too_long(server, engine, protocol):
    words = "Paris Tokyo London " * engine.info["context_length"]
    response = post(server, protocol, messages=[{"role": "user", "content": words}])
    message = assert_error(response, protocol, 400, "invalid_request_error")
    assert re.fullmatch(r"prompt is too long: \d+ tokens > \d+ maximum", message)


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), "openai", 404)
    assert_error(httpx.get(server.url + "/v1/messages"), "anthropic", 405)


@pytest.fixture(scope="module")
def keyed(loop, engine):
    server = Server(loop, create_app(engine, api_key="sesame"))
    yield server
    server.close()


@pytest.mark.parametrize(
    "headers, status",
    [
        ({}, 401),
        ({"x-api-key": "wrong"}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"x-api-key": "sesame"}, 200),
        ({"authorization": "Bearer sesame"}, 200),
    ],
)
def test_api_key(keyed, headers, status):
    response = httpx.get(keyed.url + "/v1/models", headers=headers | {"anthropic-version": "2023-06-01"})
    if status == 401:
        assert_error(response, "anthropic", 401, "authentication_error")
    else:
        assert response.status_code == 200


def test_api_key_spares_health_and_covers_generation(keyed):
    assert httpx.get(keyed.url + "/health").status_code == 200
    assert_error(post(keyed, "openai"), "openai", 401)
    assert_error(post(keyed, "anthropic"), "anthropic", 401, "authentication_error")


def test_api_key_lets_any_host_in(keyed):
    response = httpx.get(keyed.url + "/v1/models", headers={"host": "example.com", "x-api-key": "sesame"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "host, status", [("evil.example.com", 403), ("localhost:1234", 200), ("127.0.0.1", 200), ("[::1]:80", 200)]
)
def test_host_header_without_key(server, host, status):
    response = httpx.get(server.url + "/v1/models", headers={"host": host})
    if status == 403:
        assert_error(response, "openai", 403)
    else:
        assert response.status_code == 200


@pytest.mark.parametrize("origin, status", [("https://evil.example.com", 403), ("http://localhost:3000", 200)])
def test_origin_header_without_key(server, origin, status):
    response = httpx.get(server.url + "/v1/models", headers={"origin": origin})
    if status == 403:
        assert_error(response, "openai", 403)
    else:
        assert response.status_code == 200


@pytest.fixture(scope="module")
def small(loop, engine):
    server = Server(loop, create_app(engine, max_body_mb=0.001))
    yield server
    server.close()


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_body_too_large(small, protocol):
    response = post(small, protocol, messages=[{"role": "user", "content": "x" * 2000}])
    assert_error(response, protocol, 413, "request_too_large")


def test_body_too_large_without_length(small):
    """A chunked body is counted as it arrives."""
    response = httpx.post(small.url + "/v1/messages", content=iter([b"x" * 600] * 3), timeout=60)
    assert_error(response, "anthropic", 413, "request_too_large")


def test_small_body_passes_the_limit(small):
    assert post(small, "openai").status_code == 200


def running(loop, engine) -> int:
    stats = loop.run(engine.stats())
    return stats["running"] + stats["waiting"]


def wait_idle(loop, engine, seconds: float = 10) -> int:
    """Poll the engine until nothing runs or waits (or `seconds` pass); what is left."""
    deadline = time.monotonic() + seconds
    while (left := running(loop, engine)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_disconnect_during_prefill_cancels(server, loop, engine, protocol):
    """A long new prompt (no cache can hold it): the client leaves while it is still being read."""
    path, body = ROUTES[protocol]
    prompt = uuid.uuid4().hex + " Paris Tokyo London" * 4000
    body = body | {"stream": True, "messages": [{"role": "user", "content": prompt}]}
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as response:
        lines = response.iter_lines()  # kept: dropping it would close the connection at once
        next(lines)
        assert running(loop, engine) == 1
    assert wait_idle(loop, engine) == 0


def endless(engine) -> dict:
    """A request that cannot end by itself: its end tokens banned, sampled too hot to repeat."""
    banned = {str(token): -100 for token in engine.info["eos"]}
    return ROUTES["openai"][1] | {"max_tokens": 10**6, "temperature": 10.0, "logit_bias": banned}


def test_disconnect_during_decoding_cancels(server, loop, engine):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=endless(engine) | {"stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(10):
            next(lines)
        assert running(loop, engine) == 1
    assert wait_idle(loop, engine) == 0


def test_client_timeout_cancels_a_whole_response(server, loop, engine):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=endless(engine), timeout=2)
    assert wait_idle(loop, engine) == 0


@pytest.fixture(scope="module")
def faulty(loop, engine):
    """A server that lets the X-MLX-TUI-Fault header break a request's own processing."""
    server = Server(loop, create_app(engine, debug_faults=True))
    yield server
    server.close()


def test_failure_after_the_stream_began_is_an_error_event(faulty):
    path, body = ROUTES["anthropic"]
    headers = {"x-mlx-tui-fault": "request_error@3"}
    with httpx.stream("POST", faulty.url + path, json=body | {"stream": True}, headers=headers) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == "event: message_start" and lines[-2] == "event: error"
    error = json.loads(lines[-1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error"


def test_failure_after_the_openai_stream_began_is_an_error_chunk(faulty):
    path, body = ROUTES["openai"]
    headers = {"x-mlx-tui-fault": "request_error@3"}
    with httpx.stream("POST", faulty.url + path, json=body | {"stream": True}, headers=headers) as response:
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and set(json.loads(data[-2])["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_failure_of_a_whole_response_is_an_error_status(faulty, protocol):
    path, body = ROUTES[protocol]
    response = httpx.post(faulty.url + path, json=body, headers={"x-mlx-tui-fault": "request_error@3"}, timeout=60)
    assert_error(response, protocol, 500)
