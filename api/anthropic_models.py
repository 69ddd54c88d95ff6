"""The Anthropic Messages request, as pydantic models; unknown fields are accepted and ignored."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class Model(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class TextBlock(Model):
    type: Literal["text"]
    text: str


class ImageBlock(Model):
    type: Literal["image"]


class DocumentBlock(Model):
    type: Literal["document"]
    title: str | None = None


class OtherBlock(Model):
    """A block type this server has no use for (search results, tool references, server tools, ...)."""

    type: str


def block_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) and kind in KNOWN_BLOCKS else "other"


ResultBlock = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ImageBlock, Tag("image")]
    | Annotated[DocumentBlock, Tag("document")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(block_tag),
]


class ToolUseBlock(Model):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Model):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultBlock] = ""
    is_error: bool = False


class ThinkingBlock(Model):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(Model):
    type: Literal["redacted_thinking"]


KNOWN_BLOCKS = {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"}

Block = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ImageBlock, Tag("image")]
    | Annotated[DocumentBlock, Tag("document")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(block_tag),
]


class Message(Model):
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class Tool(Model):
    """A custom tool (with `input_schema`) or a server tool (with a `type` and no schema)."""

    name: str
    type: str | None = None
    description: str = ""
    input_schema: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoice(Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(Model):
    type: Literal["json_schema"]
    schema_: Any = Field(None, alias="schema")


class OutputConfig(Model):
    """Only `format` means something here (`effort` and the rest are ignored)."""

    format: OutputFormat | None = None


class Thinking(Model):
    type: Literal["enabled", "adaptive", "disabled"]


class MessagesRequest(Model):
    """The body of /v1/messages and of /v1/messages/count_tokens."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    max_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    thinking: Thinking | None = None
    stream: bool = False
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None
