"""The disk tier on its own: failed writes are counted and dropped, the queue is bounded, flush ends;
only files this cache folder signed, whole and unchanged, are ever loaded."""

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import KVCache

from mlx_tui.engine.disk_cache import DiskCache
from mlx_tui.engine.prefix_cache import Entry


def entry(tokens: int, first: int = 0, width: int = 8) -> Entry:
    """An entry of two layers of random KV state for the tokens first, first+1, ..."""
    layers = []
    for _ in range(2):
        layer = KVCache()
        layer.keys, layer.values = (mx.random.normal((1, 2, tokens, width)) for _ in range(2))
        layer.offset = tokens
        layers.append(layer)
    mx.eval([(layer.keys, layer.values) for layer in layers])
    return Entry(np.arange(first, first + tokens, dtype=np.int64), layers, True, 0.0)


def partial_path(disk: DiskCache, e: Entry):
    return disk.directory / f"{hashlib.sha256(e.tokens.tobytes()).hexdigest()[:32]}.partial.safetensors"


def test_a_removed_folder_costs_the_entries_not_the_writer(tmp_path, capfd):
    disk = DiskCache(tmp_path / "model", 2**30, "m")
    disk.save(entry(16))
    assert disk.flush(10) and len(disk.index) == 1
    for path in (tmp_path / "model").iterdir():
        path.unlink()
    (tmp_path / "model").rmdir()
    for i in range(3):
        disk.save(entry(16, first=100 * (i + 1)))
    began = time.monotonic()
    assert disk.flush(10), "flush must end once the failed writes are dropped"
    assert time.monotonic() - began < 5
    assert disk.write_errors == 3 and len(disk.index) == 1
    [line] = [s for s in capfd.readouterr().err.splitlines() if "disk cache" in s]  # said once, not per entry
    assert line.startswith(f"disk cache: cannot write to {tmp_path / 'model'}")
    (tmp_path / "model").mkdir()
    disk.save(entry(16, first=1000))
    assert disk.flush(10) and len(disk.index) == 2, "the writer still runs and writes again once it can"


@pytest.fixture
def blocked_write(tmp_path):
    """A disk tier whose next write blocks (its temporary file is a FIFO no one reads yet), and the way to unblock
    it."""
    disk = DiskCache(tmp_path / "model", 2**30, "m")
    first = entry(64)
    os.mkfifo(partial_path(disk, first))
    disk.save(first)
    deadline = time.monotonic() + 10
    while disk._pending:  # the writer took it and now waits on the FIFO
        assert time.monotonic() < deadline
        time.sleep(0.01)

    def unblock():
        with open(partial_path(disk, first), "rb") as fifo:
            while fifo.read(1 << 16):
                pass

    reader = threading.Thread(target=unblock, daemon=True)
    yield disk, reader.start
    if reader.ident is None:
        reader.start()  # never leave the writer blocked
    reader.join(10)


def test_a_write_queue_past_its_byte_bound_drops_the_oldest(blocked_write):
    disk, unblock = blocked_write
    waiting = [entry(64, first=100 * (i + 1)) for i in range(4)]
    disk.PENDING_BYTES = 2 * waiting[0].nbytes + waiting[0].nbytes // 2  # room for the one being written and one more
    for e in waiting:
        disk.save(e)
    assert disk.dropped == 3 and disk._pending_bytes <= disk.PENDING_BYTES
    unblock()
    assert disk.flush(10)
    written = {tuple(e.tokens[:1]) for e in disk.index}
    assert written == {(0,), (400,)}, "the one being written and the newest are kept"


def test_flush_gives_up_at_its_deadline(blocked_write):
    disk, unblock = blocked_write
    began = time.monotonic()
    assert disk.flush(0.3) is False
    assert time.monotonic() - began < 2
    unblock()
    assert disk.flush(10)


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 64 KiB tmpfs mounted for the test (needs root, as CI runs), almost full."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({done.stderr.strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_writes_to_a_full_disk_are_counted_and_leave_nothing_behind(full_tmpfs):
    disk = DiskCache(full_tmpfs / "model", 2**30, "m")
    disk.save(entry(512, width=16))  # ~130 KiB: does not fit
    assert disk.flush(10)
    assert disk.write_errors == 1 and not disk.index
    assert not list((full_tmpfs / "model").glob("*.safetensors")), "the partial file is removed"
    disk.save(entry(8))  # fits
    assert disk.flush(10) and len(disk.index) == 1 and disk.write_errors == 1


