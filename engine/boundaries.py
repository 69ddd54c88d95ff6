"""Where a rendered prompt's turns end, in tokens: the places later prompts are likely to part from it.

Each is found by rendering the conversation cut at a message with the same template: where
the whole prompt starts with that text, the tokens that spell it mark the boundary.
"""

from typing import Any

from .prefix_cache import longest


def position(tokenizer: Any, head: str, text: str, tokens: list[int]) -> int:
    """How many of `tokens` (the ids of `text`) spell exactly `head`, a prefix of `text`; 0 if none do."""
    if not head or not text.startswith(head):
        return 0
    encoded = tokenizer.encode(head, add_special_tokens=False)
    if tokens[: len(encoded)] == encoded:
        return len(encoded)
    # the prompt keeps a past reply's generated ids, which the text alone would encode otherwise
    n = longest(len(tokens), lambda k: head.startswith(tokenizer.decode(tokens[:k])))
    return n if tokenizer.decode(tokens[:n]) == head else 0


def rendered_until(tokenizer: Any, messages: list[dict], tools: list[dict] | None, text: str, tokens: list[int]) -> int:
    """The boundary after `messages`, a leading part of the prompt's conversation (0: not found)."""
    try:
        head = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception:  # a template may refuse to render a conversation cut there
        return 0
    return position(tokenizer, head, text, tokens)


def system_end(tokenizer: Any, messages: list[dict], tools: list[dict] | None, text: str, tokens: list[int]) -> int:
    """Where the leading system turn (with the tools) ends, if the prompt has more after it."""
    n = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    return rendered_until(tokenizer, messages[:n], tools, text, tokens) if 0 < n < len(messages) else 0


def around_last_user(
    tokenizer: Any, messages: list[dict], tools: list[dict] | None, text: str, tokens: list[int]
) -> list[int]:
    """Where the last user message starts and where it ends (those found)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
    heads = [h for h in (messages[:last], messages[: last + 1]) if any(m.get("role") != "system" for m in h)]
    return [n for h in heads if (n := rendered_until(tokenizer, h, tools, text, tokens))]
