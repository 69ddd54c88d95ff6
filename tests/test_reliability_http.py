"""Reliability over real HTTP: worker kills, disconnects, bursts, injected faults, transcripts at rest.

Every test here starts its own engine and server (they kill, fill or break them), on
loopback, and talks to it as a client would: httpx for the raw streams, the official
SDKs where a whole answer is wanted.
"""

import asyncio
import json
import os
import signal
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import openai
import pytest
from conftest import Server, letter_token

from mlx_tui.api.server import create_app

PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
SYSTEM = "You are a pirate of the seven seas. Answer every question like one, briefly and cheerfully."


@pytest.fixture
def serve(loop, make_engine):
    """Start an engine with its own settings and a fault-injecting server on it; both stopped after the test."""
    servers = []

    def start(**settings):
        engine = make_engine(**settings)
        servers.append(Server(loop, create_app(engine, debug_faults=True)))
        return engine, servers[-1]

    yield start
    for server in servers:
        server.close()


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def wait_for(check, seconds: float = 60, what: str = "the condition"):
    """Poll `check()` until it returns something true (or fail after `seconds`); its value."""
    deadline = time.monotonic() + seconds
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def idle(loop, engine) -> dict:
    stats = loop.run(engine.stats())
    return stats if stats["running"] == 0 and stats["waiting"] == 0 else None


def frames(lines) -> list[tuple[str | None, str]]:
    """SSE lines as (event name, data) pairs; pings dropped."""
    out, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            if name != "ping":
                out.append((name, line.removeprefix("data: ")))
            name = None
    return out


def body(protocol: str, messages: list, **changes) -> dict:
    if protocol == "anthropic":
        system = [m["content"] for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        return {"model": "m", "max_tokens": 8, "messages": rest, "system": system[0] if system else None} | changes
    return {"model": "m", "max_tokens": 8, "messages": messages} | changes


def clients(server):
    return (
        anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60),
        openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60),
    )


def ask(server, protocol: str, messages: list) -> tuple[str, int]:
    """One whole answer through the official SDK: its text and the cached prompt tokens it reports."""
    claude, gpt = clients(server)
    if protocol == "anthropic":
        b = body(protocol, messages)
        reply = claude.messages.create(**{k: v for k, v in b.items() if v is not None})
        text = "".join(block.text for block in reply.content if block.type == "text")
        return text, reply.usage.cache_read_input_tokens
    reply = gpt.chat.completions.create(**body(protocol, messages))
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens_details.cached_tokens


