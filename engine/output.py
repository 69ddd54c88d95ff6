"""Turn one request's generated text into events: stop strings, reasoning and tool-call markup."""

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from .events import (
    Event,
    ParseError,
    RawText,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)


def held_prefix(text: str, markers: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a marker."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


class StopMatcher:
    """Finds stop strings in streamed text, holding back anything that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """The text safe to release and the stop string matched, if any."""
        if not self.stops:
            return text, None
        self.pending += text
        found = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            i, stop = min(found)
            out, self.pending = self.pending[:i], ""
            return out, stop
        keep = held_prefix(self.pending, self.stops)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


NAME_RE = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
ARGUMENTS_RE = re.compile(r'"arguments"\s*:\s*')


class JsonArgumentStream:
    """Streams the `arguments` value of a JSON-shaped call body as it is generated.

    Tracks strings, escapes and nesting to know where the value ends, so the pieces
    it yields join to exactly the arguments' JSON text.
    """

    def __init__(self):
        self.name: str | None = None
        self.start: int | None = None
        self.pos = 0
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.begun = False
        self.ended = False

    def head(self, body: str) -> str | None:
        """The call's name once both it and the start of the arguments are known."""
        name = NAME_RE.search(body)
        args = ARGUMENTS_RE.search(body)
        if not (name and args and name.start() < args.start()):
            return None
        self.name = json.loads(f'"{name.group(1)}"')
        self.start = self.pos = args.end()
        return self.name

    def advance(self, body: str) -> str:
        """The new part of the arguments' text in `body`."""
        begin = self.pos
        for i in range(self.pos, len(body)):
            c = body[i]
            if not self.begun:
                if c.isspace():
                    begin = i + 1
                    continue
                self.begun = True
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return self._end(body, begin, i + 1)
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return self._end(body, begin, i + 1)
        self.pos = len(body)
        return body[begin:]

    def _end(self, body: str, begin: int, end: int) -> str:
        self.ended = True
        self.pos = end
        return body[begin:end]


class MarkupParser:
    """Splits model text into text, reasoning and tool calls while it streams.

    `think` and `tool` are (start, end) tag pairs or None. `parse_tool` is the
    tokenizer's tool parser, called on each complete call body with `tools`.
    """

    TEXT, REASONING, TOOL = "text", "reasoning", "tool"

    def __init__(
        self,
        think: tuple[str, str] | None,
        tool: tuple[str, str] | None,
        parse_tool: Callable[..., Any] | None,
        tools: list[dict] | None,
        state: str = TEXT,
        body: str = "",
    ):
        self.think = think
        self.tool = tool if parse_tool else None
        self.parse_tool = parse_tool
        self.tools = tools
        self.state = state
        self.buffer = body
        self.calls = 0
        self.strip_next = True
        self.call: JsonArgumentStream | None = None
        self.call_id = ""
        self.streamed: list[str] = []
        if state == self.TOOL:
            self._open_call()

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """Flush what is held back; an unclosed tool call is parsed as if closed."""
        events: list[Event] = []
        if self.state == self.TOOL:
            self._close_call(self.buffer, events)
        elif self.state == self.REASONING:
            self._emit(ReasoningDelta, self.buffer.rstrip(), events)
        else:
            self._emit(TextDelta, self.buffer.rstrip(), events)
        self.buffer = ""
        return events

    def _step(self, events: list[Event]) -> bool:
        """Consume what can be decided from the buffer; True if a tag was crossed."""
        if self.strip_next:
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return False
            self.strip_next = False
        if self.state == self.TOOL:
            return self._step_tool(events)
        if self.state == self.REASONING:
            tags = {self.think[1]: self.TEXT}
            kind = ReasoningDelta
        else:
            tags = {t[0]: s for t, s in ((self.think, self.REASONING), (self.tool, self.TOOL)) if t}
            kind = TextDelta
        found = [(i, tag) for tag in tags if (i := self.buffer.find(tag)) >= 0]
        if found:
            i, tag = min(found)
            self._emit(kind, self.buffer[:i].rstrip(), events)
            self.buffer = self.buffer[i + len(tag) :]
            self.state = tags[tag]
            self.strip_next = self.state != self.TOOL
            if self.state == self.TOOL:
                self._open_call()
            return True
        keep = held_prefix(self.buffer, list(tags))
        cut = len(self.buffer) - keep
        released = self.buffer[:cut]
        trailing = len(released) - len(released.rstrip())
        self._emit(kind, released[: len(released) - trailing], events)
        self.buffer = self.buffer[cut - trailing :]
        return False

    def _step_tool(self, events: list[Event]) -> bool:
        end = self.buffer.find(self.tool[1])
        body = self.buffer if end < 0 else self.buffer[:end]
        self._stream_arguments(body, events)
        if end < 0:
            return False
        self._close_call(body, events)
        self.buffer = self.buffer[end + len(self.tool[1]) :]
        self.state = self.TEXT
        self.strip_next = True
        return True

    def _open_call(self):
        self.call = JsonArgumentStream() if self.buffer.lstrip()[:1] in ("", "{") else None
        self.call_id = uuid.uuid4().hex[:24]
        self.streamed = []

    def _stream_arguments(self, body: str, events: list[Event]):
        call = self.call
        if call is None or call.ended:
            return
        if call.name is None:
            if call.head(body) is None:
                return
            events.append(ToolCallStart(self.calls, self.call_id, call.name))
        if piece := call.advance(body):
            self.streamed.append(piece)
            events.append(ToolCallDelta(self.calls, piece))

    def _close_call(self, body: str, events: list[Event]):
        started = self.call is not None and self.call.name is not None
        try:
            parsed = self.parse_tool(body, self.tools)
            name, arguments = parsed["name"], parsed.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if not isinstance(arguments, dict):
                raise ValueError("the arguments are not a JSON object")
        except Exception as e:  # the parsers raise anything from ValueError to KeyError
            markup = f"{self.tool[0]}{body}{self.tool[1]}"
            events.append(ParseError(f"tool call did not parse: {e}", markup))
            if not started:
                events.append(TextDelta(markup))
            self.call = None
            return
        if not started:
            events.append(ToolCallStart(self.calls, self.call_id, name))
            self.streamed = [json.dumps(arguments, ensure_ascii=False)]
            events.append(ToolCallDelta(self.calls, self.streamed[0]))
        events.append(
            ToolCallEnd(self.calls, self.call_id, name, arguments, "".join(self.streamed))
        )
        self.calls += 1
        self.call = None

    @staticmethod
    def _emit(kind, text: str, events: list[Event]):
        if text:
            events.append(kind(text))


class OutputStream:
    """One request's tokens in, its events out."""

    def __init__(self, detokenizer, stops: list[str], markup: MarkupParser):
        self.detokenizer = detokenizer
        self.stop = StopMatcher(stops)
        self.markup = markup
        self.matched_stop: str | None = None

    def add(self, token: int) -> list[Event]:
        self.detokenizer.add_token(token)
        return self._text(self.detokenizer.last_segment)

    def finish(self) -> list[Event]:
        if self.matched_stop is not None:
            return self.markup.finish()
        self.detokenizer.finalize()
        events = self._text(self.detokenizer.last_segment)
        if self.matched_stop is None:
            events += self.markup.feed(self.stop.flush())
        return events + self.markup.finish()

    def _text(self, segment: str) -> list[Event]:
        if not segment:
            return []
        released, self.matched_stop = self.stop.feed(segment)
        return [RawText(segment), *self.markup.feed(released)]
