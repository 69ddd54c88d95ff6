"""Build the bundled demo model: tokenizer, chat template, a tiny llama, trained and verified.

Run from the repository root; on Linux preload OpenBLAS, the BLAS of the mlx[cpu] wheel is ~50x
slower:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        .venv/bin/python engine/demo/train.py

It writes engine/demo/model/ and exits non-zero if a known conversation or an unfamiliar prompt
(and with `--agents`, an agent task) is not answered as expected. The committed weights are
the first phase alone (600 steps, 9 minutes here on 2 quiet cores).

`--agents` adds two phases that teach the agent tasks of `agents.py` to the clients installed
in .clients/ (the `npm install` line of .ci/run), from their requests captured at training
time. The second teaches them (300 steps): each step's gradient sums an agent task's group of
prompts and a batch of the first phase's conversations, clipped, so that the known replies hold
while the new ones are learnt. The third (300 steps) goes over them again in 96 fresh variants
of folder, date and question, at a lower rate, each reply's first and last tokens (whether to
call, answer or decline; where to stop) weighing 8x. The agent prompts are about 4k tokens,
and those of one client and run differ only in their last few hundred (the question, the
tool's result): a step runs their shared prefix once, without gradients (`PrefixCache`), and
backpropagates through the rest, about 6x cheaper than through each whole prompt.

Not good enough yet, so the committed weights do not have it. Measured here (2 cores, about
50 minutes for the three phases): every known conversation and unfamiliar prompt still passes,
and so do the agent tasks in the trained variants, but of the unseen variants one Claude Code
call was declined; against the real CLIs (tests/test_agents.py), Claude Code's whole loop
passed while Codex's answer after the result broke off, and one client's "Hello" turn got the
marker task's answer. The tasks are learnt as the variants they were shown, not
yet as "this question, in any folder and on any date". (Alternating agent steps with the first
phase's from the start learnt neither in 1200 steps; the agent tasks alone onto the trained
weights lost the known tool calls.) More variants, or a model with more capacity, are next.
"""

import json
import math
import os
import random
import re
import sys
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.llama import Model, ModelArgs
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlx_tui.engine.demo import MODEL_DIR
from mlx_tui.engine.demo.agents import agent_conversations, installed
from mlx_tui.engine.demo.conversations import CONVERSATIONS, FALLBACK_REPLY, TOOLS, assistant, chat, user
from mlx_tui.engine.demo.template import CHAT_TEMPLATE
from mlx_tui.engine.demo.unfamiliar import question, text, tool, unfamiliar_conversations

VOCAB_SIZE = 400
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
MODEL_ARGS: dict[str, Any] = dict(
    model_type="llama",
    hidden_size=128,
    num_hidden_layers=2,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=65536,
    rope_theta=500.0,
    tie_word_embeddings=True,
)
SEED = 0
STEPS = 600
LONG_EVERY = 4
AGENT_STEPS = 300
AGENT_WARMUP_STEPS = 20
AGENT_LEARNING_RATE = 1e-3
# the third phase: the agent tasks again in fresh variants, each reply's first and last tokens
# (whether to call, answer or decline; where to stop) weighing more
SHARPEN_STEPS = 300
SHARPEN_VARIANTS = 96
SHARPEN_LEARNING_RATE = 3e-4
ENDS_TOKENS = 8
ENDS_WEIGHT = 8.0
AGENT_VARIANTS = 16
LEARNING_RATE = 5e-3
WARMUP_STEPS = 50
KNOWN_BATCH = 8
UNFAMILIAR_BATCH = 8
LONG_BATCH = 1
LONG_TOKENS = 3000
NEAR_TOKENS = 32
MAX_FAR_WEIGHT = 32


def modes(conversation: dict[str, Any]) -> list[bool | None]:
    """The enable_thinking values a conversation is trained and checked with."""
    if "modes" in conversation:
        return conversation["modes"]
    return [True, False] if conversation.get("enable_thinking", True) else [False]


def reply_message(conversation: dict[str, Any], enable_thinking: bool | None) -> dict[str, Any]:
    """The last message, without its reasoning when thinking is disabled."""
    message = dict(conversation["messages"][-1])
    if not enable_thinking:
        message.pop("reasoning_content", None)
    return message


def expected_reply(tokenizer: Any, conversation: dict[str, Any], enable_thinking: bool | None) -> str:
    """The reply text exactly as the chat template renders it, without the end token."""
    rendered = tokenizer.apply_chat_template([reply_message(conversation, enable_thinking)], tokenize=False)
    header, footer = "<|im_start|>assistant\n", "<|im_end|>\n"
    assert rendered.startswith(header) and rendered.endswith(footer), rendered
    return rendered[len(header) : -len(footer)]


