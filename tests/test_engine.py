"""The real engine on the demo model: conversations, stopping, sampling, batching, cancellation."""

import asyncio
import json
import shutil

import pytest
from conftest import letter_token
from tokenizers import Tokenizer

from mlx_tui.engine.client import EngineClient
from mlx_tui.engine.config import EngineConfig
from mlx_tui.engine.demo import MODEL_DIR
from mlx_tui.engine.demo.conversations import CONVERSATIONS
from mlx_tui.engine.events import (
    Done,
    Error,
    PrefillProgress,
    RawText,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from mlx_tui.engine.request import GenerationRequest, Sampling

BY_NAME = {c["name"]: c for c in CONVERSATIONS}


def request_for(conversation: dict, **changes) -> GenerationRequest:
    given = {
        "messages": conversation["messages"][:-1],
        "tools": conversation["tools"],
        "enable_thinking": conversation.get("enable_thinking"),
    }
    return GenerationRequest(**given | changes)


async def collect(engine: EngineClient, request: GenerationRequest) -> list:
    return [event async for event in engine.generate(request)]


def text(events, kind=TextDelta) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


def reply_of(events) -> dict:
    """The events as an assistant message in the conversations' shape."""
    message = {"role": "assistant", "content": text(events)}
    if reasoning := text(events, ReasoningDelta):
        message["reasoning_content"] = reasoning
    calls = [e for e in events if isinstance(e, ToolCallEnd)]
    if calls:
        message["tool_calls"] = [(c.name, c.arguments) for c in calls]
    return message


def expected_reply(conversation: dict) -> dict:
    message = dict(conversation["messages"][-1])
    if "tool_calls" in message:
        message["tool_calls"] = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    return message


@pytest.mark.parametrize("name", list(BY_NAME))
def test_every_demo_conversation_is_reproduced(loop, engine, name):
    conversation = BY_NAME[name]
    events = loop.run(collect(engine, request_for(conversation)))
    assert reply_of(events) == expected_reply(conversation)
    done = events[-1]
    assert isinstance(done, Done)
    assert done.stop_reason == ("tool_calls" if "tool_calls" in conversation["messages"][-1] else "end")
    started = next(e for e in events if isinstance(e, Started))
    assert done.usage.prompt_tokens == started.prompt_tokens > 0
    assert done.usage.generated_tokens > 0
    assert any(isinstance(e, PrefillProgress) for e in events)


def test_tool_arguments_stream_as_json_pieces(loop, engine):
    events = loop.run(collect(engine, request_for(BY_NAME["parallel_calls"])))
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    assert len(ends) == 2
    for end in ends:
        pieces = [e.text for e in events if isinstance(e, ToolCallDelta) and e.index == end.index]
        assert len(pieces) > 1, "arguments should stream token by token, not arrive whole"
        assert "".join(pieces) == end.arguments_json
        assert json.loads(end.arguments_json) == end.arguments
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.id for s in starts] == [e.id for e in ends]
    assert "<tool_call>" in text(events, RawText)
    assert "<tool_call>" not in text(events)


