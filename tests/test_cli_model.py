"""`--model` problems end the command at once with one line naming the path, and a non-zero exit."""

import subprocess
import sys


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
    [line] = [l for l in done.stderr.splitlines() if l.startswith("mlx-tui:")]
    assert line.startswith(f"mlx-tui: {tmp_path}: cannot load the model: ")
    assert "Traceback" not in done.stderr
