"""Atomic, safe checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step_<N>/`` holding:

- ``model.safetensors``: the weights and batch-norm statistics (safetensors,
  so loading never runs code);
- ``optimizer.pt``: Adam's state and the fp16 loss scaler, read back with
  ``torch.load(weights_only=True)``;
- ``rng/rank_<R>.pt``: every random state of each rank (Python, NumPy, torch
  CPU and CUDA), also ``weights_only``;
- ``state.json``: phase, epoch, batches done in that epoch, step counters and
  the W&B run id; ``config.yaml``: the resolved config of the run.

It is written into ``.tmp-step_<N>/`` and renamed into place only once every
rank has written its part, so a process killed mid-save leaves the previous
checkpoints intact, and a folder named ``step_<N>`` is always complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import typing
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pegasus_dist.config import Config, TrainConfig, load_config
from pegasus_dist.errors import CheckpointError
from pegasus_dist.model import VAE

log = logging.getLogger("pegasus_dist.checkpoint")

PREFIX = "step_"
FINISHED = "finished.json"  # in the run folder, written last by a phase that ended
NAME = re.compile(rf"{PREFIX}(\d+)")  # and exactly checkpoint_name(N): step_00000060, not step_60
DAMAGED = "damaged-"  # the prefix of a damaged checkpoint moved aside; never pruned
PHASES = typing.get_args(typing.get_type_hints(TrainConfig)["phase"])


@dataclass
class TrainState:
    """Counters that say where a phase stands; saved in ``state.json``."""

    phase: str
    epoch: int = 0  # the epoch in progress
    batches_done: int = 0  # batches of that epoch already trained
    step: int = 0  # training steps (batches) taken in this phase, skipped ones included
    scaler_skipped_steps: int = 0  # fp16 overflows: the loss scaler skipped the update
    nonfinite_skipped_steps: int = 0  # NaN/Inf losses skipped (train.on_nonfinite=skip)
    bad_samples_skipped: int = 0  # corrupt samples replaced (data.on_bad_sample=skip)
    wandb_run_id: str = ""


def is_complete(state: TrainState, cfg: Config) -> bool:
    """Whether a phase at ``state`` has nothing left to train under ``cfg``.

    The one definition of "done": ``train.epochs`` epochs trained, or
    ``train.max_steps`` (when set) steps taken. Raising either in the config
    makes a complete run incomplete again, and it trains on.
    """
    max_steps_reached = bool(cfg.train.max_steps) and state.step >= cfg.train.max_steps
    return state.epoch >= cfg.train.epochs or max_steps_reached


def mark_finished(run_dir: Path, checkpoint: Path) -> None:
    """Record that the phase's end-of-run work (grids, evaluation) is done for ``checkpoint``."""
    (run_dir / FINISHED).write_text(json.dumps({"checkpoint": checkpoint.name}) + "\n")


def is_finished(run_dir: Path, checkpoint: Path) -> bool:
    """Whether :func:`mark_finished` was reached for ``checkpoint``.

    A run killed or preempted after its final checkpoint but before its grids
    and evaluation were written is complete by its counters, not finished: a
    restart resumes from that checkpoint and only does the end-of-run work.
    """
    try:
        return json.loads((run_dir / FINISHED).read_text()).get("checkpoint") == checkpoint.name
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under ``root``, oldest first.

    Only folders named exactly as :func:`checkpoint_name` names them count:
    temporary folders, damaged ones moved aside and strays such as
    ``step_00000060.bak`` are ignored.
    """
    if not root.is_dir():
        return []
    found = {}
    for path in root.iterdir():
        match = NAME.fullmatch(path.name)
        if match and path.name == checkpoint_name(int(match[1])) and path.is_dir():
            found[int(match[1])] = path
    return [found[step] for step in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def newest_intact_checkpoint(root: Path, move_damaged: bool) -> Path | None:
    """The newest checkpoint under ``root`` whose files all read; newer damaged ones are skipped.

    ``run.resume=auto`` resumes from it, so that an unattended requeue gets
    past a damaged checkpoint instead of failing on it forever. Every rank
    calls this and makes the same choice: the checks only read, and only the
    main process (``move_damaged``) renames each damaged folder to
    ``damaged-step_N-<time>`` beside the others, where pruning never looks,
    and says so. A rank that checks a folder while it is being moved finds its
    files gone, so damaged too: the same choice.
    """
    moved: list[str] = []
    for folder in reversed(list_checkpoints(root)):
        problem = find_damage(folder)
        if problem is None:
            _warn_moved(moved, f"resuming from {folder}")
            return folder
        if move_damaged:
            aside = root / f"{DAMAGED}{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}"
            folder.rename(aside)
            moved.append(f"{folder} is damaged ({problem}), moved to {aside}")
    _warn_moved(moved, "no complete checkpoint is left: starting from the beginning")
    return None


def _warn_moved(moved: list[str], then: str) -> None:
    if moved:
        log.warning("%s; %s", "; ".join(moved), then)


def find_damage(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when every file of it reads whole.

    Reads, never unpickles: ``state.json`` with every field checked, the
    safetensors header and length of the weights, and the CRCs of
    ``optimizer.pt`` and of each rank's RNG file (zip archives, as torch.save
    writes them).
    """
    rng = sorted((folder / "rng").glob("rank_*.pt"))
    try:
        _parse_state(folder / "state.json")
        if not rng or rng[0].name != "rank_00000.pt":
            raise CheckpointError(f"{folder / 'rng' / 'rank_00000.pt'} is missing")
        _check_safetensors(folder / "model.safetensors")
        for path in [folder / "optimizer.pt", *rng]:
            _check_zip(path)
    except CheckpointError as err:
        return str(err)
    return None


