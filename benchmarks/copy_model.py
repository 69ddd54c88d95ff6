"""A small llama whose replies copy their prompt: given a file and a one-line change, the whole edited file.

The edit benchmark's model. It memorises the benchmark's own tasks (`edit_tasks.replayed_edits`
and `replayed_chats`), as the demo model memorises its conversations: greedy decoding then
writes each edited file, nearly every token of which is in the prompt, which is what
prompt-lookup speculation drafts from. (A model that learns to copy any file did not emerge
in ~1.4M training tokens of fresh tasks on this CPU: an induction head takes longer.) It is
sized so that a forward pass, not the host's work per token, is most of a decode step, as
with real models. Trained with a byte-level BPE and the demo model's chat template (as
`engine/demo/train.py` does), saved as a plain mlx-lm model directory under
`~/.cache/mlx-tui/bench-copy-model/<hash of this file's settings and edit_tasks.py>/` on first
use and reused after. Standalone it trains (if needed) and reports the exact-match rate; on
Linux preload OpenBLAS (`python -m benchmarks --only edit` does):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        .venv/bin/python -m benchmarks.copy_model
"""

import hashlib
import json
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

from . import edit_tasks
from .stats import progress

VOCAB_SIZE = 1024
MODEL_ARGS = dict(
    model_type="llama",
    hidden_size=384,
    num_hidden_layers=4,
    intermediate_size=1152,
    num_attention_heads=6,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=65536,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
SEED = 0
EDITS = 5  # the benchmark's 4 tasks and its warm-up
CHATS = 4
STEPS = 600
LEARNING_RATE = 1e-3
CLIP_NORM = 1.0
WARMUP_STEPS = 20
CHAT_SHARE = 0.1  # of the tokenizer's training text: plain questions answered with a paragraph
REPEAT_SHARE = 0.3  # of the tokenizer's training text: random words to repeat
TRAIN_LINES = (4, 18)
VERSION = 3  # bump when the training code changes what it trains


def model_key() -> str:
    """A hash of what decides the weights: the task generator's source and the training settings."""
    settings = [
        MODEL_ARGS,
        VOCAB_SIZE,
        SEED,
        EDITS,
        CHATS,
        STEPS,
        LEARNING_RATE,
        CLIP_NORM,
        WARMUP_STEPS,
        CHAT_SHARE,
        TRAIN_LINES,
        VERSION,
    ]
    blob = (Path(__file__).parent / "edit_tasks.py").read_bytes() + json.dumps(settings).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def default_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mlx-tui" / "bench-copy-model" / model_key()


def conversation(task: edit_tasks.Task) -> dict:
    """The task in the shape `engine/demo/train.py` encodes: messages ending with the reply."""
    return {"messages": [*task.messages(), {"role": "assistant", "content": task.edited}], "tools": None}


def sample(rng: random.Random) -> edit_tasks.Task:
    draw = rng.random()
    if draw < CHAT_SHARE:
        return edit_tasks.chat_task(rng)
    if draw < CHAT_SHARE + REPEAT_SHARE:
        return repeat_task(rng)
    return edit_tasks.edit_task(rng, *TRAIN_LINES)


def repeat_task(rng: random.Random) -> edit_tasks.Task:
    """Lines of random words to repeat as they are: copying without the repeated syntax of code, learnt sooner."""
    words = edit_tasks.WORDS + edit_tasks.VERBS + edit_tasks.SECTIONS
    text = "".join(" ".join(rng.sample(words, rng.randint(4, 10))) + "\n" for _ in range(rng.randint(2, 8)))
    return edit_tasks.Task("chat", "", f"Repeat this text:\n{text}", text)


def build_tokenizer():
    from mlx_tui.engine.demo import train

    from .model import chat_template

    rng = random.Random(SEED + 1)
    bare = train.PreTrainedTokenizerFast(
        tokenizer_object=train.Tokenizer(train.models.BPE()), chat_template=chat_template()
    )
    texts = []
    for _ in range(3000):
        c = conversation(sample(rng))
        texts.append(train.prompt_text(bare, c, None) + train.expected_reply(bare, c, None))
    texts += list(edit_tasks.TOPICS.values()) * 50
    return train.train_bpe(texts, VOCAB_SIZE, chat_template(), MODEL_ARGS["max_position_embeddings"])


def memorised() -> list[edit_tasks.Task]:
    return edit_tasks.replayed_edits(EDITS) + edit_tasks.replayed_chats(CHATS)


def batch(tokenizer):
    """Inputs, targets and a reply-token mask for every memorised task, padded to the longest."""
    import mlx.core as mx

    from mlx_tui.engine.demo import train as demo

    encoded = [demo.encode(tokenizer, conversation(task), None) for task in memorised()]
    length = max(len(tokens) for tokens, _ in encoded)
    inputs, targets, mask = [], [], []
    for tokens, n_prompt in encoded:
        pad = length - len(tokens)
        inputs.append(tokens[:-1] + [0] * pad)
        targets.append(tokens[1:] + [0] * pad)
        mask.append([0] * (n_prompt - 1) + [1] * (len(tokens) - n_prompt) + [0] * pad)
    return mx.array(inputs), mx.array(targets), mx.array(mask, dtype=mx.float32)


def train(model, tokenizer):
    """Adam on the reply tokens of every memorised task each step, the gradient clipped, one compiled step."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    def loss_fn(model, inputs, targets, mask):
        return (nn.losses.cross_entropy(model(inputs), targets) * mask).sum() / mask.sum()

    schedule = optim.join_schedules(
        [
            optim.linear_schedule(1e-5, LEARNING_RATE, WARMUP_STEPS),
            optim.cosine_decay(LEARNING_RATE, STEPS - WARMUP_STEPS, 1e-5),
        ],
        [WARMUP_STEPS],
    )
    optimizer = optim.Adam(learning_rate=schedule)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask):
        loss, grads = loss_and_grad(model, inputs, targets, mask)
        grads, _ = optim.clip_grad_norm(grads, CLIP_NORM)
        optimizer.update(model, grads)
        return loss

    data = batch(tokenizer)
    start, losses = time.time(), []
    for i in range(1, STEPS + 1):
        loss = step(*data)
        mx.eval(state, loss)
        losses.append(loss.item())
        if i % 20 == 0 or i == STEPS:
            progress(
                f"copy model: step {i}/{STEPS}, loss {sum(losses[-20:]) / len(losses[-20:]):.4f}, "
                f"{time.time() - start:.0f} s"
            )


def save(model, tokenizer, path: Path):
    """Weights, config and tokenizer, loadable by mlx_lm.load, mlx_lm.server and mlx-tui."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())), {"format": "mlx"})
    config = dict(
        MODEL_ARGS,
        architectures=["LlamaForCausalLM"],
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(path))


def evaluate(path: Path) -> dict:
    """Greedy replies to the memorised tasks against their expected replies: exact matches per kind."""
    from mlx_lm import generate, load

    model, tokenizer = load(str(path))
    per_kind: dict[str, list[int]] = {}
    for task in memorised():
        prompt = tokenizer.apply_chat_template(task.messages(), add_generation_prompt=True)
        text = generate(model, tokenizer, prompt, max_tokens=1024)
        per_kind.setdefault(task.kind, []).append(int(text == task.edited))
    exact = sum(sum(v) for v in per_kind.values())
    return {
        "exact_match": exact / len(memorised()),
        "tasks": len(memorised()),
        "by_kind": {k: f"{sum(v)}/{len(v)}" for k, v in per_kind.items()},
    }


def ensure(path: Path | None = None) -> Path:
    """The trained model's directory: trained, saved and evaluated on first use, reused after."""
    path = path or default_dir()
    if (path / "model.safetensors").exists() and (path / "evaluation.json").exists():
        return path
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(SEED)
    tokenizer = build_tokenizer()
    model = Model(ModelArgs(**MODEL_ARGS, vocab_size=len(tokenizer)))
    progress(f"copy model: training {STEPS} steps into {path}")
    started = time.time()
    train(model, tokenizer)
    trained_s = time.time() - started
    unfinished = path.with_name(path.name + ".partial")
    save(model, tokenizer, unfinished)
    result = {**evaluate(unfinished), "train_s": round(trained_s), "steps": STEPS}
    (unfinished / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    unfinished.rename(path)
    progress(f"copy model: {result}")
    return path


def describe(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return {
        "path": str(path),
        "params_m": round((path / "model.safetensors").stat().st_size / 4 / 1e6, 1),
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "vocab": config["vocab_size"],
        "evaluation": json.loads((path / "evaluation.json").read_text()),
    }


if __name__ == "__main__":
    out = ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(json.dumps(describe(out), indent=2))
    sys.stdout.flush()
    os._exit(0)  # a preloaded OpenBLAS can hang in its exit handlers
