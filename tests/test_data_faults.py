"""Faults in the data path: interrupted publishes, leaks between shard sets, hostile or odd sources."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from helpers import cli_here, error_lines, files_capped_at
from PIL import Image

from pegasus_dist.checksums import sha256_file
from pegasus_dist.config import PrepareConfig
from pegasus_dist.data.decoded import ARRAY, INDEX
from pegasus_dist.data.folders import MAX_IMAGE_PIXELS, read_image_folder
from pegasus_dist.data.manifest import load_manifest, write_manifest
from pegasus_dist.data.prepare import prepare, shard_writers
from pegasus_dist.data.shards import ShardSet, write_shard
from pegasus_dist.data.verify import verify_shard_set
from pegasus_dist.errors import DataError

SETS = ("mix", "horse_bird", "eval")


def make(out: Path, seed: int) -> None:
    prepare(PrepareConfig(sources=["synthetic:200"], out=str(out), shard_size=40, eval_fraction=0.1,
                          seed=seed), "test")


# --- publishing the three sets as one unit ------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the code under test catches it."""


def killed_prepare(out: Path, seed: int, at: int, monkeypatch: pytest.MonkeyPatch) -> bool:
    """``prepare`` stopped dead at its ``at``-th rename, link or delete; whether it got that far."""
    calls = 0

    def stopping(original):
        def call(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == at:
                raise Killed
            return original(*args, **kwargs)
        return call

    with monkeypatch.context() as patch:
        for module, name in ((os, "rename"), (os, "replace"), (os, "symlink"), (os, "unlink"),
                             (shutil, "rmtree")):
            patch.setattr(module, name, stopping(getattr(module, name)))
        try:
            make(out, seed)
        except Killed:
            return True
    return False


def published(root: Path) -> dict[str, tuple[str, ...] | None]:
    """Each set's shard checksums when it is there and complete, else None."""
    found = {}
    for name in SETS:
        try:
            manifest = load_manifest(root / name)
        except DataError:
            found[name] = None
            continue
        complete = all(sha256_file(p) == s.sha256 for p, s in zip(manifest.shard_paths, manifest.shards,
                                                                   strict=True))
        found[name] = tuple(s.sha256 for s in manifest.shards) if complete else None
    return found


def test_a_second_prepare_into_one_folder_is_refused_and_deletes_nothing(tmp_path):
    make(tmp_path, seed=0)
    before = published(tmp_path)
    crashed = tmp_path / ".generation-crashed" / "mix"  # what a prepare killed mid-write left
    crashed.mkdir(parents=True)
    (crashed / "shard-000000.tar").write_bytes(b"half")
    holder = FileLock(tmp_path / ".prepare.lock")  # another prepare, writing
    with holder, pytest.raises(DataError) as refused:
        make(tmp_path, seed=1)
    assert str(refused.value) == (f"{tmp_path} is being written by another `pegasus-dist prepare`; wait "
                                  "for it to end, or prepare into another --out")
    assert published(tmp_path) == before and crashed.exists()  # not the other's to remove
    make(tmp_path, seed=1)
    assert published(tmp_path) != before and not crashed.parent.exists()


@pytest.mark.parametrize("layout", ["generations", "before generations"])
def test_a_prepare_killed_anywhere_leaves_the_old_sets_or_the_new_never_both(tmp_path, monkeypatch,
                                                                            layout):
    make(tmp_path / "old", seed=0)
    make(tmp_path / "new", seed=1)
    old, new = published(tmp_path / "old"), published(tmp_path / "new")
    template = tmp_path / "template"
    if layout == "generations":
        shutil.copytree(tmp_path / "old", template, symlinks=True)
    else:  # what earlier versions wrote: three plain folders
        for name in SETS:
            shutil.copytree(tmp_path / "old" / name, template / name)
    at = 0
    while True:
        at += 1
        root = tmp_path / f"root{at}"
        shutil.copytree(template, root, symlinks=True)
        if not killed_prepare(root, 1, at, monkeypatch):
            break
        state = published(root)
        if layout == "generations":
            assert state in (old, new), f"killed at step {at}: {state}"
        else:  # moving the old folders aside cannot be one step: sets may be missing, never mixed
            present = {name: shas for name, shas in state.items() if shas is not None}
            assert (all(shas == old[name] for name, shas in present.items())
                    or all(shas == new[name] for name, shas in present.items())), f"step {at}: {state}"
            assert all(shas is not None for shas in present.values())
    assert at > 5, "the publish was not interrupted at all"
    assert published(root) == new
    # After a kill, the next prepare finishes the job and leaves one generation on disk.
    make(tmp_path / f"root{at - 1}", seed=1)
    assert published(tmp_path / f"root{at - 1}") == new
    hidden = sorted(p.name for p in (tmp_path / f"root{at - 1}").iterdir() if p.name.startswith("."))
    assert len(hidden) == 3 and hidden[0] == ".current" and hidden[1].startswith(".generation-")
    assert hidden[2] == ".prepare.lock"  # kept, so that two prepares never lock two different files


def prepare_here(capsys: pytest.CaptureFixture, out: Path, seed: int) -> tuple[int, str]:
    """`pegasus-dist prepare` of make()'s sources in this process: its exit code and output."""
    return cli_here(capsys, "prepare", "--source", "synthetic:200", "--out", str(out), "--shard-size",
                    "40", "--eval-fraction", "0.1", "--seed", str(seed))


def generations(out: Path) -> list[Path]:
    return sorted(out.glob(".generation-*"))


def _check_in(folder: Path) -> None:
    """Hold this worker until every worker of the pool has checked in: all have started."""
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + 30
    while len(list(folder.iterdir())) < os.cpu_count() and time.monotonic() < deadline:
        time.sleep(0.01)


def _busy_writing(started: Path) -> None:
    started.touch()
    time.sleep(20)
    os._exit(0)  # had SIGTERM not ended it: the pool's join still returns, and the test fails


@pytest.mark.process  # forks the pool's workers
def test_a_pool_stopped_by_an_error_ends_its_busy_shard_writer_whatever_handler_its_caller_has(tmp_path):
    """A pool stopped by an error ends its busy workers with SIGTERM. A worker that kept its caller's
    handler (a "checkpoint and stop", in a notebook that trained a phase first) would live through
    it, and prepare would wait for its shard instead of naming the error."""
    started = tmp_path / "started"
    (tmp_path / "workers").mkdir()
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)  # a caller's: it ends nothing
    try:
        with shard_writers() as pool:
            pool.map(_check_in, [tmp_path / "workers"] * os.cpu_count(), chunksize=1)
            pool.apply_async(_busy_writing, (started,))
            deadline = time.monotonic() + 30
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            stopped = time.monotonic()  # leaving the block is the error's way out: terminate()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert started.exists()
    assert time.monotonic() - stopped < 10, "the pool waited for its busy worker: SIGTERM did not end it"


