"""(8) What a JSON schema costs decode: constrained vs free tokens/s, at 1 and 4 streams, on two vocabularies.

The benchmark model (8k tokens) and the same llama with a real-size vocabulary (about 150k
tokens, like Qwen's: the token trie llguidance walks and the mask MLX applies grow with it)
run through the engine's client API. Each round runs free and constrained, one stream and
four, in a rotating order; each ratio is taken within a round. The schema asks for at least
32 objects of a string, an integer and an enum, so the constrained reply runs to max_tokens
like the free one (the random model never ends by itself), with a mask for every token. A second
pair measures what `--constrain-tools` costs a reply that calls no tool: the same request
with a tool, free and with the tool strict (the lazy grammar's free-text mask). Beside
tokens/s, each case reports the worker's CPU milliseconds per generated token: the mask's
cost in CPU time, which other load on the machine disturbs far less than the wall clock.
"""

import asyncio
import json
import random
from pathlib import Path

from .decode import PROMPT, EngineApi, cpu_seconds
from .model import MODEL_ARGS, SEED, chat_template, never_emitted
from .servers import engine_config
from .stats import median, progress, ratio, spread

BIG_VOCAB = 151_552
ITEM = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "count": {"type": "integer"}, "kind": {"enum": ["file", "dir", "link"]}},
    "required": ["name", "count", "kind"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": ITEM, "minItems": 32}},
    "required": ["items"],
    "additionalProperties": False,
}
BIG_VERSION = 2
STREAMS = (1, 4)


def big_vocab_tokenizer(size: int):
    """A byte-level BPE of `size` tokens made of random merges of printable ASCII (no corpus has 150k merges' worth).

    Its tokens are 1 to 12 characters long, most of them short, as a trained vocabulary's are;
    the chat markup is added as single tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mlx_tui.engine.demo.train import MARKUP_TOKENS, SPECIAL_TOKENS

    rng = random.Random(SEED)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    printable = [c for c in alphabet if c.isalnum() or c in "Ġ.,;:!?-_()"]
    merges, tokens = [], list(printable)
    limit = size - len(SPECIAL_TOKENS) - len(MARKUP_TOKENS)
    while len(vocab) < limit:
        a = tokens[rng.randrange(64 + len(tokens) // 2)]
        b = rng.choice(printable if rng.random() < 0.6 else tokens)
        if len(a) + len(b) <= 12 and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
            tokens.append(a + b)
    bpe = Tokenizer(models.BPE(vocab, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(SPECIAL_TOKENS)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template(),
        model_max_length=MODEL_ARGS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def build_big_vocab(path: Path) -> Path:
    """The benchmark's llama with a BIG_VOCAB-token vocabulary, written to `path` once."""
    if (path / "model.safetensors").exists():
        return path
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = big_vocab_tokenizer(BIG_VOCAB)
    args = dict(MODEL_ARGS, vocab_size=len(tokenizer))
    mx.random.seed(SEED)
    model = Model(ModelArgs.from_dict(args))
    head = model.lm_head.weight * 4.0  # as the benchmark model: logits that vary, no end, markup or broken UTF-8
    mask = mx.ones((len(tokenizer), 1))
    mask[mx.array(never_emitted(tokenizer))] = 0.0
    model.lm_head.weight = head * mask
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(
        json.dumps(dict(args, torch_dtype="float32", eos_token_id=tokenizer.eos_token_id), indent=2)
    )
    tokenizer.save_pretrained(str(path))
    return path


async def streams(measure, n: int, max_tokens: int) -> tuple[float | None, float, int]:
    """Aggregate decode tokens/s of `n` streams run together, the worker's CPU ms per generated token, and the
    tokens."""
    before = cpu_seconds(measure.engine.pid)
    results = await asyncio.gather(*(measure(PROMPT, max_tokens) for _ in range(n)))
    for r in results:
        if r.error:
            raise RuntimeError(r.error)
    generated = sum(r.generated for r in results)
    cpu_ms = 1000 * (cpu_seconds(measure.engine.pid) - before) / max(generated, 1)
    rates = [r.decode_tps for r in results]
    return (sum(rates) if all(rates) else None), cpu_ms, generated


