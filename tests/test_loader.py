"""The epoch plan and the loader, with ranks simulated in one process."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from pegasus_dist.config import PrepareConfig
from pegasus_dist.data.loader import LoaderWorkerLost, ShardLoader, rank_batches
from pegasus_dist.data.prepare import prepare
from pegasus_dist.errors import DataError
from pegasus_dist.training.faults import loader_worker_lost


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
    loader.set_epoch(epoch, start_sample=start)
    return [list(b.keys) for b in loader]


def test_batches_are_uint8_images_and_resume_skips_done_batches(shard_set):
    loader = ShardLoader(shard_set, 4, rank=0, world_size=1, num_workers=0, seed=0, image_size=32)
    batch = next(iter(loader))
    assert batch.images.shape == (4, 3, 32, 32) and str(batch.images.dtype) == "torch.uint8"
    assert len(loader) == 15  # ceil(58 / 4)
    assert keys_of(loader, 2, start=20) == keys_of(loader, 2)[5:]  # 5 batches of 4 done


def test_image_size_must_match_the_manifest(shard_set):
    with pytest.raises(DataError, match="32px images but model.image_size is 64"):
        ShardLoader(shard_set, 4, rank=0, world_size=1, num_workers=0, seed=0, image_size=64)


@pytest.mark.parametrize("world", [1, 2])
def test_memory_mode_yields_exactly_the_streamed_batches(shard_set, world):
    import torch

    from pegasus_dist.data.loader import MemoryLoader

    for rank in range(world):
        stream = ShardLoader(shard_set, 4, rank, world, num_workers=0, seed=5, image_size=32)
        memory = MemoryLoader(shard_set, 4, rank, world, seed=5, image_size=32)
        assert len(stream) == len(memory)
        for epoch, start in ((0, 0), (3, 2)):
            stream.set_epoch(epoch, start)
            memory.set_epoch(epoch, start)
            pairs = list(zip(stream, memory, strict=True))
            assert pairs
            for a, b in pairs:
                assert a.keys == b.keys and a.labels == b.labels and a.offset == b.offset
                assert torch.equal(a.images, b.images)


def test_auto_mode_picks_memory_when_the_set_fits(shard_set):
    import torch

    from pegasus_dist.config import DataConfig
    from pegasus_dist.data.loader import MemoryLoader, make_loader

    cpu = torch.device("cpu")
    cfg = DataConfig(shards=str(shard_set.parent), shard_set="mix", batch_size=4)
    assert isinstance(make_loader(cfg, 32, 0, 1, cpu), MemoryLoader)
    cfg.memory_limit_mb = 0
    assert isinstance(make_loader(cfg, 32, 0, 1, cpu), ShardLoader)


@pytest.mark.process
def test_loader_workers_change_no_batch_and_follow_set_epoch_across_epochs_and_abandoned_ones(shard_set):
    """Loader workers persist across epochs: each epoch, and a resumed one, is planned anew."""
    inline = ShardLoader(shard_set, 4, rank=1, world_size=2, num_workers=0, seed=3, image_size=32)
    workers = ShardLoader(shard_set, 4, rank=1, world_size=2, num_workers=2, seed=3, image_size=32)
    assert keys_of(workers, 0) == keys_of(inline, 0) != keys_of(inline, 1)  # reshuffled per epoch
    assert keys_of(workers, 1) == keys_of(inline, 1)  # and seeded
    workers.set_epoch(2)
    next(iter(workers))  # abandoned after one batch, as train.max_steps does
    assert keys_of(workers, 4, start=3) == keys_of(inline, 4, start=3)
    assert keys_of(workers, 5) == keys_of(inline, 5) != keys_of(inline, 4)


# The peak resident memory (VmHWM) that loading adds: the peak is reset first (clear_refs 5),
# as torch's import peaks above what stays resident.
MEASURE_PEAK = """
import re, sys
from pathlib import Path
from pegasus_dist.data.loader import MemoryLoader
def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS")
loader = MemoryLoader(sys.argv[1], 16, 0, 1, seed=0, image_size=32)
print(loader.images.numel(), (kib("VmHWM") - before) * 1024)
"""


@pytest.mark.process
def test_memory_mode_holds_one_host_copy_of_the_set_at_its_peak(tmp_path):
    """Issue 22 item 4: a permuted copy beside the decoded one doubled each rank's host memory."""
    import subprocess
    import sys

    prepare(PrepareConfig(sources=["synthetic:6000"], out=str(tmp_path), shard_size=1000))
    done = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(tmp_path / "mix")], capture_output=True,
                          text=True, timeout=120, check=True)
    set_bytes, peak_growth = map(int, done.stdout.split())
    assert set_bytes == 5880 * 3 * 32 * 32
    assert peak_growth < 1.4 * set_bytes, (set_bytes, peak_growth)  # 2x before; keys, labels, buffers


@pytest.mark.parametrize("err", [
    LoaderWorkerLost("DataLoader worker (pid unknown) ended while handing over a batch "
                     "(ConnectionResetError: [Errno 104] Connection reset by peer)"),  # ShardLoader's word
    RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "),  # torch's SIGCHLD handler
    RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly"),  # torch's, when a batch is due
])
def test_every_word_for_a_dead_loader_worker_is_one_line_and_stops_torch_saying_it_again(err):
    before = signal.signal(signal.SIGCHLD, lambda *_: None)  # as torch's handler, while workers run
    try:
        lost = loader_worker_lost(err, "step 6 (epoch 1)")
        assert str(lost).startswith("a data loader process died at step 6 (epoch 1) (DataLoader worker (pid")
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL  # no second report mid-line
    finally:
        signal.signal(signal.SIGCHLD, before)
    assert loader_worker_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "step 6") is None
