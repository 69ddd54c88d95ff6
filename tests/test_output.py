"""The streaming text pipeline on its own: stop strings, reasoning tags and tool-call markup, fed in every split."""

import json

from hypothesis import given
from hypothesis import strategies as st
from mlx_lm.tool_parsers.json_tools import parse_tool_call

from mlx_tui.engine.events import (
    ParseError,
    ReasoningDelta,
    TextDelta,
    ToolCallAbandoned,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from mlx_tui.engine.output import JsonArgumentStream, MarkupParser, StopMatcher

THINK = ("<think>", "</think>")
TOOL = ("<tool_call>", "</tool_call>")


def chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)]


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
def test_a_reply_keeps_its_last_newline(cuts):
    """Whitespace is held back in case a tag follows; at the end it is the reply's own (a file's last line)."""
    text = "def f():\n    return 1\n"
    assert joined(run(text, cuts), TextDelta) == text
    assert joined(run("<think>x</think>\n" + text, cuts), TextDelta) == text


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
    parser = MarkupParser(
        THINK, TOOL, parse_tool_call, None, state=MarkupParser.TOOL, body='\n{"name": "get_time", "arguments": '
    )
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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
layouts = st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"ensure_ascii": False}])


@given(st.dictionaries(st.text(max_size=5), json_values, max_size=5), layouts, cuts)
def test_every_piece_sent_leaves_arguments_that_complete_to_valid_json(arguments, layout, cuts):
    text = json.dumps(arguments, **layout)
    body = '{"name": "f", "arguments": ' + text + "}"
    stream, sent = JsonArgumentStream(), ""
    assert stream.head(body) == "f"
    for end in sorted({c % (len(body) + 1) for c in cuts} | {len(body)}):
        sent += stream.advance(body[:end])
        if sent:
            assert json.loads(sent + stream.completion) is not None
    assert sent == text and stream.ended and stream.completion == ""


def abandoned(events) -> tuple[str, ToolCallAbandoned]:
    [gone] = [e for e in events if isinstance(e, ToolCallAbandoned)]
    sent = "".join(e.text for e in events if isinstance(e, ToolCallDelta) and e.index == gone.index)
    return sent, gone


@given(cuts)
def test_arguments_that_stop_being_json_stop_streaming_and_are_closed(cuts):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "when": tomorrow}}\n</tool_call>Done.'
    events = run(text, cuts)
    sent, gone = abandoned(events)
    assert sent == '{"city": "Paris"' and json.loads(sent + gone.completion) == {"city": "Paris"}
    error = next(i for i, e in enumerate(events) if isinstance(e, ParseError))
    assert events[error + 1] == gone and "tomorrow" in events[error].text
    assert joined(events, TextDelta) == "Done." and not any(isinstance(e, ToolCallEnd) for e in events)


@given(cuts)
def test_a_call_cut_off_inside_a_string_is_closed_at_the_end(cuts):
    text = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    events = run(text, cuts)
    sent, gone = abandoned(events)
    assert sent + gone.completion == '{"city": "Par"}'
    assert [type(e) for e in events[-2:]] == [ParseError, ToolCallAbandoned]


def test_a_call_cut_off_before_its_arguments_is_closed_empty():
    events = run('<tool_call>\n{"name": "get_time", "arguments": ', [])
    sent, gone = abandoned(events)
    assert (sent, gone.completion) == ("", "{}")


def test_the_next_call_after_an_abandoned_one_has_its_own_index():
    text = (
        '<tool_call>\n{"name": "get_time", "arguments": {"timezone": UTC}}\n</tool_call>'
        '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
    )
    parser = MarkupParser(THINK, TOOL, parse_tool_call, None)
    events = parser.feed(text) + parser.finish()
    assert [e.index for e in events if isinstance(e, ToolCallStart)] == [0, 1]
    assert [e.index for e in events if isinstance(e, ToolCallEnd)] == [1] and parser.calls == 1
