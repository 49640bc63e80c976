"""prepare -> shards -> manifest: round trip, determinism, splits, and damaged shards."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import DELETE, cli_here, field_words, with_field
from PIL import Image

from pegasus_dist.checksums import sha256_file
from pegasus_dist.config import DataConfig, PrepareConfig
from pegasus_dist.data.loader import make_loader
from pegasus_dist.data.manifest import load_manifest, write_manifest
from pegasus_dist.data.prepare import prepare
from pegasus_dist.data.shards import ShardSet, iter_shard, write_shard
from pegasus_dist.data.sources import synthetic
from pegasus_dist.data.verify import verify_shard_set
from pegasus_dist.errors import DataError

SOURCES = ["synthetic:150:1", "synthetic:90:2"]


def make(out, **kw):
    return prepare(PrepareConfig(sources=SOURCES, out=str(out), shard_size=40, **kw), "test")


def read_set(folder):
    return list(ShardSet(folder))


def replace_first_shard(folder, samples):
    """The set's first shard rewritten with ``samples``, its manifest entry updated to match."""
    from pegasus_dist.data.manifest import write_manifest

    m = load_manifest(folder)
    write_shard(m.shard_paths[0], samples)
    entry = m.shards[0]
    entry.num_samples, entry.sha256 = len(samples), sha256_file(m.shard_paths[0])
    entry.bytes = m.shard_paths[0].stat().st_size
    write_manifest(m.path, m.name, m.image_size, m.shards, m.counts, m.provenance)
    return m.shard_paths[0]


def test_round_trip_pixels_keys_and_meta(tmp_path):
    make(tmp_path)
    originals = {"synthetic": synthetic(150, seed=1), "synthetic_2": synthetic(90, seed=2)}
    sets = [ShardSet(tmp_path / "mix"), ShardSet(tmp_path / "eval")]
    samples = [(shard_set, s) for shard_set in sets for s in shard_set]
    assert len(samples) == 240 == len({s.key for _, s in samples})
    for shard_set, s in samples:
        source, i = originals[s.meta["source"]], s.meta["index"]
        assert s.key == s.meta["key"] == f"{s.meta['source']}-{s.meta['split']}-{i:07d}"
        assert s.image_ext == "npy" and np.array_equal(shard_set.decode(s), source.images[i])
        assert (s.meta["label"], s.meta["split"]) == (source.labels[i], source.splits[i])


def test_manifest_counts_and_checksums(tmp_path):
    make(tmp_path)
    m = load_manifest(tmp_path / "mix")
    assert m.num_samples == sum(m.shard_sizes) == len(read_set(tmp_path / "mix"))
    assert m.shard_sizes[:-1] == [40] * (len(m.shards) - 1)  # configurable shard size
    for entry, path in zip(m.shards, m.shard_paths, strict=True):
        assert entry.sha256 == sha256_file(path) and entry.bytes == path.stat().st_size
    assert sum(m.counts["label"].values()) == m.num_samples
    assert m.provenance["command"] == "test" and len(m.provenance["sources"]) == 2


def test_prepare_is_deterministic(tmp_path, monkeypatch):
    make(tmp_path / "a")
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)  # a later clock changes no byte
    make(tmp_path / "b")
    monkeypatch.undo()
    for name in ("mix", "horse_bird", "eval"):
        files = sorted(p.name for p in (tmp_path / "a" / name).iterdir())
        for f in files:
            assert (tmp_path / "a" / name / f).read_bytes() == (tmp_path / "b" / name / f).read_bytes()
    make(tmp_path / "c", seed=1)
    assert (tmp_path / "c/mix/shard-000000.tar").read_bytes() != (
        tmp_path / "a/mix/shard-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "a/mix/shard-000000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar} == {
            (0, 0, 0, "pegasus", "pegasus", 0o444)}


def test_splits_held_out_finetune_subset_and_shuffle(tmp_path):
    make(tmp_path, eval_fraction=0.1)
    mix, hb, ev = (read_set(tmp_path / n) for n in ("mix", "horse_bird", "eval"))
    mix_keys, eval_keys = {s.key for s in mix}, {s.key for s in ev}
    assert len(ev) == 24 and not mix_keys & eval_keys and len(mix_keys | eval_keys) == 240
    assert [s.key for s in hb] == [s.key for s in mix if s.meta["label"] in ("horse", "bird")]
    # Sources are interleaved, not written one after the other.
    assert len({s.meta["source"] for s in mix[:20]}) == 2


