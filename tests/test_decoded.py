"""The decoded fast path: what the loaders read beside the tars is never stale or damaged."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import start

from pegasus_dist.config import PrepareConfig
from pegasus_dist.data.decoded import ARRAY, INDEX, LOCK, Decoded, open_decoded
from pegasus_dist.data.loader import MemoryLoader, ShardLoader
from pegasus_dist.data.prepare import prepare
from pegasus_dist.data.shards import ShardSet, iter_shard
from pegasus_dist.data.verify import verify_shard_set
from pegasus_dist.errors import DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("decoded")
    prepare(PrepareConfig(sources=["synthetic:40"], out=str(out), shard_size=7), "")
    return out


@pytest.fixture
def shard_set(prepared, tmp_path):
    """A copy of the prepared mix that a test may damage."""
    copy = tmp_path / "mix"
    shutil.copytree(prepared / "mix", copy)
    return copy


def batches(loader, epoch=1):
    loader.set_epoch(epoch)
    return [(b.keys, b.labels, b.images.numpy().copy()) for b in loader]


def assert_same_batches(one, other):
    assert len(one) == len(other)
    for (keys, labels, images), (keys2, labels2, images2) in zip(one, other, strict=True):
        assert (keys, labels) == (keys2, labels2)
        np.testing.assert_array_equal(images, images2)


def from_tars(shard_set):
    return batches(ShardLoader(shard_set, 4, 0, 1, 0, seed=3, image_size=32, decoded=False))


def test_prepare_writes_what_the_tars_decode_to(prepared):
    for name in ("mix", "horse_bird", "eval"):
        shards = ShardSet(prepared / name)
        decoded, tars = shards.decoded(), shards.decode_all()
        np.testing.assert_array_equal(decoded.images, tars.images)
        assert (decoded.keys, decoded.labels) == (tars.keys, tars.labels)
        assert verify_shard_set(prepared / name)[1] == []


def test_both_loaders_read_the_array_as_they_read_the_tars(shard_set):
    tars = from_tars(shard_set)
    assert_same_batches(batches(ShardLoader(shard_set, 4, 0, 1, 0, seed=3, image_size=32)), tars)
    assert_same_batches(batches(MemoryLoader(shard_set, 4, 0, 1, seed=3, image_size=32)), tars)
    memory = MemoryLoader(shard_set, 4, 0, 1, seed=3, image_size=32)
    assert mapped_file(memory.images.data_ptr()) == str((shard_set / ARRAY).resolve())  # not a copy


def mapped_file(address):
    """The file mapped at ``address`` in this process (/proc/self/maps), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        low, high = (int(end, 16) for end in span.split("-"))
        if low <= address < high:
            return rest[4] if len(rest) > 4 else None
    return None


def flip_pixels(shard_set):
    array = shard_set / ARRAY
    data = bytearray(array.read_bytes())
    data[-500:-436] = bytes(255 - b for b in data[-500:-436])  # 64 bytes of the last images
    array.write_bytes(bytes(data))


def truncate(shard_set):
    array = shard_set / ARRAY
    array.write_bytes(array.read_bytes()[:-3000])


def empty_array(shard_set):
    (shard_set / ARRAY).write_bytes(b"")


def rename_a_key(shard_set):
    index = json.loads((shard_set / INDEX).read_text())
    index["keys"][0] += "x"
    (shard_set / INDEX).write_text(json.dumps(index))


def drop_a_label(shard_set):
    index = json.loads((shard_set / INDEX).read_text())
    index["labels"].pop()
    (shard_set / INDEX).write_text(json.dumps(index))


def nul_index(shard_set):
    (shard_set / INDEX).write_bytes(b"\0" * 100)


def stale(shard_set, prepared):
    """The pair of another set (horse_bird), as if left by an older `prepare`."""
    for name in (ARRAY, INDEX):
        shutil.copy(prepared / "horse_bird" / name, shard_set / name)


def missing_index(shard_set):
    (shard_set / INDEX).unlink()


@pytest.mark.parametrize(("damage", "why"), [
    (flip_pixels, "changed after they were written"),
    (truncate, "unreadable"),
    (empty_array, "unreadable"),
    (rename_a_key, "changed after they were written"),
    (drop_a_label, "keys and"),
    (nul_index, "unreadable"),
    (stale, "decoded from other shards"),
    (missing_index, "unreadable"),
])
def test_a_damaged_or_stale_array_is_named_and_rebuilt_never_read(shard_set, prepared, damage, why,
                                                                   caplog):
    tars = from_tars(shard_set)
    damage(shard_set, prepared) if damage is stale else damage(shard_set)
    problems = verify_shard_set(shard_set)[1]
    assert len(problems) == 1 and why in problems[0] and str(shard_set) in problems[0]
    with caplog.at_level(logging.WARNING, logger="pegasus_dist.decoded"):
        assert_same_batches(batches(ShardLoader(shard_set, 4, 0, 1, 0, seed=3, image_size=32)), tars)
    assert why in caplog.text and "decoding" in caplog.text
    assert verify_shard_set(shard_set)[1] == []  # rebuilt, and it verifies


def test_a_missing_array_is_built_on_first_use(shard_set, caplog):
    tars = from_tars(shard_set)
    for name in (ARRAY, INDEX):
        (shard_set / name).unlink()
    assert verify_shard_set(shard_set)[1] == []  # never built is no problem: training builds it
    with caplog.at_level(logging.INFO, logger="pegasus_dist.decoded"):
        assert_same_batches(batches(MemoryLoader(shard_set, 4, 0, 1, seed=3, image_size=32)), tars)
    assert "decoding" in caplog.text
    assert (shard_set / ARRAY).is_file()


