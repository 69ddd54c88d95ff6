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
class Request:
    """Messages in the chat-template shape `tokenizer.apply_chat_template` takes.

    `tools` are OpenAI-style function schemas. `tool_choice` is "auto", "none",
    "required" (any tool) or a tool name. `enable_thinking` is None to leave the
    template's default. `source` ("anthropic", "openai", "responses", "chat") and
    `client` (the user agent) only label the request on the dashboard. `fault` is the
    fault-injection debug setting, see `engine/faults.py`.
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
