"""`--dtype`: on the CPU `auto` runs unquantized weights in float32 (BLAS is fast only there), says so in /health."""

import json
import shutil
import subprocess
import sys

import httpx
import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import Server
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

from benchmarks.model import MODEL_ARGS
from mlx_tui.api.server import create_app
from mlx_tui.engine.client import ModelLoadError
from mlx_tui.engine.demo import MODEL_DIR
from mlx_tui.engine.events import Done, TextDelta
from mlx_tui.engine.loader import choose_dtype
from mlx_tui.engine.request import GenerationRequest

# the benchmark model's architecture at a size that loads in a moment, with the demo model's tokenizer
TINY = dict(
    MODEL_ARGS,
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=json.loads((MODEL_DIR / "config.json").read_text())["vocab_size"],
)


def tiny_model(path, dtype: str, quantize: bool = False):
    """A random model of the benchmark's architecture saved in `dtype` (quantized to 4 bits if asked)."""
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(TINY))
    model.set_dtype(getattr(mx, dtype))
    config = dict(TINY, torch_dtype=dtype, eos_token_id=2)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4}
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MODEL_DIR / name, path / name)
    return path


def answer(loop, engine) -> tuple[str, Done]:
    async def run():
        text, done = "", None
        async for event in engine.generate(
            GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        ):
            text += event.text if isinstance(event, TextDelta) else ""
            done = event if isinstance(event, Done) else done
        return text, done

    return loop.run(run())


def test_auto_runs_the_demo_model_in_float32(engine, server):
    assert engine.info["dtype"] == "float32"
    health = httpx.get(server.url + "/health").json()
    assert (health["dtype"], health["dtype_note"]) == ("float32", "")


def test_auto_runs_the_benchmark_architecture_in_float32(make_engine, tmp_path):
    engine = make_engine(model=str(tiny_model(tmp_path / "f32", "float32")))
    assert (engine.info["dtype"], engine.info["dtype_note"]) == ("float32", "")


def test_auto_casts_bfloat16_weights_to_float32(loop, make_engine, tmp_path):
    engine = make_engine(model=str(tiny_model(tmp_path / "bf16", "bfloat16")))
    assert engine.info["dtype"] == "float32"
    assert engine.info["dtype_note"] == "cast from bfloat16: the CPU's BLAS is fast only in float32"
    _, done = answer(loop, engine)
    assert done.usage.generated_tokens > 0


def test_bfloat16_on_request_serves_and_health_says_so(loop, make_engine):
    engine = make_engine(dtype="bfloat16")
    server = Server(loop, create_app(engine))
    try:
        health = httpx.get(server.url + "/health").json()
        assert (health["dtype"], health["dtype_note"]) == ("bfloat16", "cast from float32 (--dtype bfloat16)")
        reply = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            timeout=60,
        )
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] > 0
    finally:
        server.close()


def test_a_quantized_model_runs_as_stored(loop, make_engine, tmp_path):
    engine = make_engine(model=str(tiny_model(tmp_path / "q4", "bfloat16", quantize=True)))
    assert (engine.info["dtype"], engine.info["dtype_note"]) == ("bfloat16", "quantized: runs as stored")
    _, done = answer(loop, engine)
    assert done.usage.generated_tokens > 0


def test_an_explicit_dtype_for_a_quantized_model_is_refused(make_engine, tmp_path):
    path = tiny_model(tmp_path / "q4", "bfloat16", quantize=True)
    with pytest.raises(ModelLoadError) as refused:
        make_engine(model=str(path), dtype="float32")
    assert (
        str(refused.value) == f"{path}: --dtype float32: the model is quantized and runs as stored (use --dtype auto)"
    )


def test_auto_keeps_the_stored_dtype_where_float32_does_not_fit_or_on_a_gpu():
    gib = 2**30
    assert choose_dtype("auto", "bfloat16", False, 10 * gib, 16 * gib, on_gpu=False) == (
        "bfloat16",
        "kept: as float32 it would take 10.0 GiB of the 16.0 GiB available",
    )
    assert choose_dtype("auto", "bfloat16", False, gib, 16 * gib, on_gpu=True) == ("bfloat16", "")
    assert choose_dtype("auto", "bfloat16", False, gib, 16 * gib, on_gpu=False)[0] == "float32"


def test_the_cli_refuses_an_unknown_dtype_in_one_line():
    command = [sys.executable, "-m", "mlx_tui.tui.cli", "--serve", "--port", "0", "--dtype", "int8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "mlx-tui: --dtype int8: choose one of auto, float32, bfloat16, float16\n"
