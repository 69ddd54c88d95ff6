"""The canonical request: what the API layers translate into and the worker runs."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Sampling:
    """Sampling settings; zero means off, as in mlx-lm's `make_sampler`."""

    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None


@dataclass(slots=True)
class Constraint:
    """What the reply must match.

    `format` "json_object" or "json_schema" binds the reply's text to the JSON `schema`
    (json_object: any object); `strict_tools` names tools whose calls are bound to their
    parameters' schema whenever the model makes them.
    """

    format: str | None = None
    schema: dict[str, Any] | None = None
    strict_tools: list[str] = field(default_factory=list)


@dataclass(slots=True)
class GenerationRequest:
    """Messages in the chat-template shape `tokenizer.apply_chat_template` takes.

    `tools` are OpenAI-style function schemas. `tool_choice` is "auto", "none",
    "required" (any tool) or a tool name. `enable_thinking` is None to leave the
    template's default. `source` ("anthropic", "openai", "chat") and `client` (the
    user agent) only label the request on the dashboard. `fault` is the fault-injection
    debug setting, see `engine/faults.py`. `constraint` binds the reply to a schema
    (`engine/grammar.py`); a forced call is bound to its tool's schema without one, and to a
    single call when `parallel_tool_calls` is false.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    enable_thinking: bool | None = None
    source: str = ""
    client: str = ""
    fault: str | None = None
    constraint: Constraint | None = None
    parallel_tool_calls: bool = True
