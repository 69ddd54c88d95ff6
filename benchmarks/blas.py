"""Every process in a comparison starts with the same BLAS: the benchmark re-executes itself with the worker's."""

import os
import sys

from mlx_tui.engine.blas import worker_blas

GUARD = "MLX_TUI_BENCH_BLAS"


def ensure_same_blas(choice: str, threads: int | None = None) -> str:
    """Restart this process once with the BLAS the engine worker gets for `choice`; its name.

    A preload only takes effect when a process starts, so this runs before `mlx` is
    imported. Child processes (both servers) inherit the environment, so the in-process
    baseline, our server's front process and worker, and mlx_lm.server all match, thread
    count included: `threads`, or else the one our worker picks by default.
    """
    name, env = worker_blas(choice, threads or 0)
    if os.environ.get(GUARD) == name:
        return name
    assert "mlx.core" not in sys.modules, "mlx was imported before the BLAS was chosen"
    preload = env.get("LD_PRELOAD", "").split()[:1]  # worker_blas appends any inherited preload
    if preload:
        os.environ["LD_PRELOAD"] = preload[0]
    else:
        os.environ.pop("LD_PRELOAD", None)
    if "OPENBLAS_NUM_THREADS" in env:
        os.environ["OPENBLAS_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"]
    os.environ[GUARD] = name
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]])