def test_an_out_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")  # as root, what a read-only folder is to anyone else
    out = tmp_path / "a-file" / "shards"
    code, output = prepare_here(capsys, out, seed=0)
    assert code == 2, output[-3000:]
    assert error_lines(output) == [f"error: cannot write {out}: Not a directory; make {out} writable, "
                                   "or prepare into another --out"], output[-3000:]
    assert "Traceback" not in output


def test_a_prepare_out_of_room_keeps_the_old_sets_and_leaves_nothing_for_the_retry(tmp_path, capsys):
    """A write that fails midway (a full disk): one line with the space there and the space needed,
    the published sets untouched, the unfinished generation removed, and the retry publishes."""
    out = tmp_path / "shards"
    make(out, seed=0)
    (old,), before = generations(out), published(out)
    with files_capped_at(20_000):  # the first shard's tar is 200 KB
        code, output = prepare_here(capsys, out, seed=1)
    assert code == 2, output[-3000:]
    (line,) = error_lines(output)
    needed = re.fullmatch(rf"error: cannot write {out}: File too large \(\d+ MB free there, these sets "
                          r"take about (\d+\.\d) MB\); free space, or prepare into another --out", line)
    assert needed, line
    assert "Traceback" not in output
    assert published(out) == before and generations(out) == [old]  # nothing of the failed one left

    code, output = prepare_here(capsys, out, seed=1)
    assert code == 0, output[-3000:]
    assert published(out) not in (before, {name: None for name in SETS})
    (new,) = generations(out)
    taken = sum(path.stat().st_size for path in new.rglob("*") if path.is_file()) / 2**20
    assert 0.9 < float(needed[1]) / taken < 1.1, (needed[1], taken)  # the space it named


def rewrite_set(folder: Path, samples: list[tuple[str, np.ndarray, dict]]) -> None:
    """Replace a set's shards by one shard of (key, image, meta) ``samples``, its manifest updated
    (and no decoded array: the next reader builds it)."""
    manifest = load_manifest(folder)
    for path in [*manifest.shard_paths, folder / ARRAY, folder / INDEX]:
        path.unlink()
    shard = folder / "shard-000000.tar"
    write_shard(shard, samples)
    manifest.shards = manifest.shards[:1]
    entry = manifest.shards[0]
    entry.num_samples, entry.sha256, entry.bytes = len(samples), sha256_file(shard), shard.stat().st_size
    labels: dict[str, int] = {}
    for _, _, meta in samples:
        labels[meta["label"] or "unlabeled"] = labels.get(meta["label"] or "unlabeled", 0) + 1
    manifest.counts["label"] = dict(sorted(labels.items()))
    write_manifest(folder, manifest.name, manifest.image_size, manifest.shards, manifest.counts,
                   manifest.provenance)


