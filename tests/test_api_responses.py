"""The OpenAI Responses API (what Codex CLI speaks) with the official SDK, whose stream accumulator checks the event
order."""

import json

import httpx
import openai
import pytest
from conftest import Server
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from mlx_tui.api import responses
from mlx_tui.api.responses import seal, to_request
from mlx_tui.api.responses_models import ResponsesRequest
from mlx_tui.api.server import create_app
from mlx_tui.api.warm import warm_request
from mlx_tui.engine.demo.conversations import TOOLS
from mlx_tui.engine.events import Done, PrefillProgress, Started, TextDelta, Timings, Usage
from mlx_tui.engine.request import GenerationRequest
from mlx_tui.tui.requests import cells
from mlx_tui.tui.state import State

FUNCTIONS = [{"type": "function", **t["function"]} for t in TOOLS]
PARIS = "What is the weather in Paris?"
PARIS_RESULT = '{"city": "Paris", "temperature_c": 18, "condition": "sunny"}'
NAMESPACE = {"type": "namespace", "name": "weather_service", "description": "Weather and time.", "tools": FUNCTIONS}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def ask(client, stream: bool, **body):
    """The final Response, from `responses.create` or from `responses.stream` (which checks each event against the
    last)."""
    body = {"model": "any-name", "temperature": 0, "max_output_tokens": 256} | body
    if not stream:
        return client.responses.create(**body)
    with client.responses.stream(**body) as events:  # get_final_response() takes only `response.completed`
        [final] = [e.response for e in events if e.type in ("response.completed", "response.incomplete")]
    return final


def texts(response) -> str:
    return "".join(c.text for item in response.output if item.type == "message" for c in item.content)


def calls(response) -> list:
    return [item for item in response.output if item.type == "function_call"]


