"""The protocol translations on their own: requests into the engine's shape, engine events into frames."""

import json

import pytest
from conftest import CLAUDE_CODE_SAMPLE

from mlx_tui.api import anthropic, openai
from mlx_tui.api.anthropic_models import MessagesRequest
from mlx_tui.api.errors import ApiError
from mlx_tui.api.openai_models import ChatRequest
from mlx_tui.engine import events as ev
from mlx_tui.engine.request import Constraint

USAGE = ev.Usage(prompt_tokens=30, cached_tokens=10, generated_tokens=7)
TIMINGS = ev.Timings(0.0, 0.1, 0.2)


def anthropic_request(**body):
    return anthropic.to_request(MessagesRequest.model_validate_json(json.dumps({"model": "m", **body})))


def openai_request(**body):
    return openai.to_request(ChatRequest.model_validate_json(json.dumps({"model": "m", **body})))


def test_claude_code_sample_translates():
    with open(CLAUDE_CODE_SAMPLE) as f:
        body = json.load(f)["body"]
    request = anthropic.to_request(MessagesRequest.model_validate(body))
    system = request.messages[0]
    assert system["role"] == "system" and system["content"].startswith("You are a test fixture shaped like Claude Code")
    assert "x-anthropic-billing-header" not in json.dumps(request.messages)
    assert [m["role"] for m in request.messages[1:]] == [m["role"] for m in body["messages"]]
    assert [t["function"]["name"] for t in request.tools] == [t["name"] for t in body["tools"]]
    assert request.enable_thinking is True and request.max_tokens == 128000


def test_anthropic_tool_results_become_tool_messages():
    request = anthropic_request(
        messages=[
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "a"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "is_error": True,
                        "content": [{"type": "text", "text": "no such file"}, {"type": "image", "source": {}}],
                    },
                    {"type": "text", "text": "go on", "cache_control": {"type": "ephemeral"}},
                ],
            },
            {"role": "system", "content": "Be brief."},
        ],
    )
    assert request.messages == [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "Read", "arguments": {"path": "a"}}}
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "toolu_1",
            "name": "Read",
            "content": "Error: no such file\n[image: not shown, this model reads text only]",
        },
        {"role": "user", "content": "go on"},
        {"role": "system", "content": "Be brief."},
    ]


def test_anthropic_thinking_comes_back_only_when_signed():
    def history(signature):
        thinking = {"type": "thinking", "thinking": "hmm", "signature": signature}
        messages = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [thinking, {"type": "text", "text": "a"}]},
        ]
        return anthropic_request(messages=messages).messages[1]

    assert history(anthropic.sign("hmm"))["reasoning_content"] == "hmm"
    assert "reasoning_content" not in history("forged")


@pytest.mark.parametrize(
    "thinking, enabled",
    [
        (None, False),
        ({"type": "disabled"}, False),
        ({"type": "enabled", "budget_tokens": 9}, True),
        ({"type": "adaptive"}, True),
    ],
)
def test_anthropic_thinking_setting(thinking, enabled):
    body = {"messages": [{"role": "user", "content": "q"}]}
    if thinking:
        body["thinking"] = thinking
    assert anthropic_request(**body).enable_thinking is enabled


@pytest.mark.parametrize(
    "choice, expected",
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "f"}, "f"),
    ],
)
def test_anthropic_tool_choice(choice, expected):
    assert anthropic_request(messages=[{"role": "user", "content": "q"}], tool_choice=choice).tool_choice == expected


def events_with_everything():
    return [
        ev.Queued(0),
        ev.PrefillProgress(30, 30),
        ev.ReasoningDelta("think "),
        ev.ReasoningDelta("more"),
        ev.TextDelta("Sure, "),
        ev.TextDelta("checking."),
        ev.RawText("<tool_call>"),
        ev.ToolCallStart(0, "abc", "get_weather"),
        ev.ToolCallDelta(0, '{"city": '),
        ev.ToolCallDelta(0, '"Paris"}'),
        ev.ToolCallEnd(0, "abc", "get_weather", {"city": "Paris"}, '{"city": "Paris"}'),
        ev.ToolCallStart(1, "def", "get_time"),
        ev.ToolCallDelta(1, "{}"),
        ev.ToolCallEnd(1, "def", "get_time", {}, "{}"),
        ev.Done("tool_calls", USAGE, TIMINGS),
    ]


def anthropic_frames(events, thinking: bool) -> list:
    stream = anthropic.MessageStream("m", thinking=thinking)
    frames = stream.start(ev.Started(30, 10))
    for event in events:
        frames += stream.feed(event)
    return frames


def test_anthropic_frames_follow_the_protocol():
    frames = anthropic_frames(events_with_everything(), thinking=True)
    names = [name for name, _ in frames]
    assert names == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_delta",
        "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    message = anthropic.fold(frames)
    assert message["content"] == [
        {"type": "thinking", "thinking": "think more", "signature": anthropic.sign("think more")},
        {"type": "text", "text": "Sure, checking."},
        {"type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_def", "name": "get_time", "input": {}},
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {
        "input_tokens": 20,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 10,
        "output_tokens": 7,
    }


def test_anthropic_leaves_reasoning_out_when_thinking_is_off():
    frames = anthropic_frames(events_with_everything(), thinking=False)
    assert [b["type"] for b in anthropic.fold(frames)["content"]] == ["text", "tool_use", "tool_use"]


def test_anthropic_stop_sequence_and_error_frames():
    stream = anthropic.MessageStream("m", thinking=False)
    [(_, delta), _] = stream.feed(ev.Done("stop_sequence", USAGE, TIMINGS, stop_sequence="END"))[-2:]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    [(name, data)] = stream.feed(ev.Error("engine", "the worker died"))
    assert (name, data) == (
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "the worker died"}},
    )


