"""train.ema_decay: the weights' moving average is saved, resumed to the bit, and what the sampler reads."""

from __future__ import annotations

import pytest
from helpers import SMOKE, TINY_ARGS, overrides
from safetensors.torch import load_file

from pegasus_dist.config import load_config
from pegasus_dist.errors import ConfigError
from pegasus_dist.evaluation.sampler import load_trained_model
from pegasus_dist.training.loop import train

pytestmark = pytest.mark.slow
EMA = ["train.ema_decay=0.9", "train.checkpoint_every=3", *TINY_ARGS]


def run(shards, runs, steps: int, *extra: str) -> None:
    train(load_config(SMOKE, overrides(shards, runs, steps, *EMA, *extra)))


# channels_last: the average's weights are strided as the model's, which safetensors refuses to save.
@pytest.mark.parametrize("layout", ["train.channels_last=false", "train.channels_last=true"])
def test_the_average_resumes_to_the_bit_and_is_what_the_sampler_reads(smoke_shards, tmp_path, layout):
    run(smoke_shards, tmp_path / "whole", 6, layout)
    run(smoke_shards, tmp_path / "cut", 3, layout)
    run(smoke_shards, tmp_path / "cut", 6, layout)  # resumes from step 3
    final = "pretrain/checkpoints/step_00000006"
    whole, resumed = (load_file(tmp_path / name / final / "ema.safetensors") for name in ("whole", "cut"))
    assert all((whole[k] == resumed[k]).all() for k in whole)  # to the bit
    weights = load_file(tmp_path / "whole" / final / "model.safetensors")
    assert weights.keys() == whole.keys()
    moved = [k for k in weights if weights[k].is_floating_point() and not (weights[k] == whole[k]).all()]
    assert len(moved) > len(weights) // 2  # an average, not the last step's weights
    _, model, _ = load_trained_model(tmp_path / "whole" / "pretrain", [])
    assert all((value == whole[key]).all() for key, value in model.state_dict().items())


def test_a_decay_of_one_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(SMOKE, ["train.ema_decay=1"])
