"""`pegasus-dist pipeline`: sources -> shards -> pretrain -> finetune -> report in one process; a
rerun keeps shards and a classifier made from the same inputs and resumes the phases."""

from __future__ import annotations

import logging
from pathlib import Path

from pegasus_dist.config import Config, PrepareConfig, QualityConfig, load_config
from pegasus_dist.data.manifest import SHARD_SETS, load_manifest
from pegasus_dist.data.prepare import prepare
from pegasus_dist.errors import ConfigError, DataError
from pegasus_dist.evaluation.classifier import read_meta, train_classifier
from pegasus_dist.evaluation.report import write_report
from pegasus_dist.training.loop import train
from pegasus_dist.training.perceptual import network_recipe

log = logging.getLogger("pegasus_dist.pipeline")

PHASES = ("pretrain", "finetune")  # the config files a --config-dir holds, in running order
PATH_SOURCES = ("cifar10", "stl10", "folder")  # source kinds whose argument is a file or folder


def run_pipeline(sources: list[str], config_dir: Path, overrides: list[str],
                 reprepare: bool = False, command: str = "") -> tuple[Path, Path]:
    """Run every stage that is not done yet; the finetuned model's Pegasus grid and the report."""
    pretrain, finetune = load_phases(config_dir, overrides)
    shards = PrepareConfig(sources=sources, out=pretrain.data.shards, image_size=pretrain.model.image_size)
    log.info("pipeline 1/5: shards at %s", shards.out)
    ensure_shards(shards, reprepare, command)
    log.info("pipeline 2/5: quality classifier at %s", pretrain.classifier_dir)
    ensure_classifier(pretrain.data.shards, pretrain.classifier_dir, pretrain.quality)
    if pretrain.loss.perceptual_weight:
        recipe = network_recipe(pretrain)
        log.info("pipeline 2/5: the perceptual loss's network at %s", recipe.classifier)
        ensure_classifier(pretrain.data.shards, Path(recipe.classifier), recipe)
    for number, cfg in enumerate((pretrain, finetune), start=3):
        log.info("pipeline %d/5: %s -> %s", number, cfg.train.phase, cfg.run_dir)
        train(cfg)  # resumes from the newest checkpoint; returns at once when the phase is complete
    out = Path(finetune.run.output_dir) / "report.html"
    log.info("pipeline 5/5: report -> %s", out)
    report = write_report([pretrain.run_dir, finetune.run_dir], out)
    return finetune.run_dir / "samples" / "pegasus.png", report


def load_phases(config_dir: Path, overrides: list[str]) -> tuple[Config, Config]:
    """The two phases' configs; finetune starts from the pretrain run, both read one shard folder."""
    paths = [config_dir / f"{phase}.yaml" for phase in PHASES]
    if missing := [str(p) for p in paths if not p.is_file()]:
        raise ConfigError(f"--config-dir {config_dir} must hold {' and '.join(p.name for p in paths)}; "
                          f"missing {', '.join(missing)}")
    pretrain = load_config(paths[0], overrides)
    finetune = load_config(paths[1], [*overrides, f"train.init_from={pretrain.run_dir}"])
    if (pretrain.train.phase, finetune.train.phase) != PHASES:
        raise ConfigError(f"{paths[0]} and {paths[1]} must set train.phase to pretrain and finetune")
    if pretrain.run_dir == finetune.run_dir:
        raise ConfigError(f"both phases would write {pretrain.run_dir}; give them different run.name values")
    if pretrain.data.shards != finetune.data.shards:
        raise ConfigError(f"the phases read different shard folders ({pretrain.data.shards}, "
                          f"{finetune.data.shards}); the pipeline prepares one: set data.shards")
    return pretrain, finetune


def ensure_classifier(shards: str, folder: Path, quality: QualityConfig) -> None:
    """Train the classifier at ``folder`` unless it was trained on these very shards as ``quality`` says."""
    try:
        meta = read_meta(folder)
    except DataError as err:  # damaged: trained again, never reused
        log.warning("%s: training it again", err)
        meta = None
    wanted = {"generation": load_manifest(Path(shards) / "mix").generation,
              "seed": quality.classifier_seed, "widths": quality.classifier_widths,
              "epochs": quality.classifier_epochs, "batch_size": quality.classifier_batch_size}
    if meta is not None and all(meta.get(key) == value for key, value in wanted.items()):
        log.info("reusing the classifier at %s: trained on these shards (generation %s) as configured, "
                 "held-out accuracy %s", folder, wanted["generation"], meta["held_out"].get("accuracy"))
        return
    train_classifier(shards, folder, quality)


def ensure_shards(cfg: PrepareConfig, reprepare: bool, command: str) -> None:
    """Prepare the shard sets unless those at ``cfg.out`` were made from the same inputs."""
    wanted = _inputs(cfg.image_size, cfg.seed, cfg.eval_fraction,
                     [_source_identity(spec) for spec in cfg.sources])
    found = {name: _prepared_inputs(Path(cfg.out) / name) for name in SHARD_SETS}
    if all(inputs == wanted for inputs in found.values()):
        log.info("reusing the shards at %s: prepared from %s", cfg.out, wanted)
        return
    other = next((inputs for inputs in found.values() if inputs not in (None, wanted)), None)
    if other is not None and not reprepare:
        raise DataError(f"{cfg.out} holds shards prepared from {other}, not {wanted}; "
                        "pass --reprepare to rewrite them, or data.shards=ANOTHER_FOLDER")
    prepare(cfg, command)


def _prepared_inputs(folder: Path) -> str | None:
    """What a shard set was prepared from, in the words of :func:`_inputs`; None if not usable."""
    try:
        manifest = load_manifest(folder)
    except DataError:  # absent, half-written, emptied or damaged: prepare writes it again
        return None
    made = manifest.provenance
    return _inputs(manifest.image_size, made.get("seed"), made.get("eval_fraction"),
                   [_source_identity(s["spec"], s["origin"]) for s in made.get("sources", [])])


def _inputs(image_size: int, seed: int | None, eval_fraction: float | None, sources: list[str]) -> str:
    """One line that says what a preparation read, and how; equal for the same inputs."""
    return f"{', '.join(sources)} at {image_size} px (seed {seed}, eval fraction {eval_fraction})"


def _source_identity(spec: str, origin: str | None = None) -> str:
    """A source spec with its path resolved, so that ../x and /abs/x name the same source."""
    kind, _, arg = spec.partition(":")
    if kind in PATH_SOURCES and arg != "download":
        return f"{kind}:{origin or Path(arg).resolve()}"
    return spec
