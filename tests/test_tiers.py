"""The fast tier's guard (tests/conftest.py): what it refuses, what it names, and whom it leaves alone."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path

import conftest
import pytest
import torch.distributed
from warm import WarmProcess


class Item:
    """What the guard reads of a pytest item: its id, its marks, its stash."""

    nodeid = "tests/test_x.py::test_y"

    def __init__(self, *marks: str) -> None:
        self.marks, self.stash = marks, pytest.Stash()

    def get_closest_marker(self, name: str) -> str | None:
        return name if name in self.marks else None


STARTS = {
    "subprocess": lambda: subprocess.run(["true"], check=True),
    "os.fork": lambda: os.fork(),
    "os.system": lambda: os.system("true"),
    "warm server": lambda: WarmProcess(["script.py"], Path.cwd(), {}),
    "multiprocessing": lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
    "init_process_group": lambda: torch.distributed.init_process_group("gloo", rank=0, world_size=1,
                                                                       init_method="tcp://127.0.0.1:1"),
    "new_group": lambda: torch.distributed.new_group([0]),
}


@pytest.mark.parametrize("start", STARTS)
def test_a_test_without_a_tier_mark_cannot_start_a_process_or_a_process_group(start):
    item = Item()
    patch = conftest._guarded(item)
    try:
        with pytest.raises(conftest.ProcessInFastTier) as refused:
            STARTS[start]()
    finally:
        patch.undo()
    # This item's guard, not the one around this very test, and the mark that lets it run.
    assert str(refused.value).startswith(f"{Item.nodeid} ") and start in str(refused.value)
    assert "mark the test @pytest.mark.process" in str(refused.value)
    assert item.stash[conftest._VIOLATION] == str(refused.value)  # failed even if swallowed


@pytest.mark.parametrize("mark", conftest.FULL_TIER)
def test_a_test_of_the_full_tier_is_left_alone(mark):
    before = [getattr(owner, name) for owner, name, _ in conftest._ENTRY_POINTS if hasattr(owner, name)]
    patch = conftest._guarded(Item(mark))
    try:
        assert [getattr(owner, name) for owner, name, _ in conftest._ENTRY_POINTS
                if hasattr(owner, name)] == before
    finally:
        patch.undo()