def test_stop_string_split_across_tokens_is_never_streamed(loop, engine):
    conversation = BY_NAME["capital"]
    reply = conversation["messages"][-1]["content"]
    tokenizer_pieces = loop.run(collect(engine, request_for(conversation)))
    deltas = [e.text for e in tokenizer_pieces if isinstance(e, RawText)]
    boundary = len(deltas[0]) + len(deltas[1])
    stop = reply[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and stop not in reply[: boundary - 2]

    events = loop.run(collect(engine, request_for(conversation, stop=["never", stop])))
    assert text(events) == reply[: reply.index(stop)]
    done = events[-1]
    assert (done.stop_reason, done.stop_sequence) == ("stop_sequence", stop)


def test_max_tokens_ends_with_length(loop, engine):
    events = loop.run(collect(engine, request_for(BY_NAME["greeting"], max_tokens=3)))
    done = events[-1]
    assert (done.stop_reason, done.usage.generated_tokens) == ("length", 3)


def test_max_tokens_is_capped_by_the_server(loop, engine):
    events = loop.run(collect(engine, request_for(BY_NAME["greeting"], max_tokens=10**9)))
    assert events[-1].stop_reason == "end"


def seeded(seed: int) -> GenerationRequest:
    return request_for(BY_NAME["greeting"], sampling=Sampling(temperature=1.5, seed=seed), max_tokens=24)


async def run_together(engine, requests):
    import asyncio

    return await asyncio.gather(*(collect(engine, r) for r in requests))


def test_seed_reproduces_alone_and_in_a_batch(loop, engine):
    alone = text(loop.run(collect(engine, seeded(7))), RawText)
    batched = loop.run(run_together(engine, [seeded(7), seeded(8), seeded(9)]))
    assert text(batched[0], RawText) == alone
    assert len({text(b, RawText) for b in batched}) > 1, "different seeds should differ"


def test_four_concurrent_requests_decode_in_one_batch(loop, engine):
    names = ["capital", "weather_paris", "reasoning", "text_then_call"]
    before = loop.run(engine.stats())["batch_sizes"]
    results = loop.run(run_together(engine, [request_for(BY_NAME[n]) for n in names]))
    for name, events in zip(names, results, strict=False):
        assert reply_of(events) == expected_reply(BY_NAME[name])
    after = loop.run(engine.stats())["batch_sizes"]
    assert after.get(4, 0) > before.get(4, 0)


def test_output_tokens_are_the_replys_tokens_without_the_end_of_sequence(loop, engine):
    """As OpenAI's completion_tokens and Anthropic's output_tokens count: what was generated and sent, not the end
    token."""
    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    events = loop.run(collect(engine, request_for(BY_NAME["capital"])))
    done = events[-1]
    assert done.stop_reason == "end"
    assert done.usage.generated_tokens == len(tokenizer.encode(text(events, RawText), add_special_tokens=False).ids)


def test_a_request_left_while_generating_is_forgotten(loop, engine):
    async def start_then_leave():
        stream = engine.generate(
            request_for(BY_NAME["greeting"], max_tokens=5000, sampling=Sampling(logit_bias={letter_token(): 50.0})),
            request_id="left-1",
        )
        async for event in stream:
            if isinstance(event, TextDelta):
                break
        await stream.aclose()

    loop.run(start_then_leave())
    assert "left-1" not in engine.observer._generating, "one id kept per client disconnect"


def test_cancelled_request_leaves_the_batch(loop, engine):
    async def start_then_leave():
        stream = engine.generate(
            request_for(BY_NAME["greeting"], max_tokens=5000, sampling=Sampling(logit_bias={letter_token(): 50.0}))
        )
        async for event in stream:
            if isinstance(event, TextDelta):
                break
        await stream.aclose()
        return await engine.stats()

    stats = loop.run(start_then_leave())
    assert stats["running"] == stats["waiting"] == 0


def test_repetition_guard_ends_a_loop(loop, engine):
    request = request_for(BY_NAME["greeting"], sampling=Sampling(logit_bias={letter_token(): 50.0}), max_tokens=2000)
    done = loop.run(collect(engine, request))[-1]
    assert (done.stop_reason, done.note) == ("length", "repetition")
    assert done.usage.generated_tokens < 2000


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sampling": Sampling(temperature=-1)}, "temperature"),
        ({"sampling": Sampling(top_p=2)}, "top_p"),
        ({"sampling": Sampling(logit_bias={10**6: 1.0})}, "logit_bias"),
        ({"sampling": Sampling(top_k=10**6)}, "top_k"),
        ({"sampling": Sampling(min_p=1.0, temperature=1)}, "min_p"),
        ({"sampling": Sampling(seed=-1, temperature=1)}, "seed"),
        ({"sampling": Sampling(seed=2**64, temperature=1)}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"tool_choice": "no_such_tool"}, "no_such_tool"),
    ],
)
def test_bad_request_fails_alone(loop, engine, changes, message):
    events = loop.run(collect(engine, request_for(BY_NAME["weather_paris"], **changes)))
    assert len(events) == 1 and isinstance(events[0], Error)
    assert events[0].kind == "invalid_request" and message in events[0].message
    assert engine.restarts == 0 and engine.breaker.failures == 0


def test_prompt_longer_than_the_context_is_refused(loop, engine):
    long = "word " * engine.info["context_length"]
    events = loop.run(collect(engine, GenerationRequest(messages=[{"role": "user", "content": long}])))
    assert isinstance(events[0], Error)
    assert events[0].message.startswith("prompt is too long: ")
    assert f"> {engine.info['context_length'] - 1} maximum" in events[0].message


