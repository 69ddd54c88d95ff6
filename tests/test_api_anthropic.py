"""The Anthropic Messages API with the official SDK (and raw HTTP where the wire itself matters)."""

import json

import anthropic
import httpx
import pytest
from conftest import CLAUDE_CODE_SAMPLE, tokens_until

from mlx_tui.api.anthropic import sign
from mlx_tui.engine.demo.conversations import CONVERSATIONS, FALLBACK_REPLY, TOOLS

ANTHROPIC_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]
THINKING = {"type": "enabled", "budget_tokens": 1024}


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def assistant_blocks(message: dict) -> list[dict]:
    blocks = []
    if reasoning := message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": sign(reasoning)})
    if message["content"]:
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls", []):
        function = call["function"]
        blocks.append({"type": "tool_use", "id": call["id"], "name": function["name"], "input": function["arguments"]})
    return blocks


def to_anthropic(messages: list[dict]) -> dict:
    """Chat-template messages as Anthropic's `system` and `messages`."""
    system, out = None, []
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            out.append({"role": "user", "content": m["content"]})
        elif m["role"] == "assistant":
            out.append({"role": "assistant", "content": assistant_blocks(m)})
        else:
            result = {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}
            if out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(result)
            else:
                out.append({"role": "user", "content": [result]})
    return {"messages": out} | ({"system": system} if system else {})


def request(conversation: dict, thinking: bool) -> dict:
    body = {"model": "any-name", **to_anthropic(conversation["messages"][:-1])}
    if conversation["tools"]:
        body["tools"] = ANTHROPIC_TOOLS
    if thinking:
        body["thinking"] = THINKING
    return body


def generate(client, body: dict, stream: bool, **settings):
    """The reply, whole or streamed; greedy, the server's default (this SDK has no `temperature`)."""
    settings = {"max_tokens": 256} | settings
    if not stream:
        return client.messages.create(**body, **settings)
    with client.messages.stream(**body, **settings) as events:
        return events.get_final_message()


def texts(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def calls(message) -> list:
    return [(b.name, b.input) for b in message.content if b.type == "tool_use"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "plain"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=[c["name"] for c in CONVERSATIONS])
def test_replays_conversation(client, conversation, thinking, stream):
    body = request(conversation, thinking)
    message = generate(client, body, stream)
    expected = conversation["messages"][-1]
    assert texts(message) == expected["content"]
    assert calls(message) == [
        (c["function"]["name"], c["function"]["arguments"]) for c in expected.get("tool_calls", [])
    ]
    assert all(b.id.startswith("toolu_") for b in message.content if b.type == "tool_use")
    reasoning = [b for b in message.content if b.type == "thinking"]
    if thinking and expected.get("reasoning_content"):
        [block] = reasoning
        assert block.thinking == expected["reasoning_content"] and block.signature == sign(block.thinking)
    else:
        assert reasoning == []
    assert message.stop_reason == ("tool_use" if expected.get("tool_calls") else "end_turn")
    assert message.id.startswith("msg_") and message.model == "any-name"
    used = message.usage
    prompt = client.messages.count_tokens(**body).input_tokens
    assert used.input_tokens + used.cache_read_input_tokens + used.cache_creation_input_tokens == prompt
    assert used.output_tokens > 0


def test_thinking_round_trip(client):
    """The thinking block the server returned is accepted back as the model's own reasoning."""
    [first, second] = [c for c in CONVERSATIONS if c["name"] in ("reasoning", "reasoning_multi_turn")]
    body = request(first, thinking=True)
    reply = generate(client, body, stream=False)
    body["messages"] += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]},
        {"role": "user", "content": second["messages"][-2]["content"]},
    ]
    message = generate(client, body, stream=True)
    assert texts(message) == second["messages"][-1]["content"]
    forged = json.loads(json.dumps(body))
    forged["messages"][1]["content"][0]["signature"] = "forged"
    assert client.messages.count_tokens(**forged).input_tokens < client.messages.count_tokens(**body).input_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_sequence(client, stream):
    greeting = CONVERSATIONS[0]
    message = generate(client, request(greeting, True), stream, stop_sequences=["help", "nowhere"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "help"
    assert texts(message) == greeting["messages"][-1]["content"].split("help")[0]  # as generated, up to the stop


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_max_tokens(client, stream):
    message = generate(client, request(CONVERSATIONS[0], True), stream, max_tokens=3)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_huge_max_tokens_is_capped_not_refused(client):
    message = generate(client, request(CONVERSATIONS[0], True), True, max_tokens=10**9)
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}], ids=["any", "tool"])
def test_tool_choice_forces_a_call(client, choice):
    """A forced call starts in the prompt (engine tests show the forcing itself); the call comes back whole."""
    weather = next(c for c in CONVERSATIONS if c["name"] == "weather_tokyo")
    message = generate(client, request(weather, False), False, tool_choice=choice)
    assert calls(message) == [("get_weather", {"city": "Tokyo"})]
    assert message.stop_reason == "tool_use"


