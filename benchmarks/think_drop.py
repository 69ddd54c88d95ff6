"""What a template that drops earlier turns' reasoning costs the prefix cache, counted in tokens.

    python -m benchmarks.think_drop

Qwen3's template renders an assistant turn's `<think>` block only after the last user
query; once a new user message arrives, earlier reasoning disappears from the prompt. The
model generated it, so the cache holds it, and the next prompt differs from the cached
tokens from the first dropped block on: everything after it is prefilled again. This
renders one agent session (user tasks, each a chain of reasoning + tool call + result,
then a reasoned answer) with the demo model's template, which keeps reasoning, and with
the same template changed to drop it as Qwen3's does, and counts per request the prompt
tokens that are not a prefix of the previous request's prompt + generated tokens.

On a model whose cache cannot be cut at any token (a hybrid with recurrent layers, or a
sliding window that has rotated), a request resumes only where a snapshot was kept: the
last column counts what such a model prefills again, with the snapshots the engine keeps
(the system prompt's end, around each request's last user message, the end of each
prompt but its last token, the end of each reply).
"""

import json
import random

from transformers import AutoTokenizer

from mlx_tui.engine import boundaries
from mlx_tui.engine.demo import MODEL_DIR
from mlx_tui.engine.demo.template import CHAT_TEMPLATE

from .corpus import filler

KEEP = CHAT_TEMPLATE
# Qwen3's rule: reasoning is rendered only for assistant turns after the last user query (tool results are not queries)
DROP = CHAT_TEMPLATE.replace(
    "{%- set system = messages[0]",
    "{%- set ns = namespace(last_query=-1) -%}\n"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}\n"
    "{%- set system = messages[0]",
).replace(
    "{%- if message.reasoning_content -%}", "{%- if message.reasoning_content and loop.index0 > ns.last_query -%}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "Bash",
            "description": "Run a shell command.",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}},
        },
    }
]


def session(tokenizer, tasks: int, steps: int, reasoning: int, result: int, seed: int = 5) -> list[list[dict]]:
    """The messages of each request of the session, and each request's reply as the next request's history."""
    rng = random.Random(seed)
    system = {"role": "system", "content": filler(tokenizer, 1000, seed=1)}
    messages, requests = [system], []
    for task in range(tasks):
        messages.append({"role": "user", "content": filler(tokenizer, 60, seed=10 + task)})
        for step in range(steps + 1):
            requests.append(list(messages))
            thought = filler(tokenizer, reasoning, seed=rng.randrange(10**6))
            if step < steps:
                call = {
                    "id": f"c{task}{step}",
                    "type": "function",
                    "function": {"name": "Bash", "arguments": {"command": f"ls step{step}"}},
                }
                messages.append(
                    {"role": "assistant", "content": "", "reasoning_content": thought, "tool_calls": [call]}
                )
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call["id"],
                        "content": filler(tokenizer, result, seed=rng.randrange(10**6)),
                    }
                )
            else:
                messages.append(
                    {
                        "role": "assistant",
                        "content": filler(tokenizer, 40, seed=rng.randrange(10**6)),
                        "reasoning_content": thought,
                    }
                )
    requests.append(list(messages) + [{"role": "user", "content": "Thanks."}])
    return requests


class Rendering:
    """The tokenizer with `template` as its own, as the engine renders prompts and their boundaries."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, enable_thinking=True, **kwargs)

    def encode(self, text, **kwargs):
        return self.tokenizer.encode(text, **kwargs)

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def replay(tokenizer, template: str, requests: list[list[dict]]) -> list[dict]:
    """Per request: prompt tokens, and those prefilled again (not a prefix of the last prompt + what it generated),
    on a model cut at any token and on one resumed only at snapshots."""
    rendering = Rendering(tokenizer, template)

    def render(messages, template, prompt):
        return tokenizer.apply_chat_template(
            messages,
            tools=TOOLS,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=prompt,
            enable_thinking=True,
        )

    rows, previous, snapshots = [], "", {0}
    for i, messages in enumerate(requests):
        text = render(messages, template, True)
        common = next(
            (k for k, (a, b) in enumerate(zip(text, previous, strict=False)) if a != b), min(len(text), len(previous))
        )
        tokens = tokenizer.encode(text, add_special_tokens=False)
        reused = len(tokenizer.encode(text[:common], add_special_tokens=False))
        resumed = max(p for p in snapshots if p <= reused)
        rows.append(
            {
                "request": i + 1,
                "prompt": len(tokens),
                "prefilled": len(tokens) - reused,
                "prefilled_snapshots": len(tokens) - resumed,
            }
        )
        snapshots = {p for p in snapshots if p <= resumed} | {len(tokens) - 1}
        snapshots |= {boundaries.system_end(rendering, messages, TOOLS, text, tokens)}
        snapshots |= set(boundaries.around_last_user(rendering, messages, TOOLS, text, tokens))
        if i + 1 < len(requests):
            # what the model generated, reasoning included, up to its end-of-turn token
            turn = render(requests[i + 1][: len(messages) + 1], KEEP, False)[len(render(messages, KEEP, True)) :]
            previous = text + turn[: turn.index("<|im_end|>") + len("<|im_end|>")]
            snapshots.add(len(tokenizer.encode(previous, add_special_tokens=False)))
    return rows


def main():
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    requests = session(tokenizer, tasks=3, steps=3, reasoning=150, result=200)
    keep, drop = replay(tokenizer, KEEP, requests), replay(tokenizer, DROP, requests)
    print(
        "| request | prompt tokens, kept / dropped | prefilled, reasoning kept | prefilled, reasoning dropped "
        "(Qwen3-style) | same, resumed at snapshots (hybrid) |"
    )
    print("|---|---|---|---|---|")
    for k, d in zip(keep, drop, strict=False):
        print(
            f"| {k['request']} | {k['prompt']} / {d['prompt']} | {k['prefilled']} | {d['prefilled']} | "
            f"{d['prefilled_snapshots']} |"
        )
    after_first = {
        name: sum(r[column] for r in rows[1:])
        for name, rows, column in (
            ("kept", keep, "prefilled"),
            ("dropped", drop, "prefilled"),
            ("dropped, snapshots", drop, "prefilled_snapshots"),
            ("kept, snapshots", keep, "prefilled_snapshots"),
        )
    }
    print(json.dumps({"prefilled after the first request": after_first}))


if __name__ == "__main__":
    main()
