"""Faults in the engine worker: crashes, hangs and failed steps are survived. Each test breaks its own engine."""

import asyncio
import os
import signal
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
from conftest import letter_token

from mlx_tui.engine.client import EngineClient, EngineUnavailable
from mlx_tui.engine.config import EngineConfig
from mlx_tui.engine.demo.conversations import CONVERSATIONS
from mlx_tui.engine.events import Done, Error, PrefillProgress, RawText, Started
from mlx_tui.engine.request import GenerationRequest, Sampling

GREETING = next(c for c in CONVERSATIONS if c["name"] == "greeting")


def request(**changes) -> GenerationRequest:
    return GenerationRequest(messages=GREETING["messages"][:-1], **{"max_tokens": 64, **changes})


def endless(**changes) -> GenerationRequest:
    """A request that keeps generating until stopped (one token forced, the loop guard off)."""
    return request(sampling=Sampling(logit_bias={letter_token(): 50.0}), **{"max_tokens": 100_000, **changes})


async def collect(engine, req: GenerationRequest) -> list:
    return [e async for e in engine.generate(req)]


async def until_restarted(engine, restarts: int):
    while engine.restarts < restarts or engine.state != "ready":
        await asyncio.sleep(0.05)


@pytest.fixture
def broken(make_engine):
    """An engine of the test's own, with the repetition guard off so forced loops run on."""
    return lambda **settings: make_engine(loop_window=0, **settings)


def test_sigkill_mid_stream_ends_the_stream_and_restarts(loop, broken):
    engine = broken()
    pid = engine.pid

    async def scenario():
        events = []
        async for event in engine.generate(endless()):
            events.append(event)
            if isinstance(event, RawText) and sum(isinstance(e, RawText) for e in events) == 3:
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(until_restarted(engine, 1), 60)
        return events, await collect(engine, request())

    events, after = loop.run(scenario())
    assert isinstance(events[-1], Error) and events[-1].kind == "engine"
    assert isinstance(after[-1], Done)
    assert engine.pid != pid and engine.breaker.failures == 0, "a success resets the count"


def test_injected_exit_counts_for_the_breaker(loop, broken):
    engine = broken(breaker_threshold=5)
    events = loop.run(collect(engine, request(fault="exit@2")))
    assert isinstance(events[-1], Error) and "exited" in events[-1].message
    assert engine.breaker.failures == 1
    loop.run(asyncio.wait_for(until_restarted(engine, 1), 60))


def test_sigstop_is_caught_by_the_watchdog(loop, broken):
    engine = broken(stall_timeout=1.5)
    pid = engine.pid

    async def scenario():
        events = []
        async for event in engine.generate(endless()):
            events.append(event)
            if isinstance(event, RawText) and sum(isinstance(e, RawText) for e in events) == 3:
                os.kill(pid, signal.SIGSTOP)
        await asyncio.wait_for(until_restarted(engine, 1), 60)
        return events

    events = loop.run(scenario())
    assert isinstance(events[-1], Error) and "stalled" in events[-1].message
    assert isinstance(loop.run(collect(engine, request()))[-1], Done)


def test_a_long_prefill_is_not_a_stall(loop, broken):
    engine = broken(stall_timeout=1.5, prefill_step=32)
    words = "lorem ipsum dolor sit amet "
    per_copy = (
        loop.run(engine.count_tokens(GenerationRequest(messages=[{"role": "user", "content": words * 100}]))) / 100
    )
    long = GenerationRequest(messages=[{"role": "user", "content": words * int(10_000 / per_copy)}], max_tokens=4)
    events = loop.run(collect(engine, long))
    done = events[-1]
    assert isinstance(done, Done), done
    assert done.timings.queued_s + done.timings.prefill_s > 1.5, (
        "the prefill must outlast the stall timeout for this to show anything"
    )
    assert sum(isinstance(e, PrefillProgress) for e in events) > 100
    assert engine.restarts == 0


def test_request_error_fails_that_request_alone(loop, broken):
    engine = broken()

    async def scenario():
        return await asyncio.gather(
            collect(engine, request(fault="request_error@2")), collect(engine, request()), collect(engine, request())
        )

    faulty, *others = loop.run(scenario())
    assert isinstance(faulty[-1], Error) and faulty[-1].kind == "internal"
    assert all(isinstance(o[-1], Done) for o in others)
    assert engine.breaker.failures == 0 and engine.restarts == 0


