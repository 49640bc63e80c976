"""Atomic, safe checkpoints.

A checkpoint is a folder ``<run>/checkpoints/step_<N>/`` holding:

- ``model.safetensors``: the weights and batch-norm statistics (safetensors,
  so loading never runs code);
- ``optimizer.pt``: Adam's state and the fp16 loss scaler (and the ACAI
  critic's Adam), read back with ``torch.load(weights_only=True)``;
- ``critic.safetensors``: with ACAI (``loss.acai_weight`` > 0), the critic's weights;
- ``state.json``: phase, epoch, the samples of that epoch's seeded order
  already trained, the global batch that trained them, step counters and the
  W&B run id; ``config.yaml``: the resolved config of the run.

No random state is saved: every random draw of training comes from a
generator seeded by what the checkpoint holds (the reparameterisation noise
by the step, the epoch's order by the epoch; bad samples are replaced by a
fixed rule), so a run resumes the same on any number of processes.
Checkpoints of earlier versions also hold ``rng/rank_<R>.pt``: they are
ignored, except that their count (the processes that wrote them) converts
an older ``state.json``'s ``batches_done`` into samples.

It is written into ``.tmp-step_<N>/`` and renamed into place once complete,
so a process killed mid-save leaves the previous checkpoints intact, and a
folder named ``step_<N>`` is always complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import typing
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pegasus_dist.config import Config, TrainConfig, load_config
from pegasus_dist.data.loader import global_batch_sizes
from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.errors import CheckpointError, PegasusError
from pegasus_dist.model import VAE

log = logging.getLogger("pegasus_dist.checkpoint")

PREFIX = "step_"
CRITIC = "critic.safetensors"  # ACAI's critic, in checkpoints of runs with loss.acai_weight > 0
FINISHED = "finished.json"  # in the run folder, written last by a phase that ended
NAME = re.compile(rf"{PREFIX}(\d+)")  # and exactly checkpoint_name(N): step_00000060, not step_60
DAMAGED = "damaged-"  # the prefix of a damaged checkpoint moved aside; never pruned
PHASES = typing.get_args(typing.get_type_hints(TrainConfig)["phase"])
# Fields of older state.json files, read and converted (:func:`_in_samples`), never written.
OLDER_FIELDS = {"batches_done": int}


@dataclass
class TrainState:
    """Counters that say where a phase stands; saved in ``state.json``."""

    phase: str
    epoch: int = 0  # the epoch in progress
    # Samples of that epoch's seeded order already trained, by all processes together:
    # where a resumed run continues, whatever its process count or batch.
    samples_done: int = 0
    global_batch: int = 0  # images per optimizer step of the run that wrote it (0: unknown)
    step: int = 0  # optimizer steps taken in this phase, skipped ones included
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
    ``optimizer.pt`` (a zip archive, as torch.save writes it).
    """
    try:
        _parse_state(folder / "state.json")
        _check_safetensors(folder / "model.safetensors")
        if (folder / CRITIC).exists():
            _check_safetensors(folder / CRITIC)
        _check_zip(folder / "optimizer.pt")
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
    hints = typing.get_type_hints(TrainState) | OLDER_FIELDS
    for name, value in raw.items():
        problem = _bad_field(name, value, hints[name]) if name in hints else "is not a known field"
        if problem:
            raise CheckpointError(f"{path}: field {name} {problem}, got {value!r}")
    if "batches_done" in raw:
        raw = _in_samples(raw, path)
    return TrainState(**raw)


def _in_samples(raw: dict, path: Path) -> dict:
    """An older ``state.json``, which counted batches: its position in samples.

    Its checkpoint holds the per-process batch (``config.yaml``) and one RNG
    file per process (``rng/rank_<R>.pt``), and with its shard set that gives
    the samples of each of its global batches.
    """
    raw = dict(raw)
    batches = raw.pop("batches_done")
    if "samples_done" in raw or not batches:
        return raw
    folder = path.parent
    processes = len(list((folder / "rng").glob("rank_*.pt")))
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        data, accumulation = saved["data"], saved.get("train", {}).get("grad_accum_steps", 1)
        batch = data["batch_size"]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        data, batch, accumulation = {}, None, None
    if not processes or not isinstance(batch, int) or not isinstance(accumulation, int):
        raise CheckpointError(f"{path} counts batches_done (an older version) but its rng/ folder "
                              "and config.yaml do not give its processes and batch; resume it with "
                              "the version that wrote it, or start a new run")
    raw["samples_done"] = _older_samples(batches, batch, processes, data)
    raw.setdefault("global_batch", batch * processes * accumulation)
    return raw