def test_plain_webdataset_reads_the_shards(tmp_path):
    make(tmp_path)
    urls = [str(p) for p in load_manifest(tmp_path / "mix").shard_paths]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == load_manifest(tmp_path / "mix").num_samples
    ours = ShardSet(tmp_path / "mix")
    first = next(iter(ours))
    assert samples[0]["__key__"] == first.key and samples[0]["json"] == first.meta
    assert np.array_equal(samples[0]["npy"], ours.decode(first))


def test_damaged_shards_name_the_file(tmp_path):
    make(tmp_path)
    shard = load_manifest(tmp_path / "mix").shard_paths[0]
    with tarfile.open(shard) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2]
    shard.write_bytes(shard.read_bytes()[: middle.offset_data + middle.size // 2])  # truncated mid-member
    with pytest.raises(DataError, match=f"shard {shard} is unreadable .*pegasus-dist prepare"):
        list(ShardSet(tmp_path / "mix"))
    with tarfile.open(tmp_path / "eval" / "shard-000000.tar") as tar:
        boundary = tar.getmembers()[2].offset  # after the first sample's two members
    cut = load_manifest(tmp_path / "eval").shard_paths[0]
    cut.write_bytes(cut.read_bytes()[:boundary])  # reads as a shorter archive: its sha256 tells
    with pytest.raises(DataError, match=f"shard {cut} does not match the sha256 of its manifest .*verify"):
        list(ShardSet(tmp_path / "eval"))
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard} listed in .* is missing"):
        load_manifest(tmp_path / "mix")
    # Gone after start-up, under a streaming epoch: the reason in words, not errno 2.
    gone = re.escape(f"shard {shard} is unreadable (No such file or directory); ")
    with pytest.raises(DataError, match=gone):
        list(iter_shard(shard))


def test_wrong_size_image_damaged_image_and_missing_label(tmp_path):
    make(tmp_path)
    shard = replace_first_shard(tmp_path / "eval", [("k1", np.zeros((16, 16, 3), np.uint8), {"label": None}),
                                                    ("k2", np.zeros((32, 32, 3), np.uint8), {"key": "k2"})])
    shard_set = ShardSet(tmp_path / "eval")
    small, unlabelled = list(shard_set.read(0))[:2]  # metadata is parsed when first read
    with pytest.raises(DataError, match=f"{shard}:k1: image is 16x16 but 32x32 was expected"):
        shard_set.decode(small)
    with pytest.raises(DataError, match=f"shard {shard}: k2.json has no label field"):
        unlabelled.meta  # noqa: B018
    with tarfile.open(shard) as tar:
        assert tar.getnames()[:4] == ["k1.json", "k1.npy", "k2.json", "k2.npy"]
        assert json.loads(tar.extractfile("k2.json").read()) == {"key": "k2"}
    unlabelled.image = unlabelled.image[:100]  # the .npy member cut short
    with pytest.raises(DataError, match=f"{shard}:k2: the image does not decode"):
        shard_set.decode(unlabelled)
    with pytest.raises(DataError, match="32px images but model.image_size is 64"):
        ShardSet(tmp_path / "eval", image_size=64)


def test_a_manifest_whose_count_disagrees_with_its_shards_is_refused(tmp_path):
    make(tmp_path)
    path = tmp_path / "mix" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest | {"num_samples": manifest["num_samples"] + 1}))
    with pytest.raises(DataError) as refused:
        load_manifest(tmp_path / "mix")
    assert str(refused.value) == (f"{path} says num_samples {manifest['num_samples'] + 1} but its shards "
                                  f"list {manifest['num_samples']}; re-run `pegasus-dist prepare`")


