"""What several test files share: the smoke config, the fault script, CLI runs and metric readers.

``processes`` holds the mechanics of running processes; this module the
project's own commands and files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from processes import BIN, REPO, Ranks, popen, run_bounded, run_ranks
from warm import WarmProcess

from pegasus_dist.config import ModelConfig
from pegasus_dist.data.shards import ShardSet

SCRIPTS = Path(__file__).parent / "scripts"
SMOKE = str(REPO / "configs/smoke/pretrain.yaml")
TINY = ModelConfig(channels=[8, 8, 16, 16], fc_dims=[32, 32, 16], latent_dim=8)  # milliseconds a step
# Each phase's steps in the shared pipeline. At lr 0.01 the tiny model's finetune grid shows a
# different picture in each row, in both memory layouts: rows 16-27 grey levels apart (median),
# where half the channels, 4 latent dimensions and 60 steps drew rows 0.0-0.1 apart in pretraining.
PIPELINE_STEPS = 300
TINY_ARGS = [f"model.{key}={str(getattr(TINY, key)).replace(' ', '')}"  # TINY as command-line overrides
             for key in ("channels", "fc_dims", "latent_dim")]


@dataclass
class Trained:
    """A finished run folder, how it was made, and what its command printed."""

    root: Path  # run.output_dir: one folder per phase below it
    overrides: list[str]  # the config overrides it ran with: the same again resumes or reuses it
    output: str

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"


def grid_tiles(png: Path, tile: int, padding: int) -> np.ndarray:
    """The tiles of a sampler grid as (rows, columns, T, T, 3) uint8, once its padding is checked black.

    Black padding lines at every ``tile + padding`` pixels, and only there, are
    what puts each tile where the grid's JSON says it is.
    """
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    step = tile + padding
    rows, columns = ((side - padding) // step for side in pixels.shape[:2])
    assert pixels.shape[:2] == (rows * step + padding, columns * step + padding), (png, pixels.shape)
    inside = np.zeros(pixels.shape[:2], dtype=bool)
    for r in range(rows):
        for c in range(columns):
            inside[padding + r * step : (r + 1) * step, padding + c * step : (c + 1) * step] = True
    assert (pixels[~inside] == 0).all(), f"{png}: the padding between tiles is not black"
    return np.stack([[pixels[padding + r * step : (r + 1) * step, padding + c * step : (c + 1) * step]
                      for c in range(columns)] for r in range(rows)])


def assert_tiles_show_images(tiles: np.ndarray, png: Path) -> None:
    """What a person sees at a glance: no blank or one-colour tile, and no row drawn twice.

    Rows are compared, not tiles: neighbouring tiles of a slerp row are decoded from
    latents a few hundredths of mu apart and can round to the same bytes in a sound
    grid. A sampler that draws one pair or one latent into two rows repeats the row.
    """
    flat = tiles.reshape(-1, *tiles.shape[2:]).astype(float)
    flat_std = flat.reshape(len(flat), -1).std(axis=1)
    assert flat_std.min() > 10, f"{png}: tile {flat_std.argmin()} is nearly one colour ({flat_std.min():.1f})"
    assert min(rows_apart(tiles)) > 0, f"{png}: two rows are identical"


def rows_apart(tiles: np.ndarray) -> list[float]:
    """The mean absolute difference, in grey levels, between every two rows of a grid's tiles."""
    rows = tiles.astype(float).reshape(len(tiles), -1)
    return [np.abs(rows[a] - rows[b]).mean() for a in range(len(rows)) for b in range(a + 1, len(rows))]


def assert_pegasus_layout(samples: Path, labels: dict[str, str]) -> dict:
    """pegasus.json: 8 rows of a horse and a bird of the shards at 8 mu values from 0.4 to 0.7, and
    the phase's three PNGs (pegasus, reconstructions, prior) tiled as it says. The layout."""
    layout = json.loads((samples / "pegasus.json").read_text())
    tile, pad = layout["tile_size"], layout["padding"]
    assert (tile, layout["columns"], len(layout["rows"])) == (32, 8, 8)
    for row in layout["rows"]:
        assert (labels[row["horse"]], labels[row["bird"]]) == ("horse", "bird")
        assert row["mu"][0] == pytest.approx(0.4) and row["mu"][-1] == pytest.approx(0.7)
    assert grid_tiles(samples / "pegasus.png", tile, pad).shape[:2] == (8, 8)
    for name in ("reconstructions", "prior"):
        assert grid_tiles(samples / f"{name}.png", tile, pad).shape[1] == 8
    return layout


