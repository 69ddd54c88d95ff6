"""OpenBLAS's thread count in the worker: all cores by default, `--blas-threads N` to choose."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_unless_ci

from mlx_tui.engine.blas import find_openblas


@pytest.fixture(autouse=True)
def openblas():
    if find_openblas() is None:
        skip_unless_ci("no system OpenBLAS (apt-get install libopenblas0-pthread)")


def worker_threads(engine) -> str:
    """OPENBLAS_NUM_THREADS in the running worker's environment."""
    environ = Path(f"/proc/{engine.pid}/environ").read_bytes().split(b"\0")
    [value] = [v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"OPENBLAS_NUM_THREADS=")]
    return value


def test_the_worker_runs_with_the_thread_count_it_reports(engine):
    threads = worker_threads(engine)
    assert int(threads) >= 1
    assert engine.blas.startswith(f"openblas, {threads} thread{'' if threads == '1' else 's'} (")


def test_blas_threads_sets_the_workers_count(make_engine):
    engine = make_engine(blas_threads=3)
    assert worker_threads(engine) == "3"
    assert engine.blas.startswith("openblas, 3 threads (")


def test_the_cli_refuses_a_negative_thread_count():
    command = [sys.executable, "-m", "mlx_tui.tui.cli", "--serve", "--port", "0", "--blas-threads", "-1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "mlx-tui: error: --blas-threads must be 0 (all cores) or more"
