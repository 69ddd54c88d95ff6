"""`--warm FILE`: prefill a system prompt or a whole request at start, so the first real request hits the cache."""

import json
from pathlib import Path

from mlx_tui.engine.client import EngineClient
from mlx_tui.engine.events import Done, Error
from mlx_tui.engine.request import Request

from . import anthropic, openai, responses
from .anthropic_models import MessagesRequest
from .openai_models import ChatRequest
from .responses_models import ResponsesRequest


def warm_request(path: Path) -> Request:
    """The request to prefill: an Anthropic, OpenAI or Responses request body as JSON, or else a system prompt as text.

    A JSON body with a top-level `system`, or tools with `input_schema`, is read as Anthropic's;
    one with `input` (as Codex sends) as a Responses request.
    """
    text = path.read_text()
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return Request(messages=[{"role": "system", "content": text}, {"role": "user", "content": ""}], max_tokens=1)
    body = body.get("body", body)  # a captured request, as in shared/samples, holds the body under "body"
    if "system" in body or any("input_schema" in t for t in body.get("tools") or ()):
        request = anthropic.to_request(MessagesRequest.model_validate(body | {"stream": False}))
    elif "input" in body:
        request, _ = responses.to_request(ResponsesRequest.model_validate(body | {"stream": False}))
    else:
        request = openai.to_request(ChatRequest.model_validate(body | {"stream": False}))
    request.max_tokens = 1
    return request


async def warm(engine: EngineClient, path: Path) -> str:
    """Prefill the file's prompt; a line saying how it went."""
    async for event in engine.generate(warm_request(path), request_id="warm-up"):
        if isinstance(event, Error):
            return f"warm-up from {path} failed: {event.message}"
        if isinstance(event, Done):
            return f"warmed the prefix cache with {event.usage.prompt_tokens} tokens from {path}"
    return f"warm-up from {path} ended without an answer"