# Any field that is read, of another type, out of range or missing: (where, its damaged value).
MANIFEST_DAMAGE = [("num_samples", "50"), ("num_samples", None), ("num_samples", -1), ("num_samples", 48.0),
                   ("num_samples", DELETE), ("image_size", 0), ("image_size", "32"), ("name", 5),
                   ("name", DELETE), ("counts", DELETE), ("counts.label", []), ("counts.label.horse", "3"),
                   ("shards", {}), ("shards", DELETE), ("shards[0]", "shard-000000.tar"),
                   ("shards[0].sha256", DELETE), ("shards[1].num_samples", "40"), ("shards[0].bytes", True),
                   ("shards[0].name", None), ("shards[0].extra", 1), ("sources", "synthetic:480"),
                   ("sources[0].spec", DELETE), ("sources[0].origin", 7), ("generation", 7), ("seed", "0"),
                   ("eval_fraction", "0.1"), ("command", [])]
WHOLE_FILE_DAMAGE = [[], 5, None, "manifest", True]


@pytest.mark.parametrize(("where", "value"), [*MANIFEST_DAMAGE, *(("", v) for v in WHOLE_FILE_DAMAGE)])
def test_a_manifest_field_of_another_type_is_refused_by_every_reader_in_one_line(
        smoke_shards, tmp_path, capsys, where, value):
    good = json.loads((smoke_shards / "mix" / "manifest.json").read_text())
    path = tmp_path / "mix" / "manifest.json"
    path.parent.mkdir()
    path.write_text(json.dumps(with_field(good, where, value)))
    with pytest.raises(DataError) as refused:
        load_manifest(tmp_path / "mix")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(path))
    assert message.endswith("; re-run `pegasus-dist prepare`")
    assert field_words(where, value) in message
    assert verify_shard_set(tmp_path / "mix") == (0, [message])  # verify reports it as the set's problem
    code, printed = cli_here(capsys, "verify", str(tmp_path))
    assert code != 0 and f"  problem: {message}" in printed.splitlines(), printed
    assert printed.splitlines()[-1].endswith("1 shard set(s) failed verification; "
                                             "re-run `pegasus-dist prepare`")


def test_pixels_changed_after_prepare_stop_every_reader_naming_the_shard(tmp_path):
    make(tmp_path)
    shard = load_manifest(tmp_path / "mix").shard_paths[1]
    with tarfile.open(shard) as tar:
        image = next(m for m in tar.getmembers() if m.name.endswith(".npy"))
    raw = bytearray(shard.read_bytes())
    start = image.offset_data + image.size - 64  # the last 64 pixel bytes: every header still reads
    raw[start : start + 64] = bytes(b ^ 0xFF for b in raw[start : start + 64])
    shard.write_bytes(bytes(raw))
    refused = f"shard {shard} does not match the sha256 of its manifest .*pegasus-dist verify"
    with pytest.raises(DataError, match=refused):
        read_set(tmp_path / "mix")
    for mode in ("stream", "memory"):  # memory mode reads the set as it starts, the stream as it goes
        with pytest.raises(DataError, match=refused):
            cfg = DataConfig(shards=str(tmp_path), mode=mode, num_workers=0, batch_size=8)
            for _ in make_loader(cfg, 32, rank=0, world_size=1, device=torch.device("cpu")):
                pass


def test_png_members_of_earlier_shards_still_decode(tmp_path):
    """Shards written before the switch to .npy hold PNGs: webdataset decodes them through Pillow."""
    make(tmp_path)
    shard_set = ShardSet(tmp_path / "eval")
    samples = list(shard_set.read(0))
    with wds.TarWriter(str(shard_set.manifest.shard_paths[0]), mtime=0) as writer:
        for s in samples:
            png = io.BytesIO()
            Image.fromarray(shard_set.decode(s)).save(png, "PNG")
            writer.write({"__key__": s.key, "png": png.getvalue(), "json": s.meta})
    manifest = shard_set.manifest  # as such a set's own manifest lists it
    entry, path = manifest.shards[0], manifest.shard_paths[0]
    entry.sha256, entry.bytes = sha256_file(path), path.stat().st_size
    write_manifest(tmp_path / "eval", manifest.name, manifest.image_size, manifest.shards, manifest.counts,
                   manifest.provenance)
    again = list(ShardSet(tmp_path / "eval").read(0))
    assert [s.image_ext for s in again] == ["png"] * len(samples)
    for old, new in zip(samples, again, strict=True):
        assert new.key == old.key and np.array_equal(shard_set.decode(new), shard_set.decode(old))