def _check_safetensors(path: Path) -> None:
    """Raises unless the header reads and the file is as long as the header says."""
    try:
        with safe_open(path, framework="pt"):
            pass
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _check_zip(path: Path) -> None:
    """Raises unless ``path`` is a whole zip archive whose CRCs all match."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: {err}") from None
    if bad is not None:
        raise CheckpointError(f"{path}: member {bad} fails its CRC check")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint of a run folder."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    newest = latest_checkpoint(path / "checkpoints")
    if newest is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint (no state.json) nor a run folder with checkpoints; "
            "pass a runs/<name> folder or one of its checkpoints/step_* folders"
        )
    return newest


def save_rng_state(folder: Path, rank: int) -> None:
    """Write this rank's random states; every rank calls this."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "rng" / f"rank_{rank:05d}.pt")


def load_rng_state(folder: Path, rank: int) -> None:
    path = folder / "rng" / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the checkpoint was written by fewer processes; "
            "resume with the same number of processes or start a new run"
        )
    state = _safe_load(path)
    random.setstate(_to_tuple(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_main_files(
    folder: Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: TrainState,
    config_yaml: str,
) -> None:
    """The main process's part of a checkpoint: weights, optimizer, counters, config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()},
              folder / "model.safetensors")
    torch.save(optimizer_state, folder / "optimizer.pt")
    (folder / "config.yaml").write_text(config_yaml)
    (folder / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written temporary checkpoint visible under its final name."""
    os.replace(tmp, final)  # atomic on one filesystem
    _fsync_dir(final.parent)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and stale temporary folders."""
    stale = list_checkpoints(root)[:-keep] + [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    for path in stale:
        shutil.rmtree(path)


def read_state(folder: Path) -> TrainState:
    """``state.json``, every field checked: a bad one is one line naming the file and the field."""
    try:
        return _parse_state(folder / "state.json")
    except CheckpointError as err:
        raise CheckpointError(f"{err}; move that checkpoint aside to resume from the one before "
                              "(run.resume=auto does)") from None


def _parse_state(path: Path) -> TrainState:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # a bad encoding is a ValueError too
        raise CheckpointError(f"{path} is unreadable ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not an object of fields")
    if "phase" not in raw:  # the one field without a default (older checkpoints lack some others)
        raise CheckpointError(f"{path} has no field phase")
    hints = typing.get_type_hints(TrainState)
    for name, value in raw.items():
        problem = _bad_field(name, value, hints[name]) if name in hints else "is not a known field"
        if problem:
            raise CheckpointError(f"{path}: field {name} {problem}, got {value!r}")
    return TrainState(**raw)


def _bad_field(name: str, value: object, hint: type) -> str | None:
    """What is wrong with one field of ``state.json``, or None."""
    if name == "phase":
        return None if value in PHASES else f"must be one of {', '.join(PHASES)}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else "must be a whole number, 0 or more"
    return None if isinstance(value, hint) else f"must be a {hint.__name__}"


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load ``model.safetensors`` into ``model``, naming any shape mismatch."""
    path = folder / "model.safetensors"
    try:
        weights = load_file(path)
    except Exception as err:  # OSError, or safetensors' own SafetensorError
        raise CheckpointError(f"cannot read {path}: {err}") from None
    expected = model.state_dict()
    for name, tensor in weights.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[name].shape)}; the checkpoint comes from a model of another "
                "shape: use the model section of its config.yaml"
            )
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.load_state_dict(weights)


def load_optimizer_state(folder: Path) -> dict:
    return _safe_load(folder / "optimizer.pt")


def _safe_load(path: Path) -> dict:
    """torch.load restricted to tensors and plain containers: a pickled object is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only raises UnpicklingError for forbidden globals
        raise CheckpointError(
            f"refusing to load {path}: {str(err).splitlines()[0]}; "
            "only tensors and plain containers are accepted"
        ) from None


def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)


def _numpy_state_from_plain(state: tuple | list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _to_tuple(value: object) -> object:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config_yaml: str,
    root: Path,
    keep: int,
) -> Path:
    """Every rank calls this; returns the published ``step_<N>`` folder.

    Barriers order the steps: the main process makes the temporary folder,
    every rank writes its RNG state into it, then the main process writes the
    rest, renames it into place and prunes old checkpoints.
    """
    final = root / checkpoint_name(state.step)
    if final.exists():  # already saved at this step (e.g. epoch end == checkpoint_every)
        return final
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_rng_state(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else {}
        write_main_files(
            tmp,
            accelerator.unwrap_model(model, keep_torch_compile=False).state_dict(),
            {"optimizer": optimizer.state_dict(), "scaler": scaler},
            state,
            config_yaml,
        )
        publish(tmp, final)
        prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def restore_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    folder: Path,
) -> TrainState:
    """Load a checkpoint written by :func:`save_checkpoint` into a prepared model and optimizer."""
    load_model_weights(accelerator.unwrap_model(model, keep_torch_compile=False), folder)
    saved = load_optimizer_state(folder)
    optimizer.load_state_dict(saved["optimizer"])
    if accelerator.scaler is not None and saved["scaler"]:
        accelerator.scaler.load_state_dict(saved["scaler"])
    load_rng_state(folder, accelerator.process_index)
    return read_state(folder)


def load_trained_model(checkpoint: str | Path, overrides: list[str]) -> tuple[Config, VAE, Path]:
    """(config, model on its device, checkpoint folder) from a checkpoint or run folder."""
    folder = resolve_checkpoint(checkpoint)
    cfg = load_config(folder / "config.yaml", overrides)
    model = VAE(cfg.model)
    load_model_weights(model, folder)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    return cfg, model.to(device), folder
