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
    ToolCallAbandoned,
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

    def __init__(self, stops: list[str]) -> None:
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


NUMBER_RE = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
LITERALS = ("true", "false", "null")
HEX = "0123456789abcdefABCDEF"


class JsonArgumentStream:
    """Streams the `arguments` object of a JSON-shaped call body as it is generated.

    A small JSON scanner. It releases the arguments' text only up to points where that text
    is a valid JSON prefix which `completion` (a closing quote, then brackets) makes a valid
    object: keys, commas, colons, partial numbers, literals and escapes wait for the value
    or character that completes them. The pieces join to exactly the arguments' JSON text.
    Text that stops being JSON ends the stream (`broken`); arguments that are not an object
    are never streamed.
    """

    def __init__(self) -> None:
        self.name: str | None = None
        self.pos = 0  # the next character of the body to scan
        self.released = 0  # where the text released so far ends
        self.safe = 0  # where the text that may be released ends
        self.completion = ""  # what makes the text up to `safe` valid JSON
        self.stack: list[str] = []
        self.mode = "start"
        self.key = False  # the open string is a key
        self.escape = ""  # the escape sequence being read
        self.scalar = ""  # the number or literal being read
        self.ended = False
        self.broken = False

    def head(self, body: str) -> str | None:
        """The call's name once both it and the start of the arguments are known."""
        name = NAME_RE.search(body)
        args = ARGUMENTS_RE.search(body)
        if not (name and args and name.start() < args.start()):
            return None
        self.name = json.loads(f'"{name.group(1)}"')
        self.pos = self.released = self.safe = args.end()
        return self.name

    def advance(self, body: str) -> str:
        """The new part of the arguments' text in `body` that is safe to send."""
        while self.pos < len(body) and not (self.ended or self.broken):
            self.broken = not self._scan(body[self.pos])
            self.pos += 1
        piece = body[self.released : self.safe]
        self.released = max(self.released, self.safe)
        return piece

    def _scan(self, c: str) -> bool:
        """Take one character; False where it cannot continue the JSON text."""
        mode = self.mode
        if mode == "string":
            return self._string(c)
        if mode == "literal":
            self.scalar += c
            if self.scalar in LITERALS:
                self.mode = "after"
                self._mark()
            return any(word.startswith(self.scalar) for word in LITERALS)
        if mode == "number":
            if c in "0123456789+-.eE":
                self.scalar += c
                if NUMBER_RE.fullmatch(self.scalar):
                    self._mark()
                return any(NUMBER_RE.fullmatch(self.scalar + tail) for tail in ("", "0", "1"))
            if not NUMBER_RE.fullmatch(self.scalar):
                return False
            self.mode = mode = "after"
        if c in " \t\n\r":  # JSON's whitespace, no other
            if mode == "start":
                self.released = self.safe = self.pos + 1
            return True
        if mode == "start":
            return c == "{" and self._open(c)
        if mode == "after":
            if c == ",":
                self.mode = "key" if self.stack[-1] == "{" else "value"
                return True
            return self._close(c)
        if mode in ("key", "first_key"):
            if c == '"':
                self.mode, self.key = "string", True
                return True
            return mode == "first_key" and self._close(c)
        if mode == "colon":
            self.mode = "value"
            return c == ":"
        if mode == "first_value" and c == "]":
            return self._close(c)
        if c in "{[":
            return self._open(c)
        if c == '"':
            self.mode, self.key = "string", False
            self._mark()
        elif c in "-0123456789":
            self.mode, self.scalar = "number", c
            if c != "-":
                self._mark()
        elif c in "tfn":
            self.mode, self.scalar = "literal", c
        else:
            return False
        return True

    def _string(self, c: str) -> bool:
        if self.escape:
            self.escape += c
            if self.escape == "\\u":
                return True
            if self.escape.startswith("\\u"):
                if c not in HEX:
                    return False
                if len(self.escape) < 6:
                    return True
            elif c not in '"\\/bfnrt':
                return False
            self.escape = ""
        elif c == "\\":
            self.escape = c
            return True
        elif c == '"':
            self.mode = "colon" if self.key else "after"
        elif c < " ":
            return False
        if not self.key:
            self._mark()
        return True

    def _open(self, c: str) -> bool:
        self.stack.append(c)
        self.mode = "first_key" if c == "{" else "first_value"
        self._mark()
        return True

    def _close(self, c: str) -> bool:
        if c != ("}" if self.stack[-1] == "{" else "]"):
            return False
        self.stack.pop()
        self.mode = "after"
        self.ended = not self.stack
        self._mark()
        return True

    def _mark(self) -> None:
        """The text up to this character may be sent: `completion` makes it valid JSON."""
        self.safe = self.pos + 1
        closers = "".join("}" if b == "{" else "]" for b in reversed(self.stack))
        self.completion = ('"' if self.mode == "string" else "") + closers


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
    ) -> None:
        self.think = think
        self.tool = tool if parse_tool else None
        self.parse_tool = parse_tool
        self.tools = tools
        self.state = state
        self.buffer = body
        self.calls = 0  # calls that parsed
        self.index = 0  # the index of the next call begun
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
        else:  # whitespace held back in case a tag followed is the reply's own (a file's last newline)
            self._emit(TextDelta, self.buffer, events)
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
        kind: type[TextDelta] | type[ReasoningDelta]
        if self.state == self.REASONING:
            assert self.think is not None  # reasoning is entered only at the think tag
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
        assert self.tool is not None  # a tool call is entered only at the tool tag
        end = self.buffer.find(self.tool[1]) if self.tool[1] else -1  # no end tag (Mistral): the call runs to the end
        body = self.buffer if end < 0 else self.buffer[:end]
        self._stream_arguments(body, events)
        if end < 0:
            return False
        self._close_call(body, events)
        self.buffer = self.buffer[end + len(self.tool[1]) :]
        self.state = self.TEXT
        self.strip_next = True
        return True

    def _open_call(self) -> None:
        self.call = JsonArgumentStream() if self.buffer.lstrip()[:1] in ("", "{") else None
        self.call_id = uuid.uuid4().hex[:24]
        self.streamed = []

    def _stream_arguments(self, body: str, events: list[Event]) -> None:
        call = self.call
        if call is None or call.ended:
            return
        if call.name is None:
            if body.lstrip()[:1] not in ("", "{"):  # not JSON-shaped markup: parsed once the call ends
                self.call = None
                return
            if (name := call.head(body)) is None:
                return
            events.append(ToolCallStart(self.index, self.call_id, name))
        if piece := call.advance(body):
            self.streamed.append(piece)
            events.append(ToolCallDelta(self.index, piece))

    def _close_call(self, body: str, events: list[Event]) -> None:
        call, self.call = self.call, None
        started = call is not None and call.name is not None
        assert self.tool is not None and self.parse_tool is not None  # set together, or no tool call is entered
        try:
            parsed = self.parse_tool(body, self.tools)
            if isinstance(parsed, list) and len(parsed) == 1:  # some parsers (Kimi) always return a list
                parsed = parsed[0]
            name, arguments = parsed["name"], parsed.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if not isinstance(arguments, dict):
                raise ValueError("the arguments are not a JSON object")
            if self.streamed and not (call and call.ended):  # arguments stream only with a call
                raise ValueError("the arguments are not strict JSON")
        except Exception as e:  # the parsers raise anything from ValueError to KeyError
            markup = f"{self.tool[0]}{body}{self.tool[1]}"
            events.append(ParseError(f"tool call did not parse: {e}", markup))
            if call is not None and call.name is not None:  # started
                completion = call.completion if self.streamed else "{}"
                events.append(ToolCallAbandoned(self.index, self.call_id, completion))
                self.index += 1
            else:
                events.append(TextDelta(markup))
            return
        if not started:
            events.append(ToolCallStart(self.index, self.call_id, name))
        if not self.streamed:  # arguments given as a JSON string, or not JSON-shaped markup
            self.streamed = [json.dumps(arguments, ensure_ascii=False)]
            events.append(ToolCallDelta(self.index, self.streamed[0]))
        events.append(ToolCallEnd(self.index, self.call_id, name, arguments, "".join(self.streamed)))
        self.index += 1
        self.calls += 1

    @staticmethod
    def _emit(kind: type[TextDelta] | type[ReasoningDelta], text: str, events: list[Event]) -> None:
        if text:
            events.append(kind(text))


class OutputStream:
    """One request's tokens in, its events out."""

    def __init__(self, detokenizer: Any, stops: list[str], markup: MarkupParser) -> None:
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
