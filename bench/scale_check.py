"""Does a recipe converge at a large global batch? (`pegasus-dist scale-check`, `python bench/scale_check.py`)

It trains the real model of a config for a few optimizer steps at a given
global batch on this machine, one recipe after the other: the batch is made
of micro-batches by gradient accumulation (``train.grad_accum_steps``), so a
CPU reproduces what a cluster with that global batch computes. Each recipe
is a normal run of the trainer (its own process, a temporary run folder,
W&B off, one logged row per step); the check prints each recipe's loss, KL
and learning rate, step by step, and whether it stayed finite.

Recipes: ``linear``, the rules before issue 11 (lr scaled linearly with the
global batch, no warm-up, no gradient clip), and ``defaults``, the config as
it is. docs/scaling.md holds a table made with it.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from pegasus_dist.config import load_config
from pegasus_dist.errors import ConfigError

log = logging.getLogger("bench.scale_check")

RECIPES = {
    "linear": ["optim.lr_scaling=linear", "optim.warmup_steps=0", "optim.grad_clip=0"],
    "defaults": [],
}
GLOBAL_BATCH = 1024  # one node of slurm/pretrain.sh: 8 GPUs x 128
STEPS = 30  # the linear run was at 5e21 after 10 steps
MICRO_BATCH = 128  # the recipe's per-GPU batch: batch-norm statistics as on the cluster
CONFIG = "configs/pretrain.yaml"


@dataclass
class Trajectory:
    """One recipe's run: its rows and how it ended."""

    recipe: str
    overrides: list[str]
    global_batch: int
    grad_accum_steps: int
    peak_lr: float
    rows: list[dict[str, float]] = field(default_factory=list)  # step, loss, kl, lr
    error: str = ""  # the trainer's error line, if it stopped
    seconds: float = 0.0

    @property
    def finite(self) -> bool:
        """Every logged loss and KL finite, and no step found non-finite by the trainer."""
        return (bool(self.rows) and "non-finite" not in self.error
                and all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in self.rows))

    @property
    def outcome(self) -> str:
        if not self.error:
            return "trained" if self.finite else "**not finite**"
        if "non-finite" in self.error:
            return "**stopped: non-finite loss**"
        return "**stopped: diverging**" if "diverging" in self.error else "**failed**"


def scale_check(config: str, global_batch: int, steps: int, micro_batch: int,
                recipes: list[str], overrides: list[str]) -> list[Trajectory]:
    """Train each recipe for ``steps`` optimizer steps at ``global_batch``; return what it did."""
    if global_batch % micro_batch:
        raise ConfigError(f"--global-batch {global_batch} is not a multiple of --micro-batch "
                          f"{micro_batch}; pick sizes that divide")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ConfigError(f"unknown recipe {unknown[0]}; choose from {', '.join(RECIPES)}")
    accum = global_batch // micro_batch
    fixed = [f"data.batch_size={micro_batch}", f"train.grad_accum_steps={accum}",
             f"train.max_steps={steps}", "train.log_every=1", "train.checkpoint_every=1000000000",
             "wandb.mode=disabled"]
    done = []
    with tempfile.TemporaryDirectory(prefix="scale-check-") as tmp:
        for recipe in recipes:
            every = [*overrides, *fixed, *RECIPES[recipe], f"run.output_dir={tmp}/{recipe}"]
            done.append(_run(config, recipe, every, global_batch, accum))
    return done


