"""Starting the engine for a server, headless or under the dashboard: load, say what is missing, warm the cache."""

import logging
from collections.abc import Callable
from pathlib import Path

from mlx_tui.engine.client import EngineClient, ModelLoadError

from .warm import warm

NO_TOOL_PARSER = "no tool-call parser found for this model; pass --tool-parser NAME to enable tool calls"


async def start_engine(engine: EngineClient, warm_file: Path | None, report: Callable[[int, str], None]) -> bool:
    """Start the engine, warn when it cannot parse tool calls, prefill `warm_file`; False if the model did not load.

    `report(level, message)` gets each line, at a `logging` level.
    """
    try:
        await engine.start()
    except ModelLoadError as e:
        report(logging.ERROR, str(e))
        return False
    if engine.info.get("tool_parser") is None:
        report(logging.WARNING, NO_TOOL_PARSER)
    if warm_file:
        report(logging.INFO, await warm(engine, warm_file))
    return True