async def one_model(model_dir: Path, rounds: int, max_tokens: int) -> dict:
    from mlx_tui.engine.client import EngineClient

    engine = EngineClient(engine_config(model_dir, max_concurrency=max(STREAMS)))
    await engine.start()
    try:
        from mlx_tui.engine.request import Constraint

        tools = [{"type": "function", "function": {"name": "record", "parameters": SCHEMA}}]
        kinds = {
            "free": EngineApi(engine),
            "json_schema": EngineApi(engine, constraint=Constraint("json_schema", SCHEMA)),
            "tools": EngineApi(engine, tools=tools),
            # what --constrain-tools costs text that never calls a tool: the lazy grammar's free-text mask
            "tools_strict": EngineApi(engine, tools=tools, constraint=Constraint(strict_tools=["record"])),
        }
        for measure in kinds.values():  # warm-up; the schema's grammar is compiled and cached here
            await measure(PROMPT, 8)
        cases = [(kind, n) for n in STREAMS for kind in kinds]
        tps: dict[str, list] = {f"{kind} x{n}": [] for kind, n in cases}
        cpu: dict[str, list] = {f"{kind} x{n}": [] for kind, n in cases}
        tokens: dict[str, list] = {f"{kind} x{n}": [] for kind, n in cases}
        for i in range(rounds):
            for kind, n in cases[i % len(cases) :] + cases[: i % len(cases)]:
                rate, cpu_ms, generated = await streams(kinds[kind], n, max_tokens)
                tps[f"{kind} x{n}"].append(rate)
                cpu[f"{kind} x{n}"].append(cpu_ms)
                tokens[f"{kind} x{n}"].append(generated)
            progress(
                f"structured: {model_dir.name}, round {i + 1}/{rounds}: "
                + ", ".join(
                    f"{k} {v[-1]:.1f} tok/s {cpu[k][-1]:.1f} CPU ms/tok" for k, v in tps.items() if v[-1] is not None
                )
            )
    finally:
        await engine.stop()
    pairs = {str(n): (f"json_schema x{n}", f"free x{n}") for n in STREAMS}
    pairs |= {f"tools {n}": (f"tools_strict x{n}", f"tools x{n}") for n in STREAMS}
    ratios = {k: [ratio(c, f) for c, f in zip(tps[a], tps[b], strict=False)] for k, (a, b) in pairs.items()}
    cpu_ratios = {k: [ratio(f, c) for c, f in zip(cpu[a], cpu[b], strict=False)] for k, (a, b) in pairs.items()}
    return {
        "tps": tps,
        "cpu_ms_per_token": cpu,
        "generated": tokens,
        "median_tps": {k: median(v) for k, v in tps.items()},
        "median_cpu_ms_per_token": {k: median(v) for k, v in cpu.items()},
        "pairs": pairs,
        "median_ratio": {k: median(v) for k, v in ratios.items()},
        "ratio_range": {k: spread(v) for k, v in ratios.items()},
        # free CPU ms per token / constrained: the speed ratio the CPU cost alone implies, which load disturbs far less
        "median_cpu_ratio": {k: median(v) for k, v in cpu_ratios.items()},
    }


async def run(model_dir: Path, rounds: int, max_tokens: int) -> dict:
    big = build_big_vocab(model_dir.parent / f"{model_dir.name}-vocab{BIG_VOCAB // 1000}k-v{BIG_VERSION}")
    results = {"rounds": rounds, "max_tokens": max_tokens, "schema": SCHEMA, "models": {}}
    for path in (model_dir, big):
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        results["models"][str(vocab)] = await one_model(path, rounds, max_tokens)
    return results
