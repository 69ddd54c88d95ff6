"""Tiny random models of each cache family mlx-lm runs, built in seconds from a config.

Each is a real mlx-lm model directory (config.json, model.safetensors) with the demo
model's tokenizer and chat template, so the engine loads it through the real path. Their
sliding windows are short, so that the demo's prompts rotate them.
"""

import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from mlx_tui.engine.demo import MODEL_DIR

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=65536,
    tie_word_embeddings=False,
)
LINEAR = dict(
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    full_attention_interval=2,
)

CONFIGS = {
    # GatedDeltaNet recurrent state (ArraysCache) between full-attention KV layers
    "qwen3_5": dict(model_type="qwen3_5", num_hidden_layers=4, **LINEAR),
    "qwen3_next": dict(
        model_type="qwen3_next",
        num_hidden_layers=4,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[],
        moe_intermediate_size=32,
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
        **LINEAR,
    ),
    # sliding-window RotatingKVCache layers between full-attention KV layers
    "gpt_oss": dict(
        model_type="gpt_oss",
        num_hidden_layers=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
        rope_theta=150000,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        num_hidden_layers=4,
        sliding_window=16,
        sliding_window_pattern=2,
        query_pre_attn_scalar=16,
    ),
    # Mamba-2 state (ArraysCache) and attention KV
    "nemotron_h": dict(
        model_type="nemotron_h",
        num_hidden_layers=4,
        hybrid_override_pattern=["M", "*", "M", "-"],
        attention_bias=False,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_proj_bias=False,
        ssm_state_size=16,
        conv_kernel=4,
        n_groups=1,
        mlp_bias=False,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
    ),
    # each layer a CacheList of Mamba-2 state (ArraysCache) and attention KV
    "falcon_h1": dict(
        model_type="falcon_h1",
        num_hidden_layers=3,
        mamba_d_conv=4,
        mamba_d_head=16,
        mamba_d_ssm=64,
        mamba_d_state=16,
        mamba_n_heads=4,
        mamba_n_groups=1,
        mamba_chunk_size=16,
        rope_theta=10000.0,
    ),
}
FAMILIES = list(CONFIGS)

# every layer a plain KVCache, for what only such models do (speculation)
PLAIN = dict(model_type="llama", num_hidden_layers=2)

# chunked attention (ChunkedKVCache), which mlx-lm's BatchGenerator cannot batch
UNBATCHABLE = dict(
    model_type="llama4",
    text_config=dict(
        model_type="llama4_text",
        attention_bias=False,
        attention_chunk_size=16,
        head_dim=16,
        hidden_size=64,
        interleave_moe_layer_step=1,
        intermediate_size=64,
        intermediate_size_mlp=128,
        max_position_embeddings=4096,
        num_attention_heads=4,
        num_experts_per_tok=1,
        num_hidden_layers=4,
        num_key_value_heads=2,
        num_local_experts=2,
        rms_norm_eps=1e-5,
        rope_scaling=None,
        rope_theta=10000.0,
        use_qk_norm=True,
        vocab_size=400,
    ),
)


def build(family: str, path: Path, seed: int = 0) -> Path:
    """Write the tiny random `family` model (or "llama4", or "llama": `PLAIN`) to `path` (once) and return it."""
    if (path / "model.safetensors").exists():
        return path
    import json

    path.mkdir(parents=True, exist_ok=True)
    demo = json.loads((MODEL_DIR / "config.json").read_text())
    layers = PLAIN if family == "llama" else CONFIGS.get(family, {})
    config = UNBATCHABLE if family == "llama4" else COMMON | layers | {"vocab_size": demo["vocab_size"]}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MODEL_DIR / name, path / name)
    for key in ("eos_token_id", "bos_token_id"):
        if key in demo:
            config[key] = demo[key]
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path
