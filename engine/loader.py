"""Load a model with mlx-lm, evaluating it layer by layer so that loading can report progress."""

import hashlib
import json
import os
import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlx.core as mx
from huggingface_hub import snapshot_download
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_load
from mlx_lm.utils import sharded_load

from .config import model_problem


class ModelError(Exception):
    """The model cannot be loaded; the message is one line naming it and the problem."""


@dataclass(slots=True)
class Loaded:
    model: Any  # an mlx-lm model
    tokenizer: Any  # mlx-lm's TokenizerWrapper
    context_length: int
    dtype: str
    identity: str
    shard: str | None = None
    dtype_note: str = ""


def identity(source: str, config: dict, dtype: str) -> str:
    """A short hash naming what the model's KV state depends on: the weights (see `weights_fingerprint`),
    the config, the dtype they run in, and the versions of mlx and mlx-lm that compute it."""
    mlx_version = mx.__version__  # type: ignore[attr-defined]  # set at import; mlx.core's stubs omit it
    h = hashlib.sha256(f"{source}\0{dtype}\0mlx {mlx_version}\0mlx-lm {version('mlx-lm')}".encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(weights_fingerprint(source))
    return h.hexdigest()[:16]


def weights_fingerprint(source: str) -> bytes:
    """The weights' content: the hub revision's commit for a snapshot in the Hugging Face cache, else a
    hash of each safetensors file in the folder (see `file_fingerprint`)."""
    path = Path(source)
    if not path.is_dir():  # a repo id that mlx-lm fetched: its snapshot in the hub cache
        try:
            path = Path(snapshot_download(source, local_files_only=True, allow_patterns=["config.json"]))
        except Exception:  # not in the cache after all: nothing to read
            return b""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return f"revision {path.name}".encode()
    h = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")):
        h.update(file_fingerprint(weights))
    return h.digest()


WHOLE_FILE_BYTES = 16 * 2**20  # hashed whole up to this size; larger files are sampled
SAMPLES, SAMPLE_BYTES = 64, 64 * 2**10


def file_fingerprint(path: Path) -> bytes:
    """A hash of a weights file: all of it when small; else its header (names, dtypes, shapes, offsets),
    `SAMPLES` evenly spaced pieces of its data and its modification time, so that an edit between
    the pieces still changes it."""
    status = path.stat()
    h = hashlib.sha256(f"{path.name}:{status.st_size}".encode())
    with open(path, "rb") as f:
        if status.st_size <= WHOLE_FILE_BYTES:
            return hashlib.file_digest(f, "sha256").digest() + h.digest()
        (header,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(min(header, 64 * 2**20)))
        for i in range(SAMPLES):
            f.seek(status.st_size * i // SAMPLES)
            h.update(f.read(SAMPLE_BYTES))
    h.update(str(status.st_mtime_ns).encode())
    return h.digest()


def available_memory() -> int:
    """Bytes that new allocations can take: MemAvailable on Linux, else the machine's memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def weights_summary(model: Any, config: dict) -> tuple[str, bool, int]:
    """The weights' floating dtype, whether the model is quantized, and its bytes with every float as float32."""
    flat = typing.cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))  # typed as a dict too
    params = [p for _, p in flat]
    floats = [p for p in params if mx.issubdtype(p.dtype, mx.floating)]
    stored = dtype_name(floats[0].dtype) if floats else "float32"
    quantized = "quantization" in config or len(floats) < len(params)
    return stored, quantized, sum(p.size * 4 if mx.issubdtype(p.dtype, mx.floating) else p.nbytes for p in params)


