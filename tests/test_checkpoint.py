"""Checkpoints: complete round trip, atomic publishing, pruning, and no pickle execution.

Some tests show first what Accelerate's save_state/load_state would do alone:
the reasons pegasus_dist/training/checkpoint.py keeps those parts its own.
"""

import json
import os
import pickle

import accelerate.accelerator
import pytest
import torch
from accelerate import Accelerator
from accelerate.checkpointing import load_custom_state
from accelerate.utils import ProjectConfiguration
from helpers import TINY
from safetensors.torch import load_file, save_file

from pegasus_dist.checksums import write_sums
from pegasus_dist.config import ModelConfig
from pegasus_dist.errors import CheckpointError
from pegasus_dist.model.saved import (
    ADVERSARIES,
    MODEL,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    resolve_checkpoint,
)
from pegasus_dist.model.vae import VAE
from pegasus_dist.training import checkpoint
from pegasus_dist.training.checkpoint import restore_checkpoint, save_checkpoint
from pegasus_dist.training.state import TrainState, read_state


def _setup(compile: bool = False, extra: bool = False):
    """A prepared model and Adam after one step; with ``extra``, a registered Adam too (ACAI's)."""
    accelerator = Accelerator(cpu=True)
    model = VAE(TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(torch.compile(model) if compile else model, optimizer)
    loss = model(torch.rand(2, 3, 32, 32)).logits.mean() if not compile else None
    if loss is not None:
        accelerator.backward(loss)
        optimizer.step()
    if extra:
        accelerator.register_for_checkpointing(torch.optim.Adam(VAE(TINY).parameters(), lr=1e-3))
    return accelerator, model, optimizer


def _exploit(marker):
    """An object whose unpickling creates ``marker``: proof that a load ran code of the file's choosing."""
    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return Exploit()


def test_round_trip_restores_weights_optimizer_and_counters(tmp_path):
    """No random state is kept: training draws only from generators seeded by the counters
    (tests/test_resume_replan.py shows a resumed run bit-equal with scrambled global RNGs)."""
    accelerator, model, optimizer = _setup()
    state = TrainState(phase="finetune", epoch=2, samples_done=80, global_batch=16, step=17,
                       wandb_run_id="abc")
    folder = save_checkpoint(accelerator, state, "x: 1\n", tmp_path, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == [
        "SHA256SUMS", "config.yaml", "model.safetensors", "optimizer.bin", "state.json"]

    accelerator2, model2, optimizer2 = _setup()
    restore_checkpoint(accelerator2, folder)
    assert read_state(folder) == state
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert optimizer2.state_dict()["state"][0]["exp_avg"].equal(
        optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert (folder / "config.yaml").read_text() == "x: 1\n"


def test_keeps_last_k_and_ignores_unfinished_saves(tmp_path):
    accelerator, _, _ = _setup()
    for step in (1, 2, 3, 4):
        save_checkpoint(accelerator, TrainState(phase="pretrain", step=step), "", tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    # A save killed before its rename leaves only a temporary folder behind.
    (tmp_path / ".tmp-step_00000005").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert resolve_checkpoint(tmp_path.parent / tmp_path.name / "step_00000004").is_dir()


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint_unlike_accelerates_naming(
        tmp_path, monkeypatch):
    """Why the folder, the rename and the pruning stay ours."""
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    # Accelerate's own naming with total_limit=1 deletes the last checkpoint before writing the next.
    project = ProjectConfiguration(project_dir=str(tmp_path / "theirs"), automatic_checkpoint_naming=True,
                                   total_limit=1)
    theirs = Accelerator(cpu=True, project_config=project)
    theirs.prepare(torch.nn.Linear(2, 2))
    theirs.save_state()
    with monkeypatch.context() as patched, pytest.raises(OSError):
        patched.setattr(accelerate.accelerator, "save_accelerator_state", disk_full)
        theirs.save_state()
    assert [p.name for p in (tmp_path / "theirs/checkpoints").iterdir()] == ["checkpoint_1"]
    assert not any((tmp_path / "theirs/checkpoints/checkpoint_1").iterdir())  # nothing to resume from

    accelerator, _, _ = _setup()
    first = save_checkpoint(accelerator, TrainState(phase="pretrain", step=1), "", tmp_path / "ours", keep=1)
    with pytest.raises(CheckpointError, match="No space left"):  # after save_state, before state.json
        save_checkpoint(accelerator, TrainState(phase="pretrain", step=2), "", tmp_path / "ours", keep=1,
                        before_counters=disk_full)
    assert list_checkpoints(tmp_path / "ours") == [first]
    restore_checkpoint(_setup()[0], first)


def test_the_weights_are_the_unwrapped_models_on_any_wrapper(tmp_path):
    """Why the weights go through our hooks: save_state keeps the wrapper's keys (torch.compile's
    _orig_mod. here, DDP's module. on several processes), which no plain VAE loads."""
    accelerator, _, _ = _setup(compile=True)
    accelerator.save_state(str(tmp_path / "theirs"))
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    assert all(name.startswith("_orig_mod.") for name in theirs)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_model_weights(VAE(TINY), tmp_path / "theirs")

    folder = save_checkpoint(accelerator, TrainState(phase="pretrain", step=1), "", tmp_path / "ours", keep=1)
    assert set(load_file(folder / "model.safetensors")) == set(VAE(TINY).state_dict())
    load_model_weights(VAE(TINY), folder)  # what the sampler, init_from and one process read
    restore_checkpoint(_setup(compile=True)[0], folder)
    restore_checkpoint(_setup()[0], folder)


def test_a_pickled_object_is_refused_not_executed(tmp_path):
    accelerator, _, _ = _setup()
    folder = save_checkpoint(accelerator, TrainState(phase="pretrain", step=1), "", tmp_path, keep=1)
    marker = tmp_path / "pwned"
    with open(folder / "optimizer.bin", "wb") as f:
        pickle.dump({"state": _exploit(marker), "param_groups": []}, f)
    with pytest.raises(CheckpointError, match="refusing to load a file of .*; only tensors and plain"):
        restore_checkpoint(accelerator, folder)
    assert not marker.exists()


def test_a_pickled_object_in_a_registered_state_is_refused_though_accelerate_runs_it(tmp_path):
    """Why every load is forced weights-only: load_state unpickles registered objects
    (ACAI's critic Adam) with weights_only=False."""
    accelerator, _, _ = _setup(extra=True)
    folder = save_checkpoint(accelerator, TrainState(phase="pretrain", step=1), "", tmp_path, keep=1)
    assert (folder / "custom_checkpoint_0.pkl").is_file()
    marker = tmp_path / "pwned"
    torch.save(_exploit(marker), folder / "custom_checkpoint_0.pkl")
    with pytest.raises(Exception):  # noqa: B017 - whatever follows, the command already ran
        load_custom_state(torch.optim.Adam(VAE(TINY).parameters()), str(folder), 0)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="refusing to load a file of"):
        restore_checkpoint(accelerator, folder)
    assert not marker.exists()
    assert checkpoint.FORCE_WEIGHTS_ONLY not in os.environ  # only while loading


def test_a_registered_state_comes_back(tmp_path):
    accelerator, _, _ = _setup(extra=True)
    (registered,) = accelerator._custom_objects
    registered.param_groups[0]["lr"] = 0.123
    folder = save_checkpoint(accelerator, TrainState(phase="pretrain", step=1), "", tmp_path, keep=1)
    accelerator2, _, _ = _setup(extra=True)
    restore_checkpoint(accelerator2, folder)
    assert accelerator2._custom_objects[0].param_groups[0]["lr"] == 0.123


def test_the_loss_scaler_comes_back(tmp_path):
    """fp16 runs only on a GPU: here a CPU GradScaler stands in for the one Accelerate makes there."""
    accelerator, _, _ = _setup()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1234.0)
    folder = save_checkpoint(accelerator, TrainState(phase="pretrain", step=1), "", tmp_path, keep=1)
    assert (folder / "scaler.pt").is_file()
    accelerator2, _, _ = _setup()
    accelerator2.scaler = torch.amp.GradScaler("cpu")
    restore_checkpoint(accelerator2, folder)
    assert accelerator2.scaler.get_scale() == 1234.0


def test_weights_of_another_shape_name_the_tensor(tmp_path):
    accelerator, _, _ = _setup()
    folder = save_checkpoint(accelerator, TrainState(phase="pretrain", step=1), "", tmp_path, keep=1)
    other = VAE(ModelConfig(channels=[4, 4, 8, 8], fc_dims=[16, 16, 8], latent_dim=6))
    with pytest.raises(CheckpointError, match="has shape .* another shape"):
        load_model_weights(other, folder)


def test_resolve_rejects_a_folder_without_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)


def test_state_json_holds_every_counter_by_name_and_reads_back(tmp_path):
    state = TrainState(phase="pretrain", epoch=1, samples_done=64, global_batch=32, step=9,
                       scaler_skipped_steps=1, nonfinite_skipped_steps=2, bad_samples_skipped=3,
                       wandb_run_id="r1", shards="mix@0123456789abcdef", data_seed=5)
    checkpoint.write_counters(tmp_path, state, "")
    assert json.loads((tmp_path / "state.json").read_text()) == {
        "phase": "pretrain", "epoch": 1, "samples_done": 64, "global_batch": 32, "step": 9,
        "scaler_skipped_steps": 1, "nonfinite_skipped_steps": 2, "bad_samples_skipped": 3,
        "wandb_run_id": "r1", "shards": "mix@0123456789abcdef", "data_seed": 5, "sums": True}
    assert read_state(tmp_path) == state


def test_a_checkpoint_of_a_run_resumed_from_before_checksums_requires_its_sums(tmp_path):
    older = TrainState(phase="pretrain", step=3, sums=False)  # as parsed from such a checkpoint
    checkpoint.write_counters(tmp_path, older, "")
    assert read_state(tmp_path).sums


def test_an_older_state_json_is_read_without_its_batches_done(tmp_path):
    """Older versions counted batches_done: checked like every counter, then dropped."""
    (tmp_path / "state.json").write_text('{"phase": "pretrain", "epoch": 2, "batches_done": 7}')
    assert read_state(tmp_path) == TrainState(phase="pretrain", epoch=2, sums=False)  # nor a SHA256SUMS
    (tmp_path / "state.json").write_text('{"phase": "pretrain", "batches_done": -7}')
    with pytest.raises(CheckpointError, match="field batches_done must be a whole number, 0 or more, got -7"):
        read_state(tmp_path)


def test_weights_of_another_dtype_are_refused_not_cast(tmp_path):
    """A float16 copy of the weights with its SHA256SUMS rewritten: load_state_dict would cast it silently."""
    accelerator, _, _ = _setup()
    folder = save_checkpoint(accelerator, TrainState(phase="pretrain", step=1), "", tmp_path, keep=1)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(folder / MODEL).items()},
              folder / MODEL)
    write_sums(folder)
    with pytest.raises(CheckpointError, match=f"{folder / MODEL}: .* is torch.float16, not"):
        load_model_weights(VAE(TINY), folder)


