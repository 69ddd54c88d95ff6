"""Soak: loopback traffic in all three protocols through worker kills, client disconnects, bursts and a lost disk cache.

    .venv/bin/python -m benchmarks.soak                  # 10 minutes, 50 kills, 500 disconnects, 2 bursts of 60
    .venv/bin/python -m benchmarks.soak --seconds 60 --kills 5 --disconnects 50

An engine and the API server run in this process (on the demo model unless --model is
given, with a private disk cache and the repetition guard off, so that a forced token makes
a long answer). After a warm-up (traffic in every protocol, a few disconnects, one worker
kill), the front process's RSS, threads and open files are noted. Then for --seconds:
--clients clients stream requests to `/v1/messages`, `/v1/chat/completions` and
`/v1/responses`; --disconnects more leave streams after their second frame, spread over the
run; the worker is killed with SIGKILL --kills times, evenly; --bursts times, --burst
requests arrive at once over a queue of --max-queue; halfway, the disk cache folder is
removed. At the end it prints the counts and exits 1 unless: every request ended with a
terminal event or was refused with 429/503/529 in its protocol's shape (429 with
Retry-After), and nothing else came back; each burst was partly refused; the server is back
to ok; the front process's RSS is within 10% of its level after the warm-up, and its threads
and open files are back to their count then (asyncio's default thread pool within its bound).
"""

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import uvicorn
from tokenizers import Tokenizer

from mlx_tui.api.server import create_app
from mlx_tui.engine.client import EngineClient, EngineUnavailable
from mlx_tui.engine.config import EngineConfig
from mlx_tui.engine.demo import MODEL_DIR

PROTOCOLS = ("anthropic", "openai", "responses")
PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions", "responses": "/v1/responses"}
PROMPTS = ["Good morning!", "What is the capital of France?", "What is 2 + 2?", "Who are you?", "Is 17 a prime number?"]
SYSTEM = "You are a helpful assistant on a soak test. Answer briefly."
REFUSALS = {"anthropic": {429: "rate_limit_error", 529: "overloaded_error"}}
REFUSALS["openai"] = REFUSALS["responses"] = {429: "rate_limit_error", 503: "service_unavailable"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600, help="how long to send traffic after the warm-up (600)")
    p.add_argument("--clients", type=int, default=4, help="clients streaming whole requests at once (4)")
    p.add_argument("--kills", type=int, default=50, help="worker SIGKILLs, spread evenly (50)")
    p.add_argument("--disconnects", type=int, default=500, help="requests left after their second frame (500)")
    p.add_argument("--bursts", type=int, default=2, help="bursts of --burst requests at once (2)")
    p.add_argument("--burst", type=int, default=60, help="requests in a burst (60)")
    p.add_argument("--max-queue", type=int, default=16, help="the engine's queue (16)")
    p.add_argument("--warmup", type=int, default=250, help="requests in the warm-up (250)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--model", help="a local mlx-lm model directory (default: the demo model)")
    return p.parse_args(argv)


def body(protocol: str, prompt: str, max_tokens: int, force: int | None = None) -> dict:
    """A streamed request; `force` (a token id, Chat Completions only) makes the answer run to `max_tokens`."""
    user = {"role": "user", "content": prompt}
    if protocol == "anthropic":
        return {"model": "m", "max_tokens": max_tokens, "stream": True, "system": SYSTEM, "messages": [user]}
    if protocol == "responses":
        return {"model": "m", "max_output_tokens": max_tokens, "stream": True, "instructions": SYSTEM, "input": [user]}
    forced = {"logit_bias": {str(force): 50}} if force is not None else {}
    messages = [{"role": "system", "content": SYSTEM}, user]
    return {"model": "m", "max_tokens": max_tokens, "stream": True, "messages": messages} | forced


