"""Atomic, safe checkpoints on Accelerate's ``save_state`` and ``load_state``.

``<run>/checkpoints/step_<N>/`` is what ``save_state`` writes, plus ``config.yaml``, ``state.json`` and,
last, ``SHA256SUMS`` of every other file (README.md), whatever the process count. One whose bytes changed is
damaged, like one cut short: resume skips it and moves it aside. Why the rest stays ours: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, extract_model_from_parallel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel

from pegasus_dist.checksums import sums_problem, write_sums
from pegasus_dist.errors import CheckpointError
from pegasus_dist.model.adversaries import KINDS
from pegasus_dist.model.saved import (
    ADVERSARIES,
    EMA,
    MODEL,
    STATE,
    checkpoint_name,
    list_checkpoints,
    load_model_weights,
)
from pegasus_dist.training.ema import restore_ema
from pegasus_dist.training.state import MOVE_ASIDE, TrainState, parse_state

log = logging.getLogger("pegasus_dist.training.checkpoint")

CONFIG = "config.yaml"
OPTIMIZER = "optimizer.bin"
OLDER_OPTIMIZER = "optimizer.pt"  # of the versions before save_state, refused in one line
DAMAGED = "damaged-"  # the prefix of a damaged checkpoint moved aside; never pruned
# torch honours it over a torch.load(weights_only=False) call (:func:`_weights_only`).
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def newest_intact_checkpoint(root: Path, move_damaged: bool) -> Path | None:
    """The newest checkpoint under ``root`` whose files all read (``run.resume=auto``): a damaged one is
    moved aside (:func:`move_aside`, by the main process alone: ``move_damaged``), for a requeue to pass."""
    moved, found = [], None
    for folder in reversed(list_checkpoints(root)):
        if (problem := find_damage(folder)) is None:
            found = folder
            break
        if move_damaged:
            moved.append(f"{folder} is damaged ({problem}), moved to {move_aside(folder)}")
    if moved:
        log.warning("%s; %s", "; ".join(moved), f"resuming from {found}" if found
                    else "no complete checkpoint is left: starting from the beginning")
    return found


def move_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint ``damaged-step_N-<time>``, where neither a resume nor pruning looks."""
    aside = folder.parent / f"{DAMAGED}{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    folder.rename(aside)
    return aside


