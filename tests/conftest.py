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


@pytest.fixture(scope="session")
def quality_shards(tmp_path_factory):
    """1,500 synthetic images with a tenth held out: enough held-out horses and birds to score against."""
    out = tmp_path_factory.mktemp("quality-shards")
    done = run_bounded([str(BIN / "pegasus-dist"), "prepare", "--source", "synthetic:1500",
                        "--out", str(out), "--eval-fraction", "0.1"], timeout=120)
    assert done.returncode == 0, done.stdout
    return out


@pytest.fixture(scope="session")
def quality_classifier(quality_shards, tmp_path_factory):
    """The quality classifier trained on ``quality_shards`` (seconds), as (folder, classifier.json)."""
    from pegasus_dist.classifier import train_classifier

    folder = tmp_path_factory.mktemp("classifier")
    return folder, train_classifier(quality_shards, folder, epochs=3, batch_size=64)
