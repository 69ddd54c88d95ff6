"""The observability routes on the shared server: metrics, stats, the event stream and transcripts."""

import json

import httpx
import openai

from mlx_tui.engine.demo.conversations import TOOLS


def ask_for_weather(server) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS
    )
    return reply.id


def test_metrics_use_the_vllm_style_names(server):
    ask_for_weather(server)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "mlx_tui:prompt_tokens_total",
        "mlx_tui:generation_tokens_total",
        "mlx_tui:prefix_cache_queries_total",
        "mlx_tui:prefix_cache_hits_total",
        "mlx_tui:num_requests_running",
        "mlx_tui:num_requests_waiting",
        "mlx_tui:time_to_first_token_seconds_bucket",
        "mlx_tui:circuit_breaker_state",
    ):
        assert name in text, name
    generated = next(line for line in text.splitlines() if line.startswith("mlx_tui:generation_tokens_total"))
    assert float(generated.split()[-1]) > 0


def test_transcript_of_a_tool_call(server):
    id = ask_for_weather(server)
    listed = httpx.get(server.url + "/v1/transcripts").json()["data"]
    assert any(t["id"] == id and t["tool_calls"] == 1 for t in listed)
    t = httpx.get(f"{server.url}/v1/transcripts/{id}").json()
    assert t["received"]["messages"][0]["content"] == "What is the weather in Paris?"
    assert "<tool_call>" in t["raw"] and "<tool_call>" not in "".join(t["prompt"].split("<tools>")[0])
    assert t["tool_calls"][0]["name"] == "get_weather" and t["tool_calls"][0]["arguments"] == {"city": "Paris"}
    assert t["sent"] and t["stop_reason"] == "tool_calls"
    missing = httpx.get(server.url + "/v1/transcripts/nope")
    assert missing.status_code == 404 and "error" in missing.json()


def test_event_stream_replays_and_follows(server):
    id = ask_for_weather(server)
    seen = set()
    with httpx.stream("GET", server.url + "/v1/events", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event.get("id") == id:
                    seen.add((event["kind"], event.get("phase") or event.get("step")))
            if ("request", "done") in seen and ("transcript", "finish") in seen:
                break
    assert ("transcript", "tool_call") in seen


def test_stats_snapshot(server):
    ask_for_weather(server)
    stats = httpx.get(server.url + "/v1/stats").json()
    assert stats["state"] == "ready" and stats["breaker"]["state"] == "closed"
    assert stats["info"]["tool_parser"] == "json_tools"
    assert any(r["phase"] == "done" for r in stats["recent_requests"])
    assert httpx.get(server.url + "/health").json()["uptime_s"] >= 0


def test_speculation_is_counted_in_metrics_and_transcripts(server):
    """The demo model's tool call copies the tool's name and argument from the prompt: drafts are kept."""
    id = ask_for_weather(server)
    t = httpx.get(f"{server.url}/v1/transcripts/{id}").json()
    assert 0 < t["drafted_tokens"] < t["generated_tokens"]
    assert httpx.get(server.url + "/health").json()["speculation"].startswith("prompt lookup")
    with httpx.stream("GET", server.url + "/v1/events", timeout=30) as response:  # the next stats tick has them
        for line in response.iter_lines():
            if line.startswith("data: ") and (event := json.loads(line[6:]))["kind"] == "stats":
                if event["speculation"]["accepted_tokens"] >= t["drafted_tokens"]:
                    break
    text = httpx.get(server.url + "/metrics").text
    counts = {
        name: float(
            next(line for line in text.splitlines() if line.startswith(f"mlx_tui:spec_decode_{name}_total")).split()[-1]
        )
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    }
    assert (
        0 < counts["num_drafts"] and t["drafted_tokens"] <= counts["num_accepted_tokens"] <= counts["num_draft_tokens"]
    )
