"""What the server shows about itself: Prometheus metrics, the dashboard's snapshot, its event bus, transcripts."""

import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlx_tui.engine.bus import RequestStep, encode
from mlx_tui.engine.client import EngineClient

from .errors import ApiError


def engine_of(request: Request) -> EngineClient:
    return request.app.state.engine


async def metrics(request: Request) -> Response:
    return Response(engine_of(request).metrics.text(), media_type="text/plain; version=0.0.4")


async def stats(request: Request) -> Response:
    """The latest stats tick with the engine's state: what the dashboard shows."""
    engine = engine_of(request)
    return JSONResponse(
        {
            **engine.health(),
            "info": engine.info,
            "uptime_s": time.time() - engine.started_at,
            "stats": engine.last_stats,
            "recent_requests": [encode(e) for e in engine.bus.recent if isinstance(e, RequestStep)],
        }
    )


async def events(request: Request) -> Response:
    """The event bus as server-sent events, one JSON object per message, the recent ones first."""

    async def stream() -> AsyncIterator[dict[str, str]]:
        async for event in engine_of(request).bus.subscribe(replay=True):
            yield {"data": json.dumps(encode(event), default=str)}

    return EventSourceResponse(stream(), ping=15)


async def transcripts(request: Request) -> Response:
    items = engine_of(request).transcripts.items.values()
    return JSONResponse({"data": [t.summary() for t in reversed(items)]})


async def transcript(request: Request) -> Response:
    found = engine_of(request).transcripts.items.get(request.path_params["id"])
    if found is None:
        raise ApiError(404, f"no transcript {request.path_params['id']!r} (only the most recent are kept)")
    return JSONResponse(asdict(found))
