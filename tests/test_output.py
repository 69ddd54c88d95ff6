"""The streaming text pipeline on its own: stop strings, reasoning tags and tool-call markup, fed in every split."""

import json

from hypothesis import given
from hypothesis import strategies as st
from mlx_lm.tool_parsers.json_tools import parse_tool_call

from mlx_tui.engine.events import (
    ParseError,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from mlx_tui.engine.output import MarkupParser, StopMatcher

THINK = ("<think>", "</think>")
TOOL = ("<tool_call>", "</tool_call>")


def chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


def run(text: str, cuts: list[int], **kwargs):
    parser = MarkupParser(THINK, TOOL, parse_tool_call, None, **kwargs)
    events = [e for piece in chunks(text, cuts) for e in parser.feed(piece)]
    return events + parser.finish()


def joined(events, kind) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


cuts = st.lists(st.integers(min_value=0, max_value=400), max_size=12)


@given(cuts)
def test_stop_string_is_found_across_pieces_and_never_released(cuts):
    text = "Hello there. STOP here, not STOP again."
    matcher = StopMatcher(["STOP", "nothing"])
    released, stop = "", None
    for piece in chunks(text, cuts):
        out, stop = matcher.feed(piece)
        released += out
        assert "Hello there. ".startswith(released)
        if stop:
            break
    assert (released, stop) == ("Hello there. ", "STOP")


@given(cuts)
def test_text_without_a_stop_string_comes_out_whole(cuts):
    text = "a partial STO at the end STO"
    matcher = StopMatcher(["STOP"])
    released = "".join(matcher.feed(piece)[0] for piece in chunks(text, cuts))
    assert released + matcher.flush() == text


@given(cuts)
def test_reasoning_and_text_are_split_and_trimmed(cuts):
    events = run("<think>\nLet me see.\n</think>\n\nThe answer is 4.", cuts)
    assert joined(events, ReasoningDelta) == "Let me see."
    assert joined(events, TextDelta) == "The answer is 4."


@given(cuts)
def test_reasoning_opened_by_the_prompt(cuts):
    events = run("Thinking hard.\n</think>\n\nDone.", cuts, state=MarkupParser.REASONING)
    assert joined(events, ReasoningDelta) == "Thinking hard."
    assert joined(events, TextDelta) == "Done."


@given(cuts)
def test_text_then_two_calls_stream_their_arguments(cuts):
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris \\"FR\\"", "days": [1, {"x": "}"}]}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    events = run(text, cuts)
    assert joined(events, TextDelta) == "Let me check."
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "get_time")]
    assert ends[0].arguments == {"city": 'Paris "FR"', "days": [1, {"x": "}"}]}
    assert ends[1].arguments == {}
    for end in ends:
        pieces = "".join(e.text for e in events if isinstance(e, ToolCallDelta) and e.index == end.index)
        assert pieces == end.arguments_json
        assert json.loads(pieces) == end.arguments
        assert end.id == starts[end.index].id
    first_delta = next(i for i, e in enumerate(events) if isinstance(e, ToolCallDelta))
    assert first_delta < events.index(ends[0])


def test_arguments_stream_before_the_call_closes():
    parser = MarkupParser(THINK, TOOL, parse_tool_call, None)
    events = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert [type(e) for e in events] == [ToolCallStart, ToolCallDelta]
    assert events[1].text == '{"city": "Pa'


def test_forced_call_starts_inside_the_markup():
    parser = MarkupParser(THINK, TOOL, parse_tool_call, None, state=MarkupParser.TOOL,
                          body='\n{"name": "get_time", "arguments": ')
    events = parser.feed('{"timezone": "UTC"}}\n</tool_call>') + parser.finish()
    end = next(e for e in events if isinstance(e, ToolCallEnd))
    assert (end.name, end.arguments) == ("get_time", {"timezone": "UTC"})


@given(cuts)
def test_malformed_call_becomes_text_and_a_parse_error(cuts):
    text = "Sure.<tool_call>\nnot json at all\n</tool_call>"
    events = run(text, cuts)
    errors = [e for e in events if isinstance(e, ParseError)]
    assert len(errors) == 1 and "not json at all" in errors[0].text
    assert joined(events, TextDelta) == "Sure.<tool_call>\nnot json at all\n</tool_call>"
    assert not any(isinstance(e, ToolCallEnd) for e in events)


def test_unclosed_call_at_the_end_is_parsed():
    events = run('<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}', [])
    assert any(isinstance(e, ToolCallEnd) and e.arguments == {"timezone": "UTC"} for e in events)


@given(cuts)
def test_a_lone_angle_bracket_is_plain_text(cuts):
    events = run("a < b and <tool is not a tag", cuts)
    assert joined(events, TextDelta) == "a < b and <tool is not a tag"