def test_verify_finds_held_out_images_in_a_training_set(tmp_path, capsys):
    make(tmp_path, seed=0)
    shard_set = ShardSet(tmp_path / "mix")
    mix = [(s.key, shard_set.decode(s), s.meta) for s in shard_set.read(0)
           if s.meta["label"] not in ("horse", "bird")][:3]  # in mix only, not in horse_bird
    rewrite_set(tmp_path / "eval", mix)
    code, out = cli_here(capsys, "verify", str(tmp_path))
    assert code == 2, out
    problems = [line for line in out.splitlines() if "problem:" in line]
    assert len(problems) == 1, out
    assert f"{tmp_path / 'eval'}: 3 held-out key(s) are also in {tmp_path / 'mix'}" in problems[0]
    assert f"(e.g. {min(key for key, _, _ in mix)})" in problems[0]
    assert f"{tmp_path / 'mix'}: 180 samples, ok" in out


def test_verify_finds_sets_of_two_prepare_runs_side_by_side(tmp_path):
    make(tmp_path / "a", seed=0)
    make(tmp_path / "b", seed=1)
    replaced = tmp_path / "a" / "eval"  # by hand: rm -r a/eval && cp -r b/eval a/eval
    replaced.unlink() if replaced.is_symlink() else shutil.rmtree(replaced)
    shutil.copytree(tmp_path / "b" / "eval", replaced)
    checked, problems = verify_shard_set(tmp_path / "a" / "eval")
    a, b = load_manifest(tmp_path / "a" / "mix").generation, load_manifest(tmp_path / "b" / "eval").generation
    assert checked == 20 and a != b
    assert f"come from different `prepare` runs (generation {b} and {a})" in problems[0]
    assert any("held-out key(s) are also in" in p for p in problems)


def test_the_published_sets_read_as_plain_folders(tmp_path):
    make(tmp_path, seed=0)
    for name in SETS:
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["name"] == name and (tmp_path / name / manifest["shards"][0]["name"]).is_file()
        assert verify_shard_set(tmp_path / name)[1] == []
    assert len({load_manifest(tmp_path / name).generation for name in SETS}) == 1


# --- bad sources ------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


def test_a_truncated_archive_is_named_and_called_truncated(tmp_path, capsys):
    archive = tmp_path / "birds.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(20):  # noise: the archive cannot compress to a few bytes
            add(tar, f"birds/{'horse' if i % 2 else 'bird'}/{i}.png", noise_png(i))
    data = archive.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    code, out = cli_here(capsys, "prepare", "--source", f"folder:{tmp_path}/cut.tar.gz",
                         "--out", str(tmp_path / "shards"))
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, out
    assert errors[0].startswith(f"error: {tmp_path}/cut.tar.gz is truncated"), errors
    assert "Traceback" not in out and not (tmp_path / "shards").exists()
    plain = tmp_path / "cut.tar"  # an uncompressed tar that ends early says the same
    with tarfile.open(archive) as tar, tarfile.open(tmp_path / "whole.tar", "w") as out:
        for member in tar:
            out.addfile(member, tar.extractfile(member))
    plain.write_bytes((tmp_path / "whole.tar").read_bytes()[:40000])
    with pytest.raises(DataError, match=f"{plain} is truncated"):
        read_image_folder(plain)


def test_a_16_bit_grey_png_keeps_its_tones(tmp_path):
    (tmp_path / "imgs" / "horse").mkdir(parents=True)
    ramp = np.tile(np.arange(32, dtype=np.uint16) * 2056, (32, 1))  # 0 .. 63736 across the columns
    Image.fromarray(ramp).save(tmp_path / "imgs" / "horse" / "grey16.png")
    assert Image.open(tmp_path / "imgs" / "horse" / "grey16.png").mode == "I;16"
    image = read_image_folder(tmp_path / "imgs").images[0]
    assert np.array_equal(image[5, :, 0], (np.arange(32) * 2056) >> 8)  # 0, 8, 16, ..., 248
    assert np.array_equal(image[..., 0], image[..., 2])


def test_members_named_outside_the_archive_are_skipped_and_change_no_label(tmp_path, caplog):
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add(tar, "imgs/horse/0.png", noise_png(0))
        add(tar, "../../x.jpg", noise_png(1))
        add(tar, "imgs/birds/1.png", noise_png(2))
        add(tar, "/abs/x.jpg", noise_png(3))
    with caplog.at_level(logging.WARNING, logger="pegasus_dist"):
        source = read_image_folder(archive)
    assert source.labels == ["bird", "horse"] and len(source.images) == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{archive}: skipping 2 member(s) named outside" in warning
    assert "../../x.jpg" in warning and "/abs/x.jpg" in warning