def _older_samples(batches: int, batch: int, processes: int, data: dict) -> int:
    """Samples in the first ``batches`` global batches of an epoch of the older run.

    Each is ``batch`` x ``processes`` but the epoch's last, so an epoch
    trained to its end (which older versions could save as its last batch
    done) is exactly the shard set's samples. Without the shard set, every
    batch counts in full.
    """
    try:
        total = load_manifest(Path(data["shards"]) / data["shard_set"]).num_samples
        sizes = global_batch_sizes(total, processes, batch)
    except (PegasusError, KeyError, TypeError):
        return batches * batch * processes
    return sum(sizes[:batches]) if batches <= len(sizes) else batches * batch * processes


def _bad_field(name: str, value: object, hint: type) -> str | None:
    """What is wrong with one field of ``state.json``, or None."""
    if name == "phase":
        return None if value in PHASES else f"must be one of {', '.join(PHASES)}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else "must be a whole number, 0 or more"
    return None if isinstance(value, hint) else f"must be a {hint.__name__}"


def load_model_weights(model: torch.nn.Module, folder: Path, name: str = "model.safetensors") -> None:
    """Load ``folder/name`` (the VAE's weights, or the critic's) into ``model``, naming any mismatch."""
    path = folder / name
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
    critic: torch.nn.Module | None = None,
    critic_optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Every rank calls this; returns the published ``step_<N>`` folder.

    The main process writes the temporary folder, renames it into place and
    prunes old checkpoints; the others wait at the barrier (every rank holds
    the same weights, and nothing of a checkpoint belongs to one rank).
    """
    final = root / checkpoint_name(state.step)
    if final.exists():  # already saved at this step (e.g. epoch end == checkpoint_every)
        return final
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else {}
        optimizers = {"optimizer": optimizer.state_dict(), "scaler": scaler}
        if critic is not None:
            save_file({k: v.detach().cpu().contiguous()
                       for k, v in accelerator.unwrap_model(critic).state_dict().items()}, tmp / CRITIC)
            optimizers["critic_optimizer"] = critic_optimizer.state_dict()
        write_main_files(
            tmp,
            accelerator.unwrap_model(model, keep_torch_compile=False).state_dict(),
            optimizers,
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
    critic: torch.nn.Module | None = None,
    critic_optimizer: torch.optim.Optimizer | None = None,
) -> TrainState:
    """Load a checkpoint written by :func:`save_checkpoint` into a model and optimizer (and critic)."""
    load_model_weights(accelerator.unwrap_model(model, keep_torch_compile=False), folder)
    saved = load_optimizer_state(folder)
    optimizer.load_state_dict(saved["optimizer"])
    if accelerator.scaler is not None and saved["scaler"]:
        accelerator.scaler.load_state_dict(saved["scaler"])
    if critic is not None:
        if not (folder / CRITIC).is_file() or "critic_optimizer" not in saved:
            raise CheckpointError(
                f"{folder} holds no ACAI critic (its run had loss.acai_weight=0); resume it with "
                f"loss.acai_weight=0, or start a new run with train.init_from={folder}"
            )
        load_model_weights(critic, folder, CRITIC)
        critic_optimizer.load_state_dict(saved["critic_optimizer"])
    return read_state(folder)


def load_trained_model(checkpoint: str | Path, overrides: list[str]) -> tuple[Config, VAE, Path]:
    """(config, model on its device, checkpoint folder) from a checkpoint or run folder."""
    folder = resolve_checkpoint(checkpoint)
    cfg = load_config(folder / "config.yaml", overrides)
    model = VAE(cfg.model)
    load_model_weights(model, folder)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")
    return cfg, model.to(device), folder
