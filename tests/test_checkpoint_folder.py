"""Edge cases of run and checkpoint folders: strays, bad state.json, damage, run names."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import SMOKE, TINY, Trained, cli_here, files_capped_at, written_before_checksums
from processes import BIN, REPO, run_bounded, run_ranks
from safetensors.torch import load_file, save_file

from pegasus_dist.checksums import write_sums
from pegasus_dist.config import Config, LossConfig, PrepareConfig, load_config
from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.data.prepare import prepare
from pegasus_dist.errors import CheckpointError, ConfigError
from pegasus_dist.model.adversaries import Adversaries
from pegasus_dist.model.saved import (
    MODEL,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    resolve_checkpoint,
)
from pegasus_dist.model.vae import VAE
from pegasus_dist.training.checkpoint import (
    check_resumable,
    find_damage,
    newest_intact_checkpoint,
    save_checkpoint,
)
from pegasus_dist.training.ema import build_ema
from pegasus_dist.training.state import FINISHED, TrainState, is_finished, read_state


def save_steps(root: Path, *steps: int) -> list[Path]:
    """Checkpoints after an Adam step, with adversaries, average and (fp16's) scalers: every kind of file."""
    accelerator = Accelerator(cpu=True)
    model = VAE(TINY)
    adversaries = Adversaries(Config(model=TINY, loss=LossConfig(acai_weight=1, patch_gan_weight=1)))
    optimizers = [torch.optim.Adam(module.parameters(), lr=1e-3) for module in (model, adversaries)]
    accelerator.prepare(model, optimizers[0])
    accelerator.prepare_model(adversaries)
    accelerator.register_for_checkpointing(optimizers[1])
    accelerator.scaler = torch.amp.GradScaler("cpu")
    accelerator.register_for_checkpointing(torch.amp.GradScaler("cpu"))
    for module, optimizer in zip((model, adversaries), optimizers, strict=True):
        for param in module.parameters():
            param.grad = torch.ones_like(param)
        optimizer.step()
    config = Config(model=TINY).to_yaml()
    return [save_checkpoint(accelerator, TrainState(phase="pretrain", step=step), config, root,
                            keep=len(steps), ema=build_ema(model, 0.9)) for step in steps]


def test_only_exact_step_names_are_checkpoints(tmp_path):
    (good,) = save_steps(tmp_path, 50)
    for stray in ("step_00000060.bak", "step_60", "step_000000070", "step_0000008x"):
        (tmp_path / stray).mkdir()
        (tmp_path / stray / "state.json").write_text('{"phase": "pretrain", "step": 60}')
    (tmp_path / "step_00000090").write_text("a file, not a folder")
    assert list_checkpoints(tmp_path) == [good]
    assert latest_checkpoint(tmp_path) == good


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"phase": "pretrain", "step": "sixty"}, "field step must be a whole number, 0 or more, got 'sixty'"),
        ({"phase": "pretrain", "epoch": -1}, "field epoch must be a whole number, 0 or more, got -1"),
        ({"phase": "pretrain", "batches_done": 2.5}, "field batches_done must be a whole number"),
        ({"phase": "pretrain", "step": True}, "field step must be a whole number, 0 or more, got True"),
        ({"phase": "warmup"}, "field phase must be one of pretrain, finetune, got 'warmup'"),
        ({"phase": "pretrain", "wandb_run_id": 7}, "field wandb_run_id must be a str, got 7"),
        ({"phase": "pretrain", "steps": 3}, "field steps is not a known field"),
        ({"step": 3}, "has no field phase"),
        ([1, 2], "holds a list, not an object of fields"),
    ],
)
def test_every_field_of_state_json_is_checked_in_one_line(tmp_path, state, message):
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as refused:
        read_state(tmp_path)
    assert f"{tmp_path / 'state.json'}" in str(refused.value) and message in str(refused.value)
    assert "\n" not in str(refused.value)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _overwrite(path: Path, data: bytes, at: float = 0.5) -> None:
    """``data`` over ``path``'s bytes from ``at`` of its length: the same length, the header intact."""
    raw = bytearray(path.read_bytes())
    start = int(len(raw) * at)
    raw[start : start + len(data)] = data
    path.write_bytes(bytes(raw))


