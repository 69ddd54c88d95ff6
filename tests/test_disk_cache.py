"""The disk tier's writer on its own: failed writes are counted and dropped, the queue is bounded, flush ends."""

import hashlib
import os
import subprocess
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
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
    [line] = [l for l in capfd.readouterr().err.splitlines() if "disk cache" in l]  # said once, not per entry
    assert line.startswith(f"disk cache: cannot write to {tmp_path / 'model'}")
    (tmp_path / "model").mkdir()
    disk.save(entry(16, first=1000))
    assert disk.flush(10) and len(disk.index) == 2, "the writer still runs and writes again once it can"


@pytest.fixture
def blocked_write(tmp_path):
    """A disk tier whose next write blocks (its temporary file is a FIFO no one reads yet), and the way to unblock it."""
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
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
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
    assert not list((full_tmpfs / "model").iterdir()), "the partial file is removed"
    disk.save(entry(8))  # fits
    assert disk.flush(10) and len(disk.index) == 1 and disk.write_errors == 1
