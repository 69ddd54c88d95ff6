"""Graceful shutdown: a real `mlx-tui --serve` process gets SIGTERM or SIGINT while it streams.

It refuses new requests, lets running ones finish within `--shutdown-grace`, ends the rest
with the protocol's error event, flushes the disk cache and transcripts, and exits 0.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import free_port, letter_token

from mlx_tui.tui.cli import listen, local_backend, parse_args

PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
HELLO = [{"role": "user", "content": "Good morning!"}]


class ServeProcess:
    """`mlx-tui --serve` on a free loopback port, its data under `home`; its stderr kept in `log`."""

    def __init__(self, home, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cache = home / "prefix-cache"
        self.transcripts = home / "data" / "mlx-tui" / "transcripts" / "transcripts.jsonl"
        env = {**os.environ, "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": str(home / "cache")}
        command = [
            sys.executable,
            "-m",
            "mlx_tui.tui.cli",
            "--serve",
            "--port",
            str(self.port),
            "--cache-dir",
            str(self.cache),
            "--loop-window",
            "0",
            *flags,
        ]
        # a session of its own, so that the test can signal its process group as a terminal's Ctrl-C does
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.log: list[str] = []
        self.serving = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        assert self.serving.wait(120), f"the server did not start: {self.stderr()}"
        self.worker_pid = self._health_once_listening()["worker"]["pid"]

    def _health_once_listening(self) -> dict:
        """/health, once uvicorn listens (it says "serving" just before)."""
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, f"the server exited: {self.stderr()}"
            try:
                return httpx.get(self.url + "/health", timeout=10).json()
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the server never listened"
                time.sleep(0.02)

    def _read_log(self):
        for line in self.process.stderr:
            self.log.append(line)
            if line.startswith("mlx-tui: serving"):
                self.serving.set()
        self.serving.set()  # it exited before serving: let the constructor fail at once

    def stderr(self) -> str:
        return "".join(self.log)

    def exit_code(self, within: float) -> int:
        try:
            return self.process.wait(within)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within {within} s: {self.stderr()}")

    def close(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def serve(tmp_path):
    processes = []

    def start(*flags: str) -> ServeProcess:
        processes.append(ServeProcess(tmp_path, *flags))
        return processes[-1]

    yield start
    for process in processes:
        process.close()


def data(line: str) -> dict | str:
    text = line.removeprefix("data: ")
    return text if text == "[DONE]" else json.loads(text)


def is_delta(protocol: str, item) -> bool:
    if protocol == "anthropic":
        return item["type"] == "content_block_delta"
    return isinstance(item, dict) and bool(item["choices"]) and bool(item["choices"][0]["delta"].get("content"))


@contextlib.contextmanager
def stream_until_delta(http: httpx.Client, url: str, protocol: str, body: dict, headers: dict | None = None):
    """A stream read up to its first text delta: its remaining lines, and the data read so far."""
    with http.stream("POST", url + PATHS[protocol], json=body, headers=headers or {}) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        seen = []
        for line in lines:
            if line.startswith("data: "):
                seen.append(data(line))
                if is_delta(protocol, seen[-1]):
                    yield lines, seen
                    return
        pytest.fail(f"the stream ended before its first delta: {seen}")


def rest(lines) -> list:
    return [data(line) for line in lines if line.startswith("data: ")]


def health(server: ServeProcess) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def until_stopping(server: ServeProcess):
    """Wait for the server to have taken the signal (its /health says so)."""
    deadline = time.monotonic() + 30
    while health(server)["status"] != "stopping":
        assert time.monotonic() < deadline, "the server never began stopping"
        time.sleep(0.02)


def test_sigterm_lets_a_running_stream_finish_and_refuses_new_requests(serve):
    server = serve("--shutdown-grace", "120")
    tokens = 4000  # long enough to outlast the checks below; it must still end normally
    body = {
        "model": "m",
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": HELLO,
        "logit_bias": {str(letter_token()): 50},
    }
    with httpx.Client(timeout=60) as http, stream_until_delta(http, server.url, "openai", body) as (lines, seen):
        server.process.send_signal(signal.SIGTERM)
        until_stopping(server)

        refused = [
            http.post(server.url + PATHS["anthropic"], json={"model": "m", "max_tokens": 8, "messages": HELLO}),
            http.post(server.url + PATHS["openai"], json={"model": "m", "max_tokens": 8, "messages": HELLO}),
        ]
        assert refused[0].status_code == 529 and refused[0].json()["error"]["type"] == "overloaded_error"
        assert refused[1].status_code == 503 and refused[1].json()["error"]["type"] == "service_unavailable"
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)

        seen += rest(lines)
    assert seen[-1] == "[DONE]", seen[-3:]
    assert seen[-2]["usage"]["completion_tokens"] == tokens, "the stream must run to its end"
    assert seen[-3]["choices"][0]["finish_reason"] == "length"
    assert server.exit_code(60) == 0, server.stderr()

    entries = list(server.cache.rglob("*.safetensors"))
    assert entries and not list(server.cache.rglob("*.partial.*")), "the disk cache is flushed before exit"
    assert server.transcripts.stat().st_mode & 0o777 == 0o600
    transcripts = [json.loads(line) for line in server.transcripts.read_text().splitlines()]
    finished = [t for t in transcripts if t["id"] == seen[0]["id"]]
    assert finished and finished[0]["stop_reason"] == "length" and finished[0]["finished"]
    with pytest.raises(ProcessLookupError):
        os.kill(server.worker_pid, 0)


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_a_stream_past_the_grace_ends_with_an_error_event(serve, protocol):
    server = serve("--shutdown-grace", "0.5", "--debug-faults")
    if protocol == "openai":  # an endless generation (one token forced), stopped by Ctrl-C in the terminal
        body = {
            "model": "m",
            "max_tokens": 30000,
            "stream": True,
            "messages": HELLO,
            "logit_bias": {str(letter_token()): 50},
        }
        headers = {}

        def send():
            os.killpg(server.process.pid, signal.SIGINT)  # the worker gets it too, and must not die of it
    else:  # Anthropic has no logit bias: the worker hangs at its fifth token, so the stream cannot end by itself
        body = {"model": "m", "max_tokens": 1000, "stream": True, "messages": HELLO}
        headers = {"x-mlx-tui-fault": "stall@5"}

        def send():
            server.process.send_signal(signal.SIGTERM)

    with httpx.Client(timeout=60) as http, stream_until_delta(http, server.url, protocol, body, headers) as (lines, _):
        began = time.monotonic()
        send()
        after = rest(lines)  # read to the end: the server ends the stream, it is not cut (that would raise)
    ended = time.monotonic() - began
    if protocol == "anthropic":
        error = after[-1]
        assert error["type"] == "error" and error["error"]["type"] == "overloaded_error", after[-3:]
        assert not any(item["type"] == "message_stop" for item in after)
    else:
        assert after[-1] == "[DONE]"
        error = after[-2]
        assert error["error"]["type"] == "service_unavailable", after[-3:]
        assert not any(
            isinstance(item, dict) and item.get("choices") and item["choices"][0]["finish_reason"] for item in after
        )
    assert "shutting down" in error["error"]["message"]
    assert ended < 10, f"the stream took {ended:.1f} s to end after the signal"
    assert server.exit_code(30) == 0, server.stderr()  # a hung worker is killed after 10 s
    with pytest.raises(ProcessLookupError):
        os.kill(server.worker_pid, 0)


def test_a_whole_answer_past_the_grace_is_an_error_response(serve):
    """Not streaming: the answer still running when the grace ends is a 503 in OpenAI's shape. An
    open /v1/events stream (never ending by itself) does not hold the exit up."""
    server = serve("--shutdown-grace", "0.5")
    body = {"model": "m", "max_tokens": 30000, "messages": HELLO, "logit_bias": {str(letter_token()): 50}}
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as http:
        with http.stream("GET", server.url + "/v1/events") as events:
            answer = pool.submit(httpx.post, server.url + PATHS["openai"], json=body, timeout=60)
            lines = events.iter_lines()
            for line in lines:  # the request's lifecycle, as the dashboard sees it
                event = json.loads(line.removeprefix("data: ")) if line.startswith("data: ") else {}
                if event.get("kind") == "request" and event.get("phase") == "generating":
                    break
            server.process.send_signal(signal.SIGTERM)
            response = answer.result(30)
            with contextlib.suppress(httpx.RemoteProtocolError):  # closed when the server exits
                rest(lines)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "service_unavailable"
    assert "shutting down" in response.json()["error"]["message"]
    assert server.exit_code(30) == 0, server.stderr()


def test_a_second_signal_ends_running_streams_at_once(serve):
    server = serve("--shutdown-grace", "120")
    body = {
        "model": "m",
        "max_tokens": 30000,
        "stream": True,
        "messages": HELLO,
        "logit_bias": {str(letter_token()): 50},
    }
    with httpx.Client(timeout=60) as http, stream_until_delta(http, server.url, "openai", body) as (lines, _):
        os.killpg(server.process.pid, signal.SIGINT)
        until_stopping(server)
        began = time.monotonic()
        os.killpg(server.process.pid, signal.SIGINT)
        after = rest(lines)
    ended = time.monotonic() - began
    assert after[-1] == "[DONE]" and after[-2]["error"]["type"] == "service_unavailable", after[-3:]
    assert "shutting down" in after[-2]["error"]["message"]
    assert ended < 10, f"the stream took {ended:.1f} s to end after the second signal, not at once"
    assert server.exit_code(30) == 0, server.stderr()


@pytest.mark.asyncio
async def test_the_dashboards_api_server_drains_on_stop():
    """UI mode: when the app quits (or gets SIGTERM), its backend's stop ends running streams the same way."""
    args = parse_args(
        [
            "--port",
            str(free_port()),
            "--shutdown-grace",
            "0.5",
            "--loop-window",
            "0",
            "--cache-disk-gb",
            "0",
            "--no-transcripts",
        ]
    )
    backend = local_backend(args, *listen(args))
    backend.start()
    body = {
        "model": "m",
        "max_tokens": 30000,
        "stream": True,
        "messages": HELLO,
        "logit_bias": {str(letter_token()): 50},
    }
    stopping = None
    try:
        await backend._loading
        async with httpx.AsyncClient(base_url=backend.address, timeout=60) as http:
            async with http.stream("POST", PATHS["openai"], json=body) as response:
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: ") and is_delta("openai", data(line)):
                        break
                stopping = asyncio.create_task(backend.stop())
                after = [data(line) async for line in lines if line.startswith("data: ")]
            await asyncio.wait_for(stopping, 30)
    finally:
        if stopping is None:
            await backend.stop()
    assert after[-1] == "[DONE]" and after[-2]["error"]["type"] == "service_unavailable", after[-3:]
    assert backend.engine.state == "stopped"


