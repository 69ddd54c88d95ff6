"""The OpenAI Chat Completions API with the official SDK."""

import json

import openai
import pytest
from conftest import tokens_until

from mlx_tui.engine.demo.conversations import CONVERSATIONS, TOOLS
from mlx_tui.engine.request import GenerationRequest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def to_openai(messages: list[dict]) -> list[dict]:
    """Chat-template messages as OpenAI's: the same, with tool-call arguments as JSON text."""
    out = []
    for m in messages:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [
                {**c, "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def request(conversation: dict, thinking: bool) -> dict:
    body = {"model": "any-name", "messages": to_openai(conversation["messages"][:-1])}
    if conversation["tools"]:
        body["tools"] = TOOLS
    return body | {"extra_body": {"chat_template_kwargs": {"enable_thinking": thinking}}}


def generate(client, body: dict, stream: bool, **settings) -> tuple[dict, str, dict]:
    """The message (content, reasoning_content, tool_calls), its finish reason and usage."""
    settings = {"max_tokens": 256, "temperature": 0} | settings
    if not stream:
        completion = client.chat.completions.create(**body, **settings)
        [choice] = completion.choices
        message = choice.message
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
        reasoning = getattr(message, "reasoning_content", None)
        return (
            {"content": message.content or "", "reasoning": reasoning, "calls": calls},
            choice.finish_reason,
            completion.usage,
        )
    message = {"content": "", "reasoning": None, "calls": []}
    finish_reason = usage = None
    chunks = client.chat.completions.create(**body, **settings, stream=True, stream_options={"include_usage": True})
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta
            message["content"] += delta.content or ""
            if reasoning := getattr(delta, "reasoning_content", None):
                message["reasoning"] = (message["reasoning"] or "") + reasoning
            for call in delta.tool_calls or []:
                if call.id:
                    assert call.index == len(message["calls"]) and call.function.name
                    message["calls"].append((call.id, call.function.name, call.function.arguments or ""))
                else:
                    call_id, name, arguments = message["calls"][call.index]
                    message["calls"][call.index] = (call_id, name, arguments + call.function.arguments)
            finish_reason = choice.finish_reason or finish_reason
    return message, finish_reason, usage


def prompt_tokens(loop, engine, conversation, thinking) -> int:
    request = GenerationRequest(conversation["messages"][:-1], tools=conversation["tools"], enable_thinking=thinking)
    return loop.run(engine.count_tokens(request))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "plain"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=[c["name"] for c in CONVERSATIONS])
def test_replays_conversation(client, loop, engine, conversation, thinking, stream):
    message, finish_reason, usage = generate(client, request(conversation, thinking), stream)
    expected = conversation["messages"][-1]
    assert message["content"] == expected["content"]
    want_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in expected.get("tool_calls", [])]
    assert [(name, json.loads(arguments)) for _, name, arguments in message["calls"]] == want_calls
    assert all(call_id.startswith("call_") for call_id, _, _ in message["calls"])
    assert message["reasoning"] == (expected.get("reasoning_content") if thinking else None)
    assert finish_reason == ("tool_calls" if want_calls else "stop")
    assert usage.prompt_tokens == prompt_tokens(loop, engine, conversation, thinking)
    assert usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_length(client, stream):
    _, finish_reason, usage = generate(client, request(CONVERSATIONS[0], True), stream, max_completion_tokens=3)
    assert finish_reason == "length" and usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop(client, stream):
    greeting = CONVERSATIONS[0]
    message, finish_reason, _ = generate(client, request(greeting, True), stream, stop=["help"])
    assert finish_reason == "stop"
    assert message["content"] == greeting["messages"][-1]["content"].split("help")[0]  # as generated, up to the stop


def test_fields_clients_send_routinely_are_accepted(client):
    settings = dict(
        parallel_tool_calls=True,
        user="someone",
        store=False,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logit_bias={"5": 1},
        seed=7,
        metadata={"k": "v"},
        service_tier="auto",
        n=1,
    )
    message, finish_reason, _ = generate(client, request(CONVERSATIONS[0], True), False, **settings)
    assert finish_reason == "stop" and message["content"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_forces_a_call(client, choice):
    """A forced call starts in the prompt (engine tests show the forcing itself); the call comes back whole."""
    weather = next(c for c in CONVERSATIONS if c["name"] == "weather_tokyo")
    message, finish_reason, _ = generate(client, request(weather, thinking=False), False, tool_choice=choice)
    [(_, name, arguments)] = message["calls"]
    assert (name, json.loads(arguments)) == ("get_weather", {"city": "Tokyo"})
    assert finish_reason == "tool_calls"


def test_n_above_one_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        generate(client, request(CONVERSATIONS[0], True), False, n=2)
    assert "n" in caught.value.body["message"]


def test_models_in_openai_shape(client):
    [model] = client.models.list().data
    assert model.id == "mlx-tui-demo" and model.object == "model"


def stream_pieces(client, body: dict, **settings) -> tuple[list, dict, str]:
    """The raw tool-call deltas of a streamed reply, the message they build, and its finish reason."""
    settings = {"max_tokens": 256, "temperature": 0} | settings
    pieces, message, finish_reason = [], {"content": "", "calls": []}, None
    for chunk in client.chat.completions.create(**body, **settings, stream=True):
        for choice in chunk.choices:
            message["content"] += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                pieces.append(call)
                if call.id:
                    message["calls"].append([call.function.name, call.function.arguments or ""])
                else:
                    message["calls"][call.index][1] += call.function.arguments
            finish_reason = choice.finish_reason or finish_reason
    return pieces, message, finish_reason


def test_tool_arguments_stream_in_pieces(client):
    parallel = next(c for c in CONVERSATIONS if c["name"] == "parallel_calls")
    body = request(parallel, thinking=False)
    pieces, message, finish_reason = stream_pieces(client, body)
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in parallel["messages"][-1]["tool_calls"]]
    assert [(name, json.loads(arguments)) for name, arguments in message["calls"]] == want
    for index in range(len(want)):
        first, *rest = [p for p in pieces if p.index == index]
        assert first.id and first.function.name and len(rest) > 1
        assert all(p.id is None and p.function.name is None for p in rest)
    whole, whole_reason, _ = generate(client, body, stream=False)
    assert [(name, arguments) for _, name, arguments in whole["calls"]] == [tuple(c) for c in message["calls"]]
    assert finish_reason == whole_reason == "tool_calls"


def test_a_call_cut_off_by_the_length_ends_well_formed(client, loop, engine):
    weather = next(c for c in CONVERSATIONS if c["name"] == "weather_paris")
    cut = tokens_until(loop, engine, weather, '"city": "Pa')
    body = request(weather, thinking=False)
    _, message, finish_reason = stream_pieces(client, body, max_tokens=cut)
    assert finish_reason == "length"
    assert [(name, json.loads(arguments)) for name, arguments in message["calls"]] == [("get_weather", {"city": "Pa"})]
    whole, whole_reason, usage = generate(client, body, stream=False, max_tokens=cut)
    assert [(name, arguments) for _, name, arguments in whole["calls"]] == [tuple(c) for c in message["calls"]]
    assert whole_reason == "length" and usage.completion_tokens == cut
    with client.chat.completions.stream(**body, max_tokens=cut, temperature=0) as stream:  # the SDK's own accumulation
        kinds = [event.type for event in stream]
        [choice] = stream.current_completion_snapshot.choices
    assert "tool_calls.function.arguments.delta" in kinds and choice.finish_reason == "length"
    assert choice.message.tool_calls[0].function.arguments == message["calls"][0][1]
