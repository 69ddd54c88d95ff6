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
        if found := sorted(glob.glob(pattern)):
            return found[0]
    name = ctypes.util.find_library("openblas")
    return name if name and os.path.isabs(name) else None


def default_threads() -> int:
    """OpenBLAS threads for the worker: every core this process may use but one, left for the front process.

    With a thread on every core, each wake-up of the front process (and of the HTTP client)
    preempts one BLAS thread while the others wait for it (README, Benchmarks).
    """
    return max(1, len(os.sched_getaffinity(0)) - 1)


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
