"""The OpenAI Responses API (what Codex CLI speaks) with the official SDK, whose stream accumulator checks the event order."""

import json

import httpx
import openai
import pytest

from mlx_tui.engine.demo.conversations import TOOLS
from mlx_tui.engine.request import Request

FUNCTIONS = [{"type": "function", **t["function"]} for t in TOOLS]
PARIS = "What is the weather in Paris?"
PARIS_RESULT = '{"city": "Paris", "temperature_c": 18, "condition": "sunny"}'


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def ask(client, stream: bool, **body):
    """The final Response, from `responses.create` or from `responses.stream` (which checks each event against the last)."""
    body = {"model": "any-name", "temperature": 0, "max_output_tokens": 256} | body
    if not stream:
        return client.responses.create(**body)
    with client.responses.stream(**body) as events:
        for _ in events:
            pass
        return events.get_final_response()


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


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_text(client, stream):
    response = ask(client, stream, input="Good morning!", reasoning={"effort": "none"})
    assert response.status == "completed" and response.object == "response" and response.id.startswith("resp_")
    assert texts(response) == "Good morning! How can I help you today?" == response.output_text
    [message] = response.output
    assert message.status == "completed" and message.content[0].annotations == []
    assert response.usage.output_tokens_details.reasoning_tokens == 0
