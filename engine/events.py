"""The events one request's stream carries back from the worker, in order of appearance."""

from dataclasses import dataclass
from typing import Any, Literal

StopReason = Literal["end", "length", "stop_sequence", "tool_calls"]
ErrorKind = Literal["invalid_request", "overloaded", "engine", "internal", "timeout"]


@dataclass(slots=True, frozen=True)
class Queued:
    """Waiting for a batch slot; `ahead` requests are in front of it."""

    ahead: int


@dataclass(slots=True, frozen=True)
class Started:
    """The prompt is rendered; its first `cached_tokens` (`cached_chars` of its text) come from the prefix cache.

    `constraint` describes the grammar the reply runs under ("" for none); it binds the reply
    after the first `constraint_from` in the generated text ("": from its start).
    """

    prompt_tokens: int
    cached_tokens: int
    prompt_text: str = ""
    cached_chars: int = 0
    constraint: str = ""
    constraint_from: str = ""


@dataclass(slots=True, frozen=True)
class PrefillProgress:
    done: int
    total: int


@dataclass(slots=True, frozen=True)
class TextDelta:
    text: str


@dataclass(slots=True, frozen=True)
class ReasoningDelta:
    text: str


@dataclass(slots=True, frozen=True)
class RawText:
    """The model's text as generated, markup included (for transcripts)."""

    text: str


@dataclass(slots=True, frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(slots=True, frozen=True)
class ToolCallDelta:
    """A piece of the call's arguments as JSON text; the pieces join to `ToolCallEnd.arguments_json`."""

    index: int
    text: str


@dataclass(slots=True, frozen=True)
class ToolCallEnd:
    index: int
    id: str
    name: str
    arguments: dict[str, Any]
    arguments_json: str


@dataclass(slots=True, frozen=True)
class ToolCallAbandoned:
    """A call begun (ToolCallStart) that ends without parsing: its markup broke, or generation stopped inside it.

    `completion` is the shortest text (closing quote and brackets) that makes the
    arguments sent so far valid JSON; a ParseError comes just before it.
    """

    index: int
    id: str
    completion: str


@dataclass(slots=True, frozen=True)
class ParseError:
    """Tool-call markup that did not parse; `text` is the markup, sent on as text unless the call had begun."""

    message: str
    text: str


@dataclass(slots=True, frozen=True)
class Usage:
    """Token counts; `reasoning_tokens` are the generated tokens inside the reasoning block.

    `drafted_tokens` are the generated tokens that came from accepted speculative drafts.
    """

    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    reasoning_tokens: int = 0
    drafted_tokens: int = 0


@dataclass(slots=True, frozen=True)
class Timings:
    queued_s: float
    prefill_s: float
    decode_s: float


@dataclass(slots=True, frozen=True)
class Done:
    """The end of a generation.

    `stop_reason` is "end" (the model's end of turn), "length" (max tokens or the
    repetition guard, see `note`), "stop_sequence" (see `stop_sequence`) or
    "tool_calls" (the turn ended after tool calls).
    """

    stop_reason: StopReason
    usage: Usage
    timings: Timings
    stop_sequence: str | None = None
    note: str | None = None


@dataclass(slots=True, frozen=True)
class Error:
    """The request failed.

    `kind` is "invalid_request" (the request cannot run as asked), "overloaded" (refused for
    now), "engine" (the worker died or its batched step failed; a retry can succeed),
    "internal" (this request's own processing failed) or "timeout" (`--request-timeout`).
    """

    kind: ErrorKind
    message: str


Event = (
    Queued
    | Started
    | PrefillProgress
    | TextDelta
    | ReasoningDelta
    | RawText
    | ToolCallStart
    | ToolCallDelta
    | ToolCallEnd
    | ToolCallAbandoned
    | ParseError
    | Done
    | Error
)
TERMINAL = (Done, Error)
STREAMED = (TextDelta, ReasoningDelta, ToolCallDelta)


def coalesced(events: list[tuple[str, Event]]) -> list[tuple[str, Event]]:
    """Request-tagged events with each request's adjacent pieces of one stream joined.

    A step that keeps a speculative draft gives a request several tokens at once; they go out
    as one piece, as vLLM sends them, rather than one event and one SSE frame a token. Raw
    text stays one piece a token (for transcripts) and does not part the pieces it interleaves;
    any other event ends the join.
    """
    out: list[tuple[str, Event]] = []
    piece: dict[str, int] = {}  # where in `out` the request's last piece of streamed text stands
    for rid, event in events:
        if isinstance(event, STREAMED):
            if (i := piece.get(rid)) is not None and (both := joined(out[i][1], event)) is not None:
                out[i] = (rid, both)
                continue
            piece[rid] = len(out)
        elif not isinstance(event, RawText):
            piece.pop(rid, None)
        out.append((rid, event))
    return out


def joined(a: Event, b: Event) -> Event | None:
    """`a` and then `b` as one event, where both are pieces of the same stream."""
    match a, b:
        case TextDelta(x), TextDelta(y):
            return TextDelta(x + y)
        case ReasoningDelta(x), ReasoningDelta(y):
            return ReasoningDelta(x + y)
        case ToolCallDelta(i, x), ToolCallDelta(j, y) if i == j:
            return ToolCallDelta(i, x + y)
    return None
