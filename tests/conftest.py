"""Shared fixtures: one tiny synthetic shard set per session, and CLI runners."""

from __future__ import annotations

import pytest
from processes import BIN, run_bounded


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory):
    """shards/{mix,horse_bird,eval} from 480 synthetic images in shards of 50 (uneven)."""
    out = tmp_path_factory.mktemp("shards")
    done = run_bounded([str(BIN / "pegasus-dist"), "prepare", "--source", "synthetic:480",
                        "--out", str(out), "--shard-size", "50"], timeout=120)
    assert done.returncode == 0, done.stdout
    return out
