"""Structured output in every protocol: a response format and strict tools as the engine's Constraint."""

from typing import Any

from mlx_tui.engine.request import Constraint

from .errors import ApiError

ANY_OBJECT = {"type": "object"}


def constraint(kind: str | None, schema: Any, strict_tools: list[str], field: str) -> Constraint | None:
    """The constraint for a response format of `kind` ("text", "json_object", "json_schema"; None: none) and strict
    tools.

    `field` names where the schema was given, for the 400 when it is missing or not an object.
    """
    if kind in (None, "text"):
        return Constraint(strict_tools=strict_tools) if strict_tools else None
    if kind == "json_object":
        schema = ANY_OBJECT
    elif not isinstance(schema, dict):
        raise ApiError(400, f"{field}: a json_schema format needs its schema as a JSON object")
    return Constraint(kind, schema, strict_tools)
