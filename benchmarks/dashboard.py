"""(5) What the dashboard costs: `mlx-tui` (engine + API + dashboard, in a pseudo-terminal) vs `mlx-tui --serve`.

Both serve the same requests over HTTP, interleaved: one stream, then four concurrent
streams. The ratio (dashboard / serve) is taken within each round; the front process's
CPU time per token (all rounds' CPU time over all their tokens: a burst alone is too short
for the clock's 10 ms ticks) shows what drawing the dashboard costs, apart from the noise.
"""

from .concurrency import burst
from .stats import median, progress, ratio


def pooled(rows: list[dict], role: str) -> float:
    """CPU ms per token of `role` over all `rows` together."""
    return sum(r["cpu_ms_per_token"][role] * r["tokens"] for r in rows) / max(1, sum(r["tokens"] for r in rows))


async def run(client, serve, tui, rounds: int, max_tokens: int, streams=(1, 4)) -> dict:
    rows = []
    for i in range(rounds):
        for server in (serve, tui) if i % 2 == 0 else (tui, serve):
            for n in streams:
                r = await burst(client, server, n, max_tokens)
                rows.append({"server": server.label, "streams": n, "round": i, **r})
        progress(
            f"dashboard: round {i + 1}/{rounds}: "
            + ", ".join(f"{r['server']} {r['streams']}x {r['tps']:.1f} tok/s" for r in rows if r["round"] == i)
        )
    summary = []
    for n in streams:
        pairs = [
            (a["tps"], b["tps"])
            for a in rows
            for b in rows
            if a["round"] == b["round"]
            and a["streams"] == b["streams"] == n
            and a["server"] == tui.label
            and b["server"] == serve.label
        ]
        row = {"streams": n, "ratio": median(ratio(a, b) for a, b in pairs)}
        for server in (serve, tui):
            mine = [r for r in rows if r["server"] == server.label and r["streams"] == n]
            row[server.label] = {
                "tps": median(r["tps"] for r in mine),
                "cpu_ms_per_token": {role: pooled(mine, role) for role in mine[0]["cpu_ms_per_token"]},
            }
        summary.append(row)
    return {
        "rows": rows,
        "summary": summary,
        "max_tokens": max_tokens,
        "screen_bytes": tui.screen_bytes,
        "serve": serve.label,
        "tui": tui.label,
    }
