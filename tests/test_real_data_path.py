"""The README's first run on real data, block after block, and `pegasus-dist pipeline`.

The blocks of the README section "First run on real data" are read from
README.md, so that this test breaks when the README drifts, and run in order
from a fresh folder that holds a copy of ``configs/`` (as a clone's root
does), with two changes only, both made by :func:`adapt`:

- the source path ``../shared/data/cifar10-jpg.tar.gz`` becomes a small
  image-folder tarball built here (``tiny-jpg/<train|test>/<class>/NNNN.jpg``:
  JPEGs of synthetic horses, birds and three other classes);
- the commands that train (``train`` and ``pipeline``) get :data:`TINY`
  appended: a few steps of a tiny model, W&B disabled; ``classifier`` trains
  for one epoch.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from helpers import cli_here
from PIL import Image
from processes import BIN, REPO, run_bounded

from pegasus_dist.data.manifest import load_manifest
from pegasus_dist.data.shards import ShardSet
from pegasus_dist.data.sources import synthetic

pytestmark = pytest.mark.process

README_SOURCE = "../shared/data/cifar10-jpg.tar.gz"
SECTION = "## First run on real data"
STEPS = 3
LONG = 40  # steps of each phase in the test that kills the pipeline
# helpers.TINY's model (milliseconds a step), a few steps, one epoch of the quality classifier
TINY = [f"train.max_steps={STEPS}", "train.log_every=1", "model.channels=[4,4,8,8]",
        "model.fc_dims=[16,16,8]", "model.latent_dim=4", "data.batch_size=16",
        "data.num_workers=0", "wandb.mode=disabled", "quality.classifier_epochs=1"]
CLASSIFIER = ["quality.classifier_epochs=1"]


# --- the README's commands ------------------------------------------------------


def readme_blocks() -> list[list[list[str]]]:
    """The section's bash blocks, each a list of commands (argv lists), in README order."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return [[shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()
             if shlex.split(line, comments=True)] for block in blocks]


def adapt(argv: list[str], tarball: Path) -> list[str]:
    """A README command as this test runs it: the small tarball, and TINY for training."""
    assert argv[0] == "pegasus-dist", f"not a pegasus-dist command: {shlex.join(argv)}"
    args = [arg.replace(README_SOURCE, str(tarball)) for arg in argv[1:]]
    extra = {"train": TINY, "pipeline": TINY, "classifier": CLASSIFIER}.get(args[0], [])
    return [str(BIN / "pegasus-dist"), *args, *extra]


def run_in(cwd: Path, argv: list[str], timeout: float = 180) -> str:
    done = run_bounded(argv, timeout, cwd=cwd)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-6000:]}"
    return done.stdout


# --- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    """An image-folder tarball like the CIFAR-10 one: tiny-jpg/<split>/<class>/NNNN.jpg."""
    source = synthetic(360, 32, seed=3)
    path = tmp_path_factory.mktemp("data") / "tiny-jpg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for i, (image, label, split) in enumerate(zip(source.images, source.labels, source.splits,
                                                      strict=True)):
            if label is None:
                continue
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=95)
            member = tarfile.TarInfo(f"tiny-jpg/{'test' if split == 'test' else 'train'}/{label}/"
                                     f"{i:04d}.jpg")
            member.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(member, buffer)
    return path


def clone(root: Path) -> Path:
    """A folder laid out like the repository's root, as far as the README's commands need."""
    root.mkdir()
    shutil.copytree(REPO / "configs", root / "configs")
    return root


# --- what a user checks ------------------------------------------------------------


def labels_of(shard_set: Path) -> dict[str, str]:
    return {s.key: s.meta["label"] for s in ShardSet(shard_set)}


