"""The routes around generation: /health, /v1/models in both shapes, count_tokens; how a streamed frame is written."""

import httpx
from hypothesis import given
from hypothesis import strategies as st
from sse_starlette import ServerSentEvent

from mlx_tui.api import serving
from mlx_tui.engine.request import GenerationRequest

SCALARS = st.none() | st.booleans() | st.integers() | st.text()
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner))


def test_health(server, engine):
    """The contract's fields (later issues may add more, never rename)."""
    health = httpx.get(server.url + "/health").json()
    assert (
        health.items()
        >= {
            "status": "ok",
            "model": "mlx-tui-demo",
            "breaker": {"state": "closed", "failures": 0, "next_probe_s": None},
            "worker": {"pid": engine.pid, "restarts": engine.restarts},
            "ranks": 1,
            "blas": engine.blas,
            "dtype": engine.info["dtype"],
            "tool_parser": engine.info["tool_parser"],
            "stream_interval_ms": 50,  # auto, on the CPU backend
        }.items()
    )


def test_models_shape_follows_the_protocol_header(server):
    openai = httpx.get(server.url + "/v1/models").json()
    assert openai["object"] == "list" and openai["data"][0]["id"] == "mlx-tui-demo"
    anthropic = httpx.get(server.url + "/v1/models", headers={"anthropic-version": "2023-06-01"}).json()
    assert anthropic["data"][0]["type"] == "model" and anthropic["has_more"] is False


def test_count_tokens_matches_the_engine(server, loop, engine):
    body = {"model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "Good morning!"}]}
    counted = httpx.post(server.url + "/v1/messages/count_tokens", json=body).json()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Good morning!"}]
    assert counted == {
        "input_tokens": loop.run(engine.count_tokens(GenerationRequest(messages, enable_thinking=False)))
    }


def test_an_unexpected_error_is_a_500_in_protocol_and_keeps_the_connection(loop, engine):
    from conftest import Server
    from starlette.routing import Route

    from mlx_tui.api.server import create_app

    async def boom(request):
        raise RuntimeError("a bug")

    app = create_app(engine)
    app.router.routes.append(Route("/boom", boom))
    server = Server(loop, app)
    try:
        with httpx.Client(base_url=server.url) as client:
            answer = client.get("/boom", headers={"anthropic-version": "2023-06-01"})
            assert answer.status_code == 500
            assert answer.json()["error"]["type"] == "api_error"
            assert client.get("/health").status_code == 200, "the same connection still serves"
    finally:
        server.close()


@given(JSON, st.sampled_from([None, "message_start", "response.output_text.delta"]))
def test_a_frame_is_the_bytes_sse_starlette_would_send(data, name):
    text = serving.dumps({"data": data})
    assert serving.sse_frame(text, name) == ServerSentEvent(text, event=name).encode()
