"""Load a model with mlx-lm, evaluating it layer by layer so that loading can report progress."""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_load
from mlx_lm.utils import sharded_load

from .config import model_problem


class ModelError(Exception):
    """The model cannot be loaded; the message is one line naming it and the problem."""


@dataclass(slots=True)
class Loaded:
    model: object
    tokenizer: object
    context_length: int
    dtype: str
    identity: str
    shard: str | None = None


def identity(ref: str, config: dict) -> str:
    """A short hash naming these weights: the reference, the config and the weight files' sizes."""
    h = hashlib.sha256(ref.encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    path = Path(ref).expanduser()
    for weights in sorted(path.glob("*.safetensors")) if path.is_dir() else ():
        h.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load(
    ref: str,
    progress: Callable[[str, float], None],
    tool_parser: str | None = None,
    chat_template: str | None = None,
    group: mx.distributed.Group | None = None,
    shard: str | None = None,
) -> Loaded:
    """Load `ref`; with a `group`, this rank's shard of it (`shard`: tensor, pipeline, None: tensor where supported)."""
    if problem := model_problem(ref):
        raise ModelError(problem)
    extra = {}
    if tool_parser:
        extra["tool_parser_type"] = tool_parser
    if chat_template:
        extra["chat_template"] = Path(chat_template).read_text()
    local = Path(ref).expanduser()
    source = str(local.resolve()) if local.exists() else ref
    progress("reading", 0.0)
    if group is not None:
        return load_shard(ref, source, extra, progress, group, shard)
    try:
        model, tokenizer, config = mlx_load(source, tokenizer_config=extra, lazy=True, return_config=True)
        layers = list(getattr(model, "layers", []))
        for i, layer in enumerate(layers):
            mx.eval(layer.parameters())
            progress("weights", (i + 1) / len(layers))
        mx.eval(model.parameters())
    except ModuleNotFoundError as e:
        raise ModelError(f"{ref}: unknown tool parser or model type ({e.name})") from e
    except Exception as e:  # mlx-lm reports broken files with many exception types
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{ref}: cannot load the model: {detail}") from e
    context = config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", 0)
    dtype = str(tree_flatten(model.parameters())[0][1].dtype).removeprefix("mlx.core.")
    return Loaded(model, tokenizer, int(context or 4096), dtype, identity(source, config))


def load_shard(ref: str, source: str, extra: dict, progress, group: mx.distributed.Group, shard: str | None) -> Loaded:
    """This rank's part of the model, split by mlx-lm's `sharded_load` across `group`."""
    try:
        model, tokenizer, config = sharded_load(
            source,
            pipeline_group=group if shard == "pipeline" else None,
            tensor_group=group if shard == "tensor" else None,
            return_config=True,
            tokenizer_config=extra,
        )
    except ModuleNotFoundError as e:
        raise ModelError(f"{ref}: unknown tool parser or model type ({e.name})") from e
    except ValueError as e:
        if "not support" in str(e):
            raise ModelError(f"{ref}: model type {model_type(source)!r} cannot be split across ranks: {e}") from e
        raise ModelError(f"{ref}: cannot load the model: {str(e).splitlines()[0]}") from e
    except Exception as e:  # mlx-lm reports broken files with many exception types
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{ref}: cannot load the model: {detail}") from e
    progress("weights", 1.0)
    shard = shard or ("tensor" if hasattr(model, "shard") else "pipeline")
    context = config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", 0)
    dtype = str(tree_flatten(model.parameters())[0][1].dtype).removeprefix("mlx.core.")
    name = f"{identity(source, config)}-{shard}{group.rank()}of{group.size()}"
    return Loaded(model, tokenizer, int(context or 4096), dtype, name, shard)


def model_type(source: str) -> str:
    try:
        return json.loads((Path(source) / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError):
        return "unknown"
