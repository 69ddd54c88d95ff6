"""What a new user hits first (a bad `--model`, `--chat-template` or `--warm`) ends the command at once with one
line naming the problem and a non-zero exit; no OpenBLAS on Linux is a warning with its cost and its fix."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_unless_ci

from mlx_tui.engine.blas import find_openblas
from mlx_tui.engine.demo import MODEL_DIR


def mlx_tui(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlx_tui.tui.cli", "--serve", "--port", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_missing_model_directory(tmp_path):
    done = mlx_tui("--model", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"mlx-tui: {tmp_path / 'nowhere'}: no such model directory"


def test_a_directory_without_a_model(tmp_path):
    done = mlx_tui("--model", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == f"mlx-tui: {tmp_path}: no config.json in the model directory"


def test_a_broken_model_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    done = mlx_tui("--model", str(tmp_path))
    assert done.returncode == 1
    [line] = [s for s in done.stderr.splitlines() if s.startswith("mlx-tui:")]
    assert line.startswith(f"mlx-tui: {tmp_path}: cannot load the model: ")
    assert "Traceback" not in done.stderr


def one_line(done: subprocess.CompletedProcess, code: int) -> str:
    """The one line the command said before exiting with `code`, with no traceback."""
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    return line


def test_a_missing_chat_template_file(tmp_path):
    done = mlx_tui("--chat-template", str(tmp_path / "template.jinja"))
    assert one_line(done, 2) == f"mlx-tui: --chat-template {tmp_path / 'template.jinja'}: no such file"


def test_a_model_without_a_chat_template_is_refused(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    del settings["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    done = mlx_tui("--model", str(model))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = [s for s in done.stderr.splitlines() if s.startswith("mlx-tui:")]
    assert line == f"mlx-tui: {model}: the model has no chat template; give one with --chat-template FILE"


def test_a_repo_id_that_is_a_typo_of_a_local_folder_names_both_readings(tmp_path):
    (tmp_path / "models" / "qwen3-0.6b").mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-m", "mlx_tui.tui.cli", "--serve", "--port", "0", "--model", "models/qwen3-06b"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    line = one_line(done, 2)
    assert line.startswith("mlx-tui: models/qwen3-06b: not a folder here (did you mean models/qwen3-0.6b?)")
    assert "as a Hugging Face repo id it would be downloaded" in line


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"model": "m", "messages": [', "not valid JSON: Expecting value: line 1 column 29"),
        ('["a list"]', "a JSON file must hold a request body (an object)"),
        ('{"model": "m", "messages": "hello"}', "not an Anthropic, OpenAI or Responses request body: messages: "),
    ],
)
def test_an_invalid_warm_json_file(tmp_path, content, says):
    (tmp_path / "warm.json").write_text(content)
    line = one_line(mlx_tui("--warm", str(tmp_path / "warm.json")), 2)
    assert line.startswith(f"mlx-tui: --warm {tmp_path / 'warm.json'}: {says}"), line


def test_no_openblas_on_linux_is_a_warning_with_the_cost_and_the_fix(tmp_path):
    """OpenBLAS hidden from the server (a private mount over its folder): it warns, then serves on the wheel's BLAS."""
    if sys.platform != "linux":
        pytest.skip("the warning is for Linux only")
    found = find_openblas()
    if found is None:
        skip_unless_ci("no system OpenBLAS to hide (apt-get install libopenblas0-pthread)")
    hide = f"mount -t tmpfs tmpfs {shlex.quote(str(Path(found).resolve().parent))}"
    command = shlex.join([sys.executable, "-m", "mlx_tui.tui.cli", "--serve", "--port", "0", "--cache-disk-gb", "0"])
    if subprocess.run(
        ["unshare", "-m", "sh", "-c", f'{hide} && test -z "$(ls {shlex.quote(found)} 2>/dev/null)"']
    ).returncode:
        pytest.skip("cannot hide OpenBLAS here: unshare -m with a tmpfs mount needs root")
    server = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", f"{hide} && exec {command}"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path)},
    )
    try:
        lines = []
        for line in server.stderr:
            lines.append(line)
            if line.startswith("mlx-tui: serving"):
                break
        said = "".join(lines)
        assert "BLAS: reference" in said, said
        [warning] = [s for s in lines if s.startswith("mlx-tui: warning:")]
        assert re.match(r"mlx-tui: warning: no optimised BLAS found: float32 matmuls run at [\d.]+ GFLOP/s", warning)
        assert "apt-get install libopenblas0-pthread" in warning
    finally:
        server.kill()
        server.wait()