def test_tool_choice_none_leaves_the_tools_out(client):
    weather = next(c for c in CONVERSATIONS if c["name"] == "weather_paris")
    message = generate(client, request(weather, True), False, tool_choice={"type": "none"})
    assert calls(message) == []


def test_stream_event_sequence(server):
    """The exact wire sequence for a call with text before it, as Anthropic sends it."""
    conversation = next(c for c in CONVERSATIONS if c["name"] == "text_then_call")
    body = request(conversation, True) | {"max_tokens": 100, "stream": True}
    names = []
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
    names = [n for n in names if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    blocks = " ".join(names[1:-2]).replace("content_block_delta ", "")
    assert blocks == "content_block_start content_block_stop content_block_start content_block_stop"


def test_claude_code_sample_as_is(server):
    """Claude Code's first turn, headers and body as it sent them, streams to message_stop."""
    with open(CLAUDE_CODE_SAMPLE) as f:
        sample = json.load(f)
    skip = {"host", "content-length", "connection", "accept-encoding"}
    headers = {k: v for k, v in sample["headers"].items() if k.lower() not in skip}
    events = []
    with httpx.stream(
        "POST", server.url + sample["path"], headers=headers, json=sample["body"], timeout=300
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    kinds = [e["type"] for e in events if e["type"] != "ping"]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert text == FALLBACK_REPLY
    counted = httpx.post(f"{server.url}/v1/messages/count_tokens", headers=headers, json=sample["body"], timeout=60)
    prompt = counted.json()["input_tokens"]
    assert (
        events[0]["message"]["usage"]["input_tokens"] + events[0]["message"]["usage"]["cache_read_input_tokens"]
        == prompt
    )


def test_models_in_anthropic_shape(client):
    [model] = client.models.list().data
    assert model.id == "mlx-tui-demo" and model.type == "model"


def without_ids(message) -> dict:
    """The message's content and ending, with the ids each response makes anew left out."""
    content = [{k: v for k, v in b.model_dump().items() if k != "id"} for b in message.content]
    return {"content": content, "stop_reason": message.stop_reason, "output_tokens": message.usage.output_tokens}


def stream_events(client, body: dict, **settings) -> tuple[list, object]:
    with client.messages.stream(**body, **({"max_tokens": 256} | settings)) as stream:
        return list(stream), stream.get_final_message()


def test_tool_arguments_stream_in_pieces(client):
    parallel = next(c for c in CONVERSATIONS if c["name"] == "parallel_calls")
    body = request(parallel, False)
    events, message = stream_events(client, body)
    for block in (b for b in message.content if b.type == "tool_use"):
        index = message.content.index(block)
        pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.index == index]
        stop = next(i for i, e in enumerate(events) if e.type == "content_block_stop" and e.index == index)
        assert len(pieces) > 1 and all(e.type != "content_block_delta" or e.index != index for e in events[stop:])
        assert json.loads("".join(pieces)) == block.input
    assert calls(message) == [
        (c["function"]["name"], c["function"]["arguments"]) for c in parallel["messages"][-1]["tool_calls"]
    ]
    assert without_ids(message) == without_ids(generate(client, body, stream=False))


def test_a_call_cut_off_by_max_tokens_ends_well_formed(client, loop, engine):
    weather = next(c for c in CONVERSATIONS if c["name"] == "weather_paris")
    cut = tokens_until(loop, engine, weather, '"city": "Pa')
    body = request(weather, False)
    events, message = stream_events(client, body, max_tokens=cut)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == cut
    assert calls(message) == [("get_weather", {"city": "Pa"})]
    [index] = [i for i, b in enumerate(message.content) if b.type == "tool_use"]
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.index == index]
    assert json.loads("".join(pieces)) == {"city": "Pa"}
    assert [e.type for e in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert without_ids(message) == without_ids(generate(client, body, stream=False, max_tokens=cut))
