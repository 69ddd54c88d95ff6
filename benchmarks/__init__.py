"""Benchmarks: mlx-tui measured against mlx-lm in-process and mlx_lm.server (`python -m benchmarks`)."""

# what `--only` may name; `ranks` and `edit` run only when named
SECTIONS = (
    "decode",
    "overhead",
    "ttft",
    "concurrency",
    "replay",
    "dashboard",
    "families",
    "ranks",
    "structured",
    "edit",
)
