"""What both protocols share: a bounded, validated body; one request's trip through the engine; a client leaving."""

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlx_tui.engine.client import EngineClient, EngineUnavailable
from mlx_tui.engine.events import Error, Event, Started
from mlx_tui.engine.request import GenerationRequest

from .errors import ApiError, from_event, from_unavailable

Body = TypeVar("Body", bound=BaseModel)
FAULT_HEADER = "x-mlx-tui-fault"


async def read_body(request: Request) -> bytes:
    """The raw body, or 413 as soon as it is known to exceed the app's limit."""
    limit = request.app.state.max_body
    too_large = ApiError(413, f"the request body is larger than {limit} bytes")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def parse(request: Request, model: type[Body]) -> tuple[Body, Any]:
    """The body validated against `model` (400 naming the first problems otherwise), and as received."""
    raw = await read_body(request)
    try:
        return model.model_validate_json(raw), json.loads(raw)
    except ValidationError as e:
        raise ApiError(400, describe(e)) from None


def describe(error: ValidationError, most: int = 3) -> str:
    problems = []
    for e in error.errors(include_url=False)[:most]:
        where = ".".join(str(part) for part in e["loc"])
        problems.append(f"{where}: {e['msg']}" if where else e["msg"])
    more = error.error_count() - most
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def engine_of(request: Request) -> EngineClient:
    return request.app.state.engine


class FrameStream(Protocol):
    """A protocol's frames for one reply, from the engine's events (each protocol's stream class)."""

    def start(self, started: Started) -> list[Any]: ...

    def feed(self, event: Event) -> list[Any]: ...


class Exchange:
    """One request's trip through the engine, kept as a transcript: start, events, what was sent, finish."""

    def __init__(self, http: Request, request: GenerationRequest, id: str, received: Any) -> None:
        self.engine = engine_of(http)
        if http.app.state.debug_faults:
            request.fault = http.headers.get(FAULT_HEADER)
        self.request = request
        self.id = id
        self.transcript = self.engine.transcripts.open(id, request.source, request.client, received)
        self.events: AsyncGenerator[Event, None] | None = None
        self.finished = False

    async def start(self) -> Started:
        """Submit the request and wait for its Started event.

        A failure before that (engine unavailable, prompt too long, bad settings) raises
        ApiError, so the client gets an HTTP error status rather than a broken stream.
        """
        try:
            self.events = self.engine.generate(self.request, self.id, self.transcript)
            async for event in self.events:
                if isinstance(event, Started):
                    return event
                if isinstance(event, Error):
                    raise from_event(event)
            raise ApiError(500, "the engine ended the request without an answer")
        except BaseException as e:
            if self.events is not None:
                await self.events.aclose()
            self.finish()
            if isinstance(e, EngineUnavailable):
                raise from_unavailable(e) from None
            raise

    def rest(self) -> aclosing[AsyncGenerator[Event, None]]:
        """The events after Started, in a context that closes (and so cancels) the generation when left early."""
        assert self.events is not None  # start() began them
        return aclosing(self.events)

    async def collect(self, stream: FrameStream) -> list:
        """Every frame of a reply that is not streamed, from a protocol's `stream` (start, feed); an engine Error
        raises ApiError."""
        frames = stream.start(await self.start())
        async with self.rest() as events:
            async for event in events:
                if isinstance(event, Error):
                    raise from_event(event)
                frames += stream.feed(event)
        return frames

    async def frames(self, stream: FrameStream, started: Started) -> AsyncGenerator:
        """A streamed reply's frames from a protocol's `stream`, as the engine's events arrive."""
        async with self.rest() as events:
            for frame in stream.start(started):
                yield frame
            async for event in events:
                for frame in stream.feed(event):
                    yield frame

    async def respond(self, stream: FrameStream, fold: Callable[[list], dict]) -> JSONResponse:
        """A reply that is not streamed: its frames folded by `fold` into the protocol's one object."""
        try:
            body = fold(await self.collect(stream))
            self.sent(dumps(body))
            return JSONResponse(body)
        finally:
            self.finish()

    def sent(self, text: str) -> None:
        self.engine.transcripts.sent(self.transcript, text)

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.transcripts.finish(self.transcript)


async def count_tokens(engine: EngineClient, request: GenerationRequest) -> int:
    try:
        count = await engine.count_tokens(request)
    except EngineUnavailable as e:
        raise from_unavailable(e) from None
    if isinstance(count, Error):
        raise from_event(count)
    return count


async def unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Await `work`, cancelling it if the client disconnects first (a non-streaming generation)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
    if task.cancelled():
        return Response(status_code=499)  # nobody is left to read it
    return task.result()


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # json.dumps with options builds one per call


def dumps(data: dict) -> str:
    return JSON.encode(data)


def sse_frame(text: str, event: str | None = None) -> bytes:
    """One server-sent event as sse-starlette's `ServerSentEvent` encodes it, for `text` on one line (JSON's):
    the same bytes, without its work per event."""
    head = f"event: {event}\r\n" if event else ""
    return f"{head}data: {text}\r\n\r\n".encode()