def terminal(protocol: str, lines: list[str]) -> str | None:
    """How the stream ended: "done", "error", or None if it ended without a terminal event."""
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    if protocol == "openai":
        if not data or data[-1] != "[DONE]":
            return None
        return "error" if len(data) > 1 and data[-2].startswith('{"error"') else "done"
    if protocol == "responses":
        kind = json.loads(data[-1]).get("type") if data else None
        return {"response.completed": "done", "response.incomplete": "done", "response.failed": "error"}.get(kind)
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    names = [n for n in names if n != "ping"]
    return {"message_stop": "done", "error": "error"}.get(names[-1]) if names else None


def refusal_problem(protocol: str, response: httpx.Response) -> str | None:
    """What is wrong with a response that is not a stream: None for a refusal in the protocol's own shape."""
    kind = REFUSALS[protocol].get(response.status_code)
    if kind is None:
        return f"status {response.status_code}: {response.text[:200]}"
    if response.status_code == 429 and "retry-after" not in response.headers:
        return "429 without Retry-After"
    try:
        error = response.json()
        shaped = error.get("type") == "error" if protocol == "anthropic" else set(error) == {"error"}
        if shaped and error["error"]["type"] == kind and error["error"]["message"]:
            return None
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return f"{response.status_code} not in {protocol}'s shape: {response.text[:200]}"


def letter_token(model: str | None) -> int | None:
    """The model's token for "a", which a logit bias forces to make a long answer (None if it has none)."""
    tokenizer = Path(model or MODEL_DIR) / "tokenizer.json"
    return Tokenizer.from_file(str(tokenizer)).token_to_id("a") if tokenizer.exists() else None


def footprint() -> dict:
    """The front process's RSS (bytes), open files and threads: asyncio's default pool's apart (it grows to its
    bound, `pool_bound`, as calls overlap, and keeps them)."""
    gc.collect()
    status = Path("/proc/self/status").read_text()
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    pool = sum(t.name.startswith("asyncio_") for t in threading.enumerate())
    threads = threading.active_count() - pool
    return {"rss": rss, "fds": len(os.listdir("/proc/self/fd")), "threads": threads, "pool threads": pool}


