"""The prefix cache's disk tier: entries written behind in a thread, checked before they are trusted.

Each entry is one safetensors file in mlx-lm's prompt-cache format (`load_prompt_cache`
reads it): the entry's layers, then those of each snapshot, written to a temporary name and
renamed into place, its metadata naming the model, the tokens it holds, the snapshots'
positions, a SHA-256 of its arrays and an HMAC of all of that under the folder's own key. A
file that is unreadable, truncated, altered, unsigned or from another model is removed,
never loaded. A load reads its file in pieces and calls `progress()` after each, so that a
large entry read from a slow disk shows the worker's watchdog that it is moving.
"""

import contextlib
import hashlib
import hmac
import io
import json
import os
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache

from . import cache_kinds
from .prefix_cache import Entry, common_prefix


def digest(arrays: dict, progress: Callable[[], None] = lambda: None) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(memoryview(arrays[name]))
        progress()
    return h.hexdigest()


class PieceReader(io.FileIO):
    """A file that `mx.load` reads (it reads each array with one `readinto`) `piece` bytes at a time, calling
    `progress()` after each piece."""

    def __init__(self, path: Path, piece: int, progress: Callable[[], None]) -> None:
        super().__init__(str(path))  # mx.load infers the format from the name, a str
        self.piece = piece
        self.progress = progress

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            n = super().readinto(view[done : done + self.piece])
            if not n:
                break
            done += n
            self.progress()
        return done


def sign(metadata: dict, array_digest: str, key: bytes) -> str:
    """An HMAC-SHA256 under `key` of our header metadata (every field) and the arrays' digest."""
    message = json.dumps([metadata, array_digest], sort_keys=True).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify(metadata: dict, array_digest: str, key: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(metadata, array_digest, key), signature)


def secret(directory: Path) -> bytes:
    """The folder's key for `sign`: 32 random bytes in a file only its owner may read, made on first use.

    A key file that others could read or change, or that is not whole, is replaced, and
    with it every entry it signed is refused.
    """
    path = directory / "key"
    try:
        status = path.stat()
        if status.st_uid == os.getuid() and not status.st_mode & 0o077 and len(key := path.read_bytes()) == 32:
            return key
        path.unlink()
    except FileNotFoundError:
        pass
    key = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return secret(directory)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def serialisable(caches: list, metadata: dict) -> tuple[dict, dict]:
    """The arrays and header `save_prompt_cache` would write, built and evaluated on the calling thread.

    The writer thread then only copies finished buffers to disk, running no MLX computation.
    """
    arrays: dict[str, mx.array] = {}
    scalars: list[str | tuple[str, str]] = [""]
    flat = cast(list[tuple[str, Any]], tree_flatten([c.state for c in caches]))  # typed as a dict too
    for name, value in flat:
        if isinstance(value, mx.array):
            arrays[name] = mx.contiguous(value)
            continue
        kind = "none" if value is None else "string" if isinstance(value, str) else "scalar"
        scalars.append((name, kind))
        arrays[name] = (
            mx.array([])
            if value is None
            else mx.array([ord(c) for c in value])
            if kind == "string"
            else mx.array(value)
        )
    mx.eval(list(arrays.values()))
    return arrays, dict(tree_flatten([metadata, [type(c).__name__ for c in caches], scalars]))


def read_metadata(path: Path) -> dict:
    """Our part of the safetensors header's metadata, read without loading the arrays."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 64 * 2**20:
            raise ValueError("header too large")
        flat = json.loads(f.read(size))["__metadata__"]
    return {k.removeprefix("0."): v for k, v in flat.items() if k.startswith("0.")}


@dataclass(slots=True)
class DiskEntry:
    path: Path
    tokens: np.ndarray
    nbytes: int
    snapshots: list[int]
    cuttable: bool

    def resumable(self, n: int) -> int:
        """As `Entry.resumable`, from what the file's header says."""
        if n >= len(self.tokens) or self.cuttable:
            return min(n, len(self.tokens))
        return max((p for p in self.snapshots if p <= n), default=0)


