"""Prefix-cache reuse seen through the Anthropic API, the way Claude Code sends its turns."""

import secrets

import anthropic

HOUSE_RULES = "Answer briefly. Never guess. Cite the tool you used. " * 60


def body(billing: str, marked: int, question: str, marker: str) -> dict:
    """A request whose first system block is a per-request billing header, with a cache_control mark on block
    `marked`."""
    system = [
        {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.332; cch={billing};"},
        {"type": "text", "text": f"Session {marker}. " + HOUSE_RULES},
        {"type": "text", "text": "Be kind."},
    ]
    system[marked]["cache_control"] = {"type": "ephemeral"}
    return {
        "model": "claude-any",
        "max_tokens": 16,
        "system": system,
        "messages": [{"role": "user", "content": question}],
    }


def test_a_changing_billing_header_and_moving_cache_marks_still_hit(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="x")
    marker = secrets.token_hex(4)
    first = body("a1b2c", 1, "Good morning!", marker)
    second = body("f9e8d", 2, "What is the capital of France?", marker)
    counts = [
        client.messages.count_tokens(**{k: v for k, v in b.items() if k != "max_tokens"}).input_tokens
        for b in (first, second)
    ]
    one = client.messages.create(**first)
    two = client.messages.create(**second)
    for message, count in zip((one, two), counts, strict=False):
        u = message.usage
        assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == count
    assert one.usage.cache_read_input_tokens < 20, "only a generic head (other tests share this server)"
    system_tokens = client.messages.count_tokens(
        model="m", system=first["system"][1]["text"] + "\nBe kind.", messages=[{"role": "user", "content": "x"}]
    ).input_tokens
    assert two.usage.cache_read_input_tokens >= system_tokens - 20, "the system prompt was reused"
