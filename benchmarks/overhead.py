"""Where a token's time goes: our scheduler's step, in this process, against the mlx-lm loops it is built on.

Interleaved in one process, per token:
- `stream_generate`: mlx-lm's one-sequence loop (the decode baseline);
- bare `BatchGenerator`: the batched loop that both our engine and mlx_lm.server run;
- our `Scheduler.step()`, split into `BatchGenerator.next()` and the rest (events,
  detokenising, stop and markup parsing, the loop guard, the cache), plus what pickling the
  step's events for the socket to the front process costs; in CPU time too, at one and at
  four sequences: the model step (every thread) against our host work (the worker's own
  thread, which takes a core from the BLAS threads while it runs).

It needs no server, so it isolates the worker's per-token overhead from IPC and HTTP.
"""

import time
from multiprocessing.reduction import ForkingPickler

from .decode import PROMPT
from .servers import engine_config
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


def timed_scheduler(scheduler, request, n: int, sequences: int = 1) -> dict:
    """Per generated token, once every sequence has its first: the step's wall time and `BatchGenerator.next()`'s
    inside it; CPU time of the model step (this process's inside `next()`, every BLAS thread), of our host
    work (this thread's outside it) and of pickling the step's events as the worker sends them.

    Wall times are inflated by other load on the machine; CPU times far less.
    """
    from mlx_tui.engine.protocol import Events

    generator = scheduler.generator
    inner = {"wall": 0.0, "cpu": 0.0, "thread": 0.0}
    original = generator.next

    def next_timed():
        w, c, t = time.perf_counter(), time.process_time(), time.thread_time()
        out = original()
        inner["wall"] += time.perf_counter() - w
        inner["cpu"] += time.process_time() - c
        inner["thread"] += time.thread_time() - t
        return out

    generator.next = next_timed
    try:
        for i in range(sequences):
            scheduler.submit(f"seq{i}", request)
        while scheduler.busy and scheduler.generation_tokens_total < sequences:
            scheduler.step()
        first = scheduler.generation_tokens_total
        inner.update(wall=0.0, cpu=0.0, thread=0.0)
        wall = thread = pickling = 0.0
        while scheduler.busy:
            w, t = time.perf_counter(), time.thread_time()
            events = scheduler.step()
            wall += time.perf_counter() - w
            thread += time.thread_time() - t
            p = time.thread_time()
            ForkingPickler.dumps(Events(events))
            pickling += time.thread_time() - p
        tokens = scheduler.generation_tokens_total - first
    finally:
        del generator.next
    per = lambda x: 1000 * x / max(tokens, 1)  # noqa: E731
    return {
        "step_ms": per(wall),
        "next_ms": per(inner["wall"]),
        "ours_ms": per(wall - inner["wall"]),
        "pickle_ms": per(pickling),
        "tokens_per_s": tokens / wall if wall else None,
        "model_cpu_ms": per(inner["cpu"]),
        "host_cpu_ms": per(thread - inner["thread"]),
    }


def run(model_dir, rounds: int, n: int) -> dict:
    from mlx_tui.engine.cache_kinds import kv_bytes_per_token
    from mlx_tui.engine.loader import load
    from mlx_tui.engine.prefix_cache import PrefixCache
    from mlx_tui.engine.request import GenerationRequest
    from mlx_tui.engine.scheduler import Scheduler

    loaded = load(str(model_dir), lambda *a: None)
    scheduler = Scheduler(
        loaded, engine_config(model_dir, max_concurrency=8), PrefixCache(1 << 30), kv_bytes_per_token(loaded.model)
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    request = GenerationRequest(messages=PROMPT, max_tokens=n)
    timed_stream_generate(model, tokenizer, prompt, 8)
    timed_batch_generator(model, tokenizer, prompt, 8)
    rows = {"stream_generate": [], "BatchGenerator": [], "Scheduler.step": [], "BatchGenerator x4": []}
    parts, parts4 = [], []
    for i in range(rounds):
        rows["stream_generate"].append(timed_stream_generate(model, tokenizer, prompt, n))
        rows["BatchGenerator"].append(timed_batch_generator(model, tokenizer, prompt, n))
        part = timed_scheduler(scheduler, request, n)
        rows["Scheduler.step"].append(part["step_ms"])
        rows["BatchGenerator x4"].append(timed_batch_generator(model, tokenizer, prompt, n, sequences=4))
        parts.append(part)
        parts4.append(timed_scheduler(scheduler, request, n, sequences=4))
        progress(
            f"overhead: round {i + 1}/{rounds}: ms/token stream_generate {rows['stream_generate'][-1]:.1f}, "
            f"BatchGenerator {rows['BatchGenerator'][-1]:.1f}, Scheduler.step {part['step_ms']:.1f} "
            f"(of which ours {part['ours_ms']:.2f}, pickling {part['pickle_ms']:.3f}), "
            f"BatchGenerator x4 {rows['BatchGenerator x4'][-1]:.1f} per token of 4; CPU ms/token model step "
            f"{part['model_cpu_ms']:.1f}, host work {part['host_cpu_ms']:.3f} (x4: {parts4[-1]['model_cpu_ms']:.1f}, "
            f"{parts4[-1]['host_cpu_ms']:.3f})"
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
        "cpu_ms_per_token": {
            f"{k} sequence{'s' * (k > 1)}": {
                "model step": median(p["model_cpu_ms"] for p in ps),
                "host work": median(p["host_cpu_ms"] for p in ps),
                "pickling": median(p["pickle_ms"] for p in ps),
            }
            for k, ps in ((1, parts), (4, parts4))
        },
    }