def _run(config: str, recipe: str, overrides: list[str], global_batch: int,
         accum: int) -> Trajectory:
    from pegasus_dist.training.optim import LrSchedule  # torch: not imported by the CLI until needed

    cfg = load_config(config, overrides)  # a bad key fails here, before any training
    schedule = LrSchedule(cfg.optim, global_batch)
    found = Trajectory(recipe, overrides, global_batch, accum, schedule.peak)
    log.info("%s: %s, %d accumulation steps of %d, %d steps...", recipe, schedule.describe(),
             accum, cfg.data.batch_size, cfg.train.max_steps)
    started = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "pegasus_dist/train.py"),
           "--config", config, *overrides]
    ran = subprocess.run(cmd, capture_output=True, text=True)
    found.seconds = time.perf_counter() - started
    errors = [line for line in (ran.stdout + ran.stderr).splitlines() if line.startswith("error: ")]
    found.error = errors[-1] if errors else ("" if ran.returncode == 0
                                            else f"exit {ran.returncode}: {ran.stderr[-500:]}")
    metrics = cfg.run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    phase = cfg.train.phase
    found.rows = [{"step": r["step"], "loss": r[f"{phase}/loss"], "kl": r[f"{phase}/kl"],
                   "lr": r[f"{phase}/lr"]} for r in rows if f"{phase}/loss" in r]
    return found


def format_trajectory(t: Trajectory) -> str:
    lines = [f"{t.recipe} at global batch {t.global_batch} ({t.grad_accum_steps} accumulation "
             f"steps), peak lr {t.peak_lr:.3g}, {t.seconds:.0f} s:",
             "  step        loss          KL        lr"]
    lines += [f"  {r['step']:4d} {r['loss']:11.5g} {r['kl']:11.4g} {r['lr']:9.3g}" for r in t.rows]
    lines.append(f"  {t.outcome.strip('*')}, finite: {'yes' if t.finite else 'no'}"
                 + (f"\n  {t.error}" if t.error else ""))
    return "\n".join(lines)


def format_table(trajectories: list[Trajectory]) -> str:
    """One Markdown row per run: global batch, recipe, learning rates, losses, outcome."""
    lines = ["| global batch | recipe | peak lr | steps | lr at the last step | loss at step 1 "
             "| loss at the last step | KL at the last step | largest loss | outcome | time |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for t in trajectories:
        first, last = (t.rows[0], t.rows[-1]) if t.rows else ({}, {})
        largest = max((r["loss"] for r in t.rows), default=math.nan)
        lines.append(
            f"| {t.global_batch} | {t.recipe} | {t.peak_lr:.3g} | {last.get('step', 0)} | "
            f"{last.get('lr', math.nan):.3g} | {first.get('loss', math.nan):.5g} | "
            f"{last.get('loss', math.nan):.5g} | {last.get('kl', math.nan):.4g} | {largest:.3g} | "
            f"{t.outcome} | {t.seconds:.0f} s |")
    return "\n".join(lines)


def write_json(trajectories: list[Trajectory], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(t) | {"finite": t.finite, "outcome": t.outcome} for t in trajectories]
    out.write_text(json.dumps(rows, indent=2) + "\n")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    global_batch: Annotated[int, typer.Option(help="images per optimizer step")] = GLOBAL_BATCH,
    steps: Annotated[int, typer.Option(help="optimizer steps per recipe")] = STEPS,
    micro_batch: Annotated[int, typer.Option(
        help="images per forward pass; the rest of the global batch by gradient accumulation",
    )] = MICRO_BATCH,
    config: Annotated[str, typer.Option(help="the recipe's YAML config")] = CONFIG,
    recipe: Annotated[list[str] | None, typer.Option(
        help="linear (lr x global batch / base, no warm-up, no clip) or defaults (the config); "
             "repeat for several", show_default="linear, defaults",
    )] = None,
    out: Annotated[Path | None, typer.Option(help="JSON to write the trajectories to")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(
        help="section.key=value config overrides, e.g. train.epochs=5")] = None,
) -> None:
    """Train the real model a few steps at a large global batch, old linear rule beside the defaults."""
    found = scale_check(config, global_batch, steps, micro_batch, recipe or list(RECIPES), overrides or [])
    for trajectory in found:
        typer.echo(format_trajectory(trajectory))
    typer.echo(format_table(found))
    if out:
        write_json(found, out)
        typer.echo(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="pegasus-dist scale-check")


if __name__ == "__main__":
    main()
