"""(7) One worker against a group of 2 ranks on this machine (tensor parallel, ring backend over loopback).

On one machine the two ranks share its cores and memory, so this measures what the group
costs (the all-reduce after every attention and MLP block, the step decisions broadcast from
rank 0), not a speed-up. The engines run one after the other, each through the engine's
client API: decode tokens/s of one stream, and TTFT of a prompt no cache has seen.
"""

import secrets

from .corpus import filler
from .decode import PROMPT, EngineApi
from .servers import engine_config
from .stats import median, progress, ratio

RANKS = (1, 2)


async def run(model_dir, tokenizer, rounds: int, max_tokens: int, prompt_tokens: int) -> dict:
    from mlx_tui.engine.client import EngineClient

    rows = []
    for ranks in RANKS:
        engine = EngineClient(engine_config(model_dir, ranks=ranks))
        await engine.start()
        try:
            measure = EngineApi(engine)
            await measure(PROMPT, 8)  # warm-up
            for i in range(rounds):
                decode = await measure(PROMPT, max_tokens)
                # a fresh nonce first, so no prefix of this prompt is cached
                head = f"Session {secrets.token_hex(4)}. Read the sources below.\n\n"
                long = [{"role": "user", "content": head + filler(tokenizer, prompt_tokens, seed=i)}]
                ttft = await measure(long, 2)
                for r in (decode, ttft):
                    if r.error:
                        raise RuntimeError(f"{ranks} ranks: {r.error}")
                rows.append(
                    {
                        "ranks": ranks,
                        "round": i,
                        "decode_tps": decode.decode_tps,
                        "ttft_s": ttft.ttft,
                        "prompt_tokens": ttft.prompt_tokens,
                        "text": decode.text,
                    }
                )
                progress(
                    f"ranks: {ranks}, round {i + 1}/{rounds}: decode {decode.decode_tps:.1f} tok/s, "
                    f"TTFT {ttft.ttft:.2f} s ({ttft.prompt_tokens} tokens)"
                )
        finally:
            await engine.stop()
    summary = {
        ranks: {
            "decode_tps": median(r["decode_tps"] for r in rows if r["ranks"] == ranks),
            "ttft_s": median(r["ttft_s"] for r in rows if r["ranks"] == ranks),
            "prompt_tokens": median(r["prompt_tokens"] for r in rows if r["ranks"] == ranks),
        }
        for ranks in RANKS
    }
    one, two = summary[1], summary[2]
    texts = {r["ranks"]: r["text"] for r in rows}
    return {
        "rounds": rounds,
        "max_tokens": max_tokens,
        "rows": [{k: v for k, v in r.items() if k != "text"} for r in rows],
        "summary": {str(k): v for k, v in summary.items()},
        "decode_ratio": ratio(two["decode_tps"], one["decode_tps"]),
        "ttft_ratio": ratio(two["ttft_s"], one["ttft_s"]),
        "same_text": texts[1] == texts[2],
    }