# 1. SIGKILL mid-stream.


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_sigkill_mid_stream(serve, loop, tmp_path, protocol):
    engine, server = serve(loop_window=0, cache_dir=str(tmp_path / "cache"))
    turn = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who are you?"}]
    reply, _ = ask(server, protocol, turn)
    wait_for(lambda: loop.run(engine.stats())["cache"]["disk_bytes"], 30, "the first turn on disk")
    turn += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And where do you sail?"}]

    before = health(server)
    pid = before["worker"]["pid"]
    if protocol == "openai":  # a truly endless generation: one token forced, the loop guard off
        stream = body(protocol, turn, stream=True, max_tokens=100_000, logit_bias={str(letter_token()): 50})
        headers, enough = {}, 4  # the role chunk and three text chunks
    else:  # Anthropic has no logit bias: the worker stalls at its third token, so it cannot finish first
        stream = body(protocol, turn, stream=True, max_tokens=1000)
        headers, enough = {"x-mlx-tui-fault": "stall@3"}, 1  # message_start
    seen, killed_at = [], None
    with httpx.stream("POST", server.url + PATHS[protocol], json=stream, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            seen.append(line)
            if killed_at is None and len(frames(seen)) >= enough:
                os.kill(pid, signal.SIGKILL)
                killed_at = len(seen)
        # the loop ended because the server ended the stream: no hang (timeout), no dropped connection (raise)
    assert killed_at is not None, "the stream ended before the kill"
    after_kill = frames(seen[killed_at:])
    if protocol == "anthropic":
        name, data = after_kill[-1]
        error = json.loads(data)
        assert name == "error" and error["type"] == "error"
        assert error["error"]["type"] in ("overloaded_error", "api_error")
        assert not any(n == "message_stop" for n, _ in after_kill)
    else:
        assert after_kill[-1][1] == "[DONE]"
        error = json.loads(after_kill[-2][1])
        assert set(error["error"]) >= {"message", "type"}
        assert not any('"finish_reason":"' in d for _, d in after_kill)

    counted = health(server)
    assert counted["breaker"]["failures"] >= 1 or counted["worker"]["restarts"] >= 1
    restarted = wait_for(
        lambda: (h := health(server))["worker"]["restarts"] >= 1 and h["status"] == "ok" and h, 60, "the restart"
    )
    assert restarted["worker"]["pid"] not in (None, pid)
    assert restarted["breaker"]["state"] == "closed"

    _, cached = ask(server, protocol, turn)
    assert cached > 0, "the conversation's prefix should come back from the disk cache after the restart"
    assert loop.run(engine.stats())["cache"]["disk_hits"] >= 1
    assert health(server)["breaker"]["failures"] == 0, "a success resets the count"


# 2. Client disconnects.


def test_200_disconnects_leave_nothing_running(serve, loop):
    engine, server = serve(loop_window=0)
    openai_body = body(
        "openai",
        [{"role": "user", "content": "Good morning!"}],
        stream=True,
        max_tokens=100_000,
        logit_bias={str(letter_token()): 50},
    )
    anthropic_body = body("anthropic", [{"role": "user", "content": "Good morning!"}], stream=True, max_tokens=100_000)
    anthropic_body.pop("system")

    def leave(i: int):
        protocol = ("openai", "anthropic")[i % 2]
        payload = openai_body if protocol == "openai" else anthropic_body
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", server.url + PATHS[protocol], json=payload) as response:
                assert response.status_code == 200
                got = 0
                for line in response.iter_lines():
                    got += line.startswith("data: ")
                    if got == 2:
                        break

    def wave(indices):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(leave, indices))

    wave(range(20))
    first = wait_for(lambda: idle(loop, engine), 30, "nothing running after 20 disconnects")
    wave(range(20, 200))
    last = wait_for(lambda: idle(loop, engine), 30, "nothing running after 200 disconnects")
    assert last["running"] == 0 and last["waiting"] == 0
    grown = last["memory"]["active"] - first["memory"]["active"]
    assert last["memory"]["active"] < 2 * first["memory"]["active"] + 16 * 2**20, f"memory grew by {grown} bytes"
    assert engine.restarts == 0 and health(server)["breaker"]["failures"] == 0
    assert not engine.inflight.streams, "the front process still holds streams"


# 3. A burst over a bounded queue.


def test_burst_of_60_over_a_queue_of_16(serve):
    engine, server = serve(loop_window=0, max_queue=16, max_concurrency=4)
    payload = body(
        "openai",
        [{"role": "user", "content": "Good morning!"}],
        stream=True,
        max_tokens=150,
        logit_bias={str(letter_token()): 50},
    )

    async def client(http: httpx.AsyncClient, i: int, go: asyncio.Event):
        protocol = ("openai", "anthropic")[i % 2]
        data = payload if protocol == "openai" else body("anthropic", payload["messages"], stream=True, max_tokens=150)
        data = {k: v for k, v in data.items() if v is not None}
        await go.wait()
        began = time.monotonic()
        async with http.stream("POST", server.url + PATHS[protocol], json=data) as response:
            answered = time.monotonic() - began
            if response.status_code != 200:
                await response.aread()
                return protocol, response, answered, None
            last = [line async for line in response.aiter_lines() if line.startswith("data: ")][-1]
            return protocol, response, answered, last

    async def burst():
        go = asyncio.Event()
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            tasks = [asyncio.create_task(client(http, i, go)) for i in range(60)]
            await asyncio.sleep(0.05)
            go.set()
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    results = asyncio.run(burst())
    refused = [r for r in results if r[1].status_code != 200]
    served = [r for r in results if r[1].status_code == 200]
    assert len(served) >= 20 and len(refused) >= 30, (len(served), len(refused))
    for protocol, response, answered, _ in refused:
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error"
        if protocol == "anthropic":
            assert response.json()["type"] == "error"
        assert answered < 5, f"a refusal took {answered:.1f} s"
    for protocol, _, _, last in served:
        if protocol == "anthropic":
            assert json.loads(last.removeprefix("data: "))["type"] == "message_stop"
        else:
            assert last == "data: [DONE]"
    assert engine.restarts == 0