def raw_events(server, body: dict, headers: dict | None = None) -> list[dict]:
    """A streamed response's events as sent, each checked to name its type in the SSE `event:` field."""
    body = {"model": "m", "stream": True, "temperature": 0, "max_output_tokens": 256} | body
    with httpx.stream("POST", server.url + "/v1/responses", json=body, headers=headers, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [e["type"] for e in events]
    return events


def post(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", json={"model": "m", "input": "Hi"} | body, timeout=60)


def prompt_of(server, response_id: str) -> str:
    return httpx.get(f"{server.url}/v1/transcripts/{response_id}").json()["prompt"]


def assert_openai_error(response: httpx.Response, status: int, starts: str = "", code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert status != 400 or error["type"] == "invalid_request_error"
    assert error["message"].startswith(starts), error["message"]
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_text(client, stream):
    response = ask(client, stream, input="Good morning!", reasoning={"effort": "none"})
    assert response.status == "completed" and response.object == "response" and response.id.startswith("resp_")
    assert texts(response) == "Good morning! How can I help you today?" == response.output_text
    [message] = response.output
    assert message.status == "completed" and message.content[0].annotations == []
    assert response.usage.output_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_reasoning(client, stream):
    response = ask(client, stream, input="Is 17 a prime number?", reasoning={"effort": "medium", "summary": "auto"})
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert reasoning.content[0].text == "17 has no divisors other than 1 and 17." == reasoning.summary[0].text
    assert reasoning.encrypted_content and texts(response) == "Yes, 17 is a prime number."
    assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens


@pytest.mark.parametrize(
    "body",
    [
        {"input": "Good morning!"},
        {"input": "Is 17 a prime number?", "reasoning": {"effort": "low", "summary": "auto"}},
        {
            "input": "What are the weather and the time in Berlin?",
            "tools": [NAMESPACE],
            "reasoning": {"effort": "none"},
        },
        {"input": "Good morning!", "max_output_tokens": 2},
    ],
    ids=["text", "reasoning", "calls", "incomplete"],
)
def test_whole_response_validates_as_the_sdk_type(server, body):
    """The SDK builds a response without validating it; here the raw JSON is validated against its type."""
    response = post(server, temperature=0, **body)
    assert response.status_code == 200
    Response.model_validate(response.json())


def test_reasoning_without_summary_streams_only_its_text(server):
    body = {"input": "Is 17 a prime number?", "reasoning": {"effort": "high"}}
    kinds = {e["type"] for e in raw_events(server, body)}
    assert "response.reasoning_text.delta" in kinds and not any("summary" in k for k in kinds)


def reasoning_turns(reasoning: dict) -> list:
    return [
        {"role": "user", "content": "Is 17 a prime number?"},
        reasoning,
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Yes, 17 is a prime number."}],
        },
        {"role": "user", "content": "And 18?"},
    ]


def test_reasoning_round_trips_signed(client, server):
    first = ask(client, False, input="Is 17 a prime number?", reasoning={"effort": "medium"})
    reasoning = first.output[0].model_dump(exclude_none=True)
    second = ask(client, False, input=reasoning_turns(reasoning), reasoning={"effort": "medium"})
    assert texts(second) == "No, 18 is not prime." and second.output[0].content[0].text == "18 is divisible by 2."
    assert "<think>\n17 has no divisors other than 1 and 17.\n</think>" in prompt_of(server, second.id)
    assert second.usage.input_tokens_details.cached_tokens > first.usage.input_tokens


def test_reasoning_signed_elsewhere_is_dropped(client, server):
    forged = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "MTcgaGFzIG5vIGRpdmlzb3Jz.AAAA"}
    response = ask(client, False, input=reasoning_turns(forged), max_output_tokens=3)
    assert "<think>" not in prompt_of(server, response.id).split("Is 17")[1].split("And 18")[0]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_single_tool_call(client, stream):
    response = ask(client, stream, input=PARIS, tools=FUNCTIONS, reasoning={"effort": "none"})
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.namespace is None
    assert (
        json.loads(call.arguments) == {"city": "Paris"}
        and call.call_id.startswith("call_")
        and call.status == "completed"
    )
    assert response.status == "completed" and response.tools[0].name == "get_weather"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_parallel_tool_calls(client, stream):
    response = ask(
        client,
        stream,
        input="What are the weather and the time in Berlin?",
        tools=FUNCTIONS,
        reasoning={"effort": "none"},
    )
    assert [(c.name, json.loads(c.arguments)) for c in calls(response)] == [
        ("get_weather", {"city": "Berlin"}),
        ("get_time", {"timezone": "Europe/Berlin"}),
    ]
    assert len({c.call_id for c in calls(response)}) == 2 and response.parallel_tool_calls is True


def test_parallel_tool_calls_off_keeps_the_first(client):
    body = {
        "input": "What are the weather and the time in Berlin?",
        "tools": FUNCTIONS,
        "reasoning": {"effort": "none"},
    }
    response = ask(client, True, parallel_tool_calls=False, **body)
    assert [c.name for c in calls(response)] == ["get_weather"] and response.parallel_tool_calls is False


def test_arguments_stream_in_pieces(server):
    events = raw_events(server, {"input": PARIS, "tools": FUNCTIONS, "reasoning": {"effort": "none"}})
    pieces = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert (
        len(pieces) > 1 and "".join(pieces) == done["arguments"] and json.loads(done["arguments"]) == {"city": "Paris"}
    )


@pytest.mark.parametrize(
    "output", [PARIS_RESULT, [{"type": "input_text", "text": PARIS_RESULT}]], ids=["string", "parts"]
)
def test_tool_result_round_trip(client, output):
    first = ask(client, False, input=PARIS, tools=FUNCTIONS, reasoning={"effort": "none"})
    [call] = calls(first)
    turns = [
        {"role": "user", "content": PARIS},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": output},
    ]
    second = ask(client, True, input=turns, tools=FUNCTIONS, reasoning={"effort": "none"})
    assert second.output_text == "It is sunny in Paris, 18°C."
    # the second prompt starts with the first (but for its empty thinking block), so it comes from the prefix cache
    assert first.usage.input_tokens - 10 < second.usage.input_tokens_details.cached_tokens < second.usage.input_tokens


def test_parallel_results_round_trip(client):
    question = "What are the weather and the time in Berlin?"
    first = ask(client, False, input=question, tools=FUNCTIONS, reasoning={"effort": "none"})
    weather, time = calls(first)
    results = [
        {
            "type": "function_call_output",
            "call_id": weather.call_id,
            "output": '{"city": "Berlin", "temperature_c": 12, "condition": "cloudy"}',
        },
        {
            "type": "function_call_output",
            "call_id": time.call_id,
            "output": '{"timezone": "Europe/Berlin", "time": "14:05"}',
        },
    ]
    turns = [
        {"role": "user", "content": question},
        weather.model_dump(exclude_none=True),
        time.model_dump(exclude_none=True),
        *results,
    ]
    second = ask(client, False, input=turns, tools=FUNCTIONS, reasoning={"effort": "none"})
    assert second.output_text == "In Berlin it is cloudy and 12°C; the local time is 14:05."


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_namespace_call_maps_back(client, server, stream):
    tools = [NAMESPACE, {"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}]
    response = ask(client, stream, input=PARIS, tools=tools, reasoning={"effort": "none"})
    [call] = calls(response)
    assert (call.namespace, call.name, json.loads(call.arguments)) == (
        "weather_service",
        "get_weather",
        {"city": "Paris"},
    )
    # the namespaced call goes back in the next turn as the model saw it
    turns = [
        {"role": "user", "content": PARIS},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": PARIS_RESULT},
    ]
    assert (
        ask(client, False, input=turns, tools=tools, reasoning={"effort": "none"}).output_text
        == "It is sunny in Paris, 18°C."
    )
    assert "web_search" not in prompt_of(server, response.id)


def test_namespace_names_taken_at_the_top_are_prefixed(server):
    tools = [FUNCTIONS[0], NAMESPACE]
    response = httpx.post(
        server.url + "/v1/responses", json={"model": "m", "input": PARIS, "tools": tools, "max_output_tokens": 1}
    )
    prompt = prompt_of(server, response.json()["id"])
    assert '"name": "get_weather"' in prompt and '"name": "weather_service__get_weather"' in prompt
    assert '"name": "get_time"' in prompt and "weather_service__get_time" not in prompt


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_time"}], ids=["required", "named"])
def test_tool_choice_forces_a_call(client, choice):
    response = ask(
        client, False, input="Good morning!", tools=FUNCTIONS, tool_choice=choice, reasoning={"effort": "none"}
    )
    assert len(calls(response)) >= 1 and (choice == "required" or calls(response)[0].name == "get_time")


def test_tool_choice_none_leaves_the_tools_out(client, server):
    response = ask(client, False, input=PARIS, tools=FUNCTIONS, tool_choice="none", reasoning={"effort": "none"})
    assert not calls(response) and "get_weather" not in prompt_of(server, response.id)


def test_usage_sums(client, loop, engine):
    response = ask(
        client,
        False,
        input=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Good morning!"}],
        reasoning={"effort": "none"},
    )
    request = GenerationRequest(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Good morning!"}],
        enable_thinking=False,
    )
    used = response.usage
    assert used.input_tokens == loop.run(engine.count_tokens(request))
    assert used.total_tokens == used.input_tokens + used.output_tokens and used.output_tokens > 0
    again = ask(
        client,
        False,
        input=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Good morning!"}],
        reasoning={"effort": "none"},
    )
    assert again.usage.input_tokens_details.cached_tokens == used.input_tokens - 1  # all but the last prompt token
    assert again.usage.input_tokens_details.cache_write_tokens == 0


def test_instructions_and_leading_developer_turns_are_one_system_message(client, server):
    body = {
        "instructions": "You are a pirate.",
        "input": [
            {"role": "developer", "content": [{"type": "input_text", "text": "Answer like one."}]},
            {"role": "user", "content": "Who are you?"},
        ],
    }
    response = ask(client, False, **body, max_output_tokens=2)
    assert prompt_of(server, response.id).startswith(
        "<|im_start|>system\nYou are a pirate.\n\nAnswer like one.<|im_end|>\n<|im_start|>user\nWho are you?"
    )


def test_images_and_files_become_placeholders(client, server):
    content = [
        {"type": "input_text", "text": "Look:"},
        {"type": "input_image", "image_url": "data:image/png;base64,AA=="},
        {"type": "input_file", "file_id": "f"},
    ]
    response = ask(client, False, input=[{"role": "user", "content": content}], max_output_tokens=2)
    prompt = prompt_of(server, response.id)
    assert (
        "Look:\n[input_image: not shown, this model reads text only]\n"
        "[input_file: not shown, this model reads text only]" in prompt
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_max_output_tokens_is_incomplete(client, server, stream):
    body = {"input": "Good morning!", "max_output_tokens": 3, "reasoning": {"effort": "none"}}
    if stream:
        events = raw_events(server, body)
        assert events[-1]["type"] == "response.incomplete"
        response = events[-1]["response"]
        assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
        assert response["output"][0]["status"] == "incomplete" and response["usage"]["output_tokens"] == 3
    else:
        response = client.responses.create(model="m", **body)
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
        assert response.usage.output_tokens == 3 and response.output[0].status == "incomplete"


def test_store_and_prompt_cache_key_are_accepted(client):
    response = ask(
        client,
        False,
        input="Good morning!",
        store=True,
        prompt_cache_key="k1",
        include=["reasoning.encrypted_content"],
        metadata={"a": "b"},
    )
    assert response.status == "completed"


@pytest.mark.parametrize(
    "body, starts",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id: this server does not keep responses"),
        ({"conversation": "conv_1"}, "conversation: this server does not keep responses"),
        ({"background": True}, "background:"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema: a json_schema format needs"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0: item references"),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice:"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": FUNCTIONS}, "tool_choice names 'nope'"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, "input.0.arguments:"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input.items.0.message.role"),
        ({"input": [{"type": "message", "role": "user", "content": 5}]}, "input.items.0.message.content"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"model": None}, "model"),
    ],
)
def test_bad_requests(server, body, starts):
    assert_openai_error(post(server, **body), 400, starts)


def test_sdk_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="m", input="Hi", previous_response_id="resp_1")


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions"])
def test_prompt_too_long_is_context_length_exceeded(server, engine, path):
    words = "Paris Tokyo London " * engine.info["context_length"]
    body = {"input": words} if path == "/v1/responses" else {"messages": [{"role": "user", "content": words}]}
    response = httpx.post(server.url + path, json={"model": "m"} | body, timeout=120)
    assert_openai_error(response, 400, "prompt is too long: ", code="context_length_exceeded")


