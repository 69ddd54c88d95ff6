"""A live bar chart of one-second samples, scaled from zero, newest on the right."""

import math
from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

BLOCKS = " ▁▂▃▄▅▆▇█"
AXIS = 7  # columns for the scale on the left


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least `value` (and at least 1)."""
    if value <= 1:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def short(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


class Chart(Widget):
    """The last samples of one series as bars; `samples` is set by the view once a second."""

    samples: reactive[tuple[float, ...]] = reactive(())
    paused: reactive[bool] = reactive(False)

    def __init__(self, title: str, unit: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.title = title
        self.unit = unit
        self.border_title = title

    def watch_samples(self) -> None:
        latest = self.samples[-1] if self.samples else 0.0
        peak = max(self.samples, default=0.0)
        self.border_subtitle = f"now {short(latest)} · peak {short(peak)} {self.unit}"

    def watch_paused(self) -> None:
        self.border_title = f"{self.title} (paused)" if self.paused else self.title

    def render(self) -> Text:
        width, height = self.content_size.width - AXIS, self.content_size.height
        if width < 1 or height < 1:
            return Text()
        values = self.samples[-width:]
        top = nice_ceiling(max(values, default=0.0))
        levels = [round(v / top * height * 8) for v in values]
        pad = width - len(values)
        lines = Text()
        for row in range(height):
            label = short(top) if row == 0 else ("0" if row == height - 1 else "")
            lines.append(f"{label:>{AXIS - 2}} ┤" if label else " " * (AXIS - 2) + " │", style="dim")
            floor = (height - 1 - row) * 8
            bars = "".join(BLOCKS[max(0, min(8, level - floor))] for level in levels)
            lines.append(" " * pad + bars)
            if row < height - 1:
                lines.append("\n")
        return lines