def assert_pegasus_grid(samples: Path, labels: dict[str, str]) -> None:
    """8 rows of a horse and a bird of the shards, 8 mu values, each tile where pegasus.json says."""
    layout = json.loads((samples / "pegasus.json").read_text())
    tile, pad = layout["tile_size"], layout["padding"]
    with Image.open(samples / "pegasus.png") as grid:
        assert grid.size == (8 * (tile + pad) + pad,) * 2
    assert (tile, layout["columns"], len(layout["rows"])) == (32, 8, 8)
    for row in layout["rows"]:
        assert (labels[row["horse"]], labels[row["bird"]]) == ("horse", "bird")
        assert row["mu"][0] == pytest.approx(0.4) and row["mu"][-1] == pytest.approx(0.7)


def embedded(page: str, png: Path) -> bool:
    return base64.b64encode(png.read_bytes()).decode() in page


def assert_report(page: str, runs: list[Path]) -> None:
    for run in runs:
        assert f"<h2>{run.name}" in page
        for grid in ("pegasus", "reconstructions", "prior"):
            assert embedded(page, run / "samples" / f"{grid}.png"), f"{run}: {grid} not in report"
        assert "held-out evaluation" in page


def checkpoint_times(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns
            for p in (run / "checkpoints").rglob("*") if p.is_file()}


# --- the tests -----------------------------------------------------------------------


def test_readme_real_data_blocks_run_in_sequence(tarball, tmp_path, capsys, monkeypatch):
    """Through the console script's entry in this process (cli_here), but for `train`: the
    reference recipe trains in bf16, and Accelerate allows one precision a process."""
    blocks = [b for b in readme_blocks() if not any(argv[1] == "pipeline" for argv in b)]
    commands = [argv for block in blocks for argv in block]
    stages = [argv[1] for argv in commands]
    assert stages[:6] == ["prepare", "classifier", "classifier", "contact-sheet", "train", "train"]
    assert stages[-1] == "report" and {"sample", "eval"} <= set(stages[6:])
    root = clone(tmp_path / "clone")
    monkeypatch.chdir(root)  # the README's paths are relative to the clone's root
    printed: dict[str, str] = {}  # what the commands of each stage printed
    for argv in commands:
        if argv[1] == "train":
            out = run_in(root, adapt(argv, tarball))
        else:
            code, out = cli_here(capsys, *adapt(argv, tarball)[1:])
            assert code == 0, f"{shlex.join(argv)}\n{out[-6000:]}"
        printed[argv[1]] = printed.get(argv[1], "") + out

    shards = root / "shards" / "cifar10-jpg"  # where prepare wrote and configs/reference read
    assert load_manifest(shards / "mix").provenance["sources"][0]["origin"] == str(tarball)
    labels = labels_of(shards / "horse_bird")
    sheet = json.loads((root / "runs/reference/contact-sheet.json").read_text())["keys"]
    assert {labels[k] for k in sheet["horse"]} == {"horse"}
    assert {labels[k] for k in sheet["bird"]} == {"bird"}

    assert printed["classifier"].count("held-out accuracy") == 2
    judge, network = (json.loads((root / f"runs/reference/{name}/classifier.json").read_text())
                      for name in ("classifier", "perceptual"))
    assert (judge["seed"], network["seed"]) == (0, 1) and len(network["widths"]) > len(judge["widths"])
    assert "perceptual loss in the features of runs/reference/perceptual" in printed["train"]

    pretrain, finetune = root / "runs/reference/pretrain", root / "runs/reference/finetune"
    final = f"step_{STEPS:08d}"
    assert f"initialised finetune from runs/reference/pretrain/checkpoints/{final}" in printed["train"]
    for run in (pretrain, finetune):
        assert_pegasus_grid(run / "samples", labels)
        assert json.loads((run / "eval" / f"{final}.json").read_text())["all"]["images"] == \
            load_manifest(shards / "eval").num_samples
    analogy = json.loads((finetune / "samples" / final / "analogy.json").read_text())
    assert {labels[row["horse"]] for row in analogy["rows"]} == {"horse"}
    with Image.open(finetune / "samples" / final / "analogy.png") as grid:
        assert grid.size[1] == 8 * (analogy["tile_size"] + analogy["padding"]) + analogy["padding"]
    assert '"neg_elbo_nats"' in printed["eval"]
    assert_report((root / "runs/reference/report.html").read_text(), [pretrain, finetune])


