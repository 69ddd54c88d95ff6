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


def worker_blas(choice: str) -> tuple[str, dict[str, str]]:
    """The BLAS name to report and the environment to start the worker with.

    `choice` is "auto" (OpenBLAS where found) or "reference" (the wheel's own).
    """
    if sys.platform == "darwin":
        return "accelerate", {}
    if choice == "auto" and (path := find_openblas()):
        preload = " ".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p)
        return f"openblas ({path})", {"LD_PRELOAD": preload}
    return "reference", {}
