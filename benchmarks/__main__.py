"""`python -m benchmarks`: mlx-tui against mlx-lm in-process and mlx_lm.server, on one model, in one run.

    python -m benchmarks            # full run (about 15 minutes on 2 CPU cores)
    python -m benchmarks --quick    # smoke check (about 3 minutes)

Writes benchmarks/results/README.md (the table), results.json and PNG charts.
"""

import argparse
import sys

from . import SECTIONS
from .blas import ensure_same_blas


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run (about 3 minutes)")
    p.add_argument("--model", help="a local mlx-lm model directory (default: build a random 63M float32 llama)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these measurements")
    p.add_argument("--rounds", type=int, help="rounds of each interleaved measurement")
    p.add_argument("--decode-tokens", type=int, help="tokens a reply in the decode measurements (default 64)")
    p.add_argument(
        "--blas",
        choices=("auto", "reference"),
        default="auto",
        help="the BLAS every process starts with (auto: the system OpenBLAS where found)",
    )
    p.add_argument(
        "--blas-threads",
        type=int,
        help="OPENBLAS_NUM_THREADS for every process in the comparison (default: what our worker picks, all cores)",
    )
    p.add_argument("--out", help="results directory (default: benchmarks/results, or benchmarks/results/quick)")
    p.add_argument("--sample", help="a captured Claude Code request (default: ../shared/samples/claude-code-*.json)")
    p.add_argument(
        "--replay-tokens",
        type=int,
        help="scale the replay's first turn to about this many prompt tokens (0: the capture as is)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    blas = ensure_same_blas(args.blas, args.blas_threads)  # re-executes this process if needed: before mlx is imported
    import asyncio

    from .run import run

    return asyncio.run(run(args, blas))


if __name__ == "__main__":
    sys.exit(main())
