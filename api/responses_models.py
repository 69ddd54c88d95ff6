"""The OpenAI Responses request, as pydantic models; unknown fields are accepted and ignored."""

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class Model(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


def kind_of(value: Any) -> Any:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


def tag_of(known: set[str], default: str | None = None) -> Callable[[Any], str]:
    """A discriminator on `type`: a known type as itself, anything else as "other" (or `default` when absent)."""

    def tag(value: Any) -> str:
        kind = kind_of(value)
        if kind is None and default is not None:
            return default
        return kind if isinstance(kind, str) and kind in known else "other"

    return tag


# Content parts.


class TextPart(Model):
    type: Literal["input_text", "output_text", "text", "summary_text", "reasoning_text"]
    text: str


class RefusalPart(Model):
    type: Literal["refusal"]
    refusal: str


class OtherPart(Model):
    """A part a text-only model cannot read: input_image, input_file, input_audio, ..."""

    type: str


TEXT_PARTS = {"input_text", "output_text", "text", "summary_text", "reasoning_text"}


def part_tag(value: Any) -> str:
    kind = kind_of(value)
    if kind == "refusal":
        return "refusal"
    return "text" if isinstance(kind, str) and kind in TEXT_PARTS else "other"


Part = Annotated[
    Annotated[TextPart, Tag("text")] | Annotated[RefusalPart, Tag("refusal")] | Annotated[OtherPart, Tag("other")],
    Discriminator(part_tag),
]


# Input items.


class Message(Model):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]


class FunctionCall(Model):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None


class FunctionCallOutput(Model):
    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: str
    output: str | list[Part]


class CustomToolCall(Model):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str
    namespace: str | None = None


class Reasoning(Model):
    type: Literal["reasoning"]
    encrypted_content: str | None = None


class ItemReference(Model):
    type: Literal["item_reference"]


class OtherItem(Model):
    """An item of a hosted tool (web_search_call, ...) or one this server has no use for."""

    type: str


ITEMS = {
    "message",
    "function_call",
    "function_call_output",
    "custom_tool_call_output",
    "custom_tool_call",
    "reasoning",
    "item_reference",
}

Item = Annotated[
    Annotated[Message, Tag("message")]
    | Annotated[FunctionCall, Tag("function_call")]
    | Annotated[FunctionCallOutput, Tag("function_call_output")]
    | Annotated[FunctionCallOutput, Tag("custom_tool_call_output")]
    | Annotated[CustomToolCall, Tag("custom_tool_call")]
    | Annotated[Reasoning, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(tag_of(ITEMS, default="message")),
]


# Tools.


class FunctionTool(Model):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CustomTool(Model):
    """A tool that takes free text rather than JSON arguments."""

    type: Literal["custom"]
    name: str
    description: str | None = None


class HostedTool(Model):
    """A tool only OpenAI's servers can run (web_search, file_search, computer_use, mcp, ...): left out of the
    prompt."""

    type: str


Inner = Annotated[
    Annotated[FunctionTool, Tag("function")]
    | Annotated[CustomTool, Tag("custom")]
    | Annotated[HostedTool, Tag("other")],
    Discriminator(tag_of({"function", "custom"})),
]


class NamespaceTool(Model):
    type: Literal["namespace"]
    name: str
    description: str = ""
    tools: list[Inner]


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")]
    | Annotated[CustomTool, Tag("custom")]
    | Annotated[NamespaceTool, Tag("namespace")]
    | Annotated[HostedTool, Tag("other")],
    Discriminator(tag_of({"function", "custom", "namespace"})),
]


class NamedToolChoice(Model):
    """A named tool (`function` or `custom`); other types name a hosted tool, which is refused."""

    type: str
    name: str | None = None
    namespace: str | None = None


# Settings.


class ReasoningSettings(Model):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class TextFormat(Model):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    description: str | None = None
    schema_: Any = Field(None, alias="schema")
    strict: bool | None = None


class TextSettings(Model):
    format: TextFormat | None = None


Input = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[Item], Tag("items"), Field(min_length=1)],
    Discriminator(lambda value: "text" if isinstance(value, str) else "items"),
]


class ResponsesRequest(Model):
    model: str
    input: Input
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool | None = None
    include: list[str] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt_cache_key: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    reasoning: ReasoningSettings | None = None
    text: TextSettings | None = None