def test_weights_of_no_adversary_are_refused_in_one_line(tmp_path):
    save_file({"critic.w": torch.zeros(2), "extra.w": torch.zeros(2)}, tmp_path / ADVERSARIES)
    checkpoint.check_resumable(tmp_path, {"critic"})  # a KeyError once
    with pytest.raises(CheckpointError, match=r"does not fit the model: .* unexpected \[.*'extra.w'\]"):
        load_model_weights(torch.nn.Module(), tmp_path, ADVERSARIES)


def test_a_state_json_of_another_step_is_refused(tmp_path):
    """Copied from another checkpoint, SHA256SUMS rewritten: the run would train those steps again."""
    folder = tmp_path / "step_00000006"
    folder.mkdir()
    checkpoint.write_counters(folder, TrainState(phase="pretrain", step=3), "")
    with pytest.raises(CheckpointError, match="state.json: field step is 3, not its folder's"):
        read_state(folder)


def test_a_state_of_other_fields_is_refused_in_one_line(tmp_path):
    """Whole and finite, of other parameter groups (SHA256SUMS rewritten): Adam's own ValueError once."""
    accelerator, _, _ = _setup()
    folder = save_checkpoint(accelerator, TrainState(phase="pretrain", step=1), "", tmp_path, keep=1)
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.bin")
    write_sums(folder)
    with pytest.raises(CheckpointError, match=f"cannot load {folder}: ValueError .*parameter groups"):
        restore_checkpoint(_setup()[0], folder)