def choose_dtype(
    choice: str, stored: str, quantized: bool, float32_bytes: int, available: int, on_gpu: bool
) -> tuple[str, str]:
    """The dtype to run the weights in, and a short note on why it is not simply the stored one ("" if it is).

    BLAS on the CPU serves only float32 (bfloat16 and float16 matmuls run many times slower), so
    on the CPU `auto` casts an unquantized model to float32 when that takes at most half the
    available memory; on a GPU it keeps the stored dtype. Quantized models run as stored: an
    explicit float dtype for one is refused (ValueError).
    """
    if quantized:
        if choice != "auto":
            raise ValueError(f"--dtype {choice}: the model is quantized and runs as stored (use --dtype auto)")
        return stored, "quantized: runs as stored"
    if choice != "auto":
        return choice, "" if choice == stored else f"cast from {stored} (--dtype {choice})"
    if on_gpu or stored == "float32":
        return stored, ""
    if float32_bytes <= available // 2:
        return "float32", f"cast from {stored}: the CPU's BLAS is fast only in float32"
    return stored, (
        f"kept: as float32 it would take {float32_bytes / 2**30:.1f} GiB of the {available / 2**30:.1f} GiB available"
    )


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def load(
    ref: str,
    progress: Callable[[str, float], None],
    tool_parser: str | None = None,
    chat_template: str | None = None,
    group: mx.distributed.Group | None = None,
    shard: str | None = None,
    dtype: str = "auto",
) -> Loaded:
    """Load `ref` in the dtype that `dtype` ("auto" or a float dtype's name) picks (see `choose_dtype`);
    with a `group`, this rank's shard of it (`shard`: tensor, pipeline, None: tensor where supported)."""
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
        return load_shard(ref, source, extra, progress, group, shard, dtype)
    try:
        model, tokenizer, config = mlx_load(  # type: ignore[misc]  # typed without return_config's third value
            source, tokenizer_config=extra, lazy=True, return_config=True
        )
        require_template(ref, tokenizer)
        note = cast(model, config, dtype, ref)  # lazily: each layer is read and cast in the loop below
        layers = list(getattr(model, "layers", []))
        for i, layer in enumerate(layers):
            mx.eval(layer.parameters())
            progress("weights", (i + 1) / len(layers))
        mx.eval(model.parameters())
    except ModelError:
        raise
    except ModuleNotFoundError as e:
        raise ModelError(f"{ref}: unknown tool parser or model type ({e.name})") from e
    except Exception as e:  # mlx-lm reports broken files with many exception types
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{ref}: cannot load the model: {detail}") from e
    context = config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", 0)
    running = weights_summary(model, config)[0]
    return Loaded(model, tokenizer, int(context or 4096), running, identity(source, config, running), dtype_note=note)


def require_template(ref: str, tokenizer: Any) -> None:
    """A model without a chat template (and none given) would answer nonsense: refuse it."""
    if not tokenizer.chat_template:
        raise ModelError(f"{ref}: the model has no chat template; give one with --chat-template FILE")


def cast(model: Any, config: dict, dtype: str, ref: str) -> str:
    """Set the weights' dtype as `choose_dtype` picks it; the note on why."""
    stored, quantized, float32_bytes = weights_summary(model, config)
    on_gpu = mx.default_device() == mx.gpu
    try:
        target, note = choose_dtype(dtype, stored, quantized, float32_bytes, available_memory(), on_gpu)
    except ValueError as e:
        raise ModelError(f"{ref}: {e}") from None
    if target != stored:
        model.set_dtype(getattr(mx, target))
    return note


def load_shard(
    ref: str,
    source: str,
    extra: dict,
    progress: Callable[[str, float], None],
    group: mx.distributed.Group,
    shard: str | None,
    dtype: str,
) -> Loaded:
    """This rank's part of the model, split by mlx-lm's `sharded_load` across `group`."""
    try:
        model, tokenizer, config = sharded_load(
            source,
            pipeline_group=group if shard == "pipeline" else None,
            tensor_group=group if shard == "tensor" else None,
            return_config=True,
            tokenizer_config=extra,
        )
        require_template(ref, tokenizer)
    except ModelError:
        raise
    except ModuleNotFoundError as e:
        raise ModelError(f"{ref}: unknown tool parser or model type ({e.name})") from e
    except ValueError as e:
        if "not support" in str(e):
            raise ModelError(f"{ref}: model type {model_type(source)!r} cannot be split across ranks: {e}") from e
        raise ModelError(f"{ref}: cannot load the model: {str(e).splitlines()[0]}") from e
    except Exception as e:  # mlx-lm reports broken files with many exception types
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{ref}: cannot load the model: {detail}") from e
    note = cast(model, config, dtype, ref)
    mx.eval(model.parameters())
    progress("weights", 1.0)
    shard = shard or ("tensor" if hasattr(model, "shard") else "pipeline")
    context = config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", 0)
    running = weights_summary(model, config)[0]
    name = f"{identity(source, config, running)}-{shard}{group.rank()}of{group.size()}"
    return Loaded(model, tokenizer, int(context or 4096), running, name, shard=shard, dtype_note=note)


def model_type(source: str) -> str:
    try:
        return json.loads((Path(source) / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError):
        return "unknown"
