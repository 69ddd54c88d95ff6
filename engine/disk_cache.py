"""The prefix cache's disk tier: entries written behind in a thread, checked before they are trusted.

Each entry is one safetensors file in mlx-lm's prompt-cache format (`load_prompt_cache`
reads it): the entry's layers, then those of each snapshot, written to a temporary name and
renamed into place, its metadata naming the model, the tokens it holds, the snapshots'
positions and a SHA-256 of its arrays. A file that is unreadable, truncated, altered or
from another model is removed, never loaded.
"""

import hashlib
import json
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache

from . import cache_kinds
from .prefix_cache import Entry, common_prefix


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(memoryview(arrays[name]))
    return h.hexdigest()


def serialisable(caches: list, metadata: dict) -> tuple[dict, dict]:
    """The arrays and header `save_prompt_cache` would write, built and evaluated on the calling thread.

    The writer thread then only copies finished buffers to disk, running no MLX computation.
    """
    arrays, scalars = {}, [""]
    for name, value in tree_flatten([c.state for c in caches]):
        if isinstance(value, mx.array):
            arrays[name] = mx.contiguous(value)
            continue
        kind = "none" if value is None else "string" if isinstance(value, str) else "scalar"
        scalars.append((name, kind))
        arrays[name] = (
            mx.array([]) if value is None else mx.array([ord(c) for c in value]) if kind == "string" else mx.array(value)
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
    """Entry files under `directory` (one per model identity), at most `budget` bytes in all."""

    def __init__(self, directory: Path, budget: int, model_id: str):
        self.directory = directory
        self.budget = budget
        self.model_id = model_id
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.index: list[DiskEntry] = []
        self.rejected = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._scan()
        threading.Thread(target=self._write_behind, daemon=True).start()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.index)

    def _scan(self):
        for leftover in self.directory.glob("*.partial.safetensors"):
            leftover.unlink(missing_ok=True)
        for path in sorted(self.directory.glob("*.safetensors"), key=os.path.getmtime):
            try:
                meta = read_metadata(path)
                if meta["model"] != self.model_id:
                    raise ValueError("written for another model")
                found = described(path, meta)
            except Exception:  # any defect in a file found on disk means it is not ours to trust
                self._reject(path)
                continue
            self.index.append(found)

    def _reject(self, path: Path):
        self.rejected += 1
        path.unlink(missing_ok=True)

    def save(self, entry: Entry):
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
        self._queue.put((entry.tokens, *serialisable(caches, metadata)))

    def flush(self):
        """Wait until everything queued so far is on disk."""
        self._queue.join()

    def _write_behind(self):
        while True:
            item = self._queue.get()
            try:
                self._write(*item)
            except OSError:
                pass  # a full or read-only disk costs the disk tier, not the request
            finally:
                self._queue.task_done()

    def _write(self, tokens: np.ndarray, arrays: dict, header: dict):
        name = hashlib.sha256(tokens.tobytes()).hexdigest()[:32]
        path = self.directory / f"{name}.safetensors"
        header["0.sha256"] = digest(arrays)
        tmp = self.directory / f"{name}.partial.safetensors"
        mx.save_safetensors(str(tmp), arrays, header)
        os.replace(tmp, path)
        with self._lock:
            self.index = [e for e in self.index if e.path != path]
            self.index.append(described(path, {k.removeprefix("0."): v for k, v in header.items() if k.startswith("0.")}))
            self._evict()

    def _evict(self):
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
        return self.load(found, clock) if n > beyond else None

    def load(self, found: DiskEntry, clock: float) -> Entry | None:
        """The entry from its file, or None (and the file removed) if it is not sound."""
        try:
            arrays = mx.load(str(found.path))
            caches, meta = load_prompt_cache(str(found.path), return_metadata=True)
            tokens = np.asarray(json.loads(meta["tokens"]), dtype=np.int64)
            positions = [int(p) for p in json.loads(meta.get("snapshots", "[]"))]
            width = len(caches) // (1 + len(positions))
            layers = caches[:width]
            snapshots = {p: caches[width * (i + 1) : width * (i + 2)] for i, p in enumerate(positions)}
            sound = (
                meta["model"] == self.model_id
                and meta["sha256"] == digest(arrays)
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
