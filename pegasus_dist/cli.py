"""The ``pegasus-dist`` command: one subcommand per job, each a thin call into the package."""

from __future__ import annotations

import importlib
import json
import logging
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer
from typer.core import TyperGroup

from pegasus_dist import __version__
from pegasus_dist.config import PrepareConfig, SamplerConfig, load_config, validated
from pegasus_dist.console import exit_on_user_error, setup_logging
from pegasus_dist.errors import ConfigError, DataError
from pegasus_dist.evaluation import contact_sheet as sheet


class _Commands(TyperGroup):
    """Every command: an error of the user's is one ``error:`` line and its exit code, in process too."""

    def invoke(self, ctx: typer.Context) -> object:
        return exit_on_user_error(lambda: super(_Commands, self).invoke(ctx))


app = typer.Typer(cls=_Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train the winged-horse VAE of the paper on WebDataset shards, on 1 to N processes.")

PREPARE = PrepareConfig.model_construct()  # prepare's defaults (not validated: no --source yet)
SHARDS = Path(PREPARE.out)  # where prepare writes its shard sets
LABELLED = SHARDS / SamplerConfig().shard_set  # the sampler's horses and birds, as prepared
OVERRIDES_HELP = "section.key=value config overrides, e.g. train.epochs=5"
Overrides = Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP)]
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}  # the overrides after the options
SOURCE_HELP = ("cifar10:PATH|download, stl10:PATH|download, folder:PATH (folder or .tar.gz), "
               "synthetic:N[:SEED]; repeat for several")
REPREPARE_HELP = "rewrite the shards at data.shards when they were prepared from other sources"


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"pegasus-dist {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="print the version and exit")] = False) -> None:
    pass


@app.command()
def prepare(
    source: Annotated[list[str], typer.Option("--source", "-s", help=SOURCE_HELP)],
    out: Annotated[str, typer.Option(help="folder for mix/, horse_bird/, eval/")] = PREPARE.out,
    image_size: Annotated[int, typer.Option(help="side of the images")] = PREPARE.image_size,
    shard_size: Annotated[int, typer.Option(help="samples per tar")] = PREPARE.shard_size,
    eval_fraction: Annotated[float, typer.Option(help="held-out share")] = PREPARE.eval_fraction,
    seed: Annotated[int, typer.Option(help="shuffle and held-out seed")] = PREPARE.seed,
    verify_checksums: Annotated[bool, typer.Option(
        help="check official archives against their published md5")] = PREPARE.verify_checksums,
) -> None:
    """Write the WebDataset shard sets (mix, horse_bird, eval) with their manifests."""
    from pegasus_dist.data.prepare import prepare as run_prepare

    cfg = validated(PrepareConfig, {"sources": source, "out": out, "image_size": image_size,
                                    "shard_size": shard_size, "eval_fraction": eval_fraction,
                                    "seed": seed, "verify_checksums": verify_checksums})
    run_prepare(cfg, command=_command_line())


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="a shard set, or the folder holding several")] = SHARDS,
) -> None:
    """Check shards against their manifest: sha256, sample counts, every image decodes."""
    from pegasus_dist.data.verify import find_shard_sets, verify_shard_set

    failed = 0
    for folder in find_shard_sets(path):
        checked, problems = verify_shard_set(folder)
        for problem in problems:
            typer.echo(f"  problem: {problem}", err=True)
        typer.echo(f"{folder}: {checked} samples, " + (f"{len(problems)} problem(s)" if problems else "ok"))
        failed += bool(problems)
    if failed:
        raise DataError(f"{failed} shard set(s) failed verification; re-run `pegasus-dist prepare`")


@app.command(context_settings=EXTRA_ARGS)
def train(
    config: Annotated[Path, typer.Option(help="YAML config, e.g. configs/pretrain.yaml")],
    overrides: Overrides = None,
) -> None:
    """Train one phase; the same as `accelerate launch pegasus_dist/train.py --config ...`."""
    from pegasus_dist.training.loop import main as train_main

    train_main(["--config", str(config), *(overrides or [])])


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Option(
        help="a checkpoint folder (runs/NAME/checkpoints/step_N) or a run folder (its newest)")],
    out: Annotated[Path | None, typer.Option(
        help="where to write the grids [default: RUN/samples/step_N]")] = None,
    method: Annotated[str | None, typer.Option(
        help="slerp (the paper's; default), lerp, analogy (the wing vector) or prior")] = None,
    overrides: Overrides = None,
) -> None:
    """Write sample grids from any checkpoint (--method, or sampler.method); scored if a classifier exists."""
    from pegasus_dist.evaluation.quality import score_run_samples, summary_line
    from pegasus_dist.evaluation.sampler import sample_checkpoint

    extra = [f"sampler.method={method}"] if method else []
    done = sample_checkpoint(checkpoint, [*(overrides or []), *extra], out)
    typer.echo(f"wrote {', '.join(str(p) for p in done.paths.values())}")
    if done.classifier is not None:
        results = score_run_samples(done.cfg, done.folder, done.classifier)
        typer.echo(f"{summary_line(results)} -> {done.folder / 'quality.json'}")


