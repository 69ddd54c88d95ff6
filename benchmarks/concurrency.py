"""(3) Aggregate decode tokens/s with 1, 2, 4 and 8 concurrent streams, on both servers.

All streams start together with short, distinct prompts and the same max_tokens; the
aggregate is all generated tokens over the wall time from the first request sent to the
last stream's end. Each scaling ratio (n streams / 1 stream) is taken within a round.
"""

import asyncio
import time

from .clients import openai_stream
from .decode import cpu_seconds
from .stats import median, progress, ratio

TOPICS = (
    "a TOML parser",
    "an LRU cache",
    "a rate limiter",
    "a JSON pretty printer",
    "a trie",
    "a retry decorator",
    "a CSV diff tool",
    "a ring buffer",
)


def body(model: str, i: int, max_tokens: int) -> dict:
    messages = [{"role": "user", "content": f"Write {TOPICS[i % len(TOPICS)]} in Python (stream {i})."}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}


class EngineContestant:
    """Our engine through its in-process client (no HTTP): isolates what the HTTP layer costs."""

    kind = "engine"
    label = "mlx-tui engine API"

    def __init__(self, engine):
        from .decode import EngineApi

        self.engine = engine
        self.generate = EngineApi(engine)

    def pids(self) -> dict:
        return {"worker": self.engine.pid, "front (this process)": None}


async def one(client, server, i: int, max_tokens: int):
    if server.kind == "engine":
        return await server.generate(body("", i, max_tokens)["messages"], max_tokens)
    return await openai_stream(client, server.url, body(server.model_name, i, max_tokens))


async def burst(client, server, n: int, max_tokens: int) -> dict:
    pids = server.pids()
    cpu = {role: cpu_seconds(pid) for role, pid in pids.items()}
    start = time.perf_counter()
    results = await asyncio.gather(*(one(client, server, i, max_tokens) for i in range(n)))
    wall = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{server.label}: {errors[0]}")
    tokens = sum(r.generated for r in results)
    cpu = {role: 1000 * (cpu_seconds(pid) - cpu[role]) / max(tokens, 1) for role, pid in pids.items()}
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tps": tokens / wall,
        "per_stream_tps": median(r.decode_tps for r in results),
        "ttft_s": median(r.ttft for r in results),
        "cpu_ms_per_token": cpu,
    }


async def run(client, servers: list, streams: tuple[int, ...], rounds: int, max_tokens: int) -> dict:
    rows = []
    for i in range(rounds):
        for server in servers if i % 2 == 0 else servers[::-1]:
            for n in streams if i % 2 == 0 else streams[::-1]:
                r = await burst(client, server, n, max_tokens)
                rows.append({"server": server.label, "streams": n, "round": i, **r})
            mine = {r["streams"]: r["tps"] for r in rows if r["server"] == server.label and r["round"] == i}
            progress(
                f"concurrency: round {i + 1}/{rounds}, {server.label}: "
                + ", ".join(f"{n}x {t:.1f} tok/s" for n, t in sorted(mine.items()))
            )
    summary = []
    for server in servers:
        for n in streams:
            mine = [r for r in rows if r["server"] == server.label and r["streams"] == n]
            ones = {r["round"]: r["tps"] for r in rows if r["server"] == server.label and r["streams"] == 1}
            summary.append(
                {
                    "server": server.label,
                    "streams": n,
                    "tps": median(r["tps"] for r in mine),
                    "per_stream_tps": median(r["per_stream_tps"] for r in mine),
                    "ttft_s": median(r["ttft_s"] for r in mine),
                    "scaling": median(ratio(r["tps"], ones.get(r["round"])) for r in mine),
                    "cpu_ms_per_token": {
                        role: median(r["cpu_ms_per_token"][role] for r in mine) for role in mine[0]["cpu_ms_per_token"]
                    },
                }
            )
    # ours / mlx_lm.server at each stream count, within each round
    if len(servers) >= 2:
        a, b = servers[:2]
        for n in streams:
            pairs = [
                (r["tps"], s["tps"])
                for r in rows
                for s in rows
                if r["server"] == a.label
                and s["server"] == b.label
                and r["streams"] == s["streams"] == n
                and r["round"] == s["round"]
            ]
            for row in summary:
                if row["server"] == a.label and row["streams"] == n:
                    row["vs_other"] = median(ratio(x, y) for x, y in pairs)
    return {"rows": rows, "summary": summary, "max_tokens": max_tokens}