def pipeline_command(tarball: Path, *extra: str) -> list[str]:
    """The README's one-command run, adapted like the other blocks."""
    (command,) = [argv for block in readme_blocks() for argv in block if argv[1] == "pipeline"]
    assert "--config-dir" in command and "configs/reference" in command
    return [*adapt(command, tarball), *extra]


def test_pipeline_reaches_the_report_then_a_rerun_redoes_nothing(tarball, tmp_path):
    root = clone(tmp_path / "clone")
    command = pipeline_command(tarball)
    out = run_in(root, command)
    assert out.strip().splitlines()[-1] == "report: runs/reference/report.html"
    runs = [root / "runs/reference/pretrain", root / "runs/reference/finetune"]
    assert "initialised finetune from runs/reference/pretrain/checkpoints" in out
    labels = labels_of(root / "shards/cifar10-jpg/horse_bird")
    for run in runs:
        assert_pegasus_grid(run / "samples", labels)
    assert_report((root / "runs/reference/report.html").read_text(), runs)

    before = {run: (checkpoint_times(run), (run / "metrics.jsonl").read_text()) for run in runs}
    started = time.perf_counter()
    again = run_in(root, command)
    seconds = time.perf_counter() - started
    assert "reusing the shards at shards/cifar10-jpg" in again and "pegasus_dist.prepare" not in again
    for network in ("classifier", "perceptual"):
        assert f"reusing the classifier at runs/reference/{network}: trained on these shards" in again
    assert again.count("complete") >= 2 and "held-out:" not in again  # no phase ran again
    for run in runs:
        assert (checkpoint_times(run), (run / "metrics.jsonl").read_text()) == before[run]
    assert_report((root / "runs/reference/report.html").read_text(), runs)
    assert seconds < 30, f"a rerun of a finished pipeline took {seconds:.0f}s"


def test_pipeline_killed_mid_pretrain_continues_on_rerun(tarball, tmp_path):
    root = clone(tmp_path / "clone")
    # After TINY, so these win: enough steps to be killed in the middle of. fp32: the kill and
    # the resume are what this tests, and the recipe's bf16 costs 18 times fp32's on a CPU
    # without AVX-512 (docs/performance.md).
    steps = ["train.epochs=100", f"train.max_steps={LONG}", "train.checkpoint_every=5",
             "train.log_every=5", "train.mixed_precision=no"]
    command = pipeline_command(tarball, *steps)
    checkpoints = root / "runs/reference/pretrain/checkpoints"
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("step_*")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the pipeline ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = sorted(checkpoints.glob("step_*"))
    assert killed_at and killed_at[-1].name < f"step_{LONG:08d}", "killed too late to test a resume"

    out = run_in(root, command)
    assert "reusing the shards at shards/cifar10-jpg" in out
    assert f"resumed from runs/reference/pretrain/checkpoints/{killed_at[-1].name}" in out
    for phase in ("pretrain", "finetune"):
        state = json.loads((root / f"runs/reference/{phase}/checkpoints/step_{LONG:08d}/state.json")
                           .read_text())
        assert (state["phase"], state["step"]) == (phase, LONG)
    assert_report((root / "runs/reference/report.html").read_text(),
                  [root / "runs/reference/pretrain", root / "runs/reference/finetune"])


def test_pipeline_stops_on_shards_of_other_sources(tarball, tmp_path):
    root = clone(tmp_path / "clone")
    run_in(root, [str(BIN / "pegasus-dist"), "prepare", "--source", "synthetic:200",
                  "--out", "shards/cifar10-jpg"])
    done = run_bounded(pipeline_command(tarball), timeout=120, cwd=root)
    assert done.returncode == 2, done.stdout[-4000:]
    errors = [line for line in done.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stdout
    assert "shards/cifar10-jpg holds shards prepared from synthetic:200" in errors[0]
    assert f"not folder:{tarball}" in errors[0] and "--reprepare" in errors[0]
    assert not (root / "runs").exists()