def labels_of(shard_set: Path) -> dict[str, str]:
    return {s.key: s.meta["label"] for s in ShardSet(shard_set)}


def overrides(shards: Path, runs: Path, steps: int, *extra: str) -> list[str]:
    """A short smoke run on ``shards`` into ``runs``: W&B off, batch 16, a logged row per step."""
    return [f"data.shards={shards}", f"run.output_dir={runs}", f"train.max_steps={steps}",
            "wandb.mode=disabled", "data.batch_size=16", "train.log_every=1", *extra]


def run_cli(*args: str, timeout: float = 300) -> str:
    """``pegasus-dist ARGS``; its output, once it succeeded."""
    done = run_bounded([str(BIN / "pegasus-dist"), *args], timeout)
    assert done.returncode == 0, done.stdout[-6000:]
    return done.stdout


@contextlib.contextmanager
def files_capped_at(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes fail in this process (EFBIG), as a file finds no room on a full disk.

    As root, whom permissions never stop, this is how a fast test makes a write fail midway."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def cli_here(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``pegasus-dist ARGS`` in this process, as its entry point runs it: the exit code and the output.

    For commands that need no process of their own (errors, sampling, reports):
    the same command-line parsing and the same one-line errors as the console
    script, without the seconds a Python process takes to import torch.
    """
    from pegasus_dist.cli import app
    from pegasus_dist.console import exit_on_user_error

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # `train` sets logging up on the captured stderr
    capsys.readouterr()
    try:
        exit_on_user_error(lambda: app(list(args), prog_name="pegasus-dist"))
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        root.handlers[:], root.level = handlers, level
    printed = capsys.readouterr()
    return code, printed.out + printed.err


def train_ranks(nproc: int, overrides: list[str], timeout: float = 300) -> str:
    """train.py with the smoke config on ``nproc`` CPU processes (:class:`processes.Ranks`); its output,
    once it succeeded. ``accelerate launch`` itself is tested in test_launch.py and test_pipeline.py."""
    done = run_ranks([str(REPO / "pegasus_dist/train.py"), "--config", SMOKE, *overrides], nproc, timeout)
    assert done.returncode == 0, done.stdout[-8000:]
    return done.stdout


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen | WarmProcess:
    """``cmd`` running in its own process group (killable as a whole), output captured; ``env`` is
    added to this process's environment."""
    return popen(cmd, env)


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen | WarmProcess | Ranks,
               timeout: float) -> None:
    """Poll ``condition``; fail with ``proc``'s output if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.communicate(timeout=30)[0][-4000:]}")
        assert time.monotonic() < deadline, f"condition not reached in {timeout}s"
        time.sleep(0.05)


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error: ")]


def metrics(run: Path) -> list[dict]:
    """Every row of ``run``'s metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def training_rows(run: Path) -> list[dict]:
    """The rows logged while training (not the final evaluation's)."""
    return [row for row in metrics(run) if "pretrain/epoch" in row]


def training_steps(run: Path) -> list[int]:
    return [row["step"] for row in training_rows(run)]


def losses(run: Path) -> dict[int, float]:
    """Step -> logged loss; a resumed run's rows replace those of the killed one."""
    return {row["step"]: row["pretrain/loss"] for row in metrics(run) if "pretrain/loss" in row}


def shard_keys(shard_set: Path) -> list[str]:
    """The key of every sample of a shard set, in shard order."""
    return [s.key for s in ShardSet(shard_set)]


def written_before_checksums(checkpoint: Path) -> None:
    """``checkpoint`` as versions before checksums left it: no SHA256SUMS, no ``sums`` in state.json."""
    (checkpoint / "SHA256SUMS").unlink()
    state = json.loads((checkpoint / "state.json").read_text())
    del state["sums"]
    (checkpoint / "state.json").write_text(json.dumps(state))


DELETE = object()  # a field's damage: removed


def with_field(data: object, where: str, value: object) -> object:
    """A deep copy of JSON ``data`` whose field ``where`` ("shards[0].sha256", "" for the whole
    file) is ``value``, or removed for DELETE."""
    data = json.loads(json.dumps(data))
    if not where:
        return value
    *path, last = [int(part) if part.isdigit() else part for part in re.findall(r"\w+", where)]
    node = data
    for part in path:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


def field_words(where: str, value: object) -> str:
    """How a one-line refusal names the field ``where`` that :func:`with_field` set to ``value``."""
    if not where:
        return " holds "  # "x.json holds [], not an object of fields"
    return f"has no field {where};" if value is DELETE else f"field {where} "