# A request shaped as Codex CLI sends it (its own prompt text is not copied here).
CODEX_HEADERS = {
    "authorization": "Bearer x",
    "accept": "text/event-stream",
    "originator": "codex_exec",
    "user-agent": "codex_exec/0.171.0 (Debian 12.0.0; x86_64) xterm (codex_exec; 0.171.0)",
    "session-id": "s-1",
    "x-codex-turn-metadata": '{"turn_id": "t-1", "sandbox_mode": "read-only"}',
}
CODEX_BODY = {
    "model": "local-model",
    "stream": True,
    "input": [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "<permissions>Read-only sandbox.</permissions>"}],
        },
        {
            "type": "message",
            "role": "developer",
            "content": [
                {"type": "input_text", "text": "You are a coding agent."},
                {"type": "input_text", "text": "Be concise."},
            ],
        },
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "<environment_context>cwd: /tmp</environment_context>"}],
        },
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": PARIS}]},
    ],
    "tools": [
        {"type": "function", "strict": False, **FUNCTIONS[0]},
        {
            "type": "namespace",
            "name": "agents_v1",
            "description": "Sub-agents.",
            "tools": [
                {
                    "type": "function",
                    "name": "spawn_agent",
                    "description": "Start one.",
                    "strict": False,
                    "parameters": {
                        "type": "object",
                        "properties": {"task": {"type": "string"}},
                        "required": ["task"],
                        "additionalProperties": False,
                    },
                },
            ],
        },
        {"type": "function", "strict": False, **FUNCTIONS[1]},
        {"type": "web_search", "external_web_access": False},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "reasoning": {"summary": "auto"},
    "store": False,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "01a2-session",
    "client_metadata": {"x-codex-window-id": "w:0", "turn_id": "t-1"},
}


STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


def check_order(events: list[dict]):
    """The invariants of a Responses stream that the SDK and Codex rely on; each event validated against the SDK's
    type."""
    for event in events:
        STREAM_EVENT.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    lifecycle = [e["response"] for e in events if "response" in e]
    assert (
        len({r["id"] for r in lifecycle}) == 1
        and lifecycle[0]["output"] == []
        and lifecycle[0]["status"] == "in_progress"
    )
    items = [e for e in events if "output_index" in e]
    added = [e["output_index"] for e in items if e["type"] == "response.output_item.added"]
    done = [e for e in items if e["type"] == "response.output_item.done"]
    assert added == list(range(len(added))) == [e["output_index"] for e in done]
    for index in added:  # each item's events: added first, done last, not interleaved with another item's
        own = [i for i, e in enumerate(events) if e.get("output_index") == index]
        assert (
            events[own[0]]["type"] == "response.output_item.added"
            and events[own[-1]]["type"] == "response.output_item.done"
        )
        assert own == list(range(own[0], own[-1] + 1))
        kinds = [events[i]["type"] for i in own]
        for part, deltas in [("content_part", "text.delta"), ("reasoning_summary_part", "summary_text.delta")]:
            opened = [k for k, kind in enumerate(kinds) if kind == f"response.{part}.added"]
            streamed = [
                k
                for k, kind in enumerate(kinds)
                if kind.endswith(deltas) and ("summary" in kind) == ("summary" in part)
            ]
            closed = [k for k, kind in enumerate(kinds) if kind == f"response.{part}.done"]
            assert not streamed or (opened and opened[0] < streamed[0] and streamed[-1] < closed[0])
        item = done[added.index(index)]["item"]
        text = "".join(
            events[i]["delta"]
            for i in own
            if events[i]["type"] in ("response.output_text.delta", "response.reasoning_text.delta")
        )
        if item["type"] in ("message", "reasoning"):
            assert item["content"][0]["text"] == text
        if item["type"] == "function_call":
            arguments = "".join(
                events[i]["delta"] for i in own if events[i]["type"] == "response.function_call_arguments.delta"
            )
            assert arguments == item["arguments"] and json.loads(arguments) is not None
    final = events[-1]["response"]
    assert final["output"] == [e["item"] for e in done]
    used = final["usage"]
    assert used["total_tokens"] == used["input_tokens"] + used["output_tokens"]
    assert {"cached_tokens", "cache_write_tokens"} <= set(used["input_tokens_details"]) and "reasoning_tokens" in used[
        "output_tokens_details"
    ]


