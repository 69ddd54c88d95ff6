"""The edit benchmark's task generator: each kind of change is applied, and only that change."""

import difflib
import random
import re

import pytest

from benchmarks.edit import counters, speculation
from benchmarks.edit_tasks import EDITS, edit_task


def changed(task):
    """The lines removed from and added to the file by the edit."""
    diff = list(difflib.ndiff(task.file.splitlines(), task.edited.splitlines()))
    return [d[2:] for d in diff if d.startswith("- ")], [d[2:] for d in diff if d.startswith("+ ")]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("kind", EDITS)
def test_each_edit_changes_what_its_instruction_says(kind, seed):
    task = edit_task(random.Random(seed), kind=kind)
    removed, added = changed(task)
    assert task.kind == kind or (kind in ("rename", "number") and task.kind == "delete")  # nothing to rename
    kind = task.kind
    assert task.file.endswith("\n") and task.edited.endswith("\n")
    assert task.file in task.messages()[0]["content"] and task.instruction in task.messages()[0]["content"]
    if kind == "rename":
        old, new = task.instruction.removeprefix("Rename ").split(" to ")
        new = new.split(".")[0]
        assert removed and all(new in line for line in added)
        assert [re.sub(rf"(?<!\w){new}(?!\w)", old, line) for line in added] == removed
    elif kind == "number":
        old, new = task.instruction.removeprefix("Change the number ").split(".")[0].split(" to ")
        assert len(removed) == len(added) == 1 and added[0] == removed[0].replace(old, new)
    elif kind == "add":
        assert removed == [] and len(added) == 1 and f"`{added[0].strip()}`" in task.instruction
    else:
        assert added == [] and len(removed) == 1 and f"`{removed[0].strip()}`" in task.instruction


def test_speculation_counters_read_from_metrics_or_not_available():
    page = (
        "# TYPE mlx_tui:spec_decode_num_drafts_total counter\n"
        "mlx_tui:spec_decode_num_drafts_total 10.0\n"
        "mlx_tui:spec_decode_num_draft_tokens_total 80.0\n"
        'mlx_tui:spec_decode_num_accepted_tokens_total{model="x"} 60.0\n'
        "mlx_tui:spec_decode_num_drafts_created 1.7e9\n"
    )
    before = {"drafts": 2.0, "draft_tokens": 16.0, "accepted": 12.0}
    spec = speculation(before, counters(page))
    assert spec["acceptance"] == 48 / 64 and spec["tokens_per_pass"] == 1 + 48 / 8
    absent = counters("mlx_tui:generation_tokens_total 5.0\n")
    assert speculation(absent, absent)["acceptance"] is None
    assert speculation(absent, counters(page))["tokens_per_pass"] == 1 + 60 / 10  # labelled: absent until counted