def find_damage(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when every file of it reads whole and finite
    (never unpickled). An older layout is refused in one line, not moved aside."""
    _refuse_older_layout(folder)
    try:
        state = parse_state(folder / STATE)
        _check_config(folder / CONFIG)
        if changed := sums_problem(folder, required=state.sums):
            raise CheckpointError(changed)
        for path in _files(folder):
            if path.suffix != ".safetensors":  # safe_open checks a safetensors header (_check_finite)
                _check_zip(path)
            _check_finite(path)
    except CheckpointError as err:
        return str(err)
    return None


def _check_config(path: Path) -> None:
    """Raises unless ``path`` reads as a config: a YAML mapping of sections (a resume compares its optim)."""
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path} is unreadable ({str(err).splitlines()[0]})") from None
    if not isinstance(saved, dict) or not all(isinstance(section, dict) for section in saved.values()):
        raise CheckpointError(f"{path} is not a config: a YAML mapping of sections")


def _files(folder: Path) -> list[Path]:
    """The weights and optimizer, which every checkpoint has, and whatever else torch or safetensors wrote."""
    try:
        found = {path for path in folder.iterdir() if path.suffix in (".safetensors", ".bin", ".pt", ".pkl")}
    except OSError as err:  # e.g. moved aside by the main process meanwhile
        raise CheckpointError(f"{folder}: {err}") from None
    return sorted(found | {folder / MODEL, folder / OPTIMIZER})


def _refuse_older_layout(folder: Path) -> None:
    if (folder / OLDER_OPTIMIZER).is_file():
        raise CheckpointError(f"{folder} was written by an older version of pegasus-dist "
                              f"({OLDER_OPTIMIZER}, not {OPTIMIZER}); resume it with that version, or start "
                              f"a new run from its weights with train.init_from={folder}")


def check_resumable(folder: Path, wanted: set[str]) -> None:
    """One line when a run training the adversaries ``wanted`` cannot resume ``folder`` (one side only)."""
    _refuse_older_layout(folder)
    held = held_adversaries(folder)
    for kind in sorted(wanted ^ held):  # the first raises
        what, key = KINDS[kind]
        article = "no" if kind in wanted else "an" if what[0] in "AEIOU" else "a"
        had = f"{key}=0" if kind in wanted else f"{key} > 0"
        raise CheckpointError(f"{folder} holds {article} {what} (its run had {had}); resume it with {had}, "
                              f"or start a new run with train.init_from={folder}")


def held_adversaries(folder: Path) -> set[str]:
    """The adversaries whose weights ``folder`` holds, by their names' first part (``critic.*``)."""
    path = folder / ADVERSARIES
    if not path.is_file():
        return set()
    try:  # safe_open checks that the file is as long as its header says
        with safe_open(path, framework="pt") as weights:
            # Names of no adversary are left to the load, which refuses them naming the file.
            return {name.split(".", 1)[0] for name in weights.keys()} & KINDS.keys()  # noqa: SIM118
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


def _check_finite(path: Path) -> None:
    """Raises naming the first NaN or Inf of ``path`` (weights, their average, an Adam, a loss scaler):
    resumed, it would stop the run again at its next step, and a requeued job would loop."""
    torch_file = path.suffix != ".safetensors"  # safetensors hold named tensors by their format
    try:
        if torch_file:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            bad = _first_nonfinite(state)
        else:
            with safe_open(path, framework="pt") as weights:
                bad = next((name for name in weights.keys()  # noqa: SIM118 (not a dict)
                            if _first_nonfinite(weights.get_tensor(name), name)), None)
    except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors and containers
        raise CheckpointError(f"{path}: refusing to load it ({_pickled(err)}); only tensors and plain "
                              "containers are accepted") from None
    except Exception as err:  # torch reports a malformed file in many types
        why = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot read {path}: {why}") from None
    if torch_file and not (isinstance(state, dict) and state):  # save_state writes a dict of fields
        raise CheckpointError(f"{path} holds no saved state (a {type(state).__name__}, not the dict of one)")
    if bad is not None:
        raise CheckpointError(f"{path}: {bad} holds NaN or Inf values (saved after the run diverged, or "
                              "changed before its sha256 was written)")


def _first_nonfinite(value: object, where: str = "") -> str | None:
    """The dotted name of the first NaN or Inf in a loaded state (``state.3.exp_avg_sq``), or None."""
    if isinstance(value, dict | list | tuple):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return next((bad for key, item in items
                     if (bad := _first_nonfinite(item, f"{where}.{key}" if where else str(key)))), None)
    if isinstance(value, torch.Tensor):
        return None if not value.is_floating_point() or torch.isfinite(value).all() else where
    return None if not isinstance(value, float) or math.isfinite(value) else where


def write_counters(folder: Path, state: TrainState, config_yaml: str) -> None:
    """The files of ours in a checkpoint: ``config.yaml``, ``state.json``, then ``SHA256SUMS`` of them all."""
    (folder / CONFIG).write_text(config_yaml)
    # sums: this writer always writes SHA256SUMS, also when the run resumed an older checkpoint.
    (folder / STATE).write_text(json.dumps(state.model_dump() | {"sums": True}, indent=2) + "\n")
    write_sums(folder)


def save_checkpoint(accelerator: Accelerator, state: TrainState, config_yaml: str, root: Path,
                    keep: int, before_counters: Callable[[Path, TrainState], None] | None = None,
                    ema: AveragedModel | None = None) -> Path:
    """Every rank calls this; returns the published ``step_<N>`` folder. The main process writes
    ``.tmp-step_<N>/``, renames it into place and prunes; a failed write (a full disk) is one
    CheckpointError on every rank. ``before_counters``: ``Hooks.during_save``."""
    final = root / checkpoint_name(state.step)
    # Already saved at this step (the cadence saved the last step)? The main process
    # decides for every rank: a rank that read another answer from a shared filesystem
    # would skip the broadcast below, and the ranks' collectives would go out of step.
    if broadcast_object_list([final.exists() if accelerator.is_main_process else None])[0]:
        return final
    failure = None
    if accelerator.is_main_process:
        tmp = root / f".tmp-{final.name}"
        try:
            _write(accelerator, state, config_yaml, tmp, before_counters, ema)
            os.replace(tmp, final)  # published under its final name: atomic on one filesystem
            fd = os.open(root, os.O_RDONLY)  # the rename survives a power cut once root is synced
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except (OSError, RuntimeError, SafetensorError) as err:  # torch reports a full disk as a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            failure = _write_failure(err, final, root)
        else:  # all but the newest ``keep`` checkpoints, and stale temporary folders
            for stale in [*list_checkpoints(root)[:-keep], *root.glob(".tmp-*")]:
                shutil.rmtree(stale)
    if failure := broadcast_object_list([failure])[0]:
        raise CheckpointError(failure)
    return final


def _write(accelerator: Accelerator, state: TrainState, config_yaml: str, tmp: Path,
           before_counters: Callable[[Path, TrainState], None] | None, ema: AveragedModel | None) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    with accelerator.register_save_state_pre_hook(_unwrapped_weights):
        accelerator.save_state(str(tmp))
    if ema is not None:
        # Contiguous: safetensors refuses the strided weights of train.channels_last.
        save_file({name: value.contiguous() for name, value in ema.module.state_dict().items()}, tmp / EMA)
    for path in tmp.glob("random_states_*.pkl"):  # no random draw of training needs them
        path.unlink()
    if before_counters is not None:
        before_counters(tmp, state)
    write_counters(tmp, state, config_yaml)


def _write_failure(err: Exception, final: Path, root: Path) -> str:
    """One line: which checkpoint, why (the first line of the error), the space left, what is safe."""
    why = (err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]).strip()
    previous = list_checkpoints(root)
    safe = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    free = shutil.disk_usage(root).free / 2**20 if root.exists() else 0
    size = sum(path.stat().st_size for path in previous[-1].iterdir()) / 2**20 if previous else 0
    needs = f", a checkpoint takes {size:.1f} MB" if previous else ""
    return (f"cannot write checkpoint {final}: {why} ({free:.0f} MB free there{needs}); {safe}: free "
            "space or make the run folder writable, then run the same command to resume")


