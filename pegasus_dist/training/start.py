"""Start-up and resume: what a phase needs before its first step, agreed by every rank.

:func:`start_phase` runs it in stages (``hooks.START_STAGES``), each of which may fail on one
rank alone and is agreed by every rank (:func:`.faults.agree_on_start`) before W&B starts.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from pegasus_dist.config import Config
from pegasus_dist.data.loader import MemoryLoader, ShardLoader, make_loader
from pegasus_dist.errors import CheckpointError, ConfigError
from pegasus_dist.evaluation.heldout import leak
from pegasus_dist.model.adversaries import KINDS, Adversaries, enabled_adversaries
from pegasus_dist.model.saved import ADVERSARIES, latest_checkpoint, load_model_weights, resolve_checkpoint
from pegasus_dist.model.vae import VAE, num_parameters
from pegasus_dist.training.checkpoint import (
    check_resumable,
    find_damage,
    held_adversaries,
    move_aside,
    newest_intact_checkpoint,
    restore_checkpoint,
)
from pegasus_dist.training.distributed import (
    build_accelerator,
    convert_sync_batchnorm,
    same_as_main,
    warn_about_precision,
)
from pegasus_dist.training.ema import build_ema
from pegasus_dist.training.faults import agree_on_start, fail_with_every_rank
from pegasus_dist.training.hooks import Hooks
from pegasus_dist.training.lock import hold_run_lock
from pegasus_dist.training.optim import LrSchedule, apply_on_resume, build_optimizer, scaled_lr
from pegasus_dist.training.perceptual import load_perceptual_network
from pegasus_dist.training.state import MOVE_ASIDE, TrainState, is_complete, is_finished, read_state
from pegasus_dist.training.step import Models
from pegasus_dist.training.tracking import MetricsLog, new_run_id, start_tracking, tracker_names

log = logging.getLogger("pegasus_dist.training.start")
T = TypeVar("T")


class RunComplete(Exception):  # noqa: N818 (not an error: there is nothing left to do)
    """The checkpoint to resume from already ends the phase (:func:`.state.is_complete`)."""


@dataclass
class Started:
    """A phase ready for its first step, the same on every rank."""

    cfg: Config  # data.batch_size is the per-process share of data.global_batch_size, when set
    accelerator: Accelerator
    models: Models  # prepared; restored from the checkpoint when resuming
    loader: ShardLoader | MemoryLoader
    state: TrainState  # where the phase stands: the first step is state.step + 1
    schedule: LrSchedule  # the one learning-rate schedule of the run
    metrics: MetricsLog


def start_phase(cfg: Config, hooks: Hooks) -> Started:
    """Everything the loop needs, once every rank passed its start-up checks; :class:`RunComplete` if done."""
    try:
        accelerator = build_accelerator(cfg, tracker_names(cfg))
    except ConfigError as err:  # e.g. fp16 on a CPU, found before the ranks formed a group
        fail_with_every_rank(err)

    def stage(name: str, check: Callable[[], T]) -> T:
        return agree_on_start(accelerator, lambda: (hooks.run("at_start_up", name), check())[1])

    cfg = stage("batch", lambda: _with_batch(cfg, accelerator.num_processes))
    configs = gather_object([_flat(cfg.model_dump())])  # every rank meets here: it passed the agreed stage

    def lock() -> list:
        same_as_main(configs, accelerator.process_index, "config", "launch every rank with the same config "
                     "file and overrides (on a cluster: the same checkout of the repository on every node)")
        return _lock_and_choose(cfg, accelerator)

    # Before any rank reads the run folder. The main process alone chooses the checkpoint to
    # resume and whether the phase finished; every rank takes its answer (ranks reading a shared
    # filesystem apart could split into "complete" and "training", and hang).
    resume_from, finished = broadcast_object_list(stage("lock", lock))
    schedule = LrSchedule(cfg.optim, global_batch(cfg, accelerator), cfg.train.epochs)
    state, loader, built = stage(
        "checks", lambda: _check_and_build(cfg, accelerator, schedule, resume_from, finished))
    if loader is None:
        accelerator.end_training()
        raise RunComplete(f"{cfg.train.phase} in {cfg.run_dir} is already complete at step {state.step} "
                          f"(train.epochs={cfg.train.epochs}, train.max_steps={cfg.train.max_steps}; "
                          f"checkpoint {resume_from}); raise train.epochs or train.max_steps to train on")
    shard_sets = gather_object([_shard_view(loader)])

    def config() -> None:
        same_as_main(shard_sets, accelerator.process_index, f"shard set {loader.path}", "every node must "
                     "read the same shards: one folder that all mount, or copies of one `prepare` run")
        _save_config(cfg, accelerator)

    stage("config", config)
    if accelerator.is_main_process:
        warn_about_precision(cfg, accelerator.device)
    models = _prepare(accelerator, cfg, built)
    if resume_from is not None:  # after prepare: load_state fills what it prepared
        stage("restore", lambda: _restore(cfg, accelerator, resume_from, models))
        _continue_from(resume_from, cfg, accelerator, state, loader.num_samples, models, schedule)
    state.global_batch = schedule.global_batch  # what this run's checkpoints record
    start_tracking(accelerator, cfg, state, schedule.global_batch, schedule.peak)
    metrics = MetricsLog(accelerator, cfg.run_dir)
    if resume_from is not None:
        metrics.resume(state.step)  # the rows after the checkpoint are recomputed
    log.info("%s: %s parameters, %d samples in %s, world_size=%d, %s, %d batches per epoch; %s, grad clip %s",
             cfg.train.phase, f"{num_parameters(models.model):,}", loader.num_samples, loader.path,
             accelerator.num_processes, batch_description(cfg, accelerator), len(loader), schedule.describe(),
             f"{cfg.optim.grad_clip:g}" if cfg.optim.grad_clip else "off")
    return Started(cfg, accelerator, models, loader, state, schedule, metrics)


def _flat(config: dict) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def _shard_view(loader: ShardLoader | MemoryLoader) -> dict[str, object]:
    """What this rank's shard set is: ranks must agree on it, or their epochs would not line up."""
    m = loader.manifest
    return {"generation": m.generation, "samples": m.num_samples, "shard files": len(m.shards)}