def _flip(path: Path, count: int = 64) -> None:
    """``count`` bytes from the middle of ``path`` inverted."""
    raw = path.read_bytes()
    _overwrite(path, bytes(b ^ 0xFF for b in raw[len(raw) // 2 :][:count]))


DAMAGES = {
    "truncated weights": lambda c: _truncate(c / "model.safetensors"),
    "missing optimizer": lambda c: (c / "optimizer.bin").unlink(),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.bin"),
    "empty optimizer state": lambda c: (c / "optimizer.bin").write_bytes(b""),
    "truncated critic": lambda c: _truncate(c / "model_1.safetensors"),
    "truncated critic Adam": lambda c: _truncate(c / "custom_checkpoint_0.pkl"),
    "missing weights": lambda c: (c / "model.safetensors").unlink(),
    "bad state.json": lambda c: (c / "state.json").write_text('{"phase": "pretrain", "step": "sixty"}'),
    "state.json cut short": lambda c: _truncate(c / "state.json"),
    # Damage that keeps every file's format: only the checksums see it.
    "64 bytes flipped in the weights": lambda c: _flip(c / "model.safetensors"),
    "NaN bytes in the weights": lambda c: _overwrite(c / "model.safetensors", b"\x00\x00\xc0\x7f" * 4),
    "bytes flipped in the critic": lambda c: _flip(c / "model_1.safetensors", 8),
    "bytes flipped in the optimizer": lambda c: _flip(c / "optimizer.bin", 16),
    "another step in state.json": lambda c: (c / "state.json").write_text('{"phase": "pretrain", "step": 7}'),
    "a pickle planted for Adam": lambda c: (c / "custom_checkpoint_0.pkl").write_bytes(
        pickle.dumps(os.system)),
    "a pickled object in Adam's zip, sums rewritten": lambda c: (
        torch.save({"state": {0: {"exp_avg": os.system}}, "param_groups": []}, c / "optimizer.bin"),
        write_sums(c)),
    "a state.json of another step, sums rewritten": lambda c: (
        (c / "state.json").write_text('{"phase": "pretrain", "step": 3}'), write_sums(c)),
    "a list for Adam, sums rewritten": lambda c: (torch.save([1, 2], c / "optimizer.bin"), write_sums(c)),
    "no fields in the critic's Adam, sums rewritten": lambda c: (
        torch.save({}, c / "custom_checkpoint_0.pkl"), write_sums(c)),
    "a file added": lambda c: (c / "extra.pkl").write_bytes(pickle.dumps({})),
    "SHA256SUMS damaged": lambda c: (c / "SHA256SUMS").write_text("not a checksum line\n"),
    "SHA256SUMS removed": lambda c: (c / "SHA256SUMS").unlink(),
    "SHA256SUMS removed, weights flipped": lambda c: ((c / "SHA256SUMS").unlink(),
                                                      _flip(c / "model.safetensors")),
    "config.yaml of NUL bytes": lambda c: (c / "config.yaml").write_bytes(b"\0" * 64),
    "config.yaml a YAML list": lambda c: (c / "config.yaml").write_text("- 1\n- 2\n"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_checkpoints_are_moved_aside_by_the_main_process_only(tmp_path, damage, caplog):
    older, newer = save_steps(tmp_path, 3, 6)
    DAMAGES[damage](newer)
    before = {p.relative_to(newer): p.read_bytes() for p in newer.rglob("*") if p.is_file()}
    # Another rank skips it without moving anything: the same choice, read-only.
    assert newest_intact_checkpoint(tmp_path, move_damaged=False) == older
    assert newer.is_dir()
    assert newest_intact_checkpoint(tmp_path, move_damaged=True) == older
    (aside,) = tmp_path.glob("damaged-step_00000006-*")
    assert not newer.exists()
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == before
    assert f"{newer} is damaged (" in caplog.text
    assert f"moved to {aside}; resuming from {older}" in caplog.text
    assert list_checkpoints(tmp_path) == [older]  # never pruned, never taken for a checkpoint again


def test_with_every_checkpoint_damaged_the_phase_starts_over_keeping_them(tmp_path, caplog):
    for folder in save_steps(tmp_path, 3, 6):
        _truncate(folder / "model.safetensors")
    assert newest_intact_checkpoint(tmp_path, move_damaged=True) is None
    assert len(list(tmp_path.glob("damaged-step_*"))) == 2
    assert "no complete checkpoint is left: starting from the beginning" in caplog.text


def test_sha256sums_lists_every_file_as_sha256sum_writes_it(tmp_path):
    (folder,) = save_steps(tmp_path, 3)
    files = sorted(p for p in folder.iterdir() if p.name != "SHA256SUMS")
    assert {"model.safetensors", "optimizer.bin", "config.yaml", "state.json"} <= {p.name for p in files}
    expected = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files)
    assert (folder / "SHA256SUMS").read_text() == expected


def _spoil(path: Path, value: float) -> str:
    """``value`` in ``path``'s last float (of a tensor; a scaler's scale), saved; its name in a message."""
    if path.suffix == ".safetensors":
        tensors = load_file(path)
        name = [key for key, tensor in tensors.items() if tensor.is_floating_point()][-1]
        tensors[name].view(-1)[0] = value
        save_file(tensors, path)
        return name
    state = torch.load(path, weights_only=True)
    if "state" in state:  # an Adam: its last parameter's second moment
        last = max(state["state"])
        state["state"][last]["exp_avg_sq"].view(-1)[0] = value
        name = f"state.{last}.exp_avg_sq"
    else:
        state["scale"], name = value, "scale"
    torch.save(state, path)
    return name


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
@pytest.mark.parametrize("file", ["model.safetensors", "ema.safetensors", "model_1.safetensors",
                                  "optimizer.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl",
                                  "scaler.pt"])
def test_a_nan_or_inf_saved_in_any_file_moves_the_checkpoint_aside(tmp_path, caplog, file, value):
    """As a run diverged between sync points saves it: resumed, it would stop again, and a requeue loop."""
    older, newer = save_steps(tmp_path, 3, 6)
    name = _spoil(newer / file, value)
    write_sums(newer)  # listed as saved: the finite check, not the checksums, must catch it
    problem = (f"{newer / file}: {name} holds NaN or Inf values (saved after the run diverged, or changed "
               "before its sha256 was written)")
    assert find_damage(newer) == problem  # run.resume=<it> refuses it in this line
    assert newest_intact_checkpoint(tmp_path, move_damaged=True) == older
    (aside,) = tmp_path.glob("damaged-step_00000006-*")
    (warning,) = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert warning == f"{newer} is damaged ({problem}), moved to {aside}; resuming from {older}"


def test_a_checkpoint_written_before_checksums_still_resumes_and_starts_runs(tmp_path):
    (folder,) = save_steps(tmp_path, 3)
    written_before_checksums(folder)
    assert newest_intact_checkpoint(tmp_path, move_damaged=True) == folder
    load_model_weights(VAE(TINY), folder)  # train.init_from, sample and eval


def test_sample_eval_and_init_from_refuse_a_checkpoint_whose_checksums_were_removed(tmp_path):
    (folder,) = save_steps(tmp_path, 3)
    (folder / "SHA256SUMS").unlink()
    for load in (resolve_checkpoint, lambda f: load_model_weights(VAE(TINY), f)):
        with pytest.raises(CheckpointError, match=r"SHA256SUMS is missing \(removed after the checkpoint "
                                                  r"was written\); use another checkpoint of the run"):
            load(folder)


def test_sample_eval_and_init_from_refuse_changed_weights_naming_the_file(tmp_path):
    (folder,) = save_steps(tmp_path, 3)
    load_model_weights(VAE(TINY), folder)
    _flip(folder / "model.safetensors")
    with pytest.raises(CheckpointError) as refused:
        load_model_weights(VAE(TINY), folder)
    assert str(refused.value) == (f"{folder / 'model.safetensors'} does not match its sha256 in "
                                  f"{folder / 'SHA256SUMS'} (changed after it was written); use another "
                                  "checkpoint of the run")


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_one_before(tmp_path):
    (older,) = save_steps(tmp_path, 3)
    with files_capped_at(2000), pytest.raises(CheckpointError) as refused:
        save_steps(tmp_path, 6)
    assert str(refused.value).startswith(f"cannot write checkpoint {tmp_path / 'step_00000006'}: ")
    assert re.search(r"\(\d+ MB free there, a checkpoint takes \d+\.\d MB\); ", str(refused.value))
    assert str(refused.value).endswith(f"MB); {older} is intact: free space or make the run "
                                       "folder writable, then run the same command to resume")
    assert "\n" not in str(refused.value)
    assert list_checkpoints(tmp_path) == [older] and not list(tmp_path.glob(".tmp-*"))
    assert newest_intact_checkpoint(tmp_path, move_damaged=False) == older


def test_a_checkpoint_of_the_older_layout_is_refused_in_one_line_not_moved_aside(tmp_path):
    (folder,) = save_steps(tmp_path, 3)
    (folder / "optimizer.bin").rename(folder / "optimizer.pt")  # where versions before save_state kept Adam
    message = (f"{folder} was written by an older version of pegasus-dist (optimizer.pt, not "
               "optimizer.bin); resume it with that version, or start a new run from its weights "
               f"with train.init_from={folder}")
    for refusal in (lambda: newest_intact_checkpoint(tmp_path, move_damaged=True),
                    lambda: check_resumable(folder, {"critic", "discriminator"})):
        with pytest.raises(CheckpointError) as refused:
            refusal()
        assert str(refused.value) == message
    assert list_checkpoints(tmp_path) == [folder]


def test_an_adversary_on_one_side_only_is_refused_in_one_line(tmp_path):
    (folder,) = save_steps(tmp_path, 3)
    check_resumable(folder, {"critic", "discriminator"})  # both held, both wanted
    with pytest.raises(CheckpointError, match=r"holds an ACAI critic .*acai_weight > 0, or start a new run"):
        check_resumable(folder, {"discriminator"})
    with pytest.raises(CheckpointError,
                       match=r"holds a patch discriminator .*patch_gan_weight > 0, or start a new run"):
        check_resumable(folder, {"critic"})
    (folder / "model_1.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no ACAI critic .*acai_weight=0, or start a new run"):
        check_resumable(folder, {"critic"})
    with pytest.raises(CheckpointError,
                       match=r"holds no patch discriminator .*patch_gan_weight=0, or start a new run"):
        check_resumable(folder, {"discriminator"})


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/abs/path", "../elsewhere"])
def test_run_names_that_leave_the_output_folder_are_refused(name):
    with pytest.raises(ConfigError, match=r"run.name must be a plain folder name .*got"):
        load_config(SMOKE, [f"run.name={name}"])


def test_a_run_name_too_long_for_a_folder_is_refused(tmp_path):
    load_config(SMOKE, [f"run.name={'é' * 127}"])  # 254 bytes: a folder can hold it
    (tmp_path / ("é" * 127)).mkdir()
    with pytest.raises(ConfigError, match="run.name must be at most 255 bytes, the most a folder name holds"):
        load_config(SMOKE, [f"run.name={'é' * 128}"])


def test_a_run_name_read_under_the_c_locale_is_measured_in_its_bytes(tmp_path):
    """Under LC_ALL=C, Python holds "é" typed in a shell as two surrogates (PEP 383): still a name."""
    name = b"p\xc3\xa9gase".decode("ascii", "surrogateescape")
    assert load_config(SMOKE, [f"run.name={name}"]).run.name == name
    (tmp_path / name).mkdir()
    assert [p.name.encode("utf-8", "surrogateescape") for p in tmp_path.iterdir()] == [b"p\xc3\xa9gase"]


def test_a_negative_memory_limit_is_refused():
    with pytest.raises(ConfigError, match="data.memory_limit_mb must be 0 or more"):
        load_config(SMOKE, ["data.memory_limit_mb=-5"])


def on_two_ranks(run: Trained, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """``run`` continued on 2 gloo processes of batch 8 (its global batch of 16), to its end."""
    argv = [str(REPO / "pegasus_dist/train.py"), "--config", SMOKE, *run.overrides, "data.batch_size=8",
            f"train.max_steps={steps}", *extra]
    return run_ranks(argv, 2, timeout=300)


def test_a_requeue_gets_past_a_damaged_newest_checkpoint_on_every_rank(checkpointed_run):
    checkpoints = checkpointed_run.pretrain / "checkpoints"
    _flip(checkpoints / "step_00000006" / "model.safetensors")  # bit rot: every header still reads

    again = on_two_ranks(checkpointed_run, 9)
    assert again.returncode == 0, again.stdout[-3000:]
    (aside,) = checkpoints.glob("damaged-step_00000006-*")
    (warning,) = [line for line in again.stdout.splitlines() if "is damaged" in line]  # rank 0 says it
    assert f"{checkpoints}/step_00000006 is damaged ({checkpoints}/step_00000006/model.safetensors does " \
        "not match its sha256" in warning and f"moved to {aside}; resuming from {checkpoints}/step_00000003" \
        in warning
    assert f"resumed from {checkpoints}/step_00000003" in again.stdout
    assert [c.name for c in list_checkpoints(checkpoints)] == [f"step_0000000{n}" for n in (3, 6, 9)]

    # A requeue never loops: the same command after the next damage (config.yaml) gets further.
    (checkpoints / "step_00000009" / "config.yaml").write_bytes(b"\0" * 64)
    third = on_two_ranks(checkpointed_run, 12)
    assert third.returncode == 0, third.stdout[-3000:]
    assert f"resumed from {checkpoints}/step_00000006" in third.stdout
    assert [c.name for c in list_checkpoints(checkpoints)][-1] == "step_00000012"

    # A checkpoint named on the command line is the user's choice: its damage is an error, one line.
    (checkpoints / "step_00000012" / "state.json").write_text('{"phase": "pretrain", "step": "sixty"}')
    named = on_two_ranks(checkpointed_run, 15, f"run.resume={checkpoints}/step_00000012")
    errors = [line for line in named.stdout.splitlines() if line.startswith("error: ")]
    assert named.returncode != 0 and len(errors) == 1, named.stdout[-3000:]  # said once, by the main process
    named_folder = checkpoints / "step_00000012"
    assert (f"{named_folder}/state.json does not match its sha256 in {named_folder}/SHA256SUMS (changed "
            "after it was written)") in errors[0]


@pytest.mark.parametrize("other", ["seed", "shards"])
def test_resuming_on_other_data_is_refused_naming_both_unless_allowed(checkpointed_run, smoke_shards, capsys,
                                                                       tmp_path, other):
    trained = f"mix@{load_manifest(smoke_shards / 'mix').generation}"
    if other == "shards":  # a new `prepare` of the same sources: another generation
        prepare(PrepareConfig(out=str(tmp_path), sources=["synthetic:480"], shard_size=50, seed=1), "tests")
    change = ["data.seed=1"] if other == "seed" else [f"data.shards={tmp_path}"]
    reads = f"mix@{load_manifest(tmp_path / 'mix').generation}" if other == "shards" else trained
    train = ["train", "--config", SMOKE, *checkpointed_run.overrides, "train.max_steps=9", *change]
    newest = checkpointed_run.pretrain / "checkpoints/step_00000006"
    code, out = cli_here(capsys, *train)  # the console script, in this process
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, out[-3000:]
    seed = 1 if other == "seed" else 0
    assert (f"{newest} was trained on shards {trained} with data.seed=0, this run reads {reads} with "
            f"data.seed={seed}; resume on the same shards and seed, or set data.resume_on_other_data=true"
            in errors[0]), errors[0]
    code, out = cli_here(capsys, *train, "data.resume_on_other_data=true")
    assert code == 0, out[-3000:]
    assert "continuing on these (data.resume_on_other_data=true)" in out
    state = read_state(checkpointed_run.pretrain / "checkpoints/step_00000009")
    assert (state.shards, state.data_seed) == (reads, seed)


def test_sample_and_eval_refuse_a_checkpoint_whose_config_changed(tmp_path):
    (folder,) = save_steps(tmp_path, 3)
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: 1", 1))  # still a valid config
    with pytest.raises(CheckpointError, match=f"{config} does not match its sha256"):
        resolve_checkpoint(folder)


@pytest.mark.parametrize("damage", [b"\0" * 40, b'["a list"]', b'{"checkpoint": "step_0', b"{}", b"null",
                                    b'"text"'])
def test_a_damaged_finished_json_redoes_the_end_of_the_phase_and_says_so(tmp_path, caplog, damage):
    """finished.json is the one file of the run folder that steers a restart: unreadable, the
    restart redoes the phase's end (grids, held-out evaluation) rather than skip it, in one warning."""
    (tmp_path / FINISHED).write_text(json.dumps({"checkpoint": "step_00000006"}))
    assert is_finished(tmp_path, tmp_path / "step_00000006") and not caplog.text
    (tmp_path / FINISHED).write_bytes(damage)
    assert not is_finished(tmp_path, tmp_path / "step_00000006")
    assert f"{tmp_path / FINISHED} is unreadable (" in caplog.text
    assert "doing the end of the phase again" in caplog.text
    caplog.clear()
    (tmp_path / FINISHED).unlink()  # a run that never finished: nothing to say
    assert not is_finished(tmp_path, tmp_path / "step_00000006") and not caplog.text


def test_weights_that_do_not_fit_their_own_model_are_moved_aside_so_a_requeue_gets_further(checkpointed_run):
    """Weights of another dtype, their checksums rewritten to match: every file reads, but none
    loads into the model the checkpoint's config.yaml describes. A requeue must not fail the same way."""
    checkpoints = checkpointed_run.pretrain / "checkpoints"
    newest = checkpoints / "step_00000006"
    save_file({k: v.half() for k, v in load_file(newest / MODEL).items()}, newest / MODEL)
    write_sums(newest)
    command = [str(BIN / "pegasus-dist"), "train", "--config", SMOKE, *checkpointed_run.overrides,
               "train.max_steps=9"]

    # Another model in this run's config is the user's change: refused, the checkpoint left in place.
    changed = run_bounded([*command, "model.latent_dim=5"], timeout=300)
    assert changed.returncode == 2 and "moved it" not in changed.stdout, changed.stdout[-3000:]
    assert "Traceback" not in changed.stdout
    assert newest.is_dir()

    first = run_bounded(command, timeout=300)
    errors = [line for line in first.stdout.splitlines() if line.startswith("error: ")]
    assert first.returncode == 2 and len(errors) == 1, first.stdout[-3000:]
    (aside,) = checkpoints.glob("damaged-step_00000006-*")
    assert f"{newest}/{MODEL}: " in errors[0] and "is torch.float16" in errors[0]
    assert f"moved it to {aside}: run the same command again" in errors[0]
    second = run_bounded(command, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"resumed from {checkpoints}/step_00000003" in second.stdout
    assert [c.name for c in list_checkpoints(checkpoints)][-1] == "step_00000009"