@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_tool_choice_forces_a_call_under_a_grammar(loop, engine, choice):
    events = loop.run(collect(engine, request_for(BY_NAME["weather_tokyo"], tool_choice=choice)))
    calls = [(e.name, e.arguments) for e in events if isinstance(e, ToolCallEnd)]
    assert calls == [("get_weather", {"city": "Tokyo"})]
    assert events[-1].stop_reason == "tool_calls"
    assert text(events, RawText).startswith("<tool_call>"), "the grammar writes the whole call, its opening too"
    assert len([e for e in events if isinstance(e, ToolCallDelta)]) > 1, "the arguments stream in pieces"
    started = next(e for e in events if isinstance(e, Started))
    assert "a call to get_weather" in started.constraint


def test_tool_choice_none_leaves_the_tools_out(loop, engine):
    with_tools = loop.run(engine.count_tokens(request_for(BY_NAME["weather_tokyo"])))
    without = loop.run(engine.count_tokens(request_for(BY_NAME["weather_tokyo"], tool_choice="none")))
    assert without < with_tools - 50


def test_count_tokens_matches_the_prompt(loop, engine):
    request = request_for(BY_NAME["tool_result"])
    counted = loop.run(engine.count_tokens(request))
    events = loop.run(collect(engine, request))
    assert counted == events[-1].usage.prompt_tokens


def test_model_path_to_a_copy_of_the_demo_model(loop, tmp_path):
    copy = tmp_path / "my-model"
    shutil.copytree(MODEL_DIR, copy)
    phases = []
    engine = EngineClient(
        EngineConfig(model=str(copy), transcripts_dir=None, cache_dir=None),
        on_progress=lambda p, f: phases.append((p, f)),
    )
    loop.run(engine.start())
    try:
        conversation = BY_NAME["weather_tokyo"]
        events = loop.run(collect(engine, request_for(conversation)))
        assert reply_of(events) == expected_reply(conversation)
        assert phases[-1] == ("weights", 1.0)
        assert engine.info["tool_parser"] == "json_tools" and engine.info["thinking"]
    finally:
        loop.run(engine.stop())


def test_a_request_whose_kv_could_outgrow_max_kv_gb_is_refused(make_engine, loop):
    engine = make_engine(max_kv_gb=0.001)  # the demo model's KV takes 1 KiB a token
    events = loop.run(collect(engine, request_for(BY_NAME["capital"], max_tokens=100)))
    assert events[-1].usage.generated_tokens > 0, "a small request fits"
    events = loop.run(collect(engine, request_for(BY_NAME["capital"], max_tokens=30000)))
    assert isinstance(events[0], Error) and "--max-kv-gb" in events[0].message


def test_greedy_output_is_the_same_with_either_blas(make_engine, loop, engine):
    reference = make_engine(blas="reference")
    assert reference.blas == "reference" and engine.blas.startswith("openblas")
    for name in ("parallel_calls", "reasoning_multi_turn", "tool_result"):
        texts = [text(loop.run(collect(e, request_for(BY_NAME[name]))), RawText) for e in (engine, reference)]
        assert texts[0] == texts[1]


def test_a_decoding_stream_is_sent_once_an_interval(make_engine, loop, engine):
    """Its first token goes out at once, the rest together at the interval or the end, also while another request
    waits for its slot; the text is unchanged."""
    paced = make_engine(stream_interval="1000", speculate="off", max_concurrency=1)  # no draft joins tokens
    request = request_for(BY_NAME["greeting"], max_tokens=40, sampling=Sampling(logit_bias={letter_token(): 50.0}))

    async def two_at_once():
        return await asyncio.gather(collect(paced, request), collect(paced, request))

    expected = text(loop.run(collect(engine, request)))
    for events in loop.run(two_at_once()):
        pieces = [e.text for e in events if isinstance(e, TextDelta)]
        assert events[-1].usage.generated_tokens == 40 and pieces[0] == "a"
        assert len(pieces) <= 4, f"40 tokens in {len(pieces)} sends, within a second"
        assert "".join(pieces) == expected
    assert paced.info["stream_interval_ms"] == 1000 and engine.info["stream_interval_ms"] == 50  # auto, on the CPU