def test_where_the_array_cannot_be_written_the_tars_are_read(shard_set, caplog):
    tars = from_tars(shard_set)
    for name in (ARRAY, INDEX):
        (shard_set / name).unlink()
    (shard_set / LOCK).unlink(missing_ok=True)
    (shard_set / LOCK).mkdir()  # the lock cannot be taken: as in a read-only folder
    with caplog.at_level(logging.WARNING, logger="pegasus_dist.decoded"):
        assert_same_batches(batches(ShardLoader(shard_set, 4, 0, 1, 0, seed=3, image_size=32)), tars)
    assert "reading the tars instead" in caplog.text
    assert not (shard_set / ARRAY).exists()


def test_a_set_too_large_to_decode_at_once_is_one_line_naming_the_fix(shard_set):
    """The build holds the whole set in memory: NumPy's own refusal (a petabyte, past any machine's
    address space), raised where the build allocates, is one line, and leaves the set readable."""
    tars = from_tars(shard_set)
    for name in (ARRAY, INDEX):
        (shard_set / name).unlink()
    manifest = ShardSet(shard_set).manifest

    def too_large() -> Decoded:
        return Decoded(np.empty((2**40, 32, 32, 3), dtype=np.uint8), [], [])

    with pytest.raises(DataError) as refused:
        open_decoded(manifest, too_large)
    megabytes = manifest.num_samples * 3 * 32 * 32 / 2**20
    assert str(refused.value) == (
        f"out of memory decoding {shard_set} into {ARRAY}, {megabytes:.0f} MB at once (Unable to allocate "
        "3.00 PiB for an array with shape (1099511627776, 32, 32, 3) and data type uint8); set "
        "data.mode=stream data.decoded=false to read its tars batch by batch")
    assert not (shard_set / ARRAY).exists()
    assert_same_batches(from_tars(shard_set), tars)  # the fix it names reads the set
    assert open_decoded(manifest, ShardSet(shard_set).decode_all) is not None  # the lock was let go


def test_a_damaged_shard_is_refused_even_with_a_good_array(shard_set, caplog):
    """The tars stay the truth: a shard changed after `prepare` stops the run as before."""
    tar = shard_set / "shard-000001.tar"
    changed = {sample.key for sample in iter_shard(tar)}
    data = bytearray(tar.read_bytes())
    data[2000:2064] = bytes(64)
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-000001.tar does not match the sha256 of its manifest"):
        ShardLoader(shard_set, 4, 0, 1, 0, seed=3, image_size=32)
    with pytest.raises(DataError, match=r"shard-000001.tar does not match"):
        MemoryLoader(shard_set, 4, 0, 1, seed=3, image_size=32)
    skipping = ShardLoader(shard_set, 4, 0, 1, 0, seed=3, image_size=32, skip_bad_samples=True)
    assert "reading the tars and skipping bad samples" in caplog.text
    caplog.clear()
    skipping.set_epoch(1)
    read = list(skipping)
    assert len(read) == len(skipping)
    # None of the changed shard's samples is trained on, not even those before the changed bytes.
    assert changed and not changed & {key for batch in read for key in batch.keys}
    assert sum(batch.skipped for batch in read) == len(changed)
    assert f"re-run `pegasus-dist prepare`; skipping all {len(changed)} of its samples" in caplog.text


def test_lookups_by_label_and_key_read_the_array_as_they_read_the_tars(shard_set):
    """The sampler's and the contact sheet's lookups read a verified array (a hash, no tar parsed):
    the same keys and pixels as a scan of the tars, which a damaged array falls back to."""
    def lookups() -> tuple[dict, dict]:
        shards = ShardSet(shard_set)
        by_label = shards.keys_by_label(["horse", "bird", "cat"])
        wanted = {keys[i] for keys in by_label.values() for i in (0, -1)}
        return by_label, shards.images(wanted | {"no-such-key"})

    (shard_set / ARRAY).write_bytes(b"\0" * 64)  # no array that verifies: the tars are scanned
    scanned_keys, scanned = lookups()
    assert not (shard_set / ARRAY).read_bytes().strip(b"\0")  # looking up built nothing
    ShardSet(shard_set).decoded()  # what a training run's loader builds
    keys, images = lookups()
    assert keys == scanned_keys and all(keys.values())
    assert images.keys() == scanned.keys() and len(images) == 2 * len(keys)
    for key, image in images.items():
        np.testing.assert_array_equal(image, scanned[key])
        assert image.flags.writeable and image.dtype == np.uint8 and image.shape == (32, 32, 3)
    tar = shard_set / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000:2064] = bytes(64)
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-000001.tar does not match the sha256 of its manifest"):
        lookups()


BUILD = """
import logging, sys
from pegasus_dist.data.shards import ShardSet
logging.basicConfig(level=logging.INFO, format="%(message)s")
print(ShardSet(sys.argv[1]).decoded().keys[:3])
"""


@pytest.mark.process
def test_ranks_that_start_together_build_the_array_once(shard_set):
    for name in (ARRAY, INDEX):
        (shard_set / name).unlink()
    procs = [start([sys.executable, "-c", BUILD, str(shard_set)]) for _ in range(2)]
    try:
        outs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert [proc.returncode for proc in procs] == [0, 0], outs
    logs = "".join(outs)
    assert logs.count("decoding") == 1, logs
    assert outs[0].splitlines()[-1] == outs[1].splitlines()[-1]
    assert verify_shard_set(shard_set)[1] == []