def test_codex_shaped_request(server, engine):
    events = raw_events(server, CODEX_BODY, CODEX_HEADERS)
    check_order(events)
    final = events[-1]["response"]
    assert (
        final["model"] == "local-model"
        and final["tools"][1]["type"] == "namespace"
        and final["parallel_tool_calls"] is True
    )
    [summary] = [t for t in httpx.get(server.url + "/v1/transcripts").json()["data"] if t["id"] == final["id"]]
    assert summary["source"] == "responses" and summary["client"] == "codex_exec/0.171.0"
    state = State()  # the dashboard, from the same bus events
    for event in list(engine.bus.recent):
        state.apply(event)
    assert cells(state.requests[final["id"]])[2:4] == ("responses", "codex_exec/0.171.0")
    prompt = prompt_of(server, final["id"])
    assert prompt.startswith(
        "<|im_start|>system\n<permissions>Read-only sandbox.</permissions>\n\n"
        "You are a coding agent.\nBe concise.\n\n# Tools"
    )
    assert '"name": "spawn_agent"' in prompt and "web_search" not in prompt


@pytest.mark.parametrize(
    "body",
    [
        {"input": "Is 17 a prime number?", "reasoning": {"effort": "low", "summary": "detailed"}},
        {"input": "What are the weather and the time in Berlin?", "tools": FUNCTIONS, "reasoning": {"effort": "none"}},
        {"input": "Check the weather in Sydney, please.", "tools": FUNCTIONS, "reasoning": {"effort": "none"}},
        {"input": "Good morning!", "max_output_tokens": 4},
    ],
    ids=["reasoning-summary", "parallel-calls", "text-then-call", "incomplete"],
)
def test_event_order(server, body):
    events = raw_events(server, body)
    check_order(events)
    assert len({e["type"] for e in events}) > 6


