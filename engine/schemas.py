"""A request's JSON schemas, checked before it is queued: what llguidance cannot compile is refused with its reason.

Runs in the front process, off its event loop and under a time limit, so a schema that is
wrong, unsupported or too costly gets a 400 before the worker sees it.
"""

import asyncio
import functools
import json
import re
from typing import Any

import llguidance

from .request import GenerationRequest

# The layout templates render JSON in (`tojson`, json.dumps): one space after ':' and ',', no
# other whitespace, so a model never has room to pad a reply with blank lines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Bounds on the work one grammar may cost (compilation and each mask), well above what real
# schemas need: a schema past them is refused instead of stalling the batch.
LIMITS: dict[str, Any] = dict(
    initial_lexer_fuel=200_000, step_lexer_fuel=200_000, max_grammar_size=200_000, max_lexer_states=50_000
)
CHECK_SECONDS = 5.0


def tool_name(tool: dict) -> str:
    return tool.get("function", tool)["name"]


def tool_schema(tool: dict) -> dict:
    return tool.get("function", tool).get("parameters") or {"type": "object", "properties": {}}


def inline_json(schema: dict, lenient: bool = False) -> str:
    """A JSON schema as a Lark grammar element, in the layout of JSON_OPTIONS.

    Lenient: keywords llguidance does not implement are ignored rather than refused (for
    schemas nobody asked to be strict: forced calls, `--constrain-tools`).
    """
    guidance = {**JSON_OPTIONS, **({"lenient": True} if lenient else {}), **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": guidance})


def bound_schemas(request: GenerationRequest, constrain_tools: bool) -> list[tuple[str, dict | None, bool]]:
    """The schemas a grammar will hold this request to: (what, schema, lenient)."""
    constraint = request.constraint
    found = []
    if constraint and constraint.format:
        found.append(("the response schema", constraint.schema, False))
    tools = request.tools if request.tool_choice != "none" else None
    strict = set(constraint.strict_tools) if constraint else set()
    for tool in tools or []:
        name = tool_name(tool)
        if name in strict or constrain_tools or request.tool_choice in ("required", name):
            found.append((f"tool {name}'s schema", tool_schema(tool), name not in strict))
    return found


def problem(request: GenerationRequest, constrain_tools: bool = False) -> str | None:
    """Why a schema of this request cannot be compiled, or None."""
    for what, schema, lenient in bound_schemas(request, constrain_tools):
        if not isinstance(schema, dict):
            return f"{what} must be a JSON object"
        try:
            grammar = f"start: {inline_json(schema, lenient)}"
        except RecursionError:
            return f"{what} cannot be used: it is nested too deeply"
        if reason := compile_problem(grammar):
            return f"{what} cannot be used: {reason}"
    return None


@functools.lru_cache(maxsize=256)
def compile_problem(lark: str) -> str:
    """Why llguidance refuses this grammar ("" if it compiles); a schema seen before is not compiled again."""
    limits = llguidance.LLParserLimits(**LIMITS)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(lark), limits=limits
    )
    return first_line(messages[0]) if failed else ""


async def check(request: GenerationRequest, constrain_tools: bool = False) -> str | None:
    """`problem`, off the event loop; a schema that takes longer than CHECK_SECONDS to compile is refused."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(problem, request, constrain_tools), CHECK_SECONDS)
    except TimeoutError:
        return f"a schema took longer than {CHECK_SECONDS:g} s to compile; simplify it"


def first_line(message: str, most: int = 300) -> str:
    """llguidance's message on one line, without its position in our grammar text (it means nothing to the client)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip().strip("^")]
    line = re.sub(r"^at \d+\(\d+\): ", "", " ".join(lines)) or "unknown error"
    return line if len(line) <= most else line[: most - 1] + "…"
