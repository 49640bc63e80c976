"""Weights & Biases through Accelerate's tracker, and ``<run>/metrics.jsonl``, the complete history.

README.md, "W&B", says where runs go (``wandb.mode``), the offline fallback and what a resumed run shows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator

from pegasus_dist.config import Config
from pegasus_dist.errors import ConfigError
from pegasus_dist.model.saved import resolve_checkpoint
from pegasus_dist.training.faults import TrainingError, first_line
from pegasus_dist.training.state import TrainState, read_state

if TYPE_CHECKING:
    import wandb

log = logging.getLogger("pegasus_dist.training.tracking")


# WANDB_MODE values and the mode each means (dryrun and run are wandb's old names).
_WANDB_MODE_VALUES = {"online": "online", "offline": "offline", "disabled": "disabled",
                      "dryrun": "offline", "run": "online"}


def wandb_mode(cfg: Config) -> str:
    """The W&B mode of this run, the one place that decides: wandb.init gets it explicitly, so that
    wandb's own reading of ``WANDB_MODE`` never disagrees."""
    if cfg.wandb.mode != "auto":
        return cfg.wandb.mode
    if env := os.environ.get("WANDB_MODE", ""):
        if env not in _WANDB_MODE_VALUES:
            raise ConfigError(f"WANDB_MODE={env} is not a W&B mode: set it to online, offline or "
                              "disabled, or unset it")
        return _WANDB_MODE_VALUES[env]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def tracker_names(cfg: Config) -> list[str] | None:
    """What to pass as ``Accelerator(log_with=...)``."""
    return None if wandb_mode(cfg) == "disabled" else ["wandb"]


def new_run_id() -> str:
    """A W&B-style run id: saved in checkpoints so a resumed run continues the same W&B run."""
    return os.urandom(4).hex()