@app.command(context_settings=EXTRA_ARGS)
def classifier(
    config: Annotated[Path, typer.Option(help="YAML config: data.shards to train on, quality.* options")],
    for_loss: Annotated[bool, typer.Option(
        "--for-loss", help="train loss.perceptual_network, its seed and widths, not the judge")] = False,
    overrides: Overrides = None,
) -> None:
    """Train the sample-quality classifier on the mix's labelled images, into quality.classifier."""
    from pegasus_dist.evaluation.classifier import train_classifier
    from pegasus_dist.training.perceptual import network_recipe

    cfg = load_config(config, overrides or [])
    if for_loss and not cfg.loss.perceptual_network:
        raise ConfigError(f"--for-loss trains loss.perceptual_network, which {config} leaves empty: set it")
    quality = network_recipe(cfg) if for_loss else cfg.quality
    folder = Path(quality.classifier) if for_loss else cfg.classifier_dir
    meta = train_classifier(cfg.data.shards, folder, quality)
    typer.echo(f"held-out accuracy {meta['held_out'].get('accuracy', 0):.3f} on "
               f"{meta['held_out']['images']} images after {meta['training_seconds']:.0f} s -> {folder}")


@app.command(context_settings=EXTRA_ARGS)
def score(
    samples: Annotated[Path, typer.Argument(help="a samples folder (RUN/samples or RUN/samples/step_N)")],
    config: Annotated[Path, typer.Option(help="YAML config: quality.classifier, data.shards, eval")],
    out: Annotated[Path | None, typer.Option(
        help="JSON to write, e.g. another classifier's scores [default: SAMPLES/quality.json]")] = None,
    overrides: Overrides = None,
) -> None:
    """Score a samples folder's grids and their crossfade baselines with the classifier -> quality.json."""
    from pegasus_dist.evaluation.classifier import load_classifier
    from pegasus_dist.evaluation.quality import score_run_samples, summary_line

    cfg = load_config(config, overrides or [])
    out = out or samples / "quality.json"
    results = score_run_samples(cfg, samples, load_classifier(cfg.classifier_dir), out)
    typer.echo(json.dumps(results["grids"], indent=2))
    typer.echo(f"{summary_line(results)} -> {out}")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="a checkpoint folder or a run folder (its newest)")],
    out: Annotated[Path | None, typer.Option(help="JSON to write [default: RUN/eval/step_N.json]")] = None,
    overrides: Overrides = None,
) -> None:
    """Held-out negative ELBO (nats, bits/dim), its parts, PSNR and active latent units."""
    from pegasus_dist.evaluation.classifier import find_classifier
    from pegasus_dist.evaluation.heldout import evaluate as run_eval
    from pegasus_dist.evaluation.heldout import leak, write_eval
    from pegasus_dist.evaluation.sampler import load_trained_model
    from pegasus_dist.training.state import read_state

    cfg, model, folder = load_trained_model(checkpoint, overrides or [])
    held_out = Path(cfg.data.shards) / cfg.eval.shard_set
    if problem := leak(read_state(folder).shards, held_out):  # the user's choice: measured, and said
        logging.getLogger("pegasus_dist.cli").warning("%s; read these metrics as not held out", problem)
    metrics = run_eval(model, held_out, cfg.eval.batch_size, cfg.eval.seed, find_classifier(cfg))
    path = write_eval(metrics, out or folder.parent.parent / "eval" / f"{folder.name}.json")
    typer.echo(json.dumps(metrics, indent=2))
    typer.echo(f"wrote {path}")


@app.command("contact-sheet")
def contact_sheet(
    shard_set: Annotated[Path, typer.Option(help="labelled shard set")] = LABELLED,
    out: Annotated[Path, typer.Option(
        help="PNG to write (a .json of the keys beside it)")] = Path("contact-sheet.png"),
    label: Annotated[list[str] | None, typer.Option(
        help="classes to show", show_default=", ".join(sheet.LABELS))] = None,
    per_label: Annotated[int, typer.Option(help="candidates per class")] = sheet.PER_LABEL,
    seed: Annotated[int, typer.Option(help="which candidates")] = sheet.SEED,
) -> None:
    """Candidate horses and birds, captioned with their keys, to pick the sampler's by eye."""
    png, listing = sheet.contact_sheet(shard_set, out, tuple(label or sheet.LABELS), per_label, seed=seed)
    typer.echo(f"wrote {png} and {listing}")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run folders, or a folder of runs")],
    out: Annotated[Path, typer.Option(help="HTML page to write")] = Path("report.html"),
) -> None:
    """One HTML page with each phase's loss curves, held-out metrics and sample grids."""
    from pegasus_dist.evaluation.report import write_report

    typer.echo(f"wrote {write_report(runs, out)}")


