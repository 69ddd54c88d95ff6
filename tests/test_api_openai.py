"""The OpenAI Chat Completions API with the official SDK."""

import json

import openai
import pytest

from mlx_tui.engine.demo.conversations import CONVERSATIONS, TOOLS
from mlx_tui.engine.request import Request


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
        return {"content": message.content or "", "reasoning": reasoning, "calls": calls}, choice.finish_reason, completion.usage
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
    request = Request(conversation["messages"][:-1], tools=conversation["tools"], enable_thinking=thinking)
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
    assert message["content"] == greeting["messages"][-1]["content"].split("help")[0].rstrip()


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
