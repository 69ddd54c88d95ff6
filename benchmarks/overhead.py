"""Where a token's time goes: our scheduler's step, in this process, against the mlx-lm loops it is built on.

Interleaved in one process, per token:
- `stream_generate`: mlx-lm's one-sequence loop (the decode baseline);
- bare `BatchGenerator`: the batched loop that both our engine and mlx_lm.server run;
- our `Scheduler.step()`, split into `BatchGenerator.next()` and the rest (events,
  detokenising, stop and markup parsing, the loop guard, the cache), plus what pickling the
  step's events for the socket to the front process costs.

It needs no server, so it isolates the worker's per-token overhead from IPC and HTTP.
"""

import pickle
import time

from .decode import PROMPT
from .stats import median, progress


def timed_stream_generate(model, tokenizer, prompt, n: int) -> float:
    from mlx_lm import stream_generate

    first = None
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=n):
        first = first or time.perf_counter()
    return 1000 * (time.perf_counter() - first) / (n - 1)


def timed_batch_generator(model, tokenizer, prompt, n: int, sequences: int = 1) -> float:
    """ms per token of the bare batched loop; with several sequences, per token of all of them together."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        model,
        max_tokens=n,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        completion_batch_size=8,
        prefill_batch_size=8,
    )
    gen.insert([list(prompt) for _ in range(sequences)], max_tokens=[n] * sequences)
    first, done, tokens = None, 0, 0
    while done < sequences:
        _, responses = gen.next()
        if responses and first is None:
            first = time.perf_counter()
            continue
        for r in responses:
            tokens += 1
            done += r.finish_reason is not None
    elapsed = time.perf_counter() - first
    gen.close()
    return 1000 * elapsed / tokens


def timed_scheduler(scheduler, request, n: int) -> dict:
    """ms per token: the whole step, BatchGenerator.next() inside it, and pickling the events."""
    generator = scheduler.generator
    inner = []
    original = generator.next

    def next_timed():
        t = time.perf_counter()
        out = original()
        inner.append(time.perf_counter() - t)
        return out

    generator.next = next_timed
    try:
        scheduler.submit(1, request)
        steps, pickling, first, tokens = [], [], None, 0
        while scheduler.busy:
            t = time.perf_counter()
            events = scheduler.step()
            t1 = time.perf_counter()
            blob = pickle.dumps(("events", events), protocol=pickle.HIGHEST_PROTOCOL)
            pickling.append(time.perf_counter() - t1)
            got = sum(type(e).__name__ in ("TextDelta", "Done") for _, e in events)
            if got and first is None:
                first = time.perf_counter()
                inner.clear(), steps.clear(), pickling.clear()
                continue
            steps.append(t1 - t)
            tokens += 1 if got else 0
        assert len(blob) > 0
    finally:
        del generator.next
    per = lambda xs: 1000 * sum(xs) / max(len(xs), 1)  # noqa: E731
    return {
        "step_ms": per(steps),
        "next_ms": per(inner[: len(steps)]),
        "ours_ms": per(steps) - per(inner[: len(steps)]),
        "pickle_ms": per(pickling),
        "tokens_per_s": 1000 / per(steps) if steps else None,
    }


def run(model_dir, rounds: int, n: int) -> dict:
    from mlx_tui.engine.cache_kinds import kv_bytes_per_token
    from mlx_tui.engine.config import EngineConfig
    from mlx_tui.engine.loader import load
    from mlx_tui.engine.prefix_cache import PrefixCache
    from mlx_tui.engine.request import GenerationRequest
    from mlx_tui.engine.scheduler import Scheduler

    loaded = load(str(model_dir), lambda *a: None)
    config = EngineConfig(model=str(model_dir), transcripts_dir=None, cache_dir=None, loop_window=0, max_concurrency=8)
    scheduler = Scheduler(loaded, config, PrefixCache(1 << 30), kv_bytes_per_token(loaded.model))
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    request = GenerationRequest(messages=PROMPT, max_tokens=n)
    timed_stream_generate(model, tokenizer, prompt, 8)
    timed_batch_generator(model, tokenizer, prompt, 8)
    rows = {"stream_generate": [], "BatchGenerator": [], "Scheduler.step": [], "BatchGenerator x4": []}
    parts = []
    for i in range(rounds):
        rows["stream_generate"].append(timed_stream_generate(model, tokenizer, prompt, n))
        rows["BatchGenerator"].append(timed_batch_generator(model, tokenizer, prompt, n))
        part = timed_scheduler(scheduler, request, n)
        rows["Scheduler.step"].append(part["step_ms"])
        rows["BatchGenerator x4"].append(timed_batch_generator(model, tokenizer, prompt, n, sequences=4))
        parts.append(part)
        progress(
            f"overhead: round {i + 1}/{rounds}: ms/token stream_generate {rows['stream_generate'][-1]:.1f}, "
            f"BatchGenerator {rows['BatchGenerator'][-1]:.1f}, Scheduler.step {part['step_ms']:.1f} "
            f"(of which ours {part['ours_ms']:.2f}, pickling {part['pickle_ms']:.3f}), "
            f"BatchGenerator x4 {rows['BatchGenerator x4'][-1]:.1f} per token of 4"
        )
    base = rows["stream_generate"]
    return {
        "tokens": n,
        "rounds": rounds,
        "ms_per_token": {k: median(v) for k, v in rows.items()},
        "ratio_to_stream_generate": {
            k: median(b / x for b, x in zip(base, v, strict=False)) for k, v in rows.items() if k != "stream_generate"
        },
        "batch4_scaling": median(
            a / b for a, b in zip(rows["BatchGenerator"], rows["BatchGenerator x4"], strict=False)
        ),
        "scheduler_ours_ms": median(p["ours_ms"] for p in parts),
        "scheduler_next_ms": median(p["next_ms"] for p in parts),
        "pickle_ms": median(p["pickle_ms"] for p in parts),
    }