def test_class_folders_in_any_script_stay_labels(tmp_path):
    for folder, shade in (("馬", 0), ("鳥", 1), ("Ｈｏｒｓｅｓ", 2), ("Vögel im Flug", 3)):
        (tmp_path / "imgs" / folder).mkdir(parents=True)
        Image.new("RGB", (32, 32), (shade * 50, 0, 0)).save(tmp_path / "imgs" / folder / "a.png")
    prepare(PrepareConfig(sources=[f"folder:{tmp_path}/imgs"], out=str(tmp_path / "shards"),
                          eval_fraction=0), "test")
    labels = load_manifest(tmp_path / "shards" / "mix").counts["label"]
    assert labels == {"horse": 1, "vögel_im_flug": 1, "馬": 1, "鳥": 1}
    (tmp_path / "imgs" / "!!!").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "!!!" / "b.png")
    with pytest.raises(DataError, match="class folder '!!!' has no letter or digit; rename it"):
        read_image_folder(tmp_path / "imgs")


@pytest.mark.parametrize("side", [10_000, 14_000])  # over Pillow's warning, and over its own limit
def test_a_huge_image_is_refused_by_name_before_it_is_decoded(tmp_path, side):
    (tmp_path / "imgs" / "horse").mkdir(parents=True)
    Image.new("1", (side, side)).save(tmp_path / "imgs" / "horse" / "huge.png")  # a few KB on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw Pillow warning either
        with pytest.raises(DataError, match=f"huge.png is .*over the limit of {MAX_IMAGE_PIXELS:,} pixels"):
            read_image_folder(tmp_path / "imgs")


@pytest.mark.parametrize("size", [(1_000_000, 1), (40, 2000)])
def test_a_sliver_of_an_image_is_refused_in_one_line_not_upscaled(tmp_path, size):
    (tmp_path / "imgs" / "horse").mkdir(parents=True)
    Image.new("L", size).save(tmp_path / "imgs" / "horse" / "strip.png")  # a few KB on disk
    with pytest.raises(DataError) as refused:
        read_image_folder(tmp_path / "imgs")
    assert str(refused.value) == (f"image {tmp_path}/imgs/horse/strip.png is {size[0]}x{size[1]}, longer "
                                  "than 10 times its width; crop it by hand or remove it")


def test_gif_and_webp_are_read_and_other_files_are_named_not_dropped(tmp_path, caplog):
    horses = tmp_path / "imgs" / "horse"
    horses.mkdir(parents=True)
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((200, 30, 30), (30, 200, 30))]
    frames[0].save(horses / "a.gif", save_all=True, append_images=frames[1:])  # two frames: the first
    Image.new("RGB", (48, 64), (30, 30, 200)).save(horses / "b.webp")
    (horses / "c.heic").write_bytes(b"\0\0\0\x18ftypheic")  # what Pillow cannot open
    (horses / "d.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (horses / "notes.txt").write_text("where these came from")
    source = read_image_folder(tmp_path / "imgs", image_size=16)
    assert source.images.shape == (2, 16, 16, 3) and source.labels == ["horse", "horse"]
    assert np.abs(source.images[0].astype(int) - (200, 30, 30)).max() <= 3  # the GIF's first frame
    assert np.abs(source.images[1].astype(int) - (30, 30, 200)).max() <= 3
    (warning,) = [r.message for r in caplog.records if "skipping" in r.message]
    assert warning.startswith(f"{tmp_path / 'imgs'}: skipping 3 file(s) that are not ")
    assert warning.endswith("images (2 .heic, 1 .txt): horse/c.heic, horse/d.HEIC, horse/notes.txt")


def test_an_output_path_that_cannot_be_written_is_one_line_naming_it(smoke_shards, tmp_path, capsys):
    """`--out` under a folder no one can create (/proc), or below a file: the path and the fix in one
    line, exit 2, for every command that writes one, not Python's traceback."""
    (blocker := tmp_path / "a-file").write_text("")
    for out, named in (("/proc/sheet.png", "/proc/sheet.png: No such file or directory"),
                       (f"{blocker}/sheet.png", f"{blocker}: File exists")):
        code, printed = cli_here(capsys, "contact-sheet", "--shard-set", str(smoke_shards / "horse_bird"),
                                 "--out", out)
        assert code == 2, printed[-3000:]
        assert error_lines(printed) == [f"error: {named}; check that path: a folder to write into must be "
                                        "writable (or creatable), a file to read must be there and readable"]
