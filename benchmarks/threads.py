"""OpenBLAS threads against batch size: decode ms per token of mlx-lm's `BatchGenerator`, in-process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python -m benchmarks.threads --rounds 6 --batches 1 4 --threads 1 2

The thread count is switched at run time (`openblas_set_num_threads`), so the counts are
interleaved within each round in one process, against the same model and prompt; each round
rotates their order. Run it under `taskset -c 0` to see what one core does.
"""

import argparse
import ctypes
import json
import os
import sys

from .stats import median, progress


def openblas() -> ctypes.CDLL:
    """The OpenBLAS this process has loaded (preloaded, so before mlx's own BLAS)."""
    lib = ctypes.CDLL(None)
    if not hasattr(lib, "openblas_set_num_threads"):
        sys.exit("OpenBLAS is not loaded: start with LD_PRELOAD=.../libopenblas.so.0")
    return lib


def run(rounds: int, batches: list[int], threads: list[int], tokens: int) -> dict:
    from mlx_lm import load

    from .decode import PROMPT
    from .model import build, default_dir
    from .overhead import timed_batch_generator

    lib = openblas()
    model, tokenizer = load(str(build(default_dir())))
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    timed_batch_generator(model, tokenizer, prompt, 8)
    ms: dict[str, list[float]] = {f"batch {b}, {t} thread{'s' * (t > 1)}": [] for b in batches for t in threads}
    for i in range(rounds):
        order = threads[i % len(threads) :] + threads[: i % len(threads)]
        for b in batches:
            for t in order:
                lib.openblas_set_num_threads(t)
                ms[f"batch {b}, {t} thread{'s' * (t > 1)}"].append(
                    timed_batch_generator(model, tokenizer, prompt, tokens, sequences=b)
                )
        progress(f"threads: round {i + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in ms.items()))
    return {
        "cores": len(os.sched_getaffinity(0)),
        "load": os.getloadavg(),
        "tokens": tokens,
        "rounds": rounds,
        "ms_per_token": {k: median(v) for k, v in ms.items()},
        "rounds_ms": ms,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    print(json.dumps(run(args.rounds, args.batches, args.threads, args.tokens), indent=2))


if __name__ == "__main__":
    main()