def _unwrapped_weights(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
    """``save_state``'s pre-hook: the weights of the models inside DDP and torch.compile."""
    weights[:] = [extract_model_from_parallel(m, keep_torch_compile=False).state_dict() for m in models]


def restore_checkpoint(accelerator: Accelerator, folder: Path, ema: AveragedModel | None = None) -> None:
    """Load ``folder`` into what ``accelerator`` prepared, and ``ema`` (call :func:`check_resumable` first).
    All but the weights load weights-only, even where Accelerate asks for
    ``weights_only=False``: a pickled object is refused, never run."""
    try:
        with accelerator.register_load_state_pre_hook(_load_unwrapped_weights), _weights_only():
            accelerator.load_state(str(folder))
    except pickle.UnpicklingError as err:  # what weights_only raises for anything but tensors and containers
        raise CheckpointError(f"refusing to load a file of {folder}: {_pickled(err)}; only "
                              "tensors and plain containers are accepted") from None
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as err:  # a file missing or cut short
        # in a checkpoint named in run.resume, or a state of other fields (load_state_dict's errors)
        why = (str(err).splitlines() or [""])[0]
        raise CheckpointError(f"cannot load {folder}: {type(err).__name__} {why}; {MOVE_ASIDE}") from None
    if ema is not None:
        restore_ema(ema, folder)


def _pickled(err: pickle.UnpicklingError) -> str:
    """What weights_only refused, from its many-line message: the line naming the object."""
    why = next((line for line in str(err).splitlines() if "GLOBAL" in line), "a pickled object")
    return why.strip().rstrip(".")


def _load_unwrapped_weights(models: list[torch.nn.Module], folder: str) -> None:
    """``load_state``'s pre-hook: each model's weights through :func:`load_model_weights`, none left to it."""
    for index, model in enumerate(models):
        name = MODEL.replace(".", f"_{index}.") if index else MODEL  # as save_state names them
        load_model_weights(extract_model_from_parallel(model, keep_torch_compile=False), Path(folder), name)
    models.clear()


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """Every torch.load inside is weights-only, even where Accelerate asks for ``weights_only=False``."""
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        del os.environ[FORCE_WEIGHTS_ONLY]
        if before is not None:
            os.environ[FORCE_WEIGHTS_ONLY] = before
