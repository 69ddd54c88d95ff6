"""Snapshots of each screen, fed fixed bus events and a fixed clock (no engine)."""

import asyncio
import logging
import time

import pytest

from mlx_tui.engine.bus import decode
from mlx_tui.engine.events import (
    Done,
    RawText,
    ReasoningDelta,
    Started,
    TextDelta,
    Timings,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from mlx_tui.tui.app import MlxTui
from mlx_tui.tui.logview import LogView
from mlx_tui.tui.state import ConnectionChange, DashboardEvent, Info, State

T0 = 1_750_000_000.0  # all times are offsets from here, shown in UTC
SIZE = (140, 42)


def at(offset: float, kind: str, **data) -> dict:
    return {"kind": kind, "time": T0 + offset, **data}


def dashboard_event(data: dict) -> DashboardEvent:
    """The event as the dashboard's source gives it: a bus event through the codec, or the source's own."""
    data = dict(data)
    if data["kind"] == "info":
        time = data.pop("time")
        del data["kind"]
        return Info(values=data, time=time)
    if data["kind"] == "connection":
        del data["kind"]
        return ConnectionChange(**data)
    return decode(data)


def stats(offset: float, decode: float, prefill: float, running: int = 0, waiting: int = 0) -> dict:
    return at(
        offset,
        "stats",
        running=running,
        waiting=waiting,
        batch_sizes={"1": 3},
        prompt_tokens_total=9120,
        prefill_tokens_total=3340,
        generation_tokens_total=412,
        decode_tps=decode,
        prefill_tps=prefill,
        cache={
            "entries": 3,
            "ram_bytes": 48 * 2**20,
            "ram_budget": 3 * 2**30,
            "lookups": 4,
            "hits": 2,
            "prompt_tokens": 9120,
            "reused_tokens": 5780,
            "evictions": 0,
        },
        memory={"active": 310 * 2**20, "peak": 402 * 2**20, "running_kv": 6 * 2**20},
    )


WEATHER_CALL = {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
)
RAW = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def transcript(offset: float, id: str, source: str, client: str, *steps: dict, summary: dict) -> list[dict]:
    base = {
        "id": id,
        "source": source,
        "client": client,
        "started": T0 + offset,
        "prompt_tokens": 0,
        "cached_tokens": 0,
        "tool_calls": 0,
        "parse_errors": 0,
        "stop_reason": None,
        "error": None,
        "finished": None,
    }
    events = [
        at(
            offset,
            "transcript",
            id=id,
            step="open",
            summary=base,
            received={
                "model": "claude-sonnet-4",
                "max_tokens": 1024,
                "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            },
        )
    ]
    events += [at(offset + 0.1 * i, "transcript", id=id, **step) for i, step in enumerate(steps, 1)]
    events.append(
        at(offset + 1, "transcript", id=id, step="finish", summary={**base, **summary, "finished": T0 + offset + 1})
    )
    return events


EVENTS = [
    at(
        0,
        "info",
        model="mlx-tui-demo",
        address="http://127.0.0.1:8080",
        started_at=T0,
        blas="openblas",
        dtype="bfloat16",
        tool_parser="json_tools",
        context_length=2048,
    ),
    at(0, "worker", state="loading", pid=4242, restarts=0),
    at(1, "worker", state="loading", phase="weights", fraction=1.0),
    at(2, "worker", state="ready", pid=4242, restarts=0),
    *[
        stats(3 + i, decode, prefill)
        for i, (decode, prefill) in enumerate(
            [
                (0, 0),
                (0, 0),
                (42.0, 910.0),
                (118.5, 0),
                (96.2, 2400.0),
                (0, 0),
                (64.0, 180.0),
                (131.0, 0),
                (12.5, 0),
                (0, 0),
            ]
            * 4
        )
    ],
    at(20, "request", id="msg_01", phase="queued", source="anthropic", client="claude-cli/2.1.33 (external, cli)"),
    at(20.1, "request", id="msg_01", phase="prefill", prompt_tokens=3120, cached_tokens=0),
    at(20.6, "request", id="msg_01", phase="generating"),
    at(
        21,
        "request",
        id="msg_01",
        phase="done",
        stop_reason="tool_calls",
        note=None,
        prompt_tokens=3120,
        cached_tokens=0,
        generated_tokens=24,
        ttft_s=0.48,
        decode_s=0.31,
    ),
    *transcript(
        20,
        "msg_01",
        "anthropic",
        "claude-cli/2.1.33 (external, cli)",
        {"step": "prompt", "prompt": PROMPT, "cached_chars": 0},
        {"step": "raw", "text": RAW},
        {"step": "tool_call", "call": WEATHER_CALL},
        {"step": "sent", "texts": ['{"type":"tool_use","name":"get_weather"}']},
        summary={"prompt_tokens": 3120, "tool_calls": 1, "stop_reason": "tool_calls"},
    ),
    at(30, "request", id="chatcmpl-7", phase="queued", source="openai", client="OpenAI/Python 1.99.0"),
    at(30.1, "request", id="chatcmpl-7", phase="prefill", prompt_tokens=3140, cached_tokens=3072),
    at(
        30.3,
        "request",
        id="chatcmpl-7",
        phase="done",
        stop_reason="end",
        note=None,
        prompt_tokens=3140,
        cached_tokens=3072,
        generated_tokens=11,
        ttft_s=0.09,
        decode_s=0.12,
    ),
    *transcript(
        30,
        "chatcmpl-7",
        "openai",
        "OpenAI/Python 1.99.0",
        {"step": "prompt", "prompt": PROMPT, "cached_chars": 96},
        {"step": "raw", "text": "The capital of France is Paris."},
        {"step": "sent", "texts": ["The capital of France is Paris."]},
        summary={"prompt_tokens": 3140, "cached_tokens": 3072, "stop_reason": "end"},
    ),
    at(35, "request", id="msg_02", phase="queued", source="anthropic", client="claude-cli/2.1.33 (external, cli)"),
    at(
        35.2,
        "request",
        id="msg_02",
        phase="done",
        stop_reason="end",
        note=None,
        prompt_tokens=2860,
        cached_tokens=2708,
        generated_tokens=31,
        ttft_s=0.12,
        decode_s=0.35,
    ),
    *transcript(
        35,
        "msg_02",
        "anthropic",
        "claude-cli/2.1.33 (external, cli)",
        {"step": "prompt", "prompt": PROMPT, "cached_chars": 96},
        {"step": "raw", "text": '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'},
        {
            "step": "parse_error",
            "error": {
                "message": "invalid JSON in tool call: Expecting value",
                "text": '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>',
            },
        },
        {"step": "sent", "texts": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>']},
        summary={"prompt_tokens": 2860, "cached_tokens": 2708, "parse_errors": 1, "stop_reason": "end"},
    ),
    at(40, "request", id="msg_03", phase="queued", source="anthropic", client="claude-cli/2.1.33 (external, cli)"),
    at(
        40.1,
        "request",
        id="msg_03",
        phase="error",
        error_kind="invalid_request",
        message="the prompt is longer than the model's context (2048 tokens)",
    ),
    at(44, "request", id="msg_04", phase="queued", source="anthropic", client="claude-cli/2.1.33 (external, cli)"),
    at(44.1, "request", id="msg_04", phase="prefill", prompt_tokens=9120, cached_tokens=0),
    at(45, "request", id="msg_04", phase="prefill", done=3584, total=9120),
    stats(46, 0.0, 3584.0, running=1, waiting=1),
]

CHAT_REPLY = [
    Started(41, 0),
    ReasoningDelta("The user asks about the weather; I should call the tool."),
    TextDelta("Let me check the weather in Paris."),
    RawText(RAW),
    ToolCallStart(0, "call_1", "get_weather"),
    ToolCallDelta(0, '{"city": "Paris"}'),
    ToolCallEnd(0, "call_1", "get_weather", {"city": "Paris"}, '{"city": "Paris"}'),
    Done("tool_calls", Usage(41, 0, 24), Timings(0.01, 0.12, 0.3)),
]


def record(
    offset: float, level: int, logger: str, message: str, error: BaseException | None = None
) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error else None
    return logging.makeLogRecord(
        {
            "name": logger,
            "levelno": level,
            "levelname": logging.getLevelName(level),
            "msg": message,
            "created": T0 + offset,
            "exc_info": exc_info,
        }
    )


LOG = [
    record(0.1, logging.INFO, "mlx_tui.tui.local", "serving the API at http://127.0.0.1:8080"),
    record(0.2, logging.INFO, "uvicorn.error", "Started server process [4240]"),
    record(0.2, logging.INFO, "uvicorn.error", "Application startup complete."),
    record(
        2.4, logging.INFO, "mlx_tui.tui.local", "warmed the prefix cache with 3072 tokens from prompts/claude-code.json"
    ),
    record(
        2.6,
        logging.WARNING,
        "mlx_tui.engine",
        "worker: huggingface/tokenizers: The current process just got forked, "
        "after parallelism has already been used. Disabling parallelism to avoid deadlocks...",
    ),
    record(
        41.0,
        logging.ERROR,
        "uvicorn.error",
        "Exception in ASGI application",
        ConnectionResetError("the client closed the connection"),
    ),
]


class Replay:
    """A backend that replays fixed events and log records, and answers every chat with the same reply."""

    address = "http://127.0.0.1:8080"

    def start(self):
        for r in LOG:  # through the loggers, as a real session's records go
            logging.getLogger(r.name).handle(r)

    async def stop(self):
        pass

    async def events(self):
        for event in EVENTS:
            yield dashboard_event(event)
        await asyncio.Event().wait()

    async def chat(self, request):
        for event in CHAT_REPLY:
            yield event

    async def transcript(self, id):
        return None


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def app() -> MlxTui:
    return MlxTui(Replay(), State(clock=lambda: T0 + 47))


async def settle(pilot):
    """Let the replayed events be applied and drawn."""
    while len(pilot.app.state.requests) < 5 or pilot.app.state.stats.get("running") != 1:
        await pilot.pause()
    pilot.app.flush()
    await pilot.pause()


def test_dashboard(snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, run_before=settle)


def test_chat(snap_compare):
    async def chat(pilot):
        await settle(pilot)
        await pilot.press("2", *"Paris weather?", "enter")
        while len(pilot.app.query_one("ChatView").history) < 2:
            await pilot.pause()

    assert snap_compare(app(), terminal_size=SIZE, run_before=chat)


def test_transcripts_with_a_parsed_call(snap_compare):
    async def transcripts(pilot):
        await settle(pilot)
        await pilot.press("3", "up", "up")

    assert snap_compare(app(), terminal_size=SIZE, run_before=transcripts)


def test_transcripts_errors_only(snap_compare):
    async def errors(pilot):
        await settle(pilot)
        await pilot.press("3", "x")
        await pilot.pause()

    assert snap_compare(app(), terminal_size=SIZE, run_before=errors)


def test_log(snap_compare):
    async def log(pilot):
        await settle(pilot)
        await pilot.press("4")
        while len(pilot.app.query_one(LogView).lines) < len(LOG):  # written when the log is shown
            await pilot.pause()

    assert snap_compare(app(), terminal_size=SIZE, run_before=log)


def test_help(snap_compare):
    async def help(pilot):
        await settle(pilot)
        await pilot.press("question_mark")

    assert snap_compare(app(), terminal_size=SIZE, run_before=help)