def test_batch_errors_open_the_breaker_and_a_probe_closes_it(loop, broken):
    engine = broken(breaker_threshold=2, breaker_cooldown=2.0)
    for _ in range(2):
        events = loop.run(collect(engine, request(fault="batch_error@1")))
        assert isinstance(events[-1], Error) and events[-1].kind == "engine"
    assert engine.breaker.state == "open"
    with pytest.raises(EngineUnavailable) as refused:
        loop.run(collect(engine, request()))
    assert refused.value.reason == "breaker" and 0 < refused.value.retry_after <= 2.0

    async def after_cooldown():
        while engine.breaker.state == "open":
            await asyncio.sleep(0.05)
        return await collect(engine, request())

    assert isinstance(loop.run(after_cooldown())[-1], Done)
    assert engine.breaker.state == "closed" and engine.restarts == 0


def test_a_full_queue_refuses_at_once(loop, broken):
    engine = broken(max_concurrency=1, max_queue=1)

    async def scenario():
        first, second = engine.generate(endless()), engine.generate(endless())
        await anext(first)
        await anext(second)
        try:
            with pytest.raises(EngineUnavailable) as refused:
                await anext(engine.generate(request()))
            return refused.value
        finally:
            await first.aclose()
            await second.aclose()

    refused = loop.run(scenario())
    assert refused.reason == "busy"
    assert isinstance(loop.run(collect(engine, request()))[-1], Done)


def test_request_timeout_ends_the_request(loop, broken):
    engine = broken(request_timeout=1.0)
    events = loop.run(collect(engine, endless()))
    assert isinstance(events[-1], Error) and events[-1].kind == "timeout"
    assert loop.run(engine.stats())["running"] == 0


def test_a_livelock_is_caught_by_the_watchdog(loop, broken):
    """The worker keeps answering the stats tick while no request moves: that is a stall all the same."""
    engine = broken(stall_timeout=1.5)

    async def scenario():
        events = await asyncio.wait_for(collect(engine, endless(fault="livelock@3")), 20)
        await asyncio.wait_for(until_restarted(engine, 1), 60)
        return events

    events = loop.run(scenario())
    assert isinstance(events[-1], Error) and "stalled" in events[-1].message
    assert isinstance(loop.run(collect(engine, request()))[-1], Done)


def test_a_slow_disk_load_reports_progress_and_is_not_a_stall(loop, broken, tmp_path):
    """A disk-cache load that outlasts the stall timeout several times over, read piece by piece, is let finish."""
    first = broken(cache_dir=str(tmp_path))
    loop.run(collect(first, request()))
    loop.run(first.stop())
    [entry] = tmp_path.glob("*/*.safetensors")
    engine = broken(cache_dir=str(tmp_path), stall_timeout=1.0)
    began = time.monotonic()
    events = loop.run(collect(engine, request(fault=f"slow_disk@{entry.stat().st_size // 20}")))
    took = time.monotonic() - began
    assert isinstance(events[-1], Done), events[-1]
    assert next(e for e in events if isinstance(e, Started)).cached_tokens > 0
    assert loop.run(engine.stats())["cache"]["disk_hits"] == 1
    assert took > 3.0, "the load must outlast the stall timeout for this to show anything"
    assert engine.restarts == 0


def test_a_stranger_with_the_wrong_key_is_refused_while_the_worker_starts(loop):
    """A local process that reaches the worker's listener first, with the wrong key, does not end the start."""
    engine = EngineClient(EngineConfig(transcripts_dir=None, cache_dir=None))

    async def scenario():
        starting = asyncio.create_task(engine.start())
        while engine.supervisor.worker.address is None:
            await asyncio.sleep(0.01)
        with pytest.raises(AuthenticationError):
            await asyncio.wait_for(asyncio.to_thread(Client, engine.supervisor.worker.address, authkey=b"wrong"), 20)
        await asyncio.wait_for(starting, 60)
        return await collect(engine, request())

    try:
        events = loop.run(scenario())
    finally:
        loop.run(engine.stop())
    assert engine.state == "stopped" and isinstance(events[-1], Done)
