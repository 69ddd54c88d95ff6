"""Engine settings, shared by the front process and the worker."""

import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .demo import MODEL_DIR


def data_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlx-tui"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mlx-tui"


def cache_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlx-tui"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-tui"


@dataclass(slots=True)
class EngineConfig:
    """What the worker loads and how it schedules; the command line fills it in."""

    model: str = str(MODEL_DIR)
    max_concurrency: int = 4
    prefill_step: int = 512
    max_tokens: int = 32768
    repetition_penalty: float = 0.0
    loop_window: int = 256
    loop_max_period: int = 64
    tool_parser: str | None = None
    constrain_tools: bool = False
    speculate: str = "auto"
    stream_interval: str = "auto"
    chat_template: str | None = None
    blas: str = "auto"
    ranks: int = 1
    hostfile: str | None = None
    backend: str = "ring"
    shard: str | None = None
    blas_threads: int = 0
    dtype: str = "auto"
    max_queue: int = 16
    request_timeout: float = 0.0
    stall_timeout: float = 60.0
    breaker_threshold: int = 3
    breaker_cooldown: float = 5.0
    max_kv_gb: float = 0.0
    cache_ram_gb: float = 0.0
    cache_dir: str | None = field(default_factory=lambda: str(cache_dir() / "prefix-cache"))
    cache_disk_gb: float = 10.0
    transcripts_dir: str | None = field(default_factory=lambda: str(data_dir() / "transcripts"))

    @property
    def cache_ram_bytes(self) -> int:
        """The prefix cache's RAM budget; by default a fifth of the machine's memory."""
        if self.cache_ram_gb > 0:
            return int(self.cache_ram_gb * 2**30)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 5


DTYPES = ("auto", "float32", "bfloat16", "float16")

MAX_DRAFT = 8  # `--speculate auto`: the most tokens one pass verifies beyond the next


def draft_most(speculate: str) -> int:
    """The most drafted tokens per pass for `--speculate off|auto|N` (0: off); ValueError if unreadable."""
    if speculate == "off":
        return 0
    if speculate == "auto":
        return MAX_DRAFT
    if speculate.isdigit() and 1 <= int(speculate) <= 64:
        return int(speculate)
    raise ValueError(f"--speculate takes off, auto or a draft length from 1 to 64, not {speculate!r}")


# `--stream-interval auto` on the CPU backend, where each message takes a core from the model (see pacing.py)
CPU_STREAM_INTERVAL_MS = 50


def stream_interval_ms(setting: str, on_gpu: bool) -> int:
    """The interval for `--stream-interval auto|MS` on this backend; ValueError if unreadable."""
    if setting == "auto":
        return 0 if on_gpu else CPU_STREAM_INTERVAL_MS
    if setting.isdigit() and int(setting) <= 1000:
        return int(setting)
    raise ValueError(f"--stream-interval takes auto or milliseconds from 0 to 1000, not {setting!r}")


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def served_name(ref: str) -> str:
    """The served model's name: a Hugging Face repo id as given, a local model by its folder."""
    path = Path(ref).expanduser()
    if not path.exists():
        return ref
    return "mlx-tui-demo" if path.resolve() == MODEL_DIR.resolve() else path.resolve().name


def model_problem(ref: str) -> str | None:
    """Why `ref` names neither a local model directory nor a Hugging Face repo id, or None."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{ref}: not a directory"
        if not (path / "config.json").is_file():
            return f"{ref}: no config.json in the model directory"
        return None
    if REPO_ID.match(ref) and not ref.startswith((".", "~")):
        return misread_folder(ref)
    return f"{ref}: no such model directory"


def misread_folder(ref: str) -> str | None:
    """For a repo id `org/name` where the folder `org/` here holds a folder named much like `name`: both readings."""
    org, name = ref.split("/")
    try:
        near = difflib.get_close_matches(name, [p.name for p in Path(org).iterdir() if p.is_dir()], 1)
    except OSError:  # no such folder here: a repo id
        return None
    if not near:
        return None
    return (
        f"{ref}: not a folder here (did you mean {org}/{near[0]}?), and as a Hugging Face repo id it would be "
        f"downloaded; give the folder's path, or for the hub run from a folder without {org}/"
    )


HEARTBEAT = "mlx-tui rank alive:"  # each rank of a group says so on stderr once a second, with its CPU seconds
HEARTBEAT_S = 1.0


def hostfile_hosts(path: str, backend: str) -> list[str]:
    """The hosts, one a rank, of the `mlx.launch` hostfile at `path`; ValueError (one line) if it cannot be used."""
    from mlx._distributed_utils.common import Hostfile  # the parser mlx.launch itself uses

    try:
        hosts = Hostfile.from_file(path).hosts
    except ValueError as e:
        raise ValueError(f"--hostfile {path}: {str(e).splitlines()[0]}") from None
    if not hosts:
        raise ValueError(f"--hostfile {path}: no hosts")
    if backend == "ring" and any(not h.ips for h in hosts):
        raise ValueError(f'--hostfile {path}: the ring backend needs "ips" for every host')
    return [h.ssh_hostname for h in hosts]
