"""(4) A 10-turn conversation shaped like Claude Code's, replayed against both servers, turn by turn.

Every main turn resends the system prompt (its first block a billing header whose `cch`
changes on every request, as Claude Code's does), the tool schemas and the whole history
so far: the previous reply as the server generated it plus a tool call and its result. A
short side request with a different prompt (a title, as Claude Code asks for) runs
between turns. Claude Code moves its `cache_control` breakpoint to the newest block each
turn; so does the replay.

Our server gets the Anthropic request Claude Code sends. mlx_lm.server speaks only OpenAI,
so it gets the same conversation translated as a proxy would (system blocks joined, the
header included). The share of the prompt served from cache comes from each server's
usage: Anthropic `cache_read_input_tokens` / (input + cache read + cache creation); OpenAI
`prompt_tokens_details.cached_tokens` / `prompt_tokens`.
"""

import copy
import json
import random
from pathlib import Path

from .clients import anthropic_stream, openai_stream
from .corpus import filler
from .stats import progress

BILLING = "x-anthropic-billing-header: cc_version=2.1.332.9a2; cc_entrypoint=sdk-cli; cch={};"
TASK = "The config loader ignores environment overrides. Find out why and fix it, with a test."
COMMANDS = [
    "ls -la",
    "grep -rn load_config src/",
    "sed -n 1,80p src/config.py",
    "python -m pytest -q tests/test_config.py",
    "git diff",
    "sed -n 80,160p src/config.py",
    "python -m pytest -q",
    "grep -rn environ src/",
    "cat pyproject.toml",
    "git status",
]
TITLE_SYSTEM = (
    "Summarize this coding conversation in under 50 characters.\n"
    "Capture the main task, key files, problems addressed, and current status."
)


def find_sample(given: str | None) -> Path | None:
    if given:
        return Path(given)
    here = Path(__file__).resolve().parent.parent
    found = sorted((here.parent / "shared" / "samples").glob("claude-code-*.json"))
    return found[0] if found else None


def load_sample(path: Path | None, tokenizer) -> dict:
    """System blocks (without the header), tools and first messages of a captured first turn, or a synthetic one."""
    if path and path.exists():
        body = json.loads(path.read_text())
        body = body.get("body", body)
        system = [b["text"] for b in body["system"] if not b["text"].startswith("x-anthropic-billing-header")]
        messages = copy.deepcopy(body["messages"])
        for message in messages:
            if isinstance(message["content"], list):
                for block in message["content"]:
                    if block.get("type") == "text" and block["text"].strip() == "Hello":
                        block["text"] = TASK
        return {"source": str(path), "system": system, "tools": body["tools"], "messages": messages}
    tools = [
        {
            "name": f"Tool{i}",
            "description": filler(tokenizer, 400, seed=100 + i),
            "input_schema": {"type": "object", "properties": {"arg": {"type": "string"}}, "required": ["arg"]},
        }
        for i in range(12)
    ]
    system = ["You are a Claude agent, built on Anthropic's Claude Agent SDK.", filler(tokenizer, 2500, seed=99)]
    messages = [{"role": "user", "content": [{"type": "text", "text": TASK}]}]
    return {"source": "synthetic", "system": system, "tools": tools, "messages": messages}


def to_openai(system: list[str], tools: list[dict], messages: list[dict]) -> dict:
    """The Anthropic request as an OpenAI one, as a proxy in front of mlx_lm.server would send it."""
    out = [{"role": "system", "content": "\n".join(system)}]
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if m["role"] == "assistant":
            text = "\n".join(b["text"] for b in content if b["type"] == "text")
            calls = [
                {
                    "id": b["id"],
                    "type": "function",
                    "function": {"name": b["name"], "arguments": json.dumps(b["input"])},
                }
                for b in content
                if b["type"] == "tool_use"
            ]
            out.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
            continue
        texts = []
        for b in content:
            if b["type"] == "tool_result":
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": b["content"]})
            else:
                texts.append(b["text"])
        if texts:
            out.append({"role": m["role"], "content": "\n".join(texts)})
    functions = [
        {
            "type": "function",
            "function": {"name": t["name"], "description": t.get("description", ""), "parameters": t["input_schema"]},
        }
        for t in tools
    ]
    return {"messages": out, "tools": functions}


def prompt_tokens(tokenizer, sample: dict) -> int:
    req = to_openai(sample["system"], sample["tools"], sample["messages"])
    text = tokenizer.apply_chat_template(
        req["messages"], tools=req["tools"], add_generation_prompt=True, tokenize=False
    )
    return len(tokenizer.encode(text, add_special_tokens=False))


def scale(sample: dict, tokenizer, target: int) -> dict:
    """Shrink the capture to about `target` prompt tokens: drop the largest tools, then trim the longest texts."""
    sample = copy.deepcopy(sample)
    while prompt_tokens(tokenizer, sample) > target:
        if len(sample["tools"]) > 3:
            sample["tools"].remove(max(sample["tools"], key=lambda t: len(json.dumps(t))))
            continue
        texts = [(len(sample["system"][i]), "system", i, None) for i in range(len(sample["system"]))]
        for mi, m in enumerate(sample["messages"]):
            if isinstance(m["content"], list):
                texts += [(len(b.get("text", "")), "messages", mi, bi) for bi, b in enumerate(m["content"])]
        size, where, i, j = max(texts)
        if size < 200:
            break
        if where == "system":
            sample["system"][i] = sample["system"][i][: int(size * 0.8)]
        else:
            block = sample["messages"][i]["content"][j]
            block["text"] = block["text"][: int(size * 0.8)]
    sample["scaled_to"] = target
    return sample


