"""The end of a phase (main process): the sample grids and the held-out evaluation of its final model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pegasus_dist.config import Config
from pegasus_dist.errors import DataError
from pegasus_dist.evaluation.classifier import Classifier, find_classifier
from pegasus_dist.evaluation.heldout import DESCRIPTIVE, evaluate, leak, write_eval
from pegasus_dist.evaluation.quality import flatten, score_run_samples, summary_line
from pegasus_dist.evaluation.sampler import run_sampler
from pegasus_dist.training.state import read_state
from pegasus_dist.training.tracking import MetricsLog

log = logging.getLogger("pegasus_dist.training.finish")


def sample_and_evaluate(cfg: Config, model: torch.nn.Module, metrics: MetricsLog, step: int,
                        final: Path) -> None:
    """The phase's grids (logged as images) and the held-out metrics of ``final``, its last checkpoint."""
    classifier = find_classifier(cfg)  # None, and one line on how to create it, when absent
    outputs = run_sampler(model, cfg.sampler, cfg.data.shards, cfg.run_dir / "samples", classifier=classifier)
    metrics.log_images(outputs.paths, outputs.captions, step=step, prefix=cfg.train.phase)
    _evaluate(cfg, model, metrics, step, final, classifier)
    log.info("%s done at step %d: checkpoint %s, Pegasus grid %s",
             cfg.train.phase, step, final, outputs.paths["pegasus"])


def _evaluate(cfg: Config, model: torch.nn.Module, metrics: MetricsLog, step: int, checkpoint: Path,
              classifier: Classifier | None) -> None:
    """Held-out metrics of the final model (eval/<checkpoint>.json) and, with the classifier, the
    scores of the phase's grids (samples/quality.json)."""
    held_out = Path(cfg.data.shards) / cfg.eval.shard_set
    if not (held_out / "manifest.json").is_file():
        log.warning("no held-out set at %s: skipping the evaluation", held_out)
        return
    if problem := leak(read_state(checkpoint).shards, held_out):  # a `prepare` while this phase trained
        log.warning("%s; skipping the held-out evaluation and the quality scores: prepare the shards as they "
                    "were (the same sources and seed), then run `pegasus-dist eval --checkpoint %s`",
                    problem, checkpoint)
        return
    if classifier is not None:
        try:
            quality = score_run_samples(cfg, cfg.run_dir / "samples", classifier)
        except DataError as err:  # e.g. a tiny held-out set without 2 horses and birds: the phase is done
            log.warning("skipping the quality scores: %s", err)
        else:
            metrics.log({f"{cfg.train.phase}/quality/{k}": v for k, v in flatten(quality).items()}, step=step)
            log.info("%s", summary_line(quality))
    results = evaluate(model, held_out, cfg.eval.batch_size, cfg.eval.seed, classifier)
    path = write_eval(results, cfg.run_dir / "eval" / f"{checkpoint.name}.json")
    measured, described = {}, {}
    for subset, values in results.items():
        for name, value in values.items():
            into = described if name in DESCRIPTIVE else measured
            into[f"{cfg.train.phase}/eval/{subset}/{name}"] = value
    metrics.log(measured, step=step)
    metrics.summarize(described)  # constants of the evaluation: W&B's summary, not its history
    summary = results["all"]
    log.info("held-out: %.1f nats/image (%.4f bits/dim), PSNR %.2f dB, %s/%s active units -> %s",
             summary["neg_elbo_nats"], summary["bits_per_dim"], summary["psnr_db"],
             summary["active_units"], summary["latent_dim"], path)