def prompt_text(tokenizer: Any, conversation: dict[str, Any], enable_thinking: bool | None) -> str:
    """The rendered prompt that precedes the reply."""
    return tokenizer.apply_chat_template(
        conversation["messages"][:-1],
        tools=conversation["tools"],
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
        tokenize=False,
    )


def build_tokenizer() -> Any:
    """Train a byte-level BPE on the rendered conversations and wrap it for transformers."""
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=CHAT_TEMPLATE)
    rendered = {prompt_text(bare, c, mode) + expected_reply(bare, c, mode) for c in CONVERSATIONS for mode in modes(c)}
    texts = sorted(rendered) + [FALLBACK_REPLY] * 100
    return train_bpe(texts, VOCAB_SIZE, CHAT_TEMPLATE, MODEL_ARGS["max_position_embeddings"])


def train_bpe(texts: list[str], vocab_size: int, chat_template: str, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` tokens trained on `texts`, with the chat markup as single tokens.

    The benchmark's model uses it too.
    """
    markup = "|".join(re.escape(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS)
    pieces = [piece for text in texts for piece in re.split(markup, text)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKUP_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(pieces, trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer: Any, conversation: dict[str, Any], enable_thinking: bool | None) -> Any:
    """Token ids of prompt + reply + end token, and the number of prompt tokens."""
    prompt = tokenizer.encode(prompt_text(tokenizer, conversation, enable_thinking), add_special_tokens=False)
    reply_text = expected_reply(tokenizer, conversation, enable_thinking) + tokenizer.eos_token
    reply = tokenizer.encode(reply_text, add_special_tokens=False)
    return prompt + reply, len(prompt)


def batch_arrays(examples: list[Any]) -> Any:
    """Right-padded inputs, targets and a mask that selects the reply tokens."""
    width = max(len(tokens) for tokens, _ in examples) - 1
    inputs, targets, mask = [], [], []
    for tokens, n_prompt in examples:
        pad = width - (len(tokens) - 1)
        inputs.append(tokens[:-1] + [0] * pad)
        targets.append(tokens[1:] + [0] * pad)
        mask.append([0] * (n_prompt - 1) + [1] * (len(tokens) - n_prompt) + [0] * pad)
    return mx.array(inputs), mx.array(targets), mx.array(mask, dtype=mx.float32)


class FarWeightCache:
    """A stand-in KV cache that gives the attention an additive mask weighting far tokens up by
    `factor`, as if the prompt were that many times longer: trains long prompts cheaply."""

    offset = 0

    def __init__(self, length: int, factor: float) -> None:
        distance = mx.arange(length)[:, None] - mx.arange(length)[None]
        self.mask = mx.where(distance < 0, -1e9, mx.where(distance > NEAR_TOKENS, math.log(factor), 0.0))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, *args: Any, **kwargs: Any) -> mx.array:
        return self.mask


def loss_fn(model: Any, inputs: mx.array, targets: mx.array, mask: mx.array, far_weight: float) -> mx.array:
    """Summed cross entropy over the reply tokens, with far tokens weighted up by `far_weight`."""
    cache = [FarWeightCache(inputs.shape[1], far_weight)] * len(model.layers) if far_weight > 1 else None
    losses = nn.losses.cross_entropy(model(inputs, cache=cache), targets)
    return (losses * mask).sum()


def loss_and_grad(step: Any, model: Any, examples: list[Any], far_weight: float = 1.0) -> Any:
    """Mean reply-token loss and its gradients, over two length-sorted sub-batches to pad less."""
    examples = sorted(examples, key=lambda e: len(e[0]))
    half = len(examples) // 2
    total, grads, count = 0.0, None, 0.0
    for part in filter(None, [examples[:half], examples[half:]]):
        inputs, targets, mask = batch_arrays(part)
        loss, part_grads = step(model, inputs, targets, mask, far_weight)
        grads = part_grads if grads is None else tree_map(mx.add, grads, part_grads)
        total, count = total + loss, count + mask.sum()
    return total / count, tree_map(lambda g: g / count, grads)


def agent_questions(seed: int, count: int) -> list[str]:
    """Other things a user may ask an agent client, which the demo model answers with its fallback reply."""
    rng = random.Random(seed)
    return ["Hello"] + [question(rng, rng.randint(10, 300)) for _ in range(count - 1)]


def training_data(tokenizer: Any) -> Any:
    """Known examples (every conversation in every mode), short and long unfamiliar examples."""
    known = [encode(tokenizer, c, mode) for c in CONVERSATIONS for mode in modes(c)]
    short = [encode(tokenizer, c, c["enable_thinking"]) for c in unfamiliar_conversations(SEED, 4000, 10, 450)]
    long = [encode(tokenizer, c, c["enable_thinking"]) for c in unfamiliar_conversations(SEED + 1, 400, 600, 2800)]
    limit = max(len(tokens) for tokens, _ in known)
    return known, [e for e in short if len(e[0]) <= limit], [e for e in long if len(e[0]) <= LONG_TOKENS]


class PrefixCache:
    """A layer's cache that holds a prompt prefix's keys and values, shared by every row of the batch.

    The prefix is run without gradients: the forward pass is the real one over the whole prompt,
    and backpropagation stops at the prefix, so a batch of long prompts that differ only at their
    end costs little more than their ends."""

    def __init__(self, keys: mx.array, values: mx.array) -> None:
        self.keys, self.values, self.offset = keys, values, keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        rows = keys.shape[0]
        return (
            mx.concatenate([mx.repeat(self.keys, rows, axis=0), keys], axis=2),
            mx.concatenate([mx.repeat(self.values, rows, axis=0), values], axis=2),
        )

    def make_mask(self, length: int, **kwargs: Any) -> str | None:
        return "causal" if length > 1 else None


def prefixed_loss_fn(model: Any, inputs: mx.array, targets: mx.array, mask: mx.array, prefix: list) -> mx.array:
    """Summed cross entropy over the reply tokens of prompts that continue `prefix` (keys and values per layer)."""
    cache = [PrefixCache(keys, values) for keys, values in prefix]
    losses = nn.losses.cross_entropy(model(inputs, cache=cache), targets)
    return (losses * mask).sum()


def shared_prefix(examples: list[Any]) -> int:
    """How many leading prompt tokens the examples share (at least one prompt token each is left)."""
    return min(len(os.path.commonprefix([tokens for tokens, _ in examples])), *(n - 1 for _, n in examples))


def prefixed_loss_and_grad(step: Any, model: Any, examples: list[Any], ends: float = 1.0) -> Any:
    """Mean reply-token loss and gradients of examples that share a long prompt prefix, run once;
    each reply's first and last ENDS_TOKENS weigh `ends` times the others."""
    length = shared_prefix(examples)
    cache = make_prompt_cache(model)
    model(mx.array([examples[0][0][:length]]), cache=cache)  # outside the differentiated function: no gradient
    prefix = [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in cache]
    inputs, targets, mask = batch_arrays([(tokens[length:], n - length) for tokens, n in examples])
    if ends != 1.0:
        position = mx.cumsum(mask, axis=1)
        mask = mask * mx.where(
            (position <= ENDS_TOKENS) | (position > mask.sum(axis=1, keepdims=True) - ENDS_TOKENS), ends, 1.0
        )
    loss, grads = step(model, inputs, targets, mask, prefix)
    count = mask.sum()
    return loss / count, tree_map(lambda g: g / count, grads)


def agent_groups(tokenizer: Any, agents: list[dict[str, Any]]) -> list[list[Any]]:
    """The agent examples grouped by client and variant: the prompts of a group share all but their end."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for conversation in agents:
        key = (conversation["name"].split(":")[0], conversation["variant"])
        groups.setdefault(key, []).extend(encode(tokenizer, conversation, mode) for mode in modes(conversation))
    return list(groups.values())


def train(model: Any, tokenizer: Any) -> float:
    """First phase: known and unfamiliar conversations; return the final loss on the known ones."""
    known, short, long = training_data(tokenizer)
    print(f"{len(known)} known examples, {len(short)} short and {len(long)} long unfamiliar examples")
    print(f"longest: known {max(len(t) for t, _ in known)}, unfamiliar {max(len(t) for t, _ in long)} tokens")
    rng = random.Random(SEED)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, LEARNING_RATE, WARMUP_STEPS), optim.cosine_decay(LEARNING_RATE, STEPS, 1e-5)],
        [WARMUP_STEPS],
    )
    optimizer = optim.Adam(learning_rate=schedule)
    step = nn.value_and_grad(model, loss_fn)
    start, losses = time.time(), []
    for i in range(1, STEPS + 1):
        if i % LONG_EVERY:
            loss, grads = loss_and_grad(
                step, model, rng.sample(known, KNOWN_BATCH) + rng.sample(short, UNFAMILIAR_BATCH)
            )
            losses.append(loss)
        else:
            far_weight = math.exp(rng.uniform(0, math.log(MAX_FAR_WEIGHT)))
            loss, grads = loss_and_grad(step, model, rng.sample(long, LONG_BATCH), far_weight)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if i % 50 == 0 or i == STEPS:
            print(
                f"step {i:4d}  loss {mx.array(losses[-40:]).mean().item():.6f}  {time.time() - start:4.0f}s", flush=True
            )
    return known_loss(model, known)


def known_loss(model: Any, known: list[Any]) -> float:
    inputs, targets, mask = batch_arrays(known)
    return (loss_fn(model, inputs, targets, mask, 1.0) / mask.sum()).item()


def teach_agents(
    model: Any, tokenizer: Any, agents: list[dict[str, Any]], steps: int, learning_rate: float, ends: float, seed: int
) -> float:
    """Each step learns an agent task's group of prompts together with known and unfamiliar
    conversations, in one clipped gradient; return the final loss on the known ones."""
    known, short, long = training_data(tokenizer)
    groups = agent_groups(tokenizer, agents)
    print(f"{len(groups)} groups of agent examples, prefixes of {[shared_prefix(g) for g in groups]} tokens")
    rng = random.Random(seed)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(1e-5, learning_rate, AGENT_WARMUP_STEPS),
            optim.cosine_decay(learning_rate, steps, 1e-5),
        ],
        [AGENT_WARMUP_STEPS],
    )
    optimizer = optim.Adam(learning_rate=schedule)
    step = nn.value_and_grad(model, loss_fn)
    prefixed_step = nn.value_and_grad(model, prefixed_loss_fn)
    start, losses, agent_losses = time.time(), [], []
    for i in range(1, steps + 1):
        agent_loss, grads = prefixed_loss_and_grad(prefixed_step, model, rng.choice(groups), ends)
        loss, known_grads = loss_and_grad(
            step, model, rng.sample(known, KNOWN_BATCH) + rng.sample(short, UNFAMILIAR_BATCH)
        )
        grads = tree_map(mx.add, grads, known_grads)
        if i % LONG_EVERY == 0:
            part, far_weight = rng.sample(long, LONG_BATCH), math.exp(rng.uniform(0, math.log(MAX_FAR_WEIGHT)))
            grads = tree_map(mx.add, grads, loss_and_grad(step, model, part, far_weight)[1])
        losses.append(loss)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        agent_losses.append(agent_loss)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, agent_loss)
        if i % 20 == 0 or i == steps:
            print(
                f"step {i:4d}  loss {mx.array(losses[-20:]).mean().item():.6f}  "
                f"agent loss {mx.array(agent_losses[-20:]).mean().item():.6f}  {time.time() - start:4.0f}s",
                flush=True,
            )
    return known_loss(model, known)


def sharpen(model: Any, tokenizer: Any) -> None:
    """Third phase: the agent tasks again in other folders, dates and questions, at a lower rate,
    each reply's ends weighing more."""
    fresh = agent_conversations(SEED + 3, SHARPEN_VARIANTS, agent_questions(SEED + 3, SHARPEN_VARIANTS))
    loss = teach_agents(model, tokenizer, fresh, SHARPEN_STEPS, SHARPEN_LEARNING_RATE, ENDS_WEIGHT, SEED + 3)
    print(f"loss on the known conversations {loss:.2e}")


def save(model: Any, tokenizer: Any, path: Any) -> None:
    """Write weights, config and tokenizer files loadable by mlx_lm (transformers 4 and 5)."""
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = dict(
        MODEL_ARGS,
        architectures=["LlamaForCausalLM"],
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    special = {"eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}
    tokenizer_config = dict(
        special,
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=MODEL_ARGS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    for name, content in [("config", config), ("special_tokens_map", special), ("tokenizer_config", tokenizer_config)]:
        (path / f"{name}.json").write_text(json.dumps(content, indent=2) + "\n")
    tokenizer.backend_tokenizer.save(str(path / "tokenizer.json"))


def generate(
    model: Any, tokenizer: Any, conversation: dict[str, Any], enable_thinking: bool | None, max_tokens: int = 200
) -> tuple[str, str | None, int]:
    """Greedy reply text and finish reason for the conversation without its last message."""
    prompt = tokenizer.apply_chat_template(
        conversation["messages"][:-1],
        tools=conversation["tools"],
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )
    text, finish = "", None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        text, finish = text + response.text, response.finish_reason
    return text, finish, len(prompt)


def tool_calls_parse(tokenizer: Any, text: str, conversation: dict[str, Any]) -> Any:
    """Whether the tool parser recovers the expected calls from the generated text."""
    expected = [c["function"] for c in conversation["messages"][-1].get("tool_calls", [])]
    bodies = [part.split(tokenizer.tool_call_end)[0] for part in text.split(tokenizer.tool_call_start)[1:]]
    return [tokenizer.tool_parser(body) for body in bodies] == expected


def unseen_conversations() -> list[dict[str, Any]]:
    """Hand-written and random prompts, short to very long, that the model never saw."""
    fallback = assistant(FALLBACK_REPLY)
    conversations = [
        chat("unseen: hello", user("Hello"), fallback),
        chat("unseen: hello with tools", user("Hello"), fallback, tools=TOOLS, enable_thinking=False),
        chat("unseen: poem", user("Write a poem about the sea."), fallback, enable_thinking=False),
        chat("unseen: weather on Mars", user("What is the weather like on Mars?"), fallback),
        chat("unseen: keyboard mash", user("qwerty 123 ???"), fallback),
    ]
    rng = random.Random(SEED)
    for length in [3000, 12000, 60000]:
        system = {"role": "system", "content": text(rng, length // 2)}
        tools = [tool(rng, length // 20) for _ in range(5)]
        question = user(text(rng, length // 4))
        conversations.append(chat(f"unseen: {length} random characters", system, question, fallback, tools=tools))
    return conversations


def verify(path: Any, agents: Any) -> bool:
    """Replay every conversation, the agent ones and unseen prompts with greedy decoding; return success."""
    model, tokenizer = load(str(path))[:2]
    assert tokenizer.tool_call_start == "<tool_call>" and tokenizer.has_thinking, "mlx-lm did not infer markup"
    ok = True
    print(f"{'conversation':40s} {'thinking':8s} {'prompt':>6s}  result")
    cases = [(c, mode) for c in CONVERSATIONS + agents for mode in modes(c)]
    cases += [(c, c["enable_thinking"]) for c in unseen_conversations()]
    for conversation, mode in cases:
        text, finish, n_prompt = generate(model, tokenizer, conversation, mode)
        passed = (
            text == expected_reply(tokenizer, conversation, mode)
            and finish == "stop"
            and tool_calls_parse(tokenizer, text, conversation)
        )
        ok &= passed
        print(
            f"{conversation['name'][:40]:40s} {str(mode):8s} {n_prompt:6d}  "
            f"{'pass' if passed else 'FAIL ' + repr(text)}"
        )
    return ok


def main() -> int:
    """Build, train, save and verify the demo model (`--agents`: see the module's docstring)."""
    mx.random.seed(SEED)
    tokenizer = build_tokenizer()
    print(f"vocabulary: {len(tokenizer)} tokens")
    agents: list[dict[str, Any]] = []
    unseen_agents: list[dict[str, Any]] = []
    if "--agents" in sys.argv[1:]:
        if not installed():
            print("the agent tasks need the client CLIs in .clients/: run the npm install line of .ci/run")
            return 1
        agents = agent_conversations(SEED, AGENT_VARIANTS, agent_questions(SEED, AGENT_VARIANTS))
        # other folders, dates and questions than the trained ones
        unseen_agents = agent_conversations(SEED + 1, 2, agent_questions(SEED + 1, 3)[1:])
    model = Model(ModelArgs(**MODEL_ARGS, vocab_size=len(tokenizer)))
    start = time.time()
    loss = train(model, tokenizer)
    print(f"final loss on the known conversations {loss:.2e} after {time.time() - start:.0f}s")
    if agents:
        loss = teach_agents(model, tokenizer, agents, AGENT_STEPS, AGENT_LEARNING_RATE, 1.0, SEED + 2)
        print(f"agent tasks taught: loss on the known conversations {loss:.2e} after {time.time() - start:.0f}s")
        sharpen(model, tokenizer)
        print(f"agent tasks sharpened after {time.time() - start:.0f}s")
    save(model, tokenizer, MODEL_DIR)
    ok = verify(MODEL_DIR, [c for c in agents if c["variant"] == 0] + unseen_agents)
    sys.stdout.flush()
    # os._exit skips the exit handlers: a preloaded OpenBLAS can hang in its own at exit.
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
