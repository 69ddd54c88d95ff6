"""The real Claude Code CLI against the server, twice: it completes, and the second run reads the cache."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import skip_unless_ci

VERSION = "2.1.328"
INSTALL_DIR = Path.home() / ".cache" / "mlx-tui" / f"claude-code-{VERSION}"


@pytest.fixture(scope="module")
def claude() -> Path:
    """The CLI, installed from npm once into a cache folder; skipped only where npm is absent (and never in CI)."""
    binary = INSTALL_DIR / "node_modules" / ".bin" / "claude"
    if binary.exists():
        return binary
    if shutil.which("npm") is None:
        skip_unless_ci("node/npm is not installed, so the Claude Code CLI cannot be run")
    done = subprocess.run(
        [
            "npm",
            "install",
            "--prefix",
            str(INSTALL_DIR),
            "--no-audit",
            "--no-fund",
            f"@anthropic-ai/claude-code@{VERSION}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and binary.exists(), done.stdout + done.stderr
    return binary


def run(claude: Path, url: str, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env |= {
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "not-needed",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    done = subprocess.run(
        [str(claude), "-p", "Hello", "--output-format", "json"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_claude_code_completes_twice_and_reuses_the_cache(claude, server, tmp_path):
    """The demo model answers Claude Code's ~35k-token first turn in words (ideally its fallback reply)."""
    for _ in range(2):
        result = run(claude, server.url, tmp_path)
        assert result["is_error"] is False and result["num_turns"] == 1 and result["result"]
    assert result["usage"]["cache_read_input_tokens"] > 0