# 4. Injected faults.


def test_request_error_fails_only_that_request(serve):
    engine, server = serve()
    good = body("openai", [{"role": "user", "content": "Good morning!"}], max_tokens=16)

    def post(protocol: str, fault: str | None):
        headers = {"x-mlx-tui-fault": fault} if fault else {}
        data = {k: v for k, v in body(protocol, good["messages"], max_tokens=16).items() if v is not None}
        return httpx.post(server.url + PATHS[protocol], json=data, headers=headers, timeout=60)

    with ThreadPoolExecutor(5) as pool:
        jobs = [
            ("anthropic", "request_error@2"),
            ("openai", "request_error@2"),
            ("anthropic", None),
            ("openai", None),
            ("openai", None),
        ]
        responses = list(pool.map(lambda job: post(*job), jobs))
    faulty, others = responses[:2], responses[2:]
    assert faulty[0].status_code == 500 and faulty[0].json()["error"]["type"] == "api_error"
    assert faulty[1].status_code == 500 and faulty[1].json()["error"]["type"] == "server_error"
    assert all(r.status_code == 200 for r in others), [r.text for r in others]
    h = health(server)
    assert h["breaker"]["failures"] == 0 and h["worker"]["restarts"] == 0 and h["status"] == "ok"


def test_batch_errors_open_the_breaker_and_a_probe_closes_it(serve):
    engine, server = serve(breaker_threshold=2, breaker_cooldown=1.0)
    messages = [{"role": "user", "content": "Good morning!"}]
    anthropic_body = {k: v for k, v in body("anthropic", messages).items() if v is not None}
    openai_body = body("openai", messages)

    def post(protocol: str, fault: str | None = None):
        headers = {"x-mlx-tui-fault": fault} if fault else {}
        data = anthropic_body if protocol == "anthropic" else openai_body
        return httpx.post(server.url + PATHS[protocol], json=data, headers=headers, timeout=60)

    failed = [post("anthropic", "batch_error@1"), post("openai", "batch_error@1")]
    assert failed[0].status_code == 529 and failed[0].json()["error"]["type"] == "overloaded_error"
    assert failed[1].status_code == 503
    opened = health(server)
    assert opened["breaker"]["state"] == "open" and opened["status"] == "degraded"
    assert opened["breaker"]["failures"] >= 2 and 0 < opened["breaker"]["next_probe_s"] <= 1.0

    began = time.monotonic()
    refused = [post("anthropic"), post("openai")]
    assert time.monotonic() - began < 2, "refusals while open must be immediate"
    assert refused[0].status_code == 529 and refused[0].json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": refused[0].json()["error"]["message"]},
    }
    assert refused[1].status_code == 503 and "message" in refused[1].json()["error"]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)

    wait_for(lambda: health(server)["breaker"]["state"] != "open", 10, "the cool-down")
    probe = post("openai")
    assert probe.status_code == 200, probe.text
    closed = health(server)
    assert closed["breaker"] == {"state": "closed", "failures": 0, "next_probe_s": None}
    assert closed["status"] == "ok" and closed["worker"]["restarts"] == 0
    assert post("anthropic").status_code == 200


# 5. Transcripts at rest.


def test_transcripts_are_written_0600(serve, tmp_path):
    directory = tmp_path / "transcripts"
    engine, server = serve(transcripts_dir=str(directory))
    marker = f"marker-{uuid.uuid4().hex}"
    data = {k: v for k, v in body("anthropic", [{"role": "user", "content": marker}]).items() if v is not None}
    assert httpx.post(server.url + "/v1/messages", json=data, timeout=60).status_code == 200
    path = directory / "transcripts.jsonl"
    wait_for(path.exists, 10, "the transcript file")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) & 0o077 == 0, "the directory is private too"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert any(marker in json.dumps(e["received"]) and marker in e["prompt"] for e in entries)


def test_no_transcripts_dir_writes_nothing(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    engine, server = serve(transcripts_dir=None)
    marker = f"marker-{uuid.uuid4().hex}"
    data = body("openai", [{"role": "user", "content": marker}])
    assert httpx.post(server.url + "/v1/chat/completions", json=data, timeout=60).status_code == 200
    assert engine.transcripts.path is None
    assert any(marker in json.dumps(t.received) for t in engine.transcripts.items.values()), "kept in memory"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing may be written to disk"