def test_openai_request_translates():
    request = openai_request(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
        ],
        tools=[{"type": "function", "function": {"name": "f", "strict": True}}],
        tool_choice={"type": "function", "function": {"name": "f"}},
        max_completion_tokens=5,
        stop="END",
        seed=-1,
        logit_bias={"3": 2},
        parallel_tool_calls=False,
        user="u",
        store=False,
        presence_penalty=0.5,
    )
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "look\n[image_url: not shown, this model reads text only]"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}],
        },
        {"role": "tool", "content": "done", "tool_call_id": "c1"},
    ]
    assert request.tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ]
    assert (request.tool_choice, request.max_tokens, request.stop) == ("f", 5, ["END"])
    assert (request.sampling.seed, request.sampling.logit_bias, request.sampling.presence_penalty) == (
        2**64 - 1,
        {3: 2.0},
        0.5,
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 2},
        {"logprobs": True},
        {"response_format": {"type": "json_schema"}},
        {"functions": []},
        {"logit_bias": {"x": 1}},
    ],
)
def test_openai_refuses_what_it_cannot_do(extra):
    with pytest.raises(ApiError) as caught:
        openai_request(messages=[{"role": "user", "content": "q"}], **extra)
    assert caught.value.status == 400


def test_openai_chunks_and_fold():
    stream = openai.ChunkStream("m", include_usage=True)
    chunks = stream.start(ev.Started(30, 10))
    for event in events_with_everything():
        chunks += stream.feed(event)
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert calls[0] == {
        "index": 0,
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert calls[1:3] == [
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 30
    completion = openai.fold(stream, chunks)
    message = completion["choices"][0]["message"]
    assert message["content"] == "Sure, checking." and message["reasoning_content"] == "think more"
    assert [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]
    ] == [
        ("call_abc", "get_weather", {"city": "Paris"}),
        ("call_def", "get_time", {}),
    ]
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    assert completion["usage"] == {
        "prompt_tokens": 30,
        "completion_tokens": 7,
        "total_tokens": 37,
        "prompt_tokens_details": {"cached_tokens": 10},
    }


def abandoned_call():
    return [
        ev.ToolCallStart(0, "abc", "get_weather"),
        ev.ToolCallDelta(0, "{"),
        ev.ToolCallDelta(0, '"city": "Pa'),
        ev.ParseError("tool call did not parse", '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa'),
        ev.ToolCallAbandoned(0, "abc", '"}'),
        ev.Done("length", USAGE, TIMINGS),
    ]


def test_anthropic_closes_an_abandoned_call_with_valid_json():
    frames = anthropic_frames(abandoned_call(), thinking=False)
    assert [name for name, _ in frames] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    message = anthropic.fold(frames)
    assert message["content"] == [
        {"type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": {"city": "Pa"}}
    ]
    assert message["stop_reason"] == "max_tokens"


def test_openai_closes_an_abandoned_call_with_valid_json():
    stream = openai.ChunkStream("m", include_usage=False)
    chunks = stream.start(ev.Started(30, 10))
    for event in abandoned_call():
        chunks += stream.feed(event)
    completion = openai.fold(stream, chunks)
    [call] = completion["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Pa"}
    assert completion["choices"][0]["finish_reason"] == "length"


def test_a_signature_with_any_characters_is_just_not_ours():
    from mlx_tui.api.anthropic import sign, signed

    assert signed("hm", sign("hm"))
    assert not signed("hm", "\x80 not ascii")


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, Constraint("json_object", {"type": "object"})),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": False},
                }
            },
            Constraint("json_schema", SCHEMA),
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": SCHEMA, "strict": True}},
                    {"type": "function", "function": {"name": "g"}},
                ]
            },
            Constraint(strict_tools=["f"]),
        ),
    ],
    ids=["none", "text", "json_object", "json_schema", "strict_tool"],
)
def test_openai_structured_output(extra, expected):
    assert openai_request(messages=[{"role": "user", "content": "q"}], **extra).constraint == expected


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"output_config": {"effort": "high"}}, None),
        ({"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}}, Constraint("json_schema", SCHEMA)),
        ({"output_format": {"type": "json_schema", "schema": SCHEMA}}, Constraint("json_schema", SCHEMA)),
        (
            {"tools": [{"name": "f", "input_schema": SCHEMA, "strict": True}, {"name": "g", "input_schema": SCHEMA}]},
            Constraint(strict_tools=["f"]),
        ),
    ],
    ids=["effort_only", "output_config", "beta_output_format", "strict_tool"],
)
def test_anthropic_structured_output(extra, expected):
    assert anthropic_request(messages=[{"role": "user", "content": "q"}], **extra).constraint == expected
