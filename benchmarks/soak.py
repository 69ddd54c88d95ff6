"""Soak: a bounded loopback run mixing normal requests, client disconnects and worker kills.

    .venv/bin/python -m benchmarks.soak               # 2 minutes
    .venv/bin/python -m benchmarks.soak --seconds 30

An engine and the API server run in this process (on the demo model unless --model is
given), with a private disk cache; clients stream requests over loopback in both
protocols, some leave mid-stream, and every --kill-every seconds the worker is killed
with SIGKILL (its pid read from /health). At the end it prints requests sent, faults
injected, requests that ended without a terminal event (must be 0) and restarts, and
exits 1 if any request lacked its terminal event or the server did not come back.
"""

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import tempfile
import time
from collections import Counter

import httpx
import uvicorn

from mlx_tui.api.server import create_app
from mlx_tui.engine.client import EngineClient
from mlx_tui.engine.config import EngineConfig

PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
PROMPTS = ["Good morning!", "What is the capital of France?", "What is 2 + 2?", "Who are you?", "Is 17 a prime number?"]
SYSTEM = "You are a helpful assistant on a soak test. Answer briefly."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120, help="how long to send traffic (default 120)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--kill-every", type=float, default=20, help="SIGKILL the worker this often, in seconds (0: never)")
    p.add_argument("--disconnect-rate", type=float, default=0.25, help="share of requests the client leaves mid-stream")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--model", help="a local mlx-lm model directory (default: the demo model)")
    return p.parse_args(argv)


def terminal(protocol: str, lines: list[str]) -> str | None:
    """How the stream ended: "done", "error", or None if it ended without a terminal event."""
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    if protocol == "openai":
        if not data or data[-1] != "[DONE]":
            return None
        return "error" if len(data) > 1 and data[-2].startswith('{"error"') else "done"
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    names = [n for n in names if n != "ping"]
    return {"message_stop": "done", "error": "error"}.get(names[-1]) if names else None


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, engine: EngineClient):
        self.args = args
        self.url = url
        self.engine = engine
        self.counts: Counter = Counter()
        self.lost: list[str] = []
        self.rng = random.Random(1)

    async def request(self, http: httpx.AsyncClient):
        protocol = self.rng.choice(["anthropic", "openai"])
        leave = self.rng.random() < self.args.disconnect_rate
        prompt = self.rng.choice(PROMPTS)
        if protocol == "anthropic":
            body = {
                "model": "m",
                "max_tokens": self.args.max_tokens,
                "stream": True,
                "system": SYSTEM,
                "messages": [{"role": "user", "content": prompt}],
            }
        else:
            body = {
                "model": "m",
                "max_tokens": self.args.max_tokens,
                "stream": True,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            }
        self.counts["sent"] += 1
        lines: list[str] = []
        try:
            async with http.stream("POST", self.url + PATHS[protocol], json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    self.counts[f"refused {response.status_code}"] += 1
                    return
                async for line in response.aiter_lines():
                    lines.append(line)
                    if leave and sum(x.startswith("data: ") for x in lines) >= 2:
                        self.counts["disconnected"] += 1
                        return
        except httpx.HTTPError as e:
            self.lost.append(f"{protocol}: {type(e).__name__}: {e} after {len(lines)} lines")
            return
        end = terminal(protocol, lines)
        if end is None:
            self.lost.append(f"{protocol}: stream ended without a terminal event: {lines[-3:]}")
        else:
            self.counts[end] += 1

    async def client(self, deadline: float):
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as http:
            while time.monotonic() < deadline:
                await self.request(http)

    async def killer(self, deadline: float):
        if not self.args.kill_every:
            return
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                await asyncio.sleep(self.args.kill_every)
                if time.monotonic() >= deadline - 2:
                    return
                health = (await http.get(self.url + "/health")).json()
                if health["status"] == "ok" and health["worker"]["pid"]:
                    os.kill(health["worker"]["pid"], signal.SIGKILL)
                    self.counts["faults injected"] += 1

    async def recovered(self, seconds: float = 60) -> bool:
        async with httpx.AsyncClient(timeout=10) as http:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                health = (await http.get(self.url + "/health")).json()
                if health["status"] == "ok":
                    return True
                await asyncio.sleep(0.1)
        return False


async def main(args: argparse.Namespace) -> int:
    # asyncio warns "socket.send() raised exception." when a stream writes after its client left
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="mlx-tui-soak-") as tmp:
        settings = {"transcripts_dir": None, "cache_dir": tmp}
        if args.model:
            settings["model"] = args.model
        engine = EngineClient(EngineConfig(**settings))
        began = time.monotonic()
        await engine.start()
        print(f"engine ready in {time.monotonic() - began:.1f} s (worker pid {engine.pid})", flush=True)
        config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        soak = Soak(args, f"http://127.0.0.1:{port}", engine)
        deadline = time.monotonic() + args.seconds
        try:
            await asyncio.gather(soak.killer(deadline), *(soak.client(deadline) for _ in range(args.clients)))
            back = await soak.recovered()
        finally:
            server.should_exit = True
            await serving
            await engine.stop()
        elapsed = time.monotonic() - began
    c = soak.counts
    refused = sum(v for k, v in c.items() if k.startswith("refused"))
    print(
        json.dumps(
            {
                "seconds": round(elapsed, 1),
                "requests sent": c["sent"],
                "completed": c["done"],
                "ended with an error event": c["error"],
                "refused with a status": refused,
                "refusals": {k: v for k, v in c.items() if k.startswith("refused")},
                "client disconnects": c["disconnected"],
                "faults injected (SIGKILL)": c["faults injected"],
                "ended without a terminal event": len(soak.lost),
                "restarts": engine.restarts,
                "server back to ok": back,
            },
            indent=2,
        )
    )
    for lost in soak.lost[:10]:
        print("LOST", lost)
    return 0 if not soak.lost and back else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
