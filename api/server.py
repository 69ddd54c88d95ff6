"""The Starlette app: the routes in one list, the API-key and Host checks, errors in the caller's protocol."""

import hmac
import ipaddress
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_tui.engine.client import EngineClient

from . import anthropic, observe, openai, responses
from .errors import ApiError, error_response

log = logging.getLogger("mlx_tui.api")
HEALTH_STATUS = {"ready": "ok", "loading": "loading", "restarting": "restarting", "stopping": "stopping"}
STARTED = datetime.now(UTC)


async def health(request: Request) -> Response:
    engine: EngineClient = request.app.state.engine
    health, info = engine.health(), engine.info
    status = HEALTH_STATUS.get(health["state"], "degraded")
    return JSONResponse(
        {
            "status": "degraded" if health["breaker"]["state"] != "closed" else status,
            "model": engine.model_name,
            "breaker": health["breaker"],
            "worker": {"pid": health["pid"], "restarts": health["restarts"]},
            "ranks": len(health["rank_states"]),
            "rank_states": health["rank_states"],
            "blas": engine.blas,
            "dtype": info.get("dtype"),
            "dtype_note": info.get("dtype_note"),
            "tool_parser": info.get("tool_parser"),
            "prefix_cache": info.get("cache_mode"),
            "speculation": info.get("speculation"),
            "stream_interval_ms": info.get("stream_interval_ms"),
            "uptime_s": round(time.time() - engine.started_at, 1),
        }
    )


async def models(request: Request) -> Response:
    """The one served model, in Anthropic's list shape when asked with `anthropic-version`."""
    name = request.app.state.engine.model_name
    if "anthropic-version" in request.headers:
        created = STARTED.isoformat().replace("+00:00", "Z")
        model = {"type": "model", "id": name, "display_name": name, "created_at": created}
        return JSONResponse({"data": [model], "has_more": False, "first_id": name, "last_id": name})
    model = {"id": name, "object": "model", "created": int(STARTED.timestamp()), "owned_by": "mlx-tui"}
    return JSONResponse({"object": "list", "data": [model]})


ROUTES = [
    Route("/v1/messages", anthropic.messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", anthropic.count_tokens, methods=["POST"]),
    Route("/v1/chat/completions", openai.chat_completions, methods=["POST"]),
    Route("/v1/responses", responses.responses, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", observe.metrics, methods=["GET"]),
    Route("/v1/stats", observe.stats, methods=["GET"]),
    Route("/v1/events", observe.events, methods=["GET"]),
    Route("/v1/transcripts", observe.transcripts, methods=["GET"]),
    Route("/v1/transcripts/{id}", observe.transcript, methods=["GET"]),
]


def loopback_host(host: str) -> bool:
    """Whether a Host header (or a --host) names this machine's loopback (a name a web page cannot rebind).

    The one loopback rule: the Host check below, and serving without an API key.
    """
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.removeprefix("[").split("]")[0].lower()
    if name in ("localhost", "localhost.localdomain") or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Guard:
    """Requires the API key (but on /health) when one is set; otherwise a loopback Host and Origin.

    Without a key, the Host check is what stops a web page from reaching the server
    through a DNS name rebound to 127.0.0.1, and the Origin check stops any other web
    page from posting to it (a form post needs no CORS preflight).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, allow_any_host: bool) -> None:
        self.app = app
        self.api_key = api_key
        self.allow_any_host = allow_any_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            refusal = self.refusal(request)
            if refusal:
                await error_response(request, *refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> tuple[int, str] | None:
        if self.api_key is None:
            if self.allow_any_host:
                return None
            host, origin = request.headers.get("host", ""), request.headers.get("origin")
            if not loopback_host(host):
                return 403, f"the Host header {host!r} is not a loopback name; set an API key to serve other hosts"
            if origin is not None and not loopback_host(urlsplit(origin).netloc):
                return 403, f"requests from the web page at {origin!r} are refused; set an API key to allow them"
            return None
        if request.url.path == "/health":
            return None
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            return 401, "invalid API key: send it as x-api-key or Authorization: Bearer"
        return None


async def api_error(request: Request, exc: ApiError) -> Response:
    return error_response(request, exc.status, exc.message, exc.retry_after)


async def http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(request, exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


class CatchAll:
    """Answers an unexpected exception with a 500 in the caller's protocol and keeps the connection.

    (Starlette's own last-resort handler re-raises after answering, and uvicorn then
    drops the connection, failing the client's next request on it.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            log.exception("unexpected error answering %s", scope.get("path"))
            if scope["type"] == "http" and not started:
                message = f"internal server error: {type(e).__name__}"
                await error_response(Request(scope), 500, message)(scope, receive, send)


def create_app(
    engine: EngineClient,
    *,
    api_key: str | None = None,
    max_body_mb: float = 32,
    allow_any_host: bool = False,
    debug_faults: bool = False,
) -> Starlette:
    """The API app. `allow_any_host` lifts the Host check (for --insecure); `debug_faults` lets the
    X-MLX-TUI-Fault header inject a fault (see engine/faults.py)."""
    handlers: dict[Any, Callable[..., Any]] = {ApiError: api_error, HTTPException: http_error}
    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(CatchAll), Middleware(Guard, api_key=api_key, allow_any_host=allow_any_host)],
        exception_handlers=handlers,
    )
    app.state.engine = engine
    app.state.max_body = int(max_body_mb * 2**20)
    app.state.debug_faults = debug_faults
    return app
