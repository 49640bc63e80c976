"""Where a phase stands: ``state.json`` in each checkpoint, and ``finished.json`` in the run folder.

``state.json`` is read before the models exist (to choose the checkpoint to resume) and validated by
pydantic, as the config is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pegasus_dist.config import Config, Phase, problem
from pegasus_dist.errors import CheckpointError
from pegasus_dist.model.saved import NAME, STATE, checkpoint_name

log = logging.getLogger("pegasus_dist.training.state")

FINISHED = "finished.json"  # in the run folder, written last by a phase that ended
MOVE_ASIDE = "move that checkpoint aside to resume from the one before (run.resume=auto does)"
Count = Annotated[int, Field(ge=0)]
# Fields of older state.json files, checked and dropped: their checkpoints cannot be resumed
# (:func:`pegasus_dist.training.checkpoint.check_resumable`), but their weights start runs (train.init_from).
OLDER_FIELDS = {"batches_done"}
COUNT = "must be a whole number, 0 or more"
WORDS = {"int_type": COUNT, "greater_than_equal": COUNT, "string_type": "must be a str",
         "extra_forbidden": "is not a known field"}


class TrainState(BaseModel):
    """Counters that say where a phase stands; saved in ``state.json``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    phase: Phase
    epoch: Count = 0  # the epoch in progress
    # Samples of that epoch's seeded order already trained, by all processes together:
    # where a resumed run continues, whatever its process count or batch.
    samples_done: Count = 0
    global_batch: Count = 0  # images per optimizer step of the run that wrote it (0: unknown)
    step: Count = 0  # optimizer steps taken in this phase, skipped ones included
    scaler_skipped_steps: Count = 0  # fp16 overflows: the loss scaler skipped the update
    nonfinite_skipped_steps: Count = 0  # NaN/Inf losses skipped (train.on_nonfinite=skip)
    bad_samples_skipped: Count = 0  # corrupt samples replaced (data.on_bad_sample=skip)
    wandb_run_id: str = ""
    shards: str = ""  # the shard set trained on, <set>@<generation> ("": not recorded)
    data_seed: int | None = None  # data.seed, which orders every epoch (None: not recorded)
    sums: bool = True  # written with a SHA256SUMS, so one missing is damage (absent: an older version)

    @property
    def last_step_epoch(self) -> int:
        """The epoch of the last step taken: the one before ``epoch`` when that one has not begun."""
        return self.epoch - 1 if self.epoch and not self.samples_done else self.epoch


class _OlderStateFile(TrainState):
    batches_done: Count = 0


def is_complete(state: TrainState, cfg: Config) -> bool:
    """Whether a phase at ``state`` has nothing left to train under ``cfg`` (the one definition)."""
    return state.epoch >= cfg.train.epochs or 0 < cfg.train.max_steps <= state.step


def mark_finished(run_dir: Path, checkpoint: Path) -> None:
    """Record that the phase's end-of-run work (grids, evaluation) is done for ``checkpoint``."""
    (run_dir / FINISHED).write_text(json.dumps({"checkpoint": checkpoint.name}) + "\n")


def is_finished(run_dir: Path, checkpoint: Path) -> bool:
    """Whether :func:`mark_finished` was reached for ``checkpoint``: a run killed after its final
    checkpoint is complete, not finished, and a restart only does the end-of-run work."""
    path = run_dir / FINISHED
    try:
        return json.loads(path.read_text())["checkpoint"] == checkpoint.name
    except FileNotFoundError:
        return False
    except (OSError, ValueError, LookupError, TypeError) as err:  # damaged: the end-of-run work is redone
        log.warning("%s is unreadable (%s): doing the end of the phase again (grids, held-out "
                    "evaluation)", path, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return False


def read_state(folder: Path) -> TrainState:
    """``state.json``, every field checked: a bad one is one line naming the file and the field."""
    try:
        return parse_state(folder / STATE)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {MOVE_ASIDE}") from None


def parse_state(path: Path) -> TrainState:
    """``path`` (a ``state.json``) validated; one :class:`CheckpointError` line when it does not fit."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # a bad encoding is a ValueError too
        raise CheckpointError(f"{path} is unreadable ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not an object of fields")
    try:
        state = _OlderStateFile.model_validate({"sums": False} | raw)
    except ValidationError as err:
        error = err.errors()[0]
        field = error["loc"][0]
        if error["type"] == "missing":  # phase: the one field without a default
            raise CheckpointError(f"{path} has no field {field}") from None
        reason = WORDS.get(error["type"]) or problem(error, TrainState)
        raise CheckpointError(f"{path}: field {field} {reason}, got {error['input']!r}") from None
    if NAME.fullmatch(path.parent.name) and path.parent.name != checkpoint_name(state.step):
        raise CheckpointError(f"{path}: field step is {state.step}, not its folder's: a state.json of "
                              "another checkpoint")
    return TrainState.model_validate(state.model_dump(exclude=OLDER_FIELDS))
