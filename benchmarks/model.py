"""The benchmark models: randomly initialised float32 models with a byte-level BPE tokenizer.

The main one is a llama (every layer a plain KV cache); `FAMILIES` adds a Qwen3.5-style
hybrid (GatedDeltaNet recurrent layers between attention layers) and a gpt-oss-style one
(sliding-window layers between full ones), for the prefix cache on those cache kinds.

Random weights never say when to stop, so the output rows of the end token and of every
token that is not complete UTF-8 text on its own are zeroed: greedy decoding then never
picks them (some other logit is always above zero), so every request generates exactly
`max_tokens` and every token is text at once, on every server alike.
"""

import hashlib
import json
from pathlib import Path

from .corpus import corpus_texts

VOCAB_SIZE = 8192
MODEL_ARGS = dict(
    model_type="llama",
    hidden_size=768,
    num_hidden_layers=8,
    intermediate_size=2048,
    num_attention_heads=12,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=65536,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
FAMILIES = {
    "qwen3_5": dict(
        model_type="qwen3_5",
        hidden_size=768,
        num_hidden_layers=8,
        intermediate_size=2048,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        linear_num_value_heads=12,
        linear_num_key_heads=6,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=65536,
        tie_word_embeddings=False,
    ),
    "gpt_oss": dict(
        # smaller than the others: mixture-of-experts layers are slow on MLX's CPU backend
        model_type="gpt_oss",
        hidden_size=512,
        num_hidden_layers=8,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_local_experts=2,
        num_experts_per_tok=1,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 4,
        rope_theta=150000,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=65536,
    ),
}
SEED = 0
VERSION = 1


def chat_template() -> str:
    """The demo model's template (tools, reasoning), so that both servers render the same prompt."""
    from mlx_tui.engine.demo.template import CHAT_TEMPLATE

    return CHAT_TEMPLATE


def model_args(family: str) -> dict:
    return MODEL_ARGS if family == "llama" else FAMILIES[family]


def model_key(family: str = "llama") -> str:
    blob = json.dumps([model_args(family), VOCAB_SIZE, SEED, VERSION, chat_template()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_dir(family: str = "llama") -> Path:
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mlx-tui" / "benchmark-models" / f"{family}-random-{model_key(family)}"


def build_tokenizer():
    from mlx_tui.engine.demo import train

    return train.train_bpe(list(corpus_texts()), VOCAB_SIZE, chat_template(), MODEL_ARGS["max_position_embeddings"])


def never_emitted(tokenizer) -> list[int]:
    """Token ids that would end generation or stream as an incomplete character."""
    from mlx_tui.engine.demo import train

    ids = []
    specials = set(train.SPECIAL_TOKENS + train.MARKUP_TOKENS)
    for token, i in tokenizer.get_vocab().items():
        if token in specials:
            ids.append(i)
            continue
        text = tokenizer.decode([i])
        if not text or "\ufffd" in text:
            ids.append(i)
    return sorted(ids)


def build(path: Path, family: str = "llama") -> Path:
    """Write config.json, model.safetensors and the tokenizer to `path` (once; reused after)."""
    if (path / "model.safetensors").exists() and (path / "tokenizer.json").exists():
        return path
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    mx.random.seed(SEED)
    model_class, args_class = _get_classes(model_args(family))
    weights = dict(tree_flatten(model_class(args_class.from_dict(model_args(family))).parameters()))
    # the default init leaves logits tiny and nearly flat; scale the head so greedy choices vary
    blocked = never_emitted(tokenizer)
    mask = mx.ones((VOCAB_SIZE, 1))
    mask[mx.array(blocked)] = 0.0
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[head] = weights[head] * 4.0 * mask
    mx.eval(weights)
    tmp = path / "model.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    tmp.rename(path / "model.safetensors")
    config = dict(model_args(family), torch_dtype="float32", eos_token_id=tokenizer.eos_token_id)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(path))
    (path / "never_emitted.json").write_text(json.dumps(blocked))
    return path


def describe(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    size = (path / "model.safetensors").stat().st_size
    return {
        "path": str(path),
        "params_m": round(size / 4 / 1e6, 1),
        "type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden": config.get("hidden_size"),
        "vocab": config.get("vocab_size"),
        "dtype": config.get("torch_dtype", "float32"),
    }


if __name__ == "__main__":
    import sys

    out = build(Path(sys.argv[1]) if len(sys.argv) > 1 else default_dir())
    print(json.dumps(describe(out), indent=2))
