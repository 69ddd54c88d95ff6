"""(7) The Claude-Code-shaped replay on a hybrid and a sliding-window model, against mlx_lm.server.

The same replay as (4), on random models whose caches cannot be cut at any token: a
Qwen3.5-style hybrid (GatedDeltaNet recurrent state between attention layers) and a
gpt-oss-style model (sliding-window layers between full ones). Each family gets its own
pair of servers, started and stopped here.
"""

from pathlib import Path

from . import replay, servers
from .model import FAMILIES, build, default_dir, describe
from .stats import progress


async def run(
    client, workdir: Path, concurrency: int, cache_bytes: int, turns: int, tokens: int, sample: str | None
) -> dict:
    from transformers import AutoTokenizer

    out = {}
    for family in FAMILIES:
        model_dir = build(default_dir(family), family)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        ours = servers.ours(model_dir, workdir / family, concurrency)
        theirs = servers.mlx_lm(model_dir, workdir / family, concurrency, cache_bytes)
        (workdir / family).mkdir(parents=True, exist_ok=True)
        progress(f"families: {family} ({describe(model_dir)['params_m']}M parameters)")
        try:
            for s in (ours, theirs):
                s.start()
            for s in (ours, theirs):
                s.wait_ready()
            health = (await client.get(ours.url + "/health")).json()
            result = await replay.run(client, [ours, theirs], tokenizer, turns, tokens, sample)
        finally:
            for s in (ours, theirs):
                s.stop()
        out[family] = {"model": describe(model_dir), "prefix_cache": health.get("prefix_cache"), **result}
    return out
