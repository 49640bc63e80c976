"""Small things people hit at once: SLURM's log folder, sheet captions, sampled grids, --version, Ctrl-C."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from helpers import PIPELINE_STEPS, Trained, cli_here
from PIL import Image, ImageDraw, ImageFont
from processes import REPO

from pegasus_dist.console import exit_on_user_error, import_entry
from pegasus_dist.data.shards import ShardSet
from pegasus_dist.evaluation.contact_sheet import draw_sheet


def in_process(capsys: pytest.CaptureFixture, *args: str) -> str:
    """``pegasus-dist ARGS`` run in this process; its output, once it succeeded."""
    code, output = cli_here(capsys, *args)
    assert code == 0, output[-6000:]
    return output


def test_version_is_the_one_in_pyproject(capsys):
    version = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)[1]
    assert in_process(capsys, "--version").strip() == f"pegasus-dist {version}"


def test_ctrl_c_is_one_line_and_exit_130_not_a_traceback(capsys):
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(interrupted)
    assert stopped.value.code == 130
    assert capsys.readouterr().err == ("error: interrupted (Ctrl-C); run the same command again (training "
                                       "resumes from its last checkpoint)\n")


def test_ctrl_c_that_the_entry_imports_swallow_still_ends_it_in_one_line(tmp_path, monkeypatch, capsys):
    """What torch's C++ side does to a KeyboardInterrupt raised while it imports numpy: it clears it
    (and elsewhere aborts on it), so the entry's imports hold Ctrl-C until they are done."""
    (tmp_path / "swallows_ctrl_c.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "try:\n    time.sleep(0.05)\nexcept KeyboardInterrupt:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "swallows_ctrl_c", raising=False)
    # Ctrl-C at a terminal: a suite started in the background (`cmd &`) inherits SIGINT ignored.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as stopped:
            import_entry("swallows_ctrl_c")
    finally:
        signal.signal(signal.SIGINT, before)
    assert stopped.value.code == 130
    assert capsys.readouterr().err == ("error: interrupted (Ctrl-C); run the same command again (training "
                                       "resumes from its last checkpoint)\n")


@pytest.mark.process  # git
@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="needs the git checkout")
def test_the_slurm_log_folder_comes_with_a_clone():
    """sbatch does not create its --output folder: without it a job fails and leaves no log."""
    scripts = sorted((REPO / "slurm").glob("*.sh"))
    folders = {Path(m[1]).parent for s in scripts
               for m in re.finditer(r"^#SBATCH --output=(\S+)$", s.read_text(), re.M)}
    assert folders == {Path("slurm/logs")}

    def ignored(path: str) -> bool:
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert done.returncode in (0, 1)
        return done.returncode == 0

    for folder in folders:
        assert (REPO / folder / ".gitkeep").is_file()
        assert not ignored(f"{folder}/.gitkeep")  # committed, so a fresh clone has the folder
        assert ignored(f"{folder}/pegasus-pretrain-1234.out")  # but never the logs


def write_image_folder(root: Path, per_class: int) -> None:
    """root/train/<horse|bird>/*.png: flat colours, a different one per image."""
    for c, label in enumerate(("horse", "bird")):
        (root / "train" / label).mkdir(parents=True)
        for i in range(per_class):
            colour = (40 + 9 * i, 100 + 120 * c, 200 - 7 * i)
            Image.new("RGB", (32, 32), colour).save(root / "train" / label / f"{i:03d}.png")


