"""Errors in the caller's protocol: Anthropic's or OpenAI's body, status and type names."""

import math

from starlette.requests import Request
from starlette.responses import JSONResponse

from mlx_tui.engine.client import EngineUnavailable
from mlx_tui.engine.events import Error

ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}

# The engine's words for a prompt over the context window (Anthropic clients act on them as they are).
TOO_LONG = "prompt is too long"

# An engine Error's kind as a status. "engine" means the worker died or its batch step
# failed: the engine restarts and a retry can succeed, which is what 529 (OpenAI: 503) says.
# "internal" is a failure in this request's own processing (a bug), hence 500.
KIND_STATUS = {
    "invalid_request": 400,
    "overloaded": 429,
    "engine": 529,
    "timeout": 504,
    "internal": 500,
    "cancelled": 500,
}


class ApiError(Exception):
    """A request that ends with an HTTP error; `status` is Anthropic's (529 is OpenAI's 503)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def from_event(error: Error) -> ApiError:
    return ApiError(KIND_STATUS.get(error.kind, 500), error.message)


def from_unavailable(e: EngineUnavailable) -> ApiError:
    """A full queue is a rate limit (429); an open breaker or a restarting engine is an overload (529)."""
    return ApiError(429 if e.reason == "busy" else 529, str(e), e.retry_after)


def anthropic_error(status: int, message: str) -> dict:
    kind = ANTHROPIC_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def openai_status(status: int) -> int:
    return 503 if status == 529 else status


def openai_code(message: str) -> str | None:
    """OpenAI's error code where a client acts on it: `context_length_exceeded` makes Codex compact its history."""
    return "context_length_exceeded" if message.startswith(TOO_LONG) else None


def openai_error(status: int, message: str) -> dict:
    status = openai_status(status)
    kind = OPENAI_TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": openai_code(message)}}


def speaks_anthropic(request: Request) -> bool:
    """Whether to answer in Anthropic's shape: its routes, or any route asked with its header."""
    return request.url.path.startswith("/v1/messages") or "anthropic-version" in request.headers


def error_response(request: Request, status: int, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"retry-after": str(math.ceil(retry_after))} if retry_after is not None else None
    if speaks_anthropic(request):
        return JSONResponse(anthropic_error(status, message), status, headers)
    return JSONResponse(openai_error(status, message), openai_status(status), headers)