def test_no_transcripts_leaves_nothing_on_disk_after_a_shutdown(serve, tmp_path):
    server = serve("--no-transcripts", "--cache-disk-gb", "0")
    body = {"model": "m", "max_tokens": 8, "messages": HELLO}
    answer = httpx.post(server.url + PATHS["openai"], json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    listed = httpx.get(server.url + "/v1/transcripts", timeout=10).json()["data"]
    assert answer.json()["id"] in [t["id"] for t in listed], "kept in memory"
    server.process.send_signal(signal.SIGTERM)
    assert server.exit_code(30) == 0, server.stderr()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing may be written to disk"


def test_a_cache_folder_removed_while_serving_costs_the_disk_tier_not_the_exit(serve):
    """Writes into the removed folder fail: counted in /metrics, said once in the log, and SIGTERM still ends at
    once."""
    server = serve()

    def ask(text: str):
        body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": text}]}
        assert httpx.post(server.url + PATHS["openai"], json=body, timeout=60).status_code == 200

    ask("Good morning!")
    deadline = time.monotonic() + 30
    while not list(server.cache.rglob("*.safetensors")):  # the first entry is written behind the reply
        assert time.monotonic() < deadline, "the first entry was never written"
        time.sleep(0.05)
    shutil.rmtree(server.cache)
    ask("What is the capital of France?")
    ask("Hello there")
    deadline = time.monotonic() + 30
    while "mlx_tui:prefix_cache_disk_write_errors_total 2.0" not in httpx.get(server.url + "/metrics").text:
        assert time.monotonic() < deadline, "the failed writes never reached /metrics"
        time.sleep(0.2)
    began = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.exit_code(30) == 0, server.stderr()
    assert time.monotonic() - began < 5, "the worker's flush must not wait out the grace"
    assert "Traceback" not in server.stderr()
    assert server.stderr().count("disk cache: cannot write to") == 1, server.stderr()


def test_serve_never_imports_textual(serve, monkeypatch):
    """`--serve` is the engine and the API alone: the dashboard's framework is not even imported."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # each import on stderr: "import time: ... | module"
    server = serve("--no-transcripts", "--cache-disk-gb", "0")
    os.kill(server.process.pid, signal.SIGTERM)
    assert server.exit_code(30) == 0, server.stderr()
    imported = {line.rsplit("|", 1)[1].strip() for line in server.log if line.startswith("import time:")}
    assert "mlx_tui.api.headless" in imported
    assert not {m for m in imported if m.split(".")[0] == "textual"}
