"""The dashboard's state model: bus events in, what the views show out."""

import asyncio
import json
from contextlib import aclosing
from dataclasses import asdict

import pytest

from mlx_tui.engine.bus import EventBus, RequestStep, decode, encode
from mlx_tui.engine.events import Done, RawText, Started, Timings, ToolCallEnd, Usage
from mlx_tui.engine.transcripts import Transcripts
from mlx_tui.tui.changes import Changes
from mlx_tui.tui.chart import nice_ceiling
from mlx_tui.tui.requests import cells
from mlx_tui.tui.state import KEEP, State, TranscriptRecord, percentile
from mlx_tui.tui.transcripts import SENT_TAIL, raw, sent


def request(id: str, phase: str, **data) -> RequestStep:
    return RequestStep(id=id, phase=phase, time=100.0, **data)


def test_a_request_row_follows_its_lifecycle():
    state = State()
    state.apply(request("r1", "queued", source="anthropic", client="claude-cli"))
    state.apply(request("r1", "prefill", prompt_tokens=900, cached_tokens=600))
    state.apply(request("r1", "prefill", done=256, total=300))
    row = state.requests["r1"]
    assert (row.phase, row.prompt_tokens, row.cached_tokens, row.prefill_done) == ("prefill", 900, 600, 256)
    state.apply(
        request(
            "r1",
            "done",
            stop_reason="end",
            note=None,
            prompt_tokens=900,
            cached_tokens=600,
            generated_tokens=40,
            ttft_s=0.2,
            decode_s=0.5,
        )
    )
    assert (row.phase, row.stop_reason, row.tokens_per_s) == ("done", "end", 80.0)
    state.apply(request("r2", "queued"))
    state.apply(request("r2", "error", error_kind="overloaded", message="the queue is full"))
    assert state.requests["r2"].error == "overloaded: the queue is full"
    assert state.ttft_p50 == 0.2


def test_percentiles_and_hit_rates():
    assert percentile([], 0.5) is None
    assert percentile([0.1, 0.2, 0.3, 0.4], 0.5) == 0.2
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    state = State()
    assert state.token_hit_rate is None and state.request_hit_rate is None
    cache = {"prompt_tokens": 1000, "reused_tokens": 750, "lookups": 4, "hits": 1}
    state.apply(decode({"kind": "stats", "time": 1.0, "decode_tps": 12.5, "cache": cache}))
    assert (state.token_hit_rate, state.request_hit_rate, list(state.decode_tps)) == (0.75, 0.25, [12.5])


@pytest.mark.asyncio
async def test_transcript_records_match_the_recorders_shape():
    """Built from the bus alone, a record exports what the engine's recorder keeps."""
    bus = EventBus()
    state = State()
    recorder = Transcripts(bus, None)
    t = recorder.open("r1", "openai", "curl/8", received={"messages": []})
    recorder.record(t, Started(12, 4, "<|im_start|>user\nhi<|im_end|>\n", 10))
    recorder.record(t, RawText('<tool_call>{"name": "f", "arguments": {}}</tool_call>'))
    recorder.record(t, ToolCallEnd(0, "call_1", "f", {}, "{}"))
    recorder.record(t, Done("tool_calls", Usage(12, 4, 9), Timings(0, 0.1, 0.2)))
    recorder.sent(t, "data: ...")
    recorder.finish(t)
    state.apply(request("r1", "queued"))
    for event in bus.recent:
        state.apply(event)
    assert state.transcripts["r1"].as_dict() == asdict(t)
    assert state.requests["r1"].tool_calls == 1


@pytest.mark.asyncio
async def test_a_constrained_request_is_marked_and_its_transcript_says_where_the_grammar_began():
    bus = EventBus()
    state = State()
    recorder = Transcripts(bus, None)
    t = recorder.open("r1", "openai", "", received=None)
    recorder.record(t, Started(12, 0, "prompt", 0, "free until </think>, then a json_schema reply", "</think>"))
    recorder.record(t, RawText("<think>\nhm\n"))
    assert t.constrained_at is None, "still free"
    recorder.record(t, RawText('</think>\n\n{"a": 1}'))
    recorder.finish(t)
    assert t.raw[t.constrained_at :] == '\n\n{"a": 1}'
    state.apply(request("r1", "queued", source="openai"))
    state.apply(request("r1", "prefill", prompt_tokens=12, cached_tokens=0, constraint=t.constraint))
    for event in bus.recent:
        state.apply(event)
    record = state.transcripts["r1"]
    assert record.as_dict() == asdict(t)
    assert "bound by the grammar from character" in raw(record).plain
    assert "◆" in cells(state.requests["r1"])[2].plain
    state.apply(request("r2", "queued", source="openai"))
    assert cells(state.requests["r2"])[2] == "openai", "a free request is not marked"


