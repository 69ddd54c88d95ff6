"""Start and stop the two servers under comparison on loopback ports, logging to files."""

import fcntl
import os
import pty
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mlx_tui.engine.config import EngineConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blas_of(pid: int | None) -> str:
    """Which BLAS library process `pid` has mapped (from /proc; "" where that cannot be read)."""
    try:
        maps = Path(f"/proc/{pid or 'self'}/maps").read_text()
    except OSError:
        return ""
    if "libopenblas" in maps:
        return "openblas"
    return "reference" if "libmlx" in maps else ""


@dataclass
class Server:
    """One server process; `kind` is "ours" or "mlx_lm"; `protocol` what its streaming client speaks."""

    kind: str
    label: str
    port: int
    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    tty: bool = False
    process: subprocess.Popen | None = None
    model_name: str = "bench"
    screen_bytes: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("w")
        if not self.tty:
            self.process = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True
            )
            return
        # the dashboard needs a terminal: give it a 120x40 pseudo-terminal and read what it draws
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {**os.environ, **self.env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
        self.process = subprocess.Popen(
            self.args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        threading.Thread(target=self._drain, args=(master,), daemon=True).start()

    def _drain(self, fd: int):
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                return
            if not data:
                return
            self.screen_bytes += len(data)

    def wait_ready(self, timeout: float = 300.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with code {self.process.returncode}; see {self.log}:\n"
                    + self.log.read_text()[-2000:]
                )
            try:
                r = httpx.get(self.url + "/health", timeout=2.0)
                if r.status_code == 200 and r.json().get("status") in ("ok", None):
                    return r.json()
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.label} not ready after {timeout:.0f} s; see {self.log}")

    def compute_pid(self) -> int | None:
        """The pid that runs MLX: our worker (from /health), or mlx_lm.server itself."""
        if self.kind == "ours":
            try:
                return httpx.get(self.url + "/health", timeout=5).json()["worker"]["pid"]
            except (httpx.HTTPError, KeyError, ValueError):
                return None
        return self.process.pid if self.process else None

    def pids(self) -> dict[str, int | None]:
        """The processes whose CPU time serving costs, by role."""
        if self.kind == "ours":
            return {"worker": self.compute_pid(), "front": self.process.pid}
        return {"server": self.process.pid}

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(5)


def engine_config(model: Path, **settings: object) -> EngineConfig:
    """An engine a benchmark runs from its own process, set as `ours` starts mlx-tui: no disk tier or
    transcripts, the repetition guard and speculation off."""
    return EngineConfig(
        model=str(model), transcripts_dir=None, cache_dir=None, loop_window=0, speculate="off", **settings
    )


def ours(
    model: Path,
    workdir: Path,
    concurrency: int,
    extra: list[str] = (),
    dashboard: bool = False,
    speculate: str = "off",
    variant: str = "",
) -> Server:
    """`mlx-tui --serve`, or with `dashboard` the full `mlx-tui` (engine + API + dashboard) in a terminal.

    Speculation is off unless asked for: the random benchmark models' greedy replies fall
    into loops that prompt lookup drafts, which would measure the loops, not the serving;
    the `edit` section measures speculation on replies that copy their prompt. `variant` names
    a second server with other `extra` settings (its label, logs and cache directories).
    """
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "mlx_tui.tui.cli",
        *([] if dashboard else ["--serve"]),
        "--model",
        str(model),
        "--port",
        str(port),
        "--max-concurrency",
        str(concurrency),
        "--loop-window",
        "0",
        "--speculate",
        speculate,
        *extra,
    ]
    name = ("ours-dashboard" if dashboard else "ours") + (f"-{variant.strip('-').split()[0]}" if variant else "")
    # a private cache and data directory: the disk tier must not carry entries between runs
    env = {"XDG_CACHE_HOME": str(workdir / f"{name}-cache"), "XDG_DATA_HOME": str(workdir / f"{name}-data")}
    label = ("mlx-tui (dashboard)" if dashboard else "mlx-tui --serve") + (f" {variant}" if variant else "")
    return Server("ours", label, port, args, workdir / f"{name}.log", env, tty=dashboard)


def mlx_lm(model: Path, workdir: Path, concurrency: int, cache_bytes: int) -> Server:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "mlx_lm.server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--decode-concurrency",
        str(concurrency),
        "--prompt-concurrency",
        str(concurrency),
        "--prompt-cache-bytes",
        str(cache_bytes),
        "--max-tokens",
        "4096",
        "--log-level",
        "WARNING",
    ]
    return Server("mlx_lm", "mlx_lm.server", port, args, workdir / "mlx_lm.log", model_name="default_model")
