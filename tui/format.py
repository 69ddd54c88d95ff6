"""Numbers as the views print them; None prints as a dash."""

import time

DASH = "–"


def size(n: float | None) -> str:
    if n is None:
        return DASH
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def seconds(s: float | None) -> str:
    if s is None:
        return DASH
    if s < 1:
        return f"{s * 1000:.0f} ms"
    return f"{s:.2f} s" if s < 60 else duration(s)


def duration(s: float | None) -> str:
    """A span as 45s, 12m 03s or 3h 07m."""
    if s is None:
        return DASH
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def percent(fraction: float | None) -> str:
    return DASH if fraction is None else f"{fraction:.0%}"


def number(n: float | None, digits: int = 0) -> str:
    return DASH if n is None else f"{n:,.{digits}f}"


def short_id(id: str, width: int = 16) -> str:
    return id if len(id) <= width else id[: width - 1] + "…"


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))
