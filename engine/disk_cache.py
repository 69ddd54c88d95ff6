"""The prefix cache's disk tier: entries written behind in a thread, checked before they are trusted.

Each entry is one safetensors file written with mlx-lm's `save_prompt_cache` to a
temporary name and renamed into place, its metadata naming the model, the tokens it
holds and a SHA-256 of its arrays. A file that is unreadable, truncated, altered or
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

from .prefix_cache import Entry, common_prefix, reusable


def digest(layers: list) -> str:
    h = hashlib.sha256()
    for layer in layers:
        for array in (layer.keys, layer.values):
            h.update(memoryview(array))
    return h.hexdigest()


def serialisable(layers: list, metadata: dict) -> tuple[dict, dict]:
    """The arrays and header `save_prompt_cache` would write, built and evaluated on the calling thread.

    The writer thread then only copies finished buffers to disk, running no MLX computation.
    """
    arrays, scalars = {}, [""]
    for i, layer in enumerate(layers):
        arrays[f"{i}.0"], arrays[f"{i}.1"], arrays[f"{i}.2"] = layer.keys, layer.values, mx.array(layer.offset)
        scalars.append((f"{i}.2", "scalar"))
    mx.eval(list(arrays.values()))
    return arrays, dict(tree_flatten([metadata, ["KVCache"] * len(layers), scalars]))


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
                tokens = np.asarray(json.loads(meta["tokens"]), dtype=np.int64)
            except Exception:  # any defect in a file found on disk means it is not ours to trust
                self._reject(path)
                continue
            self.index.append(DiskEntry(path, tokens, path.stat().st_size))

    def _reject(self, path: Path):
        self.rejected += 1
        path.unlink(missing_ok=True)

    def save(self, entry: Entry):
        """Queue the entry to be written soon, in the background."""
        metadata = {
            "model": self.model_id,
            "tokens": json.dumps(entry.tokens.tolist()),
            "checkpoint": str(int(entry.checkpoint)),
        }
        self._queue.put((entry.tokens, entry.layers, *serialisable(entry.layers, metadata)))

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

    def _write(self, tokens: np.ndarray, layers: list, arrays: dict, header: dict):
        name = hashlib.sha256(tokens.tobytes()).hexdigest()[:32]
        path = self.directory / f"{name}.safetensors"
        header["0.sha256"] = digest(layers)
        tmp = self.directory / f"{name}.partial.safetensors"
        mx.save_safetensors(str(tmp), arrays, header)
        os.replace(tmp, path)
        with self._lock:
            self.index = [e for e in self.index if e.path != path]
            self.index.append(DiskEntry(path, tokens, path.stat().st_size))
            self._evict()

    def _evict(self):
        total = sum(e.nbytes for e in self.index)
        while total > self.budget and len(self.index) > 1:
            oldest = self.index.pop(0)
            total -= oldest.nbytes
            oldest.path.unlink(missing_ok=True)

    def longest(self, tokens: np.ndarray) -> tuple[DiskEntry | None, int]:
        best, best_len = None, 0
        with self._lock:
            for entry in self.index:
                n = common_prefix(entry.tokens, tokens)
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
            layers, meta = load_prompt_cache(str(found.path), return_metadata=True)
            mx.eval([(layer.keys, layer.values) for layer in layers])
            tokens = np.asarray(json.loads(meta["tokens"]), dtype=np.int64)
            sound = (
                meta["model"] == self.model_id
                and reusable(layers)
                and all(layer.offset == len(tokens) == layer.keys.shape[2] for layer in layers)
                and meta["sha256"] == digest(layers)
            )
        except Exception:  # unreadable, truncated or malformed: all mean the same here
            sound = False
        if not sound:
            with self._lock:
                self.index = [e for e in self.index if e is not found]
            self._reject(found.path)
            return None
        return Entry(tokens, layers, meta.get("checkpoint") == "1", clock)