def described(path: Path, meta: dict) -> DiskEntry:
    tokens = np.asarray(json.loads(meta["tokens"]), dtype=np.int64)
    snapshots = [int(p) for p in json.loads(meta.get("snapshots", "[]"))]
    return DiskEntry(path, tokens, path.stat().st_size, snapshots, meta.get("cuttable", "1") == "1")


class DiskCache:
    """Entry files under `directory` (one per model identity), at most `budget` bytes in all.

    Entries wait to be written in a queue of at most `PENDING_BYTES` (the oldest are dropped
    beyond it); a write that fails drops its entry, so a full, read-only or removed folder
    costs the disk tier, never the worker.
    """

    PENDING_BYTES = 2**30
    FLUSH_S = 5.0  # how long `flush` waits, less than the front process gives a stopping worker
    PIECE_BYTES = 64 * 2**20  # a load reports progress after each piece this large

    def __init__(
        self, directory: Path, budget: int, model_id: str, progress: Callable[[], None] = lambda: None
    ) -> None:
        self.directory = directory
        self.budget = budget
        self.model_id = model_id
        self.progress = progress  # called on the loading thread as a load moves on
        self.piece = self.PIECE_BYTES
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key = secret(directory)
        self.index: list[DiskEntry] = []
        self.rejected = 0
        self.write_errors = 0
        self.dropped = 0  # queued writes dropped to keep the queue within PENDING_BYTES
        self._lock = threading.Lock()
        self._pending: deque = deque()
        self._pending_bytes = 0
        self._writing = False
        self._changed = threading.Condition()
        self._writer: threading.Thread | None = None  # started by the first `save`
        self._scan()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.index)

    def _scan(self) -> None:
        for leftover in self.directory.glob("*.partial.safetensors"):
            leftover.unlink(missing_ok=True)
        for path in sorted(self.directory.glob("*.safetensors"), key=os.path.getmtime):
            try:
                meta = read_metadata(path)
                if meta["model"] != self.model_id:
                    raise ValueError("written for another model")
                if "hmac" not in meta:
                    raise ValueError("not signed")
                found = described(path, meta)
            except Exception:  # any defect in a file found on disk means it is not ours to trust
                self._reject(path)
                continue
            self.index.append(found)

    def _reject(self, path: Path) -> None:
        self.rejected += 1
        path.unlink(missing_ok=True)

    def save(self, entry: Entry) -> None:
        """Queue the entry to be written soon, in the background."""
        positions = sorted(entry.snapshots)
        metadata = {
            "model": self.model_id,
            "tokens": json.dumps(entry.tokens.tolist()),
            "checkpoint": str(int(entry.checkpoint)),
            "snapshots": json.dumps(positions),
            "cuttable": str(int(entry.cuttable)),
        }
        caches = entry.layers + [x for p in positions for x in entry.snapshots[p]]
        arrays, header = serialisable(caches, metadata)
        size = sum(a.nbytes for a in arrays.values())
        with self._changed:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_behind, daemon=True)
                self._writer.start()
            self._pending.append((size, (entry.tokens, arrays, header)))
            self._pending_bytes += size
            while self._pending_bytes > self.PENDING_BYTES and len(self._pending) > 1:
                self._pending_bytes -= self._pending.popleft()[0]
                self.dropped += 1
            self._changed.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written (or dropped), at most `timeout` (default FLUSH_S) seconds."""
        with self._changed:
            return self._changed.wait_for(self._idle, self.FLUSH_S if timeout is None else timeout)

    def _idle(self) -> bool:
        return not self._pending and not self._writing

    def _write_behind(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending)
                size, item = self._pending.popleft()
                self._writing = True
            try:
                self._write(*item)
            except Exception as e:  # a full, read-only or removed folder costs the disk tier, never the worker
                self._write_failed(e)
            finally:
                with self._changed:
                    self._pending_bytes -= size
                    self._writing = False
                    self._changed.notify_all()

    def _write_failed(self, error: Exception) -> None:
        """Count the failure, and say so on stderr the first time."""
        self.write_errors += 1
        if self.write_errors == 1:
            print(
                f"disk cache: cannot write to {self.directory} ({error}); entries are dropped "
                "while it fails (counted in /metrics)",
                file=sys.stderr,
                flush=True,
            )

    def _write(self, tokens: np.ndarray, arrays: dict, header: dict) -> None:
        name = hashlib.sha256(tokens.tobytes()).hexdigest()[:32]
        path = self.directory / f"{name}.safetensors"
        header["0.sha256"] = array_digest = digest(arrays)
        metadata = {k.removeprefix("0."): v for k, v in header.items() if k.startswith("0.")}
        header["0.hmac"] = sign(metadata, array_digest, self.key)
        tmp = self.directory / f"{name}.partial.safetensors"
        try:
            mx.save_safetensors(str(tmp), arrays, header)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # what a full disk let through
            raise
        with self._lock:
            self.index = [e for e in self.index if e.path != path]
            self.index.append(
                described(path, {k.removeprefix("0."): v for k, v in header.items() if k.startswith("0.")})
            )
            self._evict()

    def _evict(self) -> None:
        total = sum(e.nbytes for e in self.index)
        while total > self.budget and len(self.index) > 1:
            oldest = self.index.pop(0)
            total -= oldest.nbytes
            oldest.path.unlink(missing_ok=True)

    def longest(self, tokens: np.ndarray) -> tuple[DiskEntry | None, int]:
        """The entry that can resume furthest into `tokens`, and how far."""
        best, best_len = None, 0
        with self._lock:
            for entry in self.index:
                n = entry.resumable(common_prefix(entry.tokens, tokens))
                if n > best_len:
                    best, best_len = entry, n
        return best, best_len

    def fetch(self, tokens: np.ndarray, beyond: int, clock: float) -> Entry | None:
        """The sound entry holding the longest prefix of `tokens` on disk, if that is longer than `beyond`."""
        found, n = self.longest(tokens)
        return self.load(found, clock) if found is not None and n > beyond else None  # n is 0 without one

    def load(self, found: DiskEntry, clock: float) -> Entry | None:
        """The entry from its file, or None (and the file removed) if it is not sound."""
        try:
            with self._reader(found.path) as f:
                arrays_digest = digest(cast(dict[str, mx.array], mx.load(f)), self.progress)  # safetensors: a dict
            with self._reader(found.path) as f:
                caches, meta = load_prompt_cache(f, return_metadata=True)
            tokens = np.asarray(json.loads(meta["tokens"]), dtype=np.int64)
            positions = [int(p) for p in json.loads(meta.get("snapshots", "[]"))]
            width = len(caches) // (1 + len(positions))
            layers = caches[:width]
            snapshots = {p: caches[width * (i + 1) : width * (i + 2)] for i, p in enumerate(positions)}
            sound = (
                meta["model"] == self.model_id
                and verify({k: v for k, v in meta.items() if k != "hmac"}, arrays_digest, self.key, meta["hmac"])
                and width * (1 + len(positions)) == len(caches)
                and all(isinstance(c, cache_kinds.BATCHABLE) for c in caches)
                and all(layer.offset == len(tokens) for layer in layers if hasattr(layer, "offset"))
                and all(0 < p < len(tokens) for p in positions)
            )
        except Exception:  # unreadable, truncated or malformed: all mean the same here
            sound = False
        if not sound:
            with self._lock:
                self.index = [e for e in self.index if e is not found]
            self._reject(found.path)
            return None
        return Entry(tokens, layers, meta.get("checkpoint") == "1", clock, snapshots)

    def _reader(self, path: Path) -> PieceReader:
        return PieceReader(path, self.piece, self.progress)