def start_tracking(accelerator: Accelerator, cfg: Config, state: TrainState, global_batch: int,
                   lr: float) -> None:
    """Open the W&B run (main process only) with the resolved config, ``launch`` and ``started_from``."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return
    config = cfg.model_dump()
    config["launch"] = {"world_size": accelerator.num_processes, "global_batch": global_batch, "lr": lr}
    if cfg.train.init_from and state.step == 0:  # a resumed run keeps what its start recorded
        folder = resolve_checkpoint(cfg.train.init_from)
        source = read_state(folder)
        config["started_from"] = {"checkpoint": str(folder.resolve()), "phase": source.phase,
                                  "step": source.step, "wandb_run_id": source.wandb_run_id}
    # W&B would fail on such a value, after its own loggers choked on it (the folder: the cwd's too)
    if key := _not_utf8({**config, "the run folder": str(cfg.run_dir.resolve())}):
        log.warning("W&B could not start (%s holds bytes that this locale's encoding, %s, cannot decode): "
                    "training on without it; metrics.jsonl in %s keeps every row; run under a UTF-8 "
                    "locale (LC_ALL=C.UTF-8) to log to W&B", key, sys.getfilesystemencoding(), cfg.run_dir)
        return
    try:
        _start(accelerator, cfg, state, config, mode)
    except Exception as err:  # any other failure of W&B's start (a bad locale, a full disk) costs only W&B
        _drop_wandb(accelerator)
        log.warning("W&B could not start (%s: %s): training on without it; metrics.jsonl in %s keeps "
                    "every row", type(err).__name__, first_line(err), cfg.run_dir)


def _not_utf8(config: dict[str, Any], prefix: str = "") -> str | None:
    """The first key of ``config`` whose value UTF-8 cannot hold: under a locale that is not UTF-8 (LC_ALL=C),
    Python keeps the undecodable bytes of a path or an argument as surrogates (PEP 383): the files are right,
    but W&B can neither send nor log them."""
    for key, value in config.items():
        try:
            json.dumps(value, ensure_ascii=False, default=str).encode()
        except UnicodeEncodeError:  # a section: the key in it, else the section (one of its keys)
            return (isinstance(value, dict) and _not_utf8(value, f"{prefix}{key}.")) or f"{prefix}{key}"
    return None


def _start(accelerator: Accelerator, cfg: Config, state: TrainState, config: dict[str, Any],
           mode: str) -> None:
    """wandb.init through Accelerate (main process only); offline instead when an online start fails."""
    import wandb  # here, not at the top: ranks that log nothing, and runs with W&B off, skip its 0.5 s

    try:
        accelerator.init_trackers(cfg.wandb.project, config=config, init_kwargs={"wandb": {
            "mode": mode, "dir": str(cfg.run_dir.resolve()), "id": state.wandb_run_id,
            "resume": "allow", "entity": cfg.wandb.entity or None, "name": cfg.wandb_name,
            "group": cfg.wandb_group, "tags": cfg.wandb.tags or None, "job_type": cfg.train.phase,
            # A server out of reach: wandb.init retries until init_timeout, then raises CommError.
            "settings": wandb.Settings(init_timeout=cfg.wandb.init_timeout_s),
        }})
    except wandb.Error as err:
        if mode != "online":
            raise
        # init_trackers kept the failed WandBTracker (W&B is the only tracker: nothing else starts
        # twice), and wandb's service still holds the run id ("run ID is in use"): clear both.
        _drop_wandb(accelerator)
        _start(accelerator, cfg, state, config, "offline")
        folder = Path(accelerator.get_tracker("wandb", unwrap=True).dir).parent  # <folder>/files
        log.warning("W&B could not start online (%s: %s); logging offline into %s instead: upload it "
                    "later with `wandb sync %s` (a slow link may need a larger wandb.init_timeout_s)",
                    type(err).__name__, first_line(err), folder, folder)


class MetricsLog:
    """Logs a row to every tracker and appends it to ``metrics.jsonl`` (main process)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.path = run_dir / "metrics.jsonl"
        # The last step the W&B run holds (set by resume): rows up to it are not logged there again.
        self.wandb_holds_step = -1

    def log(self, values: dict[str, float], step: int) -> None:
        if step > self.wandb_holds_step:
            self._to_wandb(step, lambda: self.accelerator.log(values, step=step))
        if self.accelerator.is_main_process:
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps({"step": step, **values}) + "\n")
            except OSError as err:  # a full disk, a folder made unwritable under the run
                free = shutil.disk_usage(self.path.parent).free / 2**20
                raise TrainingError(f"cannot append step {step} to {self.path}: {err.strerror or err} "
                                    f"({free:.0f} MB free there); free space or make it writable, then run "
                                    "the same command to resume from the last checkpoint") from None

    def summarize(self, values: dict[str, Any]) -> None:
        """Values that describe the run rather than a step: the W&B summary, not the history."""
        if (run := self._wandb_run()) is not None:
            self._to_wandb(None, lambda: run.summary.update(values))

    def log_images(self, paths: dict[str, Path], captions: dict[str, str], step: int, prefix: str) -> None:
        """The PNG files of the sample grids as W&B images: exactly the pixels of ``samples/``."""
        if (run := self._wandb_run()) is None or step <= self.wandb_holds_step:
            return

        def send() -> None:  # wandb.Image copies each file into the run: a failure of W&B's too
            import wandb

            run.log({f"{prefix}/{name}": wandb.Image(str(path), caption=captions[name])
                     for name, path in paths.items()}, step=step)
        self._to_wandb(step, send)

    def close(self) -> None:
        """Finish the W&B run, then Accelerate's end of training (which also ends the process group)."""
        if (run := self._wandb_run()) is not None:
            self._to_wandb(None, run.finish)
            self.accelerator.trackers.clear()  # finished: end_training must not finish it again
        self.accelerator.end_training()

    def resume(self, step: int) -> None:
        """Continue the logs of a run resumed at ``step``: the rows after it leave metrics.jsonl
        (recomputed); those after W&B's ``run.step`` (offline: 0) are logged again from it."""
        if not self.accelerator.is_main_process:
            return
        rows = self._keep_rows_up_to(step)
        if (run := self._wandb_run()) is None:
            return
        self.wandb_holds_step = run.step - 1
        missing = [row for row in rows if row["step"] > self.wandb_holds_step]
        for row in missing:
            self._to_wandb(row["step"], lambda row=row: run.log({k: v for k, v in row.items() if k != "step"},
                                                                step=row["step"]))
        if run.offline:
            log.info("W&B run %s is offline: this launch writes a folder of its own, which starts "
                     "with the %d rows of %s up to step %d", run.id, len(missing), self.path, step)
        else:
            log.info("W&B run %s holds steps up to %d; logged the %d rows after them again from %s",
                     run.id, self.wandb_holds_step, len(missing), self.path)

    def _keep_rows_up_to(self, step: int) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        kept = []
        lines = self.path.read_bytes().splitlines()  # json.loads decodes each strictly: no U+FFFD names
        for number, line in enumerate(lines, 1):
            if (row := _metrics_row(line)) is None:
                # Also a cut last line: a file cut short loses the rows after it, which only this says.
                log.warning("%s: line %d is not a metrics row; keeping the %d rows before it",
                            self.path, number, len(kept))
                break
            if row["step"] > step:
                break  # rows are appended in step order: all the rest come later too
            kept.append(row)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(self.path)
        return kept

    def _to_wandb(self, step: int | None, write: Callable[[], object]) -> None:
        """``write`` to W&B; if W&B fails mid-run (its service killed, its folder's disk full), that
        costs only W&B: one warning, and the rest of the run goes on without it."""
        if not self.accelerator.trackers:  # W&B disabled, never started, or lost earlier in the run
            return
        try:
            write()
        except Exception as err:
            folder = Path(self.accelerator.get_tracker("wandb", unwrap=True).dir).parent  # <folder>/files
            _drop_wandb(self.accelerator)
            at = f"at step {step}" if step is not None else "at the end of the phase"
            log.warning("W&B stopped %s (%s: %s): training goes on without it; metrics.jsonl in %s keeps "
                        "every row (W&B's folder %s may hold fewer)", at, type(err).__name__,
                        first_line(err), self.path.parent, folder)

    def _wandb_run(self) -> wandb.Run | None:
        """The W&B run on the main process; None on the others or with W&B disabled."""
        on = self.accelerator.is_main_process and any(t.name == "wandb" for t in self.accelerator.trackers)
        return self.accelerator.get_tracker("wandb", unwrap=True) if on else None


def _drop_wandb(accelerator: Accelerator) -> None:
    """End W&B's service and forget its tracker, after W&B failed; the caller says why."""
    import wandb

    with contextlib.suppress(Exception):  # a service already gone fails its teardown the same way
        wandb.teardown()
    accelerator.trackers.clear()


def _metrics_row(line: bytes) -> dict[str, Any] | None:
    """``line`` as :meth:`MetricsLog.log` writes it, or None: a JSON object of a whole-number ``step``,
    0 or more, and numbers (NaN included: a diverged loss). Anything else is damage, which a resume
    would compare with its step or replay to W&B."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # not JSON; or nested past what the parser takes
        return None
    # json.loads makes exactly int, float and bool: type() keeps bools out.
    numbers = isinstance(row, dict) and all(type(value) in (int, float) for value in row.values())
    return row if numbers and type(row.get("step")) is int and row["step"] >= 0 else None