CUSTOM = {
    "type": "namespace",
    "name": "editing",
    "description": "Edit files.",
    "tools": [{"type": "custom", "name": "apply_patch", "description": "Apply a patch."}],
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_custom_tool_in_a_namespace(client, server, stream):
    choice = {"type": "custom", "name": "apply_patch"}
    # the call is bound to the tool's grammar: its free-text input may run to max_output_tokens on the demo model
    response = ask(
        client,
        stream,
        input="Good morning!",
        tools=[CUSTOM],
        tool_choice=choice,
        reasoning={"effort": "none"},
        max_output_tokens=40,
    )
    call = response.output[0]
    assert (call.type, call.name, call.namespace) == ("custom_tool_call", "apply_patch", "editing") and isinstance(
        call.input, str
    )
    assert (
        '"name": "apply_patch", "description": "Apply a patch.", '
        '"parameters": {"type": "object", "properties": {"input"' in prompt_of(server, response.id)
    )


def test_custom_tool_call_goes_back_as_its_input(client, server):
    turns = [
        {"role": "user", "content": "Patch it."},
        {
            "type": "custom_tool_call",
            "call_id": "call_9",
            "name": "apply_patch",
            "namespace": "editing",
            "input": "*** Begin Patch",
        },
        {"type": "custom_tool_call_output", "call_id": "call_9", "output": "Done."},
    ]
    response = ask(client, False, input=turns, tools=[CUSTOM], max_output_tokens=2)
    prompt = prompt_of(server, response.id)
    assert (
        '{"name": "apply_patch", "arguments": {"input": "*** Begin Patch"}}' in prompt
        and "<tool_response>\nDone.\n</tool_response>" in prompt
    )


@pytest.fixture(scope="module")
def faulty(loop, engine):
    """A server that lets the X-MLX-TUI-Fault header break a request's own processing."""
    server = Server(loop, create_app(engine, debug_faults=True))
    yield server
    server.close()


def test_failure_after_the_stream_began_is_response_failed(faulty):
    events = raw_events(faulty, {"input": "Good morning!"}, {"x-mlx-tui-fault": "request_error@3"})
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    error, failed = events[-2:]
    assert error["type"] == "error" and error["code"] == "server_error" and "injected" in error["message"]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": error["message"]}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_failure_of_a_whole_response_is_an_error_status(faulty):
    response = httpx.post(
        faulty.url + "/v1/responses",
        json={"model": "m", "input": "Hi"},
        headers={"x-mlx-tui-fault": "request_error@3"},
        timeout=60,
    )
    assert_openai_error(response, 500)


def test_sdk_stream_raises_on_failure(faulty):
    client = openai.OpenAI(base_url=faulty.url + "/v1", api_key="x", max_retries=0)
    with client.responses.stream(model="m", input="Hi", extra_headers={"x-mlx-tui-fault": "request_error@3"}) as events:
        kinds = [e.type for e in events]
        with pytest.raises(RuntimeError):
            events.get_final_response()
    assert kinds[-2:] == ["error", "response.failed"]


def test_items_of_one_assistant_turn_make_one_message():
    items = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": seal("Two calls.")},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {
            "type": "function_call",
            "call_id": "c2",
            "name": "get_weather",
            "namespace": "weather_service",
            "arguments": '{"city": "Rome"}',
        },
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rainy"}]},
        {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": seal("Both known.")},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny and rainy."}]},
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        {"role": "developer", "content": "Now in French."},
    ]
    request, _ = to_request(
        ResponsesRequest.model_validate({"model": "m", "instructions": "Hi.", "input": items, "tools": [NAMESPACE]})
    )

    def call(call_id: str, city: str) -> dict:
        return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}

    assert request.messages == [
        {"role": "system", "content": "Hi.\n\nBe brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Two calls.",
            "tool_calls": [call("c1", "Paris"), call("c2", "Rome")],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny", "name": "get_weather"},
        {"role": "tool", "tool_call_id": "c2", "content": "rainy", "name": "get_weather"},
        {"role": "assistant", "content": "Sunny and rainy.", "reasoning_content": "Both known."},
        {"role": "system", "content": "Now in French."},
    ]
    assert request.source == "responses" and request.enable_thinking is None


def test_a_long_prefill_repeats_in_progress(monkeypatch):
    """Codex's idle timer counts events: a prefill longer than PROGRESS_SECONDS says it is still in progress."""
    body = ResponsesRequest.model_validate({"model": "m", "input": "Hi"})
    stream = responses.ResponseStream(body, {})
    events = stream.start(Started(4000, 0))
    assert stream.feed(PrefillProgress(512, 4000)) == []  # too soon
    monkeypatch.setattr(responses, "PROGRESS_SECONDS", 0)
    events += (
        stream.feed(PrefillProgress(1024, 4000))
        + stream.feed(TextDelta("Hello"))
        + stream.feed(Done("end", Usage(4000, 0, 1), Timings(0, 0, 0)))
    )
    assert [e["type"] for e in events][:4] == [
        "response.created",
        "response.in_progress",
        "response.in_progress",
        "response.output_item.added",
    ]
    check_order(events)


def test_warm_takes_a_captured_codex_request(tmp_path):
    """`--warm` with a captured Codex-shaped first turn prefills the prompt its next turn starts with."""
    captured = tmp_path / "codex-first-turn.json"
    captured.write_text(json.dumps({"body": CODEX_BODY}))
    request = warm_request(captured)
    again, _ = to_request(ResponsesRequest.model_validate(CODEX_BODY))
    assert request.source == "responses" and request.max_tokens == 1 and request.messages == again.messages
    assert [t["function"]["name"] for t in request.tools] == [t["function"]["name"] for t in again.tools]