@app.command()
def bench(
    images: Annotated[int, typer.Option(help="images to benchmark with")] = 10000,
    steps: Annotated[int, typer.Option(help="timed training steps per precision")] = 8,
    size: Annotated[list[int] | None, typer.Option(
        help="image side of the scaling rows; repeat for several", show_default="32, 64, 96")] = None,
    images_from: Annotated[str, typer.Option(
        help="auto (the CIFAR-10 JPEGs in ../shared/data when present, else synthetic), "
             "synthetic, or an image folder or .tar.gz")] = "auto",
    process_steps: Annotated[int, typer.Option(help="steps of the 1- and 2-process runs")] = 60,
    compile_rows: Annotated[bool, typer.Option(
        "--compile", help="also time train.compile=true, with and without channels_last "
                          "(inductor compiles for about a minute a variant on 2 cores)")] = False,
    rounds: Annotated[int, typer.Option(
        help="times each comparison's loops are timed in turn, the best of each kept (fewer: faster, "
             "noisier)", min=1)] = 5,
    batch: Annotated[int, typer.Option(help="per-process batch of the training rows", min=1)] = 128,
    out: Annotated[Path, typer.Option(help="JSON to write")] = Path("bench/results/latest.json"),
) -> None:
    """Loader, trainer, prepare and process-count throughput, each against its baseline."""
    harness = _bench_module("harness")
    rows = harness.run_bench(images, steps, out, size or [32, 64, 96], images_from, process_steps,
                             compile_rows, rounds, batch)
    typer.echo(harness.format_table(rows))
    typer.echo(f"wrote {out}")


def _bench_module(name: str) -> ModuleType:
    """bench/NAME.py of the repository this package runs from: a developer's tool, not the library's."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "bench" / f"{name}.py").is_file():
        raise ConfigError(f"no bench/{name}.py beside {Path(__file__).parent}: `pegasus-dist bench` and "
                          "`scale-check` run from a clone of the repository (`pip install -e .`)")
    sys.path.insert(0, str(repo))  # its spawned processes import it by this name too
    return importlib.import_module(f"bench.{name}")


@app.command("scale-check", add_help_option=False, context_settings=EXTRA_ARGS)
def scale_check(ctx: typer.Context) -> None:
    """Train the real model a few steps at a large global batch (bench/scale_check.py: --help there)."""
    _bench_module("scale_check").main(ctx.args)


@app.command(context_settings=EXTRA_ARGS)
def pipeline(
    source: Annotated[list[str], typer.Option("--source", "-s", help=SOURCE_HELP)],
    config_dir: Annotated[Path, typer.Option(
        help="folder holding pretrain.yaml and finetune.yaml")] = Path("configs/reference"),
    reprepare: Annotated[bool, typer.Option(help=REPREPARE_HELP)] = False,
    overrides: Annotated[list[str] | None, typer.Argument(help=OVERRIDES_HELP + " (both phases)")] = None,
) -> None:
    """Shards, pretrain, finetune, grids, held-out eval and HTML report; run again to resume."""
    _run_pipeline(source, config_dir, reprepare, overrides or [])


@app.command()
def demo(
    images: Annotated[int, typer.Option(help="synthetic images to prepare")] = 3000,
    reprepare: Annotated[bool, typer.Option(help=REPREPARE_HELP)] = False,
    overrides: Overrides = None,
) -> None:
    """The pipeline on synthetic data, offline on a CPU: --source synthetic:N --config-dir configs/smoke."""
    _run_pipeline([f"synthetic:{images}"], Path("configs/smoke"), reprepare, overrides or [])


def _run_pipeline(sources: list[str], config_dir: Path, reprepare: bool, overrides: list[str]) -> None:
    from pegasus_dist.pipeline import run_pipeline

    # A stop signal ends it with exit 75 (console.exit_on_user_error); the same command resumes.
    pegasus, report = run_pipeline(sources, config_dir, overrides, reprepare, _command_line())
    typer.echo(f"Pegasus grid: {pegasus}")
    typer.echo(f"report: {report}")


def _command_line() -> str:
    return shlex.join(["pegasus-dist", *sys.argv[1:]])


def main() -> None:
    setup_logging()
    app()
