"""(2) Time to first token, cold vs warm, for 1k/4k/8k-token system prompts, on both servers.

Cold: a system prompt no server has seen (a fresh nonce leads it). Warm: the same system
prompt again with another user message, as a new conversation with the same agent
would send it: only the system prompt can come from a cache. Both over OpenAI streaming.
"""

import secrets

from .clients import openai_stream
from .corpus import filler
from .stats import median, progress, ratio

QUESTIONS = ("Summarise what the code above does.", "Which function would you test first, and why?")


def system_prompt(tokenizer, size: int, nonce: str) -> str:
    head = f"Session {nonce}. You are a coding agent. The project's sources follow.\n\n"
    return head + filler(tokenizer, size - len(tokenizer.encode(head)), seed=size)


def body(model: str, system: str, question: str) -> dict:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0.0}


async def run(client, servers: list, tokenizer, sizes: dict[int, int]) -> dict:
    """`sizes` maps a system prompt size in tokens to its number of rounds."""
    rows = []
    order = list(servers)
    for size, rounds in sizes.items():
        for i in range(rounds):
            for server in order if i % 2 == 0 else order[::-1]:
                system = system_prompt(tokenizer, size, secrets.token_hex(4))
                cold = await openai_stream(client, server.url, body(server.model_name, system, QUESTIONS[0]))
                warm = await openai_stream(client, server.url, body(server.model_name, system, QUESTIONS[1]))
                for r in (cold, warm):
                    if r.error:
                        raise RuntimeError(f"{server.label}: {r.error}")
                rows.append(
                    {
                        "server": server.label,
                        "size": size,
                        "round": i,
                        "prompt_tokens": cold.prompt_tokens,
                        "cold_s": cold.ttft,
                        "warm_s": warm.ttft,
                        "ratio": ratio(warm.ttft, cold.ttft),
                        "cold_cached": cold.cached_tokens,
                        "warm_cached": warm.cached_tokens,
                    }
                )
                progress(
                    f"ttft: {size} tokens, round {i + 1}/{rounds}, {server.label}: "
                    f"cold {cold.ttft:.2f} s, warm {warm.ttft:.2f} s "
                    f"(cached {warm.cached_tokens}/{warm.prompt_tokens})"
                )
    summary = {}
    for server in servers:
        for size in sizes:
            mine = [r for r in rows if r["server"] == server.label and r["size"] == size]
            summary[f"{server.label}|{size}"] = {
                "server": server.label,
                "size": size,
                "rounds": len(mine),
                "prompt_tokens": median(r["prompt_tokens"] for r in mine),
                "cold_s": median(r["cold_s"] for r in mine),
                "warm_s": median(r["warm_s"] for r in mine),
                "ratio": median(r["ratio"] for r in mine),
                "warm_cached": median(r["warm_cached"] for r in mine),
            }
    return {"rows": rows, "summary": list(summary.values())}
