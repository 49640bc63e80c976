"""The epoch plan and the loader, with ranks simulated in one process."""

from __future__ import annotations

import numpy as np
import pytest

from pegasus_dist.config import PrepareConfig
from pegasus_dist.data.loader import ShardLoader, rank_batches
from pegasus_dist.data.prepare import prepare
from pegasus_dist.errors import DataError


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize(("n", "batch"), [(23, 4), (24, 4), (25, 4), (3, 4), (7, 1), (9, 2)])
def test_plan_gives_equal_batch_counts_and_each_position_once(world, n, batch):
    plans = [rank_batches(n, world, r, batch) for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    assert all(1 <= len(b.positions) <= batch + 1 for p in plans for b in p)
    positions = np.concatenate([b.positions for p in plans for b in p])
    assert sorted(positions) == list(range(n))


def test_fewer_samples_than_ranks_is_an_error():
    with pytest.raises(DataError, match="2 samples, fewer than the 3 processes"):
        rank_batches(2, 3, 0, 4)


def test_one_process_of_2b_sees_what_two_of_b_see():
    one = rank_batches(23, 1, 0, 8)
    two = [rank_batches(23, 2, r, 4) for r in range(2)]
    for step, batch in enumerate(one):
        joined = np.concatenate([two[0][step].positions, two[1][step].positions])
        assert list(joined) == list(batch.positions)
        assert two[1][step].offset == len(two[0][step].positions)  # slices abut in the global batch


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader")
    prepare(PrepareConfig(sources=["synthetic:60"], out=str(out), shard_size=7), "")
    return out / "mix"


def keys_of(loader, epoch, start=0):
    loader.set_epoch(epoch, start_batch=start)
    return [list(b.keys) for b in loader]


def test_workers_do_not_change_the_batches(shard_set):
    inline = ShardLoader(shard_set, 4, rank=1, world_size=2, num_workers=0, seed=3, image_size=32)
    workers = ShardLoader(shard_set, 4, rank=1, world_size=2, num_workers=2, seed=3, image_size=32)
    assert keys_of(inline, 0) == keys_of(workers, 0)
    assert keys_of(inline, 0) != keys_of(inline, 1)  # reshuffled per epoch
    assert keys_of(inline, 1) == keys_of(workers, 1)  # and seeded


def test_batches_are_uint8_images_and_resume_skips_done_batches(shard_set):
    loader = ShardLoader(shard_set, 4, rank=0, world_size=1, num_workers=0, seed=0, image_size=32)
    batch = next(iter(loader))
    assert batch.images.shape == (4, 3, 32, 32) and str(batch.images.dtype) == "torch.uint8"
    assert len(loader) == 15  # ceil(58 / 4)
    assert keys_of(loader, 2, start=5) == keys_of(loader, 2)[5:]


def test_image_size_must_match_the_manifest(shard_set):
    with pytest.raises(DataError, match="32px images but model.image_size is 64"):
        ShardLoader(shard_set, 4, rank=0, world_size=1, num_workers=0, seed=0, image_size=64)
