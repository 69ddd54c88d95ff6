"""The worker as an mlx.distributed group: two local ranks started by mlx.launch, tensor parallel on the demo model."""

import asyncio
import os
import signal

import pytest
from conftest import letter_token, start_engine

from mlx_tui.engine.demo.conversations import CONVERSATIONS
from mlx_tui.engine.events import Done, Error, RawText, Started, TextDelta, ToolCallEnd
from mlx_tui.engine.request import Request, Sampling

BY_NAME = {c["name"]: c for c in CONVERSATIONS}


def request_for(name: str, **changes) -> Request:
    c = BY_NAME[name]
    given = {"messages": c["messages"][:-1], "tools": c["tools"], "enable_thinking": c.get("enable_thinking")}
    return Request(**given | changes)


def endless() -> Request:
    """Generates until stopped: one token forced (the engines here have the loop guard off)."""
    return request_for("greeting", sampling=Sampling(logit_bias={letter_token(): 50.0}), max_tokens=100_000)


async def collect(engine, request: Request) -> list:
    return [e async for e in engine.generate(request)]


def raw(events) -> str:
    return "".join(e.text for e in events if isinstance(e, RawText))


def started(events) -> Started:
    return next(e for e in events if isinstance(e, Started))


@pytest.fixture(scope="module")
def group(loop):
    """An engine whose worker is two ranks on 127.0.0.1, each holding half of every layer."""
    engine = start_engine(loop, ranks=2, loop_window=0)
    yield engine
    loop.run(engine.stop())


def test_the_group_reports_its_ranks(group):
    ranks = group.info["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["pid"] for r in ranks}) == 2 and all(r["host"] for r in ranks)
    assert group.info["shard"] == "tensor"


@pytest.mark.parametrize("name", ["capital", "weather_paris", "reasoning", "text_then_call"])
def test_greedy_output_is_the_same_as_one_rank(loop, engine, group, name):
    one, two = (loop.run(collect(e, request_for(name))) for e in (engine, group))
    assert raw(two) == raw(one) and raw(one)
    assert [(e.name, e.arguments) for e in two if isinstance(e, ToolCallEnd)] == [
        (e.name, e.arguments) for e in one if isinstance(e, ToolCallEnd)
    ]
    assert isinstance(two[-1], Done) and two[-1].stop_reason == one[-1].stop_reason


def test_the_next_turn_hits_the_cache_on_every_rank(loop, group):
    first = loop.run(collect(group, request_for("weather_paris")))
    second = loop.run(collect(group, request_for("tool_result")))
    done = first[-1]
    # a hit on rank 0 that rank 1 did not share would desynchronise the ranks and fail the request
    assert started(second).cached_tokens == done.usage.prompt_tokens + done.usage.generated_tokens
    assert isinstance(second[-1], Done) and "".join(e.text for e in second if isinstance(e, TextDelta))


def test_two_concurrent_requests_decode_in_one_batch(loop, engine, group):
    names = ["capital", "weather_paris"]
    before = loop.run(group.stats())["batch_sizes"]

    async def together():
        return await asyncio.gather(*(collect(group, request_for(n, max_tokens=40)) for n in names))

    results = loop.run(together())
    for name, events in zip(names, results):
        assert raw(events) == raw(loop.run(collect(engine, request_for(name, max_tokens=40))))
    assert loop.run(group.stats())["batch_sizes"].get(2, 0) > before.get(2, 0)


def test_a_cancelled_request_leaves_every_rank(loop, group):
    async def start_then_leave():
        stream = group.generate(endless())
        async for event in stream:
            if isinstance(event, TextDelta):
                break
        await stream.aclose()
        return await group.stats()

    stats = loop.run(start_then_leave())
    assert stats["running"] == stats["waiting"] == 0
    # the ranks still step together: a request after the cancellation runs to its end
    assert isinstance(loop.run(collect(group, request_for("capital")))[-1], Done)


def test_killing_rank_1_mid_stream_restarts_the_whole_group(loop, make_engine):
    engine = make_engine(ranks=2, loop_window=0)
    rank1 = engine.info["ranks"][1]["pid"]

    async def until_restarted():
        while engine.restarts < 1 or engine.state != "ready":
            await asyncio.sleep(0.05)

    async def scenario():
        events = []
        async for event in engine.generate(endless()):
            events.append(event)
            if isinstance(event, RawText) and sum(isinstance(e, RawText) for e in events) == 3:
                os.kill(rank1, signal.SIGKILL)
        await asyncio.wait_for(until_restarted(), 120)
        return events, await collect(engine, request_for("capital"))

    events, after = loop.run(scenario())
    assert isinstance(events[-1], Error) and events[-1].kind == "engine"
    assert isinstance(after[-1], Done)
    assert engine.info["ranks"][1]["pid"] != rank1
    assert engine.breaker.failures == 0, "the failure was counted, then the success reset it"