def test_every_contact_sheet_caption_fits_its_tile_and_gives_back_its_key(tmp_path, capsys):
    # A folder source with a long name: keys like folder_birds_in_flight_and_horses-train-0000012,
    # far wider than a tile, as folder_cifar10_jpg-train-0004013 is.
    write_image_folder(tmp_path / "birds_in_flight_and_horses", per_class=20)
    in_process(capsys, "prepare", "--source", f"folder:{tmp_path / 'birds_in_flight_and_horses'}",
               "--out", str(tmp_path / "shards"))
    shard_set = tmp_path / "shards" / "horse_bird"
    in_process(capsys, "contact-sheet", "--shard-set", str(shard_set), "--out", str(tmp_path / "sheet.png"),
               "--per-label", "10")
    listing = json.loads((tmp_path / "sheet.json").read_text())
    chosen, columns, tile = listing["keys"], listing["columns"], listing["tile"]
    assert [len(keys) for keys in chosen.values()] == [10, 10]

    # The sheet the command wrote is the one drawn here, whose captions are then measured.
    shards = ShardSet(shard_set)
    images = shards.images({s.key for s in shards})
    sheet, captions = draw_sheet(chosen, images, columns, tile)
    with Image.open(tmp_path / "sheet.png") as written:
        pixels = np.asarray(written.convert("RGB"))
    assert np.array_equal(pixels, np.asarray(sheet))

    assert [c.key for c in captions] == [k for keys in chosen.values() for k in keys]
    assert all(len(c.lines) >= 2 for c in captions)  # the keys are too long for one line
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for caption in captions:
        assert "".join(caption.lines) == caption.key
        left, top, right, bottom = caption.strip
        assert right - left == tile
        for origin, line in zip(caption.origins, caption.lines, strict=True):
            x0, y0, x1, y1 = draw.textbbox(origin, line, font=font)
            assert left <= x0 and x1 <= right and top <= y0 and y1 <= bottom, (caption.key, line)
        strip = pixels[top:bottom, left:right].min(axis=2)
        assert (strip < 128).any()  # the caption is there
        assert (strip[:, [0, -1]] == 255).all()  # and keeps off both edges of its tile
    for a, b in pairwise(captions):  # neighbours' strips do not overlap
        assert a.strip[2] <= b.strip[0] or a.strip[3] <= b.strip[1] or b.strip[3] <= a.strip[1]


def test_the_report_shows_the_grids_of_pegasus_dist_sample(smoke_pipeline: Trained, tmp_path, capsys):
    shared = sorted(smoke_pipeline.pretrain.rglob("*"))
    run = tmp_path / "pretrain"  # a copy: the shared run stays as the pipeline left it
    shutil.copytree(smoke_pipeline.pretrain, run, symlinks=True)
    for method in ("analogy", "lerp"):
        in_process(capsys, "sample", "--checkpoint", str(run), "--method", method)
    in_process(capsys, "report", str(run), "--out", str(tmp_path / "report.html"))

    page = (tmp_path / "report.html").read_text()
    shown = {caption: base64.b64decode(data) for data, caption in re.findall(
        r"<img src='data:image/png;base64,([^']+)'><figcaption>([^<]+)</figcaption>", page)}
    last = f"step_{PIPELINE_STEPS:08d}"
    step = run / "samples" / last
    assert shown[f"analogy ({last})"] == (step / "analogy.png").read_bytes()
    assert shown[f"lerp ({last})"] == (step / "lerp.png").read_bytes()
    assert shown["pegasus"] == (run / "samples" / "pegasus.png").read_bytes()  # the phase's own
    assert sorted(smoke_pipeline.pretrain.rglob("*")) == shared  # the copy took every write


def test_train_compile_without_a_cxx_compiler_trains_eager_after_one_warning(monkeypatch, caplog):
    import torch

    from pegasus_dist.config import Config, validated
    from pegasus_dist.training.start import compile_or_eager

    model, cfg = torch.nn.Linear(2, 2), validated(Config, {"train": {"compile": True}})
    compiled = compile_or_eager(model, cfg, warn=True)  # g++ is here: compiled (lazily, at its first call)
    assert compiled is not model and isinstance(compiled, torch.nn.Module)
    assert compile_or_eager(model, Config(), warn=True) is model and not caplog.records  # compile off
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert compile_or_eager(model, cfg, warn=True) is model
    assert compile_or_eager(model, cfg, warn=False) is model  # the other ranks: silent
    assert [r.getMessage() for r in caplog.records] == [
        "train.compile=true, but no C++ compiler 'no-such-compiler-here' is on PATH for torch.compile's "
        "inductor: training eager (uncompiled) instead; install one (g++) or point $CXX at one, or set "
        "train.compile=false to silence this"]