def global_batch(cfg: Config, accelerator: Accelerator) -> int:
    """Images per optimizer step: per-process batch x processes x accumulation steps."""
    return cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps


def batch_description(cfg: Config, accelerator: Accelerator) -> str:
    source = " (data.global_batch_size)" if cfg.data.global_batch_size else ""
    return (f"global batch {global_batch(cfg, accelerator)}{source} = per-process batch "
            f"{cfg.data.batch_size} x {accelerator.num_processes} process(es) x "
            f"{cfg.train.grad_accum_steps} accumulation step(s)")


def _with_batch(cfg: Config, world_size: int) -> Config:
    """``cfg`` whose data.batch_size is the per-process share of data.global_batch_size, when set."""
    wanted, k = cfg.data.global_batch_size, cfg.train.grad_accum_steps
    if not wanted:
        return cfg
    if wanted % (world_size * k):
        raise ConfigError(f"data.global_batch_size={wanted} does not split evenly over {world_size} "
                          f"process(es) x train.grad_accum_steps={k}; use a multiple of {world_size * k}")
    data = cfg.data.model_copy(update={"batch_size": wanted // (world_size * k)})
    return cfg.model_copy(update={"data": data})


def _lock_and_choose(cfg: Config, accelerator: Accelerator) -> list:
    """On the main process: lock the run folder (its first write), then [the checkpoint to resume by
    ``run.resume`` or None, whether the phase finished at it]; [None, False] elsewhere."""
    if not accelerator.is_main_process:
        return [None, False]
    try:
        hold_run_lock(cfg.run_dir)
    except OSError as err:
        raise ConfigError(f"cannot write the run folder {cfg.run_dir}: {err.strerror or err}; make it "
                          "writable, or set run.output_dir to a folder that is") from None
    checkpoints = cfg.run_dir / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():  # else read as "none yet", and a run from scratch
        raise ConfigError(f"{checkpoints} is not a folder; move it away so that the run can keep its "
                          "checkpoints there")
    resume_from = None
    if cfg.run.resume == "auto":  # damaged checkpoints skipped (and moved aside)
        resume_from = newest_intact_checkpoint(checkpoints, move_damaged=True)
    elif cfg.run.resume == "never":
        if latest_checkpoint(checkpoints) is not None:
            raise ConfigError(f"run.resume=never but {cfg.run_dir} already has checkpoints; choose another "
                              "run.name or use run.resume=auto")
    else:
        resume_from = resolve_checkpoint(cfg.run.resume)
        if problem := find_damage(resume_from):  # the user's choice: an error, never moved aside
            raise CheckpointError(f"{problem}; {MOVE_ASIDE}")
    return [resume_from, resume_from is not None and is_finished(cfg.run_dir, resume_from)]


def _check_and_build(cfg: Config, accelerator: Accelerator, schedule: LrSchedule, resume_from: Path | None,
                     finished: bool) -> tuple[TrainState, ShardLoader | MemoryLoader | None, Models | None]:
    """This rank's start-up checks, then its loader and its models, not yet prepared (None, None: the
    phase is already complete); none waits for the others, so the checkpoint is only checked."""
    state = TrainState(phase=cfg.train.phase, wandb_run_id=new_run_id())
    if resume_from is not None:
        if not accelerator.is_main_process and not resume_from.is_dir():
            raise CheckpointError(f"{resume_from}, chosen by the main process, is not there on this node: "
                                  f"run.output_dir ({cfg.run.output_dir}) must be one folder that every "
                                  "node mounts; a shared filesystem that lags (NFS) shows it seconds "
                                  "later: run the same command again")
        state = read_state(resume_from)
        if state.phase != cfg.train.phase:
            raise CheckpointError(f"{resume_from} is a {state.phase} checkpoint but this run is "
                                  f"{cfg.train.phase}; to start {cfg.train.phase} from its weights use "
                                  f"train.init_from={resume_from}")
        if is_complete(state, cfg) and finished:
            return state, None, None
        check_resumable(resume_from, enabled_adversaries(cfg))
    loader = make_loader(cfg.data, cfg.model.image_size, accelerator.process_index,
                         accelerator.num_processes, accelerator.device)
    if resume_from is not None:
        state = _resume_position(state, loader.num_samples, accelerator.num_processes, resume_from)
    _check_batch_fits(cfg, accelerator, loader.num_samples, loader.path)
    state = _on_data(state, cfg, loader, resume_from)
    # A resumed run has its weights: train.init_from starts a new one only.
    new_from = resume_from is None and cfg.train.init_from
    source = _init_source(cfg, accelerator.is_main_process) if new_from else None
    return state, loader, _build_models(cfg, accelerator, schedule, source)


def _init_source(cfg: Config, main: bool) -> Path:
    """train.init_from's checkpoint: a run folder's newest, with a warning where that run has not
    finished (a finetune started while its pretraining still runs, or after it was killed), or
    where it trained on shards prepared before these (their held-out split may hold its images)."""
    named = Path(cfg.train.init_from)
    source = resolve_checkpoint(named)
    if not main:  # the warnings, once
        return source
    if source != named and not is_finished(named, source):
        log.warning("train.init_from: %s has not finished (no finished.json for its newest checkpoint, "
                    "%s): this phase starts from those weights; let that run end first, or name the "
                    "checkpoint itself to start from it", named, source.name)
    if problem := leak(read_state(source).shards, Path(cfg.data.shards) / cfg.eval.shard_set):
        log.warning("train.init_from %s: %s; this phase's held-out metrics may count them", source, problem)
    return source


def _save_config(cfg: Config, accelerator: Accelerator) -> None:
    """The main process saves the run's config in its folder, which the lock stage created."""
    path = cfg.run_dir / "config.yaml"
    if accelerator.is_main_process:
        try:
            path.write_text(cfg.to_yaml())
        except OSError as err:  # e.g. a folder of that name, or the run folder made read-only
            raise ConfigError(f"cannot write {path}: {err.strerror or err}; make it a writable file "
                              "(move away what is there), or set run.output_dir to another folder") from None


def _restore(cfg: Config, accelerator: Accelerator, folder: Path, models: Models) -> None:
    """:func:`restore_checkpoint`. Under ``run.resume=auto`` a checkpoint whose files all read (find_damage)
    but do not load into the model its own config.yaml describes is damaged (e.g. weights swapped with their
    checksums rewritten): the main process moves it aside, for a requeue to resume from the one before."""
    try:
        restore_checkpoint(accelerator, folder, models.ema)
    except CheckpointError as err:
        saved = yaml.safe_load((folder / "config.yaml").read_text()).get("model")
        if cfg.run.resume != "auto" or saved != cfg.model.model_dump():  # another model: the user's change
            raise
        where = move_aside(folder) if accelerator.is_main_process else "damaged-*"
        raise CheckpointError(f"{err}; moved it to {where}: run the same command again to resume "
                              "from the checkpoint before") from None


def _resume_position(state: TrainState, num_samples: int, world_size: int, folder: Path) -> TrainState:
    """Where the resumed run continues, checked, so that the loop ends whatever state.json says."""
    done = state.samples_done
    if done > num_samples:
        raise CheckpointError(f"{folder / 'state.json'}: samples_done {done} is past the end of the epoch "
                              f"({num_samples} samples in this shard set); train on the shard set it was "
                              "written for, or move that checkpoint aside to resume from the one before")
    if done == num_samples:
        return state.model_copy(update={"epoch": state.epoch + 1, "samples_done": 0})
    if num_samples - done < world_size:
        raise CheckpointError(f"{folder} stopped {num_samples - done} sample(s) before the end of epoch "
                              f"{state.epoch + 1}, too few to share among {world_size} processes; resume it "
                              f"with at most {num_samples - done} process(es), or from an earlier checkpoint")
    return state


def _check_batch_fits(cfg: Config, accelerator: Accelerator, num_samples: int, path: Path) -> None:
    """One line when a step wants more images than the set holds (its lr scaled for a batch never seen)."""
    if global_batch(cfg, accelerator) > num_samples:
        most = max(1, num_samples // (accelerator.num_processes * cfg.train.grad_accum_steps))
        raise ConfigError(f"{batch_description(cfg, accelerator)}, but {path} holds {num_samples} samples; "
                          f"lower data.batch_size to {most} or less (or data.global_batch_size)")


def _on_data(state: TrainState, cfg: Config, loader: ShardLoader | MemoryLoader,
             resume_from: Path | None) -> TrainState:
    """``state`` recording the data of this run; a resume on other data is refused, or logged if allowed."""
    generation = loader.manifest.generation
    shards = f"{loader.manifest.name}@{generation}" if generation else ""
    was = (state.shards or shards, cfg.data.seed if state.data_seed is None else state.data_seed)
    if resume_from is not None and was != (shards, cfg.data.seed):
        change = (f"{resume_from} was trained on shards {was[0]} with data.seed={was[1]}, this run reads "
                  f"{shards or loader.path} with data.seed={cfg.data.seed}")
        if not cfg.data.resume_on_other_data:
            raise CheckpointError(f"{change}; resume on the same shards and seed, or set "
                                  "data.resume_on_other_data=true to continue on these")
        log.warning("%s: continuing on these (data.resume_on_other_data=true)", change)
    return state.model_copy(update={"shards": shards, "data_seed": cfg.data.seed})


def _build_models(cfg: Config, accelerator: Accelerator, schedule: LrSchedule, source: Path | None) -> Models:
    """The models and their optimizers, not yet prepared, the weights from ``source`` (train.init_from's
    checkpoint) if any. ACAI's critic and the patch discriminator, when on, are seeded apart, so that
    turning them on leaves the model's initial weights as they were."""
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    model = VAE(cfg.model)
    if source is not None:
        load_model_weights(model, source)
        log.info("initialised %s from %s", cfg.train.phase, source)
    if cfg.model.sync_batchnorm and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model, accelerator.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    models = Models(model, build_optimizer(model.parameters(), schedule, accelerator.device))
    if wanted := enabled_adversaries(cfg):
        set_seed(cfg.train.seed + 1)  # identical on every rank
        models.adversaries = adversaries = Adversaries(cfg)
        for kind in sorted(wanted & held_adversaries(source)) if source is not None else ():
            load_model_weights(getattr(adversaries, kind), source, ADVERSARIES, prefix=f"{kind}.")
            log.info("initialised the %s from %s", KINDS[kind][0], source)
        models.adversary_optimizer = build_optimizer(adversaries.parameters(), schedule, accelerator.device)
    models.perceptual = load_perceptual_network(cfg, accelerator.device)
    return models


def _prepare(accelerator: Accelerator, cfg: Config, built: Models) -> Models:
    """The models wrapped for the ranks (DDP) and mixed precision, their optimizers with them."""
    model = compile_or_eager(built.model, cfg, accelerator.is_main_process)
    prepared = Models(*accelerator.prepare(model, built.optimizer), perceptual=built.perceptual)
    if cfg.train.ema_decay:  # of the weights as built: initialised, or loaded from train.init_from
        prepared.ema = build_ema(built.model, cfg.train.ema_decay)
    if built.adversaries is not None:
        prepared.adversaries = accelerator.prepare_model(built.adversaries)
        # Unprepared: Accelerate's GradScaler is the autoencoder's; fp16 gives them their own.
        prepared.adversary_optimizer = built.adversary_optimizer
        accelerator.register_for_checkpointing(built.adversary_optimizer)
        if accelerator.scaler is not None:
            prepared.adversary_scaler = torch.amp.GradScaler(accelerator.device.type)
            accelerator.register_for_checkpointing(prepared.adversary_scaler)
    return prepared


def compile_or_eager(model: torch.nn.Module, cfg: Config, warn: bool) -> torch.nn.Module:
    """``model`` under torch.compile when asked for and inductor has a C++ compiler; else as it is,
    with one warning (``warn``) rather than a traceback at the first step."""
    if not cfg.train.compile:
        return model
    compiler = os.environ.get("CXX", "g++")  # what inductor looks for on Linux
    if shutil.which(compiler) is None:
        if warn:
            log.warning("train.compile=true, but no C++ compiler %r is on PATH for torch.compile's "
                        "inductor: training eager (uncompiled) instead; install one (g++) or point "
                        "$CXX at one, or set train.compile=false to silence this", compiler)
        return model
    return torch.compile(model)


def _continue_from(folder: Path, cfg: Config, accelerator: Accelerator, state: TrainState,
                   num_samples: int, models: Models, schedule: LrSchedule) -> None:
    """Say where the restored run goes on; the restored optimizer takes this run's settings."""
    log.info("resumed from %s: epoch %d, %d of its %d samples trained, step %d",
             folder, state.epoch + 1, state.samples_done, num_samples, state.step)
    old, new = state.global_batch, schedule.global_batch
    if accelerator.is_main_process and old and old != new:
        log.warning("the global batch changed on resume: %d -> %d; lr %.3g -> %.3g (optim.lr_scaling=%s); "
                    "steps per epoch %d -> %d; epoch %d continues at sample %d of %d, so nothing is "
                    "repeated or skipped", old, new, scaled_lr(cfg.optim, old), schedule.peak,
                    cfg.optim.lr_scaling, math.ceil(num_samples / old), math.ceil(num_samples / new),
                    state.epoch + 1, state.samples_done, num_samples)
    apply_on_resume(models.optimizer, schedule, state, folder)
