"""The log pane: the API server's and the front process's log records, routed away from the terminal."""

import logging
import time
from collections import deque
from typing import Any

from rich.text import Text
from textual.app import App
from textual.message import Message
from textual.widgets import RichLog

LOGGERS = ("uvicorn", "mlx_tui")
LEVEL_STYLES = {logging.WARNING: "yellow", logging.ERROR: "bold red", logging.CRITICAL: "bold red"}
FORMATTER = logging.Formatter()


class LogRecordPosted(Message):
    def __init__(self, record: logging.LogRecord) -> None:
        super().__init__()
        self.record = record


class AppHandler(logging.Handler):
    """Posts each record to the app; safe from any thread."""

    def __init__(self, app: App) -> None:
        super().__init__(logging.INFO)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        self.app.post_message(LogRecordPosted(record))


class LoggerRoute:
    """While installed, our loggers and uvicorn's write to the app, not to the terminal."""

    def __init__(self, app: App) -> None:
        self.handler = AppHandler(app)
        self.saved: list[tuple[logging.Logger, int, bool]] = []

    def install(self) -> None:
        for name in LOGGERS:
            logger = logging.getLogger(name)
            self.saved.append((logger, logger.level, logger.propagate))
            logger.setLevel(logging.INFO)
            logger.propagate = False
            logger.addHandler(self.handler)

    def remove(self) -> None:
        for logger, level, propagate in self.saved:
            logger.removeHandler(self.handler)
            logger.setLevel(level)
            logger.propagate = propagate
        self.saved.clear()


class LogView(RichLog):
    """The records, wrapped to the pane's width; those that come while it is hidden are written when it is shown."""

    MAX_LINES = 2000

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=self.MAX_LINES, wrap=True, markup=False, highlight=False, **kwargs)
        self.unseen: deque[logging.LogRecord] = deque(maxlen=self.MAX_LINES)

    def add(self, record: logging.LogRecord) -> None:
        if self.region:
            self._write(record)
        else:  # hidden: a line written now would be wrapped to no known width
            self.unseen.append(record)

    def on_show(self) -> None:
        while self.unseen:
            self._write(self.unseen.popleft())

    def _write(self, record: logging.LogRecord) -> None:
        line = Text(time.strftime("%H:%M:%S ", time.localtime(record.created)), style="dim")
        line.append(f"{record.levelname:<8}", style=LEVEL_STYLES.get(record.levelno, "green"))
        line.append(record.getMessage())
        if record.exc_info:
            line.append("\n" + FORMATTER.formatException(record.exc_info), style="red")
        self.write(line, width=self.scrollable_content_region.width)
