"""The two tiers' guard, and the work tests share: shard sets, a classifier, trained runs.

Tiers (pyproject's markers; README "Tests"):

- ``process``: the test starts a process or a torch.distributed process group
  (a CLI run, ``accelerate launch``, torchrun, loader workers, a fork);
- ``slow``: it starts none, but trains a model or otherwise takes seconds
  (by review, and for the users of the trained classifier, at collection);
- ``slurm``: it needs the one-node SLURM cluster.

``make check`` runs the tests with none of these marks; ``make test`` runs all.
``make test`` runs the files on three pytest-xdist workers (``--dist loadfile``): the
work every test shares (shard sets, the classifier, trained runs) is made once per
pytest run, under a file lock, whichever worker asks first (:func:`_made_once`).

A test without a mark that starts a process or a process group fails, at that
call, naming the mark to add: the fast tier cannot grow a process unnoticed.
The guard covers the test's fixtures too, so a fast test cannot lean on a
fixture that starts one (a session fixture is built by the first test that
asks for it); a test that uses a shared trained run is marked ``process``
here, at collection, and one that uses the trained quality classifier ``slow``.
"""

from __future__ import annotations

import json
import multiprocessing.process
import os
import shutil
import subprocess
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed
import torch.distributed.distributed_c10d
from filelock import FileLock
from helpers import PIPELINE_STEPS, SMOKE, TINY_ARGS, Trained
from processes import BIN, REPO, run_bounded
from warm import WarmProcess

from pegasus_dist.config import PrepareConfig, QualityConfig
from pegasus_dist.data.prepare import prepare

FULL_TIER = ("process", "slow", "slurm")

# One thread per process: three workers share two cores, and threads that outnumber
# the cores spin in OpenMP's barriers (a tiny-model step 100x slower); the runs'
# processes inherit it. The tiny model's steps are too small to split anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


class ProcessInFastTier(RuntimeError):
    """A test of the fast tier started a process or a process group."""


# Fixtures that cost a tier: a test that uses one is in the full tier, whatever it does itself.
FIXTURE_TIERS = {"smoke_pipeline": "process", "_checkpointed_run": "process",  # CLI runs
                 "quality_classifier": "slow", "perceptual_network": "slow"}  # train a classifier here


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture in FIXTURE_TIERS.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(FIXTURE_TIERS[fixture])


_VIOLATION = pytest.StashKey[str]()


def _refusing(item: pytest.Item, what: str) -> Callable[..., None]:
    def refuse(*args, **kwargs) -> None:
        message = (f"{item.nodeid} {what}, but the fast tier (`make check`) starts no process and no "
                   "process group: mark the test @pytest.mark.process (the full tier, `make test`), "
                   "or do the work in this process")
        item.stash[_VIOLATION] = message  # reported even if the code under test swallows the error
        raise ProcessInFastTier(message)
    return refuse


def _named_as(refuse: Callable[..., None], owner: object, name: str) -> Callable[..., None]:
    """``refuse`` under the name it replaces, so that pickle still finds, say, os.system by name."""
    if isinstance(owner, types.ModuleType):
        refuse.__module__, refuse.__name__, refuse.__qualname__ = owner.__name__, name, name
    return refuse

# Every way a test could start a process or a process group, and how to say it.
_ENTRY_POINTS = [
    (subprocess.Popen, "_execute_child", "starts a process (subprocess)"),
    (os, "fork", "forks (os.fork)"),
    (os, "forkpty", "forks (os.forkpty)"),
    (os, "posix_spawn", "starts a process (os.posix_spawn)"),
    (os, "posix_spawnp", "starts a process (os.posix_spawnp)"),
    (os, "system", "starts a process (os.system)"),
    (WarmProcess, "__init__", "starts a process (forked by the warm server of tests/warm.py)"),
    (multiprocessing.process.BaseProcess, "start",
     "starts a process (multiprocessing: a Pool, or DataLoader workers)"),
    (torch.distributed, "init_process_group", "creates a process group (init_process_group)"),
    (torch.distributed.distributed_c10d, "init_process_group",
     "creates a process group (init_process_group)"),
    (torch.distributed, "new_group", "creates a process group (new_group)"),
    (torch.distributed.distributed_c10d, "new_group", "creates a process group (new_group)"),
]


def _guarded(item: pytest.Item):
    """A monkeypatch context that refuses every entry point while a fast-tier test sets up and runs."""
    patch = pytest.MonkeyPatch()
    if not any(item.get_closest_marker(name) for name in FULL_TIER):
        for owner, name, what in _ENTRY_POINTS:
            if hasattr(owner, name):
                patch.setattr(owner, name, _named_as(_refusing(item, what), owner, name))
    return patch


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    patch = _guarded(item)
    yield
    patch.undo()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    patch = _guarded(item)
    yield
    patch.undo()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when in ("setup", "call") and report.passed and _VIOLATION in item.stash:
        report.outcome, report.longrepr = "failed", item.stash[_VIOLATION]


# --- made once per pytest run, shared by its workers ---------------------------------------------


