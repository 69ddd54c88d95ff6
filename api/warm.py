"""`--warm FILE`: prefill a system prompt or a whole request at start, so the first real request hits the cache."""

import json
from pathlib import Path

from pydantic import ValidationError

from mlx_tui.engine.client import EngineClient
from mlx_tui.engine.events import Done, Error
from mlx_tui.engine.request import GenerationRequest

from . import anthropic, openai, responses
from .anthropic_models import MessagesRequest
from .openai_models import ChatRequest
from .responses_models import ResponsesRequest


def warm_request(path: Path) -> GenerationRequest:
    """The request to prefill: an Anthropic, OpenAI or Responses request body as JSON, or else a system prompt as text.

    A JSON body with a top-level `system`, or tools with `input_schema`, is read as Anthropic's;
    one with `input` (as Codex sends) as a Responses request. ValueError (one line) for a JSON
    file that is not a request body.
    """
    text = path.read_text()
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        if path.suffix == ".json" or text.lstrip().startswith(("{", "[")):
            raise ValueError(f"not valid JSON: {e}") from None
        return GenerationRequest(
            messages=[{"role": "system", "content": text}, {"role": "user", "content": ""}], max_tokens=1
        )
    if isinstance(body, dict) and isinstance(body.get("body"), dict):
        body = body["body"]  # a captured request holds the body under "body"
    if not isinstance(body, dict):
        raise ValueError("a JSON file must hold a request body (an object)")
    try:
        if "system" in body or any(isinstance(t, dict) and "input_schema" in t for t in body.get("tools") or ()):
            request = anthropic.to_request(MessagesRequest.model_validate(body | {"stream": False}))
        elif "input" in body:
            request, _ = responses.to_request(ResponsesRequest.model_validate(body | {"stream": False}))
        else:
            request = openai.to_request(ChatRequest.model_validate(body | {"stream": False}))
    except ValidationError as e:
        where = ".".join(map(str, e.errors()[0]["loc"]))
        raise ValueError(
            f"not an Anthropic, OpenAI or Responses request body: {where}: {e.errors()[0]['msg']}"
        ) from None
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