def written(folder: Path, e: Entry) -> Path:
    disk = DiskCache(folder, 2**30, "m")
    disk.save(e)
    assert disk.flush(10)
    [path] = folder.glob("*.safetensors")
    return path


def test_the_key_is_the_owners_alone_and_kept(tmp_path):
    DiskCache(tmp_path, 2**30, "m")
    key = tmp_path / "key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    assert DiskCache(tmp_path, 2**30, "m").key == key.read_bytes()
    before = key.read_bytes()
    key.chmod(0o644)  # others could read it: what it signed proves nothing any more
    assert DiskCache(tmp_path, 2**30, "m").key != before and key.stat().st_mode & 0o777 == 0o600


def test_a_token_id_changed_in_the_header_is_refused(tmp_path):
    path = written(tmp_path, entry(16))
    data = path.read_bytes()
    assert data.count(b"[0, 1, 2, 3,") == 1
    path.write_bytes(data.replace(b"[0, 1, 2, 3,", b"[0, 1, 2, 9,"))  # still parses, arrays untouched
    disk = DiskCache(tmp_path, 2**30, "m")
    changed = np.array([0, 1, 2, 9, *range(4, 16)])
    assert disk.fetch(changed, 0, 0.0) is None
    assert disk.rejected == 1 and not path.exists()


def test_a_file_signed_in_another_cache_folder_is_refused(tmp_path):
    path = written(tmp_path / "theirs", entry(16))
    ours = DiskCache(tmp_path / "ours", 2**30, "m")
    shutil.copy(path, ours.directory)
    disk = DiskCache(tmp_path / "ours", 2**30, "m")
    assert disk.fetch(np.arange(16), 0, 0.0) is None and disk.rejected == 1


def test_a_load_reports_progress_piece_by_piece(tmp_path):
    path = written(tmp_path, entry(64))
    pieces = []
    disk = DiskCache(tmp_path, 2**30, "m", progress=lambda: pieces.append(1))
    disk.piece = 4096
    [found] = disk.index
    assert disk.load(found, 0.0) is not None
    assert len(pieces) >= 2 * path.stat().st_size // 4096, "the file is read twice (checked, then loaded)"


@functools.cache
def original() -> tuple[bytes, bytes, Entry]:
    """A sound entry file, the key of the folder it was written in, and the entry."""
    e = entry(12)
    with tempfile.TemporaryDirectory() as folder:
        path = written(Path(folder), e)
        return path.read_bytes(), (Path(folder) / "key").read_bytes(), e


def load_all(data: bytes) -> list[Entry]:
    """Whatever a fresh disk tier loads from a folder (with the original's key) holding `data` as an entry file."""
    _, key, _ = original()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "key").write_bytes(key)
        os.chmod(Path(folder) / "key", 0o600)
        (Path(folder) / "entry.safetensors").write_bytes(data)
        disk = DiskCache(Path(folder), 2**30, "m")
        return [loaded for found in list(disk.index) if (loaded := disk.load(found, 0.0))]


def same(a: Entry, b: Entry) -> bool:
    return np.array_equal(a.tokens, b.tokens) and all(
        mx.array_equal(x.keys, y.keys).item() and mx.array_equal(x.values, y.values).item() and x.offset == y.offset
        for x, y in zip(a.layers, b.layers, strict=True)
    )


FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=bool(os.environ.get("CI")))


def test_the_original_file_loads():
    data, _, e = original()
    [loaded] = load_all(data)
    assert same(loaded, e)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_files_are_never_loaded(data):
    assert load_all(data) == []


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=8),
    st.one_of(st.none(), st.integers(0, 2**31)),
)
def test_mutated_files_are_never_loaded_as_anything_else(flips, cut):
    data, _, e = original()
    mutated = bytearray(data)
    for at, bits in flips:
        mutated[at % len(mutated)] ^= bits
    if cut is not None:
        mutated = mutated[: cut % len(mutated)]
    for loaded in load_all(bytes(mutated)):  # a flip that changes nothing that is read (JSON whitespace) may load
        assert same(loaded, e)
