"""Shared fixtures: one tiny synthetic shard set per session, and CLI runners."""

from __future__ import annotations

import pytest
from processes import BIN, run_bounded


def _prepare(out, *options: str):
    done = run_bounded([str(BIN / "pegasus-dist"), "prepare", "--out", str(out), *options], timeout=120)
    assert done.returncode == 0, done.stdout
    return out


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory):
    """shards/{mix,horse_bird,eval} from 480 synthetic images in shards of 50 (uneven)."""
    return _prepare(tmp_path_factory.mktemp("shards"), "--source", "synthetic:480", "--shard-size", "50")


@pytest.fixture(scope="session")
def quality_shards(tmp_path_factory):
    """1,500 synthetic images with a tenth held out: enough held-out horses and birds to score against."""
    return _prepare(tmp_path_factory.mktemp("quality-shards"), "--source", "synthetic:1500",
                    "--eval-fraction", "0.1")


@pytest.fixture(scope="session")
def quality_classifier(quality_shards, tmp_path_factory):
    """The quality classifier trained on ``quality_shards`` (seconds), as (folder, classifier.json)."""
    from pegasus_dist.config import QualityConfig
    from pegasus_dist.evaluation.classifier import train_classifier

    folder = tmp_path_factory.mktemp("classifier")
    quality = QualityConfig(classifier_epochs=3, classifier_batch_size=64)
    return folder, train_classifier(quality_shards, folder, quality)
