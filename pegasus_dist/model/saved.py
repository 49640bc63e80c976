"""A trained model on disk, for its readers (sampler, ``eval``, ``train.init_from``): where a
checkpoint's files are, its weights loaded by name; writing them is ``training.checkpoint``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from pegasus_dist.checksums import sums_problem
from pegasus_dist.errors import CheckpointError

PREFIX = "step_"
STATE = "state.json"
MODEL = "model.safetensors"  # the first model prepared; Accelerate names the others model_<i>
ADVERSARIES = "model_1.safetensors"  # the critic and patch discriminator, prepared second when on
EMA = "ema.safetensors"  # the VAE's weights averaged over steps (train.ema_decay > 0)
NAME = re.compile(rf"{PREFIX}(\d+)")  # and exactly checkpoint_name(N): step_00000060, not step_60


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under ``root``, oldest first: only folders named exactly ``step_<N>``."""
    if not root.is_dir():
        return []
    found = {int(m[1]): path for path in root.iterdir() if (m := NAME.fullmatch(path.name))
             and path.name == checkpoint_name(int(m[1])) and path.is_dir()}
    return [found[step] for step in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    return next(reversed(list_checkpoints(root)), None)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint of a run folder; every file of it
    matching its ``SHA256SUMS`` (its config.yaml shapes the model and seeds the sampler too)."""
    path = Path(path)
    folder = path if (path / STATE).is_file() else latest_checkpoint(path / "checkpoints")
    if folder is None:
        raise CheckpointError(f"{path} is neither a checkpoint (no state.json) nor a run folder with "
                              "checkpoints; pass a runs/<name> folder or one of its "
                              "checkpoints/step_* folders")
    _check_sums(folder)
    return folder


def _check_sums(folder: Path, names: list[str] | None = None) -> None:
    """Check ``folder``'s files (or ``names``) by its ``SHA256SUMS``, required once state.json says one
    was written (older checkpoints have none and load unchecked): then its loss is damage, not age."""
    try:
        required = json.loads((folder / STATE).read_text()).get("sums") is True
    except (OSError, ValueError, AttributeError):  # refused where state.json is parsed
        required = False
    if changed := sums_problem(folder, names, required):
        raise CheckpointError(f"{changed}; use another checkpoint of the run")


def read_weights(folder: Path, name: str = MODEL) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/name``, checked: sha256 (``SHA256SUMS``), format, every value finite."""
    path = folder / name
    _check_sums(folder, [name])
    try:
        weights = load_file(path)
    except Exception as err:  # OSError, or safetensors' own SafetensorError
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if nonfinite := sorted(key for key, value in weights.items() if not torch.isfinite(value).all()):
        raise CheckpointError(f"{path}: {nonfinite[0]} holds NaN or Inf values; the run diverged before "
                              "it was saved: use an earlier checkpoint of the run")
    return weights


def sampled_weights(folder: Path) -> str:
    """The file of ``folder`` that grids and evaluations use: the moving average when the run kept one."""
    return EMA if (folder / EMA).is_file() else MODEL


def load_model_weights(model: torch.nn.Module, folder: Path, name: str = MODEL, prefix: str = "") -> None:
    """Load ``folder/name``'s weights named ``prefix...`` (default: all), less the prefix, into ``model``."""
    path = folder / name
    weights = {key.removeprefix(prefix): value for key, value in read_weights(folder, name).items()
               if key.startswith(prefix)}
    expected = model.state_dict()
    for name, tensor in weights.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)} but the model expects "
                                  f"{tuple(expected[name].shape)}; the checkpoint comes from a model of "
                                  "another shape: use the model section of its config.yaml")
        if name in expected and expected[name].dtype != tensor.dtype:  # load_state_dict would cast it
            raise CheckpointError(f"{path}: {name} is {tensor.dtype}, not the {expected[name].dtype} saved; "
                                  "it was changed after the run: use another checkpoint of the run")
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    model.load_state_dict(weights)
