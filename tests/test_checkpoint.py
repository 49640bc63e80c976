"""Checkpoints: complete round trip, atomic publishing, pruning, and no pickle execution."""

import os
import pickle

import pytest
import torch
from accelerate import Accelerator
from helpers import TINY

from pegasus_dist.checkpoint import (
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    resolve_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from pegasus_dist.config import ModelConfig
from pegasus_dist.errors import CheckpointError
from pegasus_dist.model import VAE


def _setup():
    accelerator = Accelerator(cpu=True)
    model = VAE(TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss = model(torch.rand(2, 3, 32, 32)).logits.mean()
    accelerator.backward(loss)
    optimizer.step()
    return accelerator, model, optimizer


def test_round_trip_restores_weights_optimizer_and_counters(tmp_path):
    """No random state is saved: training draws only from generators seeded by the counters
    (tests/test_resume_replan.py shows a resumed run bit-equal with scrambled global RNGs)."""
    accelerator, model, optimizer = _setup()
    state = TrainState(phase="finetune", epoch=2, samples_done=80, global_batch=16, step=17,
                       wandb_run_id="abc")
    folder = save_checkpoint(accelerator, model, optimizer, state, "x: 1\n", tmp_path, keep=2)
    assert not (folder / "rng").exists()

    accelerator2, model2, optimizer2 = _setup()
    restored = restore_checkpoint(accelerator2, model2, optimizer2, folder)
    assert restored == state
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert optimizer2.state_dict()["state"][0]["exp_avg"].equal(
        optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert (folder / "config.yaml").read_text() == "x: 1\n"


def test_keeps_last_k_and_ignores_unfinished_saves(tmp_path):
    accelerator, model, optimizer = _setup()
    for step in (1, 2, 3, 4):
        save_checkpoint(accelerator, model, optimizer, TrainState("pretrain", step=step), "",
                        tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    # A save killed before its rename leaves only a temporary folder behind.
    (tmp_path / ".tmp-step_00000005").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert resolve_checkpoint(tmp_path.parent / tmp_path.name / "step_00000004").is_dir()


def test_a_pickled_object_is_refused_not_executed(tmp_path):
    accelerator, model, optimizer = _setup()
    folder = save_checkpoint(accelerator, model, optimizer, TrainState("pretrain", step=1), "",
                             tmp_path, keep=1)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "optimizer.pt", "wb") as f:
        pickle.dump({"optimizer": Exploit(), "scaler": {}}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        restore_checkpoint(accelerator, model, optimizer, folder)
    assert not marker.exists()


def test_weights_of_another_shape_name_the_tensor(tmp_path):
    accelerator, model, optimizer = _setup()
    folder = save_checkpoint(accelerator, model, optimizer, TrainState("pretrain", step=1), "",
                             tmp_path, keep=1)
    other = VAE(ModelConfig(channels=[4, 4, 8, 8], fc_dims=[16, 16, 8], latent_dim=6))
    with pytest.raises(CheckpointError, match="has shape .* another shape"):
        load_model_weights(other, folder)


def test_resolve_rejects_a_folder_without_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)