def pool_bound() -> int:
    """How many threads asyncio's default pool may hold (`ThreadPoolExecutor`'s default)."""
    return min(32, (os.cpu_count() or 1) + 4)


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, engine: EngineClient, cache: Path):
        self.args = args
        self.url = url
        self.engine = engine
        self.cache = cache
        self.counts: Counter = Counter()
        self.lost: list[str] = []  # streams that ended without a terminal event
        self.wrong: list[str] = []  # answers that were neither a stream nor a refusal in the protocol's shape
        self.bursts: list[Counter] = []
        self.rss: list[float] = []  # MiB, each minute of the run
        self.blocks: list[int] = []  # Python's allocated blocks, in thousands, each minute
        self.rng = random.Random(1)
        self.force = letter_token(args.model)

    async def request(self, http: httpx.AsyncClient, data: dict, protocol: str, leave: bool = False) -> str:
        """Send one request; how it ended: "done", "error", "refused", "disconnected", "lost" or "wrong"."""
        self.counts["sent"] += 1
        lines: list[str] = []
        try:
            async with http.stream("POST", self.url + PATHS[protocol], json=data) as response:
                if response.status_code != 200:
                    await response.aread()
                    if problem := refusal_problem(protocol, response):
                        self.wrong.append(f"{protocol}: {problem}")
                        return self._count("wrong")
                    self.counts[f"refused {protocol} {response.status_code}"] += 1
                    return self._count("refused")
                async for line in response.aiter_lines():
                    lines.append(line)
                    if leave and sum(x.startswith("data: ") for x in lines) >= 2:
                        return self._count("disconnected")
        except httpx.HTTPError as e:
            self.lost.append(f"{protocol}: {type(e).__name__}: {e} after {len(lines)} lines")
            return self._count("lost")
        if (end := terminal(protocol, lines)) is None:
            self.lost.append(f"{protocol}: stream ended without a terminal event: {lines[-3:]}")
            return self._count("lost")
        return self._count(end)

    def _count(self, outcome: str) -> str:
        self.counts[outcome] += 1
        return outcome

    def random_body(self) -> tuple[dict, str]:
        protocol = self.rng.choice(PROTOCOLS)
        return body(protocol, self.rng.choice(PROMPTS), self.args.max_tokens), protocol

    async def client(self, until) -> None:
        """Whole requests, one after another, while `until()` is false."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as http:
            while not until():
                if await self.request(http, *self.random_body()) == "refused":
                    await asyncio.sleep(1.0)  # as a client that heeds Retry-After would, rather than spin

    async def leaver(self, began: float, n: int, seconds: float) -> None:
        """`n` requests left after their second frame, the i-th due at i/n of `seconds` (two at a time)."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as http:

            async def one(i: int) -> None:
                await asyncio.sleep(max(0.0, began + seconds * i / n - time.monotonic()))
                for _ in range(30):  # again if it was refused or ended (the worker killed) before its second frame
                    outcome = await self.request(http, *self.random_body(), leave=True)
                    if outcome == "disconnected":
                        return
                    if outcome == "refused":
                        await asyncio.sleep(1.0)

            for i in range(0, n, 2):
                await asyncio.gather(*(one(j) for j in range(i, min(i + 2, n))))

    async def killer(self, began: float, n: int, seconds: float) -> None:
        """SIGKILL the worker `n` times, the i-th at (i + 1/2)/n of `seconds`, each once it serves again."""
        for i in range(n):
            await asyncio.sleep(max(0.0, began + seconds * (i + 0.5) / n - time.monotonic()))
            await self.recovered()
            if self.engine.pid:
                os.kill(self.engine.pid, signal.SIGKILL)
                self.counts["kills"] += 1

    async def burster(self, began: float, n: int, seconds: float) -> None:
        """`n` bursts of --burst requests at once (long ones in Chat Completions), the i-th at i/(n+1) of `seconds`."""
        limits = httpx.Limits(max_connections=self.args.burst + 10, max_keepalive_connections=0)
        for i in range(1, n + 1):
            await asyncio.sleep(max(0.0, began + seconds * i / (n + 1) - time.monotonic()))
            async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits) as http:
                sent = [PROTOCOLS[j % 3] for j in range(self.args.burst)]
                bodies = [body(p, "Good morning!", 150, self.force if p == "openai" else None) for p in sent]
                ends = await asyncio.gather(*(self.request(http, b, p) for b, p in zip(bodies, sent, strict=True)))
            self.bursts.append(Counter(ends))

    async def sampler(self, began: float, seconds: float, every: float = 60) -> None:
        """The front process's RSS (MiB) and Python's allocated blocks (thousands) every `every` seconds."""
        for i in range(1, int(seconds // every) + 1):
            await asyncio.sleep(max(0.0, began + every * i - time.monotonic()))
            self.rss.append(round(footprint()["rss"] / 2**20, 1))
            self.blocks.append(round(sys.getallocatedblocks() / 1000))

    async def remover(self, began: float, seconds: float) -> None:
        await asyncio.sleep(max(0.0, began + seconds / 2 - time.monotonic()))
        shutil.rmtree(self.cache)
        self.counts["disk cache removed"] += 1

    async def recovered(self, seconds: float = 60) -> bool:
        deadline = time.monotonic() + seconds
        while self.engine.state != "ready" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.engine.state == "ready"

    async def idle(self, seconds: float = 60) -> bool:
        """Whether every request has left the front process and the worker within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                stats = await self.engine.stats()
            except EngineUnavailable:  # not ready, or it went while asked
                stats = None
            if stats and not self.engine.inflight.streams and stats["running"] == stats["waiting"] == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    async def warm_up(self) -> None:
        """--warmup requests in every protocol, a few left mid-stream, and one worker kill and restart."""
        began = time.monotonic()
        target = self.counts["sent"] + self.args.warmup
        clients = [self.client(lambda: self.counts["sent"] >= target) for _ in range(self.args.clients)]
        await asyncio.gather(*clients, self.leaver(began, 10, 4), self.killer(began, 1, 2))

    async def run(self) -> None:
        began = time.monotonic()
        seconds = self.args.seconds
        clients = [self.client(lambda: time.monotonic() > began + seconds) for _ in range(self.args.clients)]
        await asyncio.gather(
            *clients,
            self.leaver(began, self.args.disconnects, seconds),
            self.killer(began, self.args.kills, seconds),
            self.burster(began, self.args.bursts, seconds),
            self.remover(began, seconds),
            self.sampler(began, seconds),
        )


async def settled(before: dict, seconds: float = 30) -> dict:
    """The footprint once threads and open files are back to `before` (or after `seconds`): exits finish late."""
    deadline = time.monotonic() + seconds
    while (now := footprint())["threads"] > before["threads"] or now["fds"] > before["fds"]:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    return now


async def main(args: argparse.Namespace) -> int:
    # asyncio warns "socket.send() raised exception." when a stream writes after its client left
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    logging.getLogger("mlx_tui.engine").setLevel(logging.ERROR)  # the worker's output on each kill
    with tempfile.TemporaryDirectory(prefix="mlx-tui-soak-") as tmp:
        cache = Path(tmp) / "cache"
        settings = {"transcripts_dir": None, "cache_dir": str(cache), "max_queue": args.max_queue, "loop_window": 0}
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
        soak = Soak(args, f"http://127.0.0.1:{port}", engine, cache)
        try:
            await soak.warm_up()
            await soak.idle()
            warm = footprint()
            warm_counts = Counter(soak.counts)
            print(f"warm-up done: {json.dumps(dict(warm_counts))}; {json.dumps(warm)}", flush=True)
            ran = time.monotonic()
            await soak.run()
            ran = time.monotonic() - ran
            back = await soak.recovered() and await soak.idle()
            end = await settled(warm)
            write_errors = engine.metrics.registry.get_sample_value("mlx_tui:prefix_cache_disk_write_errors_total")
        finally:
            server.should_exit = True
            await serving
            await engine.stop()
    c = soak.counts - warm_counts
    growth = (end["rss"] - warm["rss"]) / warm["rss"]
    checks = {
        "every request ended with a terminal event": not soak.lost,
        "every other answer a refusal in its protocol's shape": not soak.wrong,
        "each burst partly refused": len(soak.bursts) == args.bursts and all(b["refused"] for b in soak.bursts),
        "server back to ok": back,
        "RSS within 10% of the warm-up's": abs(growth) <= 0.10,
        "threads back to the warm-up's count": end["threads"] <= warm["threads"],
        "asyncio's pool within its bound": end["pool threads"] <= pool_bound(),
        "open files back to the warm-up's count": end["fds"] <= warm["fds"],
    }
    print(
        json.dumps(
            {
                "seconds": round(ran, 1),
                "requests sent": c["sent"],
                "completed": c["done"],
                "ended with an error event": c["error"],
                "refused": c["refused"],
                "refusals": {k.removeprefix("refused "): v for k, v in sorted(c.items()) if k.startswith("refused ")},
                "client disconnects": c["disconnected"],
                "worker SIGKILLs": c["kills"],
                "bursts": [dict(b) for b in soak.bursts],
                "disk cache folder removed": c["disk cache removed"],
                "disk cache write errors": write_errors,
                "ended without a terminal event": len(soak.lost),
                "wrong answers": len(soak.wrong),
                "restarts": engine.restarts,
                "front process after warm-up": warm,
                "front process at the end": end,
                "RSS growth": f"{growth:+.1%}",
                "RSS each minute (MiB)": soak.rss,
                "Python's allocated blocks each minute (thousands)": soak.blocks,
                "checks": checks,
            },
            indent=2,
        )
    )
    for line in (soak.lost + soak.wrong)[:10]:
        print("FAILED", line)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
