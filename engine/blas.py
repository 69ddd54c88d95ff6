"""Which BLAS the worker's MLX uses: an optimised OpenBLAS preloaded on Linux when there is one."""

import ctypes.util
import glob
import os
import sys

OPENBLAS_PATTERNS = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
)


def find_openblas() -> str | None:
    for pattern in OPENBLAS_PATTERNS:
        if found := sorted(p for p in glob.glob(pattern) if os.path.exists(p)):  # not a dangling link
            return found[0]
    name = ctypes.util.find_library("openblas")
    return name if name and os.path.isabs(name) else None


def default_threads() -> int:
    """OpenBLAS threads for the worker: every core this process may use, as OpenBLAS itself picks.

    A rule from measurements on two core counts, not a per-step choice, since the best count
    does not change with the batch size (benchmarks/results/overhead, `python -m
    benchmarks.threads`: mlx-lm's BatchGenerator decoding the benchmark model in one process,
    the count switched at run time and interleaved). On 2 quiet cores two threads beat one
    at 1 sequence (23 against 36 ms per token) and at 4 (7.6 against 10.2 ms per token of the
    four); on 1 core (`taskset -c 0`) one thread beats two, by a little at 1 sequence (37.4
    against 38.4 ms) and by a lot at 4 (10.7 against 13.6 ms: two threads on one core take
    turns). Fewer threads than cores left more CPU to the front process, but the second core
    gains more than its wake-ups cost (benchmarks/results/blas-threads, every process alike:
    one thread gave 0.65x the tokens per second at one stream and 0.76x at four).
    """
    return len(os.sched_getaffinity(0))


def worker_blas(choice: str, threads: int = 0) -> tuple[str, dict[str, str]]:
    """The BLAS name to report and the environment to start the worker with.

    `choice` is "auto" (OpenBLAS where found) or "reference" (the wheel's own); `threads`
    is OpenBLAS's thread count (0: an inherited OPENBLAS_NUM_THREADS, else `default_threads()`).
    """
    if sys.platform == "darwin":
        return "accelerate", {}
    if choice == "auto" and (path := find_openblas()):
        preload = " ".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p)
        inherited = os.environ.get("OPENBLAS_NUM_THREADS", "")
        threads = threads or (int(inherited) if inherited.isdigit() else 0) or default_threads()
        name = f"openblas, {threads} thread{'' if threads == 1 else 's'} ({path})"
        return name, {"LD_PRELOAD": preload, "OPENBLAS_NUM_THREADS": str(threads)}
    return "reference", {}


def missing_openblas(choice: str, name: str) -> str | None:
    """On Linux, when `auto` found no OpenBLAS: what the wheel's own BLAS costs here, and how to install one."""
    if sys.platform != "linux" or choice != "auto" or name != "reference":
        return None
    return (
        f"no optimised BLAS found: float32 matmuls run at {matmul_gflops():.1f} GFLOP/s with the mlx[cpu] wheel's "
        "own, ~50x slower than OpenBLAS; install it (Debian/Ubuntu: apt-get install libopenblas0-pthread; "
        "Fedora: dnf install openblas-threads) and start again"
    )


def matmul_gflops(n: int = 256, seconds: float = 0.2) -> float:
    """How fast this process multiplies n x n float32 matrices, measured now."""
    import time

    import mlx.core as mx

    a = mx.random.normal((n, n))
    mx.eval(a @ a)
    began, count = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        mx.eval(a @ a)
        count += 1
    return count * 2 * n**3 / (time.perf_counter() - began) / 1e9