@pytest.mark.asyncio
async def test_a_streaming_transcript_is_published_a_few_times_a_second_and_whole():
    """Per-token growth is held back between publications; the bus still gets all of it, in order."""
    bus = EventBus(history=1000)
    recorder = Transcripts(bus, None)
    t = recorder.open("r1", "openai", "curl/8", received=None)
    recorder.record(t, Started(12, 0, "<|im_start|>user\nhi<|im_end|>\n", 0))
    for i in range(50):
        recorder.record(t, RawText(f"a{i} "))
        recorder.sent(t, f"chunk a{i}")
    steps = [e.step for e in bus.recent]
    assert steps == ["open", "prompt", "raw"], "only the first token goes out at once"
    async with aclosing(bus.subscribe(replay=True)) as events:
        for _ in steps:
            await anext(events)
        raw, sent = [await asyncio.wait_for(anext(events), Transcripts.INTERVAL + 5) for _ in range(2)]
    assert raw.step == "raw" and raw.text == "".join(f"a{i} " for i in range(1, 50))
    assert sent.step == "sent" and sent.texts == [f"chunk a{i}" for i in range(50)]
    for i in range(50):
        recorder.record(t, RawText(f"b{i} "))
        recorder.sent(t, f"chunk b{i}")
    recorder.record(t, ToolCallEnd(0, "call_1", "f", {}, "{}"))
    recorder.finish(t)
    steps = [e.step for e in bus.recent]
    assert len(steps) < 12 and steps[-2:] == ["tool_call", "finish"]
    state = State()
    for event in bus.recent:
        state.apply(event)
    assert state.transcripts["r1"].as_dict() == asdict(t)
    assert not recorder.unpublished


def test_what_a_hidden_view_has_not_drawn_stays_bounded():
    state, unseen = State(), Changes()
    for i in range(KEEP + 50):
        event = request(f"r{i}", "queued")
        unseen.note(state.apply(event), event)
        unseen.forget_gone(state)
    assert unseen.requests == set(state.requests) and len(unseen.requests) == KEEP


def test_a_running_transcript_shows_the_last_pieces_sent_and_all_once_it_ends():
    t = TranscriptRecord("r1", sent=[f"chunk {i}" for i in range(SENT_TAIL + 50)])
    lines = sent(t).plain.split("\n")
    assert lines[0].startswith("… 50 earlier pieces") and lines[1:] == t.sent[50:]
    t.finished = 1.0
    assert sent(t).plain.split("\n") == t.sent


def test_a_breaker_from_stats_counts_down_to_its_probe():
    state = State(clock=lambda: 110.0)
    breaker = {"state": "open", "failures": 3, "next_probe_s": 30.0}
    state.apply(decode({"kind": "stats", "time": 100.0, "breaker": breaker}))
    assert state.breaker.state == "open" and state.breaker.probe_in(state.clock()) == 20.0


def test_chart_scale_starts_at_zero_and_ends_round():
    assert [nice_ceiling(v) for v in (0, 0.4, 7, 120, 180, 2100)] == [1, 1, 10, 200, 200, 5000]


def test_bus_events_go_through_json_and_back_unchanged():
    """The codec `/v1/events` and `--attach` share: the dashboard applies the same events attached and in process."""
    bus = EventBus()
    recorder = Transcripts(bus, None)
    t = recorder.open("r1", "openai", "curl/8", received={"messages": []})
    recorder.record(t, Started(12, 4, "<|im_start|>user\nhi<|im_end|>\n", 10))
    recorder.record(t, ToolCallEnd(0, "call_1", "f", {"x": 1}, '{"x": 1}'))
    recorder.finish(t)
    stats = decode({"kind": "stats", "time": 1.0, "running": 1, "cache": {"hits": 2}, "state": "ready", "pid": 7})
    events = [*bus.recent, request("r1", "done", stop_reason="end", prompt_tokens=12, ttft_s=0.5), stats]
    assert [decode(json.loads(json.dumps(encode(e)))) for e in events] == events
    wire = {"kind": "stats", "time": 1.0, "running": 1, "cache": {"hits": 2}, "state": "ready", "pid": 7}
    assert encode(stats) == wire