def _made_once(tmp_path_factory, name: str, make: Callable[[Path], dict]) -> tuple[Path, dict]:
    """``make(folder)``'s folder and its JSON record, made by the first worker that asks.

    Under xdist each worker has its own basetemp below one shared folder; the
    lock makes the others wait and then read what the first one made. A
    worker whose ``make`` failed leaves no record, so the next one tries again.
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, record = shared / name, shared / f"{name}.json"
    with FileLock(shared / f"{name}.lock"):
        if not record.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            record.write_text(json.dumps(make(folder)))
    return folder, json.loads(record.read_text())


def _prepared(tmp_path_factory, name: str, **options) -> Path:
    def make(out: Path) -> dict:
        prepare(PrepareConfig(out=str(out), **options), "tests")
        return {}
    return _made_once(tmp_path_factory, name, make)[0]


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory):
    """shards/{mix,horse_bird,eval} from 480 synthetic images in shards of 50 (uneven)."""
    return _prepared(tmp_path_factory, "shards", sources=["synthetic:480"], shard_size=50)


@pytest.fixture(scope="session")
def quality_shards(tmp_path_factory):
    """1,500 synthetic images with a tenth held out: enough held-out horses and birds to score against."""
    return _prepared(tmp_path_factory, "quality-shards", sources=["synthetic:1500"], eval_fraction=0.1)


@pytest.fixture(scope="session")
def quality_classifier(quality_shards, tmp_path_factory):
    """The quality classifier trained on ``quality_shards`` (seconds), as (folder, classifier.json)."""
    from pegasus_dist.evaluation.classifier import train_classifier

    quality = QualityConfig(classifier_epochs=3, classifier_batch_size=64)
    return _made_once(tmp_path_factory, "classifier",
                      lambda folder: train_classifier(quality_shards, folder, quality))


@pytest.fixture(scope="session")
def perceptual_network(smoke_shards, tmp_path_factory) -> Path:
    """A classifier of another seed and depth than the judge's, for loss.perceptual_network (a second)."""
    from pegasus_dist.evaluation.classifier import train_classifier

    quality = QualityConfig(classifier_epochs=1, classifier_batch_size=64, classifier_seed=1,
                            classifier_widths=[8, 16, 16, 16])
    return _made_once(tmp_path_factory, "perceptual",
                      lambda folder: train_classifier(smoke_shards, folder, quality))[0]


def _trained(tmp_path_factory, name: str, command: list[str], overrides: list[str]) -> Trained:
    """A CLI run with ``overrides`` plus run.output_dir, made once; its folder and output."""
    def make(root: Path) -> dict:
        done = run_bounded([*command, f"run.output_dir={root}", *overrides], timeout=300,
                           env={"WANDB_API_KEY": ""})
        assert done.returncode == 0, done.stdout[-6000:]
        return {"output": done.stdout}
    root, record = _made_once(tmp_path_factory, name, make)
    return Trained(root, [*overrides, f"run.output_dir={root}"], record["output"])


@pytest.fixture(scope="session")
def smoke_pipeline(smoke_shards, tmp_path_factory) -> Trained:
    """One finished ``pegasus-dist pipeline`` on the smoke configs with the tiny model, as `demo` runs it.

    It reads ``smoke_shards`` (the pipeline reuses shards prepared from its
    sources: synthetic:480), trains its quality classifier (one epoch), then
    both phases, each ending with its grids, quality.json and held-out
    evaluation at step PIPELINE_STEPS (60), and writes report.html. Tests read it and write
    elsewhere; a test that changes a run works on a copy.
    """
    command = [str(BIN / "pegasus-dist"), "pipeline", "--source", "synthetic:480",
               "--config-dir", str(REPO / "configs/smoke")]
    return _trained(tmp_path_factory, "pipeline", command, [
        f"data.shards={smoke_shards}", f"train.max_steps={PIPELINE_STEPS}", "train.log_every=5",
        "data.batch_size=16", "optim.lr=0.01", "optim.lr_scaling=none", "optim.warmup_steps=0",
        "wandb.mode=disabled", "quality.classifier_epochs=1", *TINY_ARGS])


@pytest.fixture(scope="session")
def _checkpointed_run(smoke_shards, tmp_path_factory) -> Trained:
    command = [str(BIN / "pegasus-dist"), "train", "--config", SMOKE]
    return _trained(tmp_path_factory, "checkpointed", command, [
        f"data.shards={smoke_shards}", "train.max_steps=6", "train.checkpoint_every=3",
        "train.log_every=1", "data.batch_size=16", "wandb.mode=disabled", *TINY_ARGS])


@pytest.fixture
def checkpointed_run(_checkpointed_run, tmp_path) -> Trained:
    """A copy, this test's own, of a 6-step smoke pretrain of the tiny model on ``smoke_shards``.

    Checkpoints at steps 3 and 6 (``pretrain/checkpoints/step_0000000{3,6}``),
    global batch 16. ``overrides`` point at the copy: the same overrides with a
    higher ``train.max_steps`` resume it; add a fault and they are refused.
    """
    source = _checkpointed_run
    root = tmp_path / "checkpointed"
    shutil.copytree(source.root, root, symlinks=True)
    overrides = [o.replace(str(source.root), str(root)) for o in source.overrides]
    return Trained(root, overrides, source.output)
