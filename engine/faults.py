"""Fault injection for tests: a request may carry `fault="KIND@N"`, acted on at its Nth generated token.

Off unless the server is started with `--debug-faults`, which lets the header
`X-MLX-TUI-Fault: KIND@N` set it. KIND is one of:
- `request_error`: this request's own output processing raises (it alone fails);
- `batch_error`: the batched step raises (every request in the step fails; the breaker counts it);
- `stall`: the worker stops making progress (the watchdog must kill and restart it);
- `exit`: the worker process exits at once.
"""

import os
import time

KINDS = ("request_error", "batch_error", "stall", "exit")


class InjectedFault(Exception):
    pass


def parse(spec: str) -> tuple[str, int]:
    kind, _, at = spec.partition("@")
    if kind not in KINDS or not at.isdigit():
        raise ValueError(f"fault must be KIND@N with KIND one of {', '.join(KINDS)}, got {spec!r}")
    return kind, int(at)


def act(kind: str):
    """Carry out a fault that takes the whole worker down."""
    if kind == "exit":
        os._exit(70)
    if kind == "stall":
        while True:
            time.sleep(3600)
    raise InjectedFault(f"injected {kind}")