def test_empty_or_missing_sets(tmp_path):
    prepare(PrepareConfig(sources=["synthetic:1"], out=str(tmp_path), eval_fraction=0.5), "")
    with pytest.raises(DataError, match="empty"):
        load_manifest(tmp_path / "horse_bird")
    with pytest.raises(DataError, match="no shard set at .*nothing.*pegasus-dist prepare"):
        load_manifest(tmp_path / "nothing")


def test_verify_finds_each_kind_of_damage(tmp_path):
    from pegasus_dist.data.verify import find_shard_sets

    make(tmp_path)
    assert [p.name for p in find_shard_sets(tmp_path)] == ["eval", "horse_bird", "mix"]
    assert verify_shard_set(tmp_path / "mix") == (load_manifest(tmp_path / "mix").num_samples, [])

    # An image of the wrong size and a JSON without a label, in a shard whose manifest is updated.
    small = np.zeros((8, 8, 3), dtype=np.uint8)
    replace_first_shard(tmp_path / "horse_bird", [("a", small, {"label": "horse"}), ("b", small, {})])
    _, problems = verify_shard_set(tmp_path / "horse_bird")
    assert any("a: image is 8x8 but 32x32" in p for p in problems)
    assert any("b.json has no label field" in p for p in problems)

    shard = load_manifest(tmp_path / "mix").shard_paths[1]
    changed = bytearray(shard.read_bytes())
    changed[700] ^= 0xFF  # a byte of the first image: the tar still reads, its sha256 differs
    shard.write_bytes(bytes(changed))
    _, problems = verify_shard_set(tmp_path / "mix")
    # Said once, not again by the sample read that follows the whole-file check.
    assert [p for p in problems if str(shard) in p] == [f"{shard}: sha256 differs from "
                                                        f"{tmp_path}/mix/manifest.json"]
    shard.write_bytes(shard.read_bytes()[:3000])  # truncated
    _, problems = verify_shard_set(tmp_path / "mix")
    assert any("sha256 differs" in p for p in problems)
    assert any("unreadable" in p for p in problems)

    (tmp_path / "eval" / "manifest.json").unlink()  # verified and refused, not passed over
    assert [p.name for p in find_shard_sets(tmp_path)] == ["eval", "horse_bird", "mix"]
    assert verify_shard_set(tmp_path / "eval")[1]


@pytest.mark.process  # a pool of worker processes
def test_the_parallel_path_is_deterministic_too(tmp_path):
    from pegasus_dist.data.prepare import POOL_THRESHOLD

    for run in ("a", "b"):
        prepare(PrepareConfig(sources=[f"synthetic:{POOL_THRESHOLD + 100}"],
                              out=str(tmp_path / run), shard_size=500), "")
    for name in ("mix", "horse_bird", "eval"):
        for path in sorted((tmp_path / "a" / name).iterdir()):
            assert path.read_bytes() == (tmp_path / "b" / name / path.name).read_bytes(), path
    assert load_manifest(tmp_path / "a" / "mix").num_samples == read_count(tmp_path / "a" / "mix")


def read_count(folder):
    return len(read_set(folder))


def test_shards_from_other_tar_writers_read_the_same(tmp_path):
    """Shards in PAX or GNU layout, as other tools write them, read the same."""
    make(tmp_path)
    ours = load_manifest(tmp_path / "mix").shard_paths[0]
    with tarfile.open(ours) as tar:  # the standard library agrees with our reader
        assert [m.name for m in tar] == [n for s in iter_shard(ours) for n in (f"{s.key}.json",
                                                                             f"{s.key}.npy")]
    expected = [(s.key, s.image, s.meta) for s in iter_shard(ours)]
    for layout in ("pax", "gnu"):
        other = tmp_path / f"{layout}.tar"
        with open(other, "wb") as stream:  # a float mtime needs a PAX header per member
            writer = wds.TarWriter(stream, mtime=1.5 if layout == "pax" else 0,
                                   format=f"{layout.upper()}_FORMAT")
            for key, image, meta in expected:
                writer.write({"__key__": key, "npy": image, "json": json.dumps(meta).encode()})
            writer.close()
        assert [(s.key, s.image, s.meta) for s in iter_shard(other)] == expected
        other.write_bytes(other.read_bytes()[:9000])  # truncated: named, whatever the reader
        with pytest.raises(DataError, match=f"shard {other}"):
            list(iter_shard(other))