def with_breakpoint(messages: list[dict]) -> list[dict]:
    """Claude Code marks the newest block with cache_control (and so moves the mark every turn)."""
    messages = copy.deepcopy(messages)
    last = messages[-1]
    if isinstance(last["content"], list) and last["content"]:
        last["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return messages


class Session:
    """One server's side of the replay: its own history, built from what it generated."""

    def __init__(self, server, sample: dict, seed: int):
        self.server = server
        self.sample = sample
        self.messages = copy.deepcopy(sample["messages"])
        self.rng = random.Random(seed)

    def header(self) -> str:
        return BILLING.format("".join(self.rng.choice("0123456789abcdef") for _ in range(5)))

    async def send(self, client, system: list[str], tools: list[dict], messages: list[dict], max_tokens: int):
        system = [self.header(), *system]
        if self.server.kind == "ours":
            blocks = [{"type": "text", "text": t} for t in system]
            blocks[1]["cache_control"] = {"type": "ephemeral"}
            body = {
                "model": "claude-opus-5-5",
                "system": blocks,
                "tools": tools,
                "messages": with_breakpoint(messages),
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "thinking": {"type": "adaptive"},
                "metadata": {"user_id": "bench"},
            }
            return await anthropic_stream(client, self.server.url, body)
        body = {
            "model": self.server.model_name,
            **to_openai(system, tools, messages),
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        if not tools:
            body.pop("tools")
        return await openai_stream(client, self.server.url, body)

    async def turn(self, client, max_tokens: int):
        return await self.send(client, self.sample["system"], self.sample["tools"], self.messages, max_tokens)

    def extend(self, turn: int, reply: str, tokenizer, result_tokens: int):
        """The reply as generated, a tool call, and the tool's result: the history of the next turn."""
        tool_id = f"toolu_{turn:02d}{self.rng.randrange(16**8):08x}"
        command = COMMANDS[turn % len(COMMANDS)]
        assistant = [{"type": "text", "text": reply}] if reply else []
        assistant.append(
            {
                "type": "tool_use",
                "id": tool_id,
                "name": "Bash",
                "input": {"command": command, "description": f"Run {command.split()[0]}"},
            }
        )
        self.messages.append({"role": "assistant", "content": assistant})
        output = filler(tokenizer, result_tokens, seed=1000 + turn)
        self.messages.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": output}]}
        )

    async def side(self, client, max_tokens: int):
        """A title request: a different, short prompt between turns (no tools)."""
        recent = self.messages[-1]["content"]
        text = json.dumps(recent)[:600] if not isinstance(recent, str) else recent[:600]
        messages = [{"role": "user", "content": [{"type": "text", "text": f"Conversation so far:\n{text}"}]}]
        return await self.send(client, [TITLE_SYSTEM], [], messages, max_tokens)


async def run(
    client,
    servers: list,
    tokenizer,
    turns: int,
    target_tokens: int,
    sample_path: str | None,
    reply_tokens: int = 32,
    result_tokens: int = 160,
) -> dict:
    path = find_sample(sample_path)
    sample = load_sample(path, tokenizer)
    captured = prompt_tokens(tokenizer, sample)
    if target_tokens:
        sample = scale(sample, tokenizer, target_tokens)
    progress(
        f"replay: {sample['source']}: {captured} prompt tokens as captured, "
        f"{prompt_tokens(tokenizer, sample)} after scaling; {len(sample['tools'])} tools, {turns} turns"
    )
    sessions = [Session(s, sample, seed=7) for s in servers]
    rows, sides = [], []
    previous: dict[str, int] = {}
    for turn in range(1, turns + 1):
        for s in sessions if turn % 2 else sessions[::-1]:
            r = await s.turn(client, reply_tokens)
            if r.error:
                raise RuntimeError(f"{s.server.label}, turn {turn}: {r.error}")
            before = previous.get(s.server.label)
            rows.append(
                {
                    "server": s.server.label,
                    "turn": turn,
                    "prompt_tokens": r.prompt_tokens,
                    "cached_tokens": r.cached_tokens,
                    "cached_share": r.cached_share,
                    "ttft_s": r.ttft,
                    "generated": r.generated,
                    "previous_prompt": before,
                    "of_previous": (r.cached_tokens or 0) / before if before else None,
                }
            )
            previous[s.server.label] = r.prompt_tokens
            progress(
                f"replay: turn {turn}/{turns}, {s.server.label}: {r.prompt_tokens} prompt tokens, "
                f"{r.cached_tokens} cached ({(r.cached_share or 0):.0%}), TTFT {r.ttft:.2f} s"
            )
            s.extend(turn, r.text, tokenizer, result_tokens)
            if turn < turns:
                side = await s.side(client, 8)
                if side.error:
                    raise RuntimeError(f"{s.server.label}, side request {turn}: {side.error}")
                sides.append(
                    {
                        "server": s.server.label,
                        "after_turn": turn,
                        "prompt_tokens": side.prompt_tokens,
                        "cached_tokens": side.cached_tokens,
                        "ttft_s": side.ttft,
                    }
                )
    return {
        "source": sample["source"],
        "captured_tokens": captured,
        "scaled_to": target_tokens or None,
        "tools": len(sample["tools"]),
        "rows": rows,
        "sides": sides,
    }
