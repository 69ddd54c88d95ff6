"""Transcripts at rest: private files, rotated at their bound so the total stays bounded; none without a directory."""

import json
import os
import stat

import pytest

from mlx_tui.engine.bus import EventBus
from mlx_tui.engine.events import Done, RawText, Started, Timings, Usage
from mlx_tui.engine.transcripts import Transcripts

pytestmark = pytest.mark.asyncio  # transcripts publish to the bus on the event loop's timers

PROMPT = "<|user|>What is the weather like in Paris today?<|assistant|>" * 8  # about 500 bytes


def record(transcripts: Transcripts, i: int):
    """One request's transcript, from opening to finishing, as the API records it."""
    t = transcripts.open(f"req_{i}", "openai", "test", {"messages": [{"role": "user", "content": f"question {i}"}]})
    transcripts.record(t, Started(prompt_tokens=120, cached_tokens=0, prompt_text=PROMPT))
    transcripts.record(t, RawText(f"answer {i}"))
    transcripts.record(t, Done("end", Usage(120, 0, 3), Timings(0.0, 0.1, 0.2)))
    transcripts.sent(t, json.dumps({"content": f"answer {i}"}))
    transcripts.finish(t)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_transcripts_rotate_at_their_bound_and_stay_private(tmp_path):
    directory = tmp_path / "data" / "transcripts"
    bound = 8192
    transcripts = Transcripts(EventBus(), directory, file_bytes=bound)
    current, rotated = directory / "transcripts.jsonl", directory / "transcripts.jsonl.1"
    for i in range(60):
        record(transcripts, i)
        files = {p.name: p.stat().st_size for p in directory.iterdir()}
        assert set(files) <= {current.name, rotated.name}, files
        assert all(size <= bound for size in files.values()), files
    assert rotated.exists(), "60 transcripts of about 1 KB each must have rotated the file"
    assert mode(current) == mode(rotated) == 0o600
    assert mode(directory) == 0o700

    kept = [json.loads(line) for path in (rotated, current) for line in path.read_text().splitlines()]
    ids = [t["id"] for t in kept]
    assert ids == [f"req_{i}" for i in range(60 - len(ids), 60)], "the newest, in order, without a gap"
    assert len(ids) < 30, "the oldest were removed"
    assert all(
        t["prompt"] == PROMPT and t["raw"] == f"answer {t['id'][4:]}" and t["stop_reason"] == "end" for t in kept
    )


async def test_without_a_directory_transcripts_stay_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    transcripts = Transcripts(EventBus(), None, keep=5)
    for i in range(8):
        record(transcripts, i)
    assert list(transcripts.items) == [f"req_{i}" for i in range(3, 8)], "the most recent, bounded in number"
    assert transcripts.items["req_7"].raw == "answer 7"
    assert not list(tmp_path.rglob("*")), "nothing may be written to disk"
