"""W&B with a key but no server: WANDB_MODE is respected, and a failed online start logs offline.

The server is a loopback port only: one nothing listens on (connections refused,
as with no network), or one that listens and records whether anyone connected.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SMOKE, TINY_ARGS, cli_here, error_lines, training_steps
from processes import BIN, run_bounded

from pegasus_dist.config import load_config
from pegasus_dist.training.tracking import wandb_mode

FAKE_KEY = "pegasusfakewandbkey0123456789abcdef01234"  # 40 characters, as W&B keys
FALLBACK = "W&B could not start online"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused, and no one else takes it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A loopback server that never answers; a connection waits in its queue until accepted."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        yield sock


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger as it was: an in-process `train` sets it up on the captured stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def history_steps(wandb_file: Path) -> list[int]:
    """The steps of the history rows in ``wandb_file``, read by W&B's own ``wandb leet inspect``."""
    done = run_bounded([str(BIN / "wandb"), "leet", "inspect", "--json", str(wandb_file)], timeout=60)
    assert done.returncode == 0, done.stdout[-3000:]
    records = map(json.loads, done.stdout.splitlines())
    return [r["history"]["step"]["num"] for r in records if r["type"] == "history"]


def train(shards: Path, runs: Path, env: dict[str, str], *extra: str):
    """A 3-step tiny-model smoke run with wandb.mode=auto (the default); the process and its seconds."""
    cmd = [str(BIN / "pegasus-dist"), "train", "--config", str(SMOKE), f"data.shards={shards}",
           f"run.output_dir={runs}", "train.max_steps=3", "data.batch_size=16",
           "train.log_every=1", *TINY_ARGS, *extra]
    start = time.monotonic()
    done = run_bounded(cmd, timeout=240, env={"WANDB_API_KEY": FAKE_KEY, **env})
    return done, time.monotonic() - start


@pytest.mark.process
def test_an_unreachable_server_gives_an_offline_run_and_one_warning(smoke_shards, tmp_path,
                                                                     closed_port, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # auto with a key: online, were it reachable
    url = f"http://127.0.0.1:{closed_port}"
    done, seconds = train(smoke_shards, tmp_path, {"WANDB_BASE_URL": url}, "wandb.init_timeout_s=5")
    assert done.returncode == 0, done.stdout[-4000:]
    # Unbounded, wandb alone waits 90 s (its default init_timeout) and then crashes.
    assert seconds < 90, seconds
    assert "Traceback" not in done.stdout
    (warning,) = [line for line in done.stdout.splitlines() if FALLBACK in line]
    assert "CommError" in warning
    folder = Path(re.search(r"`wandb sync (\S+)`", warning).group(1))
    run = tmp_path / "pretrain"
    assert folder.parent == (run / "wandb").resolve() and folder.name.startswith("offline-run-")
    # The offline run holds the history of the whole run: W&B lost nothing.
    (wandb_file,) = folder.glob("run-*.wandb")
    assert training_steps(run) == [1, 2, 3]
    assert set(history_steps(wandb_file)) >= {1, 2, 3}
    for path in run.rglob("*"):  # the failed online attempt wrote no trace of the key either
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


@pytest.mark.process
def test_wandb_mode_offline_in_the_environment_wins_over_the_key(smoke_shards, tmp_path,
                                                                  listening_socket):
    port = listening_socket.getsockname()[1]
    done, _ = train(smoke_shards, tmp_path, {"WANDB_BASE_URL": f"http://127.0.0.1:{port}",
                                             "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stdout[-4000:]
    with pytest.raises(BlockingIOError):  # nothing is waiting to be accepted: no one connected
        listening_socket.accept()
    assert FALLBACK not in done.stdout
    run = tmp_path / "pretrain"
    # One run folder (not counting the latest-run link), and an offline one: no online attempt.
    (wandb_file,) = run.glob("wandb/*run-*/run-*.wandb")
    assert wandb_file.parent.name.startswith("offline-run-")
    assert set(history_steps(wandb_file)) >= {1, 2, 3}


@pytest.mark.parametrize(("override", "env", "mode"), [
    ([], {"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}, "offline"),
    ([], {"WANDB_MODE": "disabled", "WANDB_API_KEY": FAKE_KEY}, "disabled"),
    ([], {"WANDB_MODE": "dryrun"}, "offline"),  # wandb's old name for offline
    ([], {"WANDB_MODE": "", "WANDB_API_KEY": FAKE_KEY}, "online"),
    ([], {"WANDB_MODE": "", "WANDB_API_KEY": ""}, "offline"),
    (["wandb.mode=online"], {"WANDB_MODE": "offline"}, "online"),  # the config wins
    (["wandb.mode=disabled"], {"WANDB_MODE": "online", "WANDB_API_KEY": FAKE_KEY}, "disabled"),
])
def test_the_config_wins_then_wandb_mode_then_the_key(monkeypatch, override, env, mode):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert wandb_mode(load_config(SMOKE, override)) == mode


def test_an_unknown_wandb_mode_is_one_line_naming_it(smoke_shards, tmp_path, monkeypatch, capsys,
                                                      root_logging):
    monkeypatch.setenv("WANDB_MODE", "ofline")
    code, output = cli_here(capsys, "train", "--config", str(SMOKE), f"data.shards={smoke_shards}",
                            f"run.output_dir={tmp_path}", *TINY_ARGS)
    assert code == 2, output[-4000:]
    assert error_lines(output) == [
        "error: WANDB_MODE=ofline is not a W&B mode: set it to online, offline or disabled, or unset it"]
    assert list(tmp_path.iterdir()) == []  # refused before the run wrote anything
    assert wandb_mode(load_config(SMOKE, ["wandb.mode=offline"])) == "offline"  # a set mode ignores it


@pytest.mark.process
def test_any_other_wandb_start_failure_costs_only_wandb(smoke_shards, tmp_path):
    """A non-ASCII run folder under the C locale: wandb.init would raise UnicodeEncodeError, after
    its own loggers printed tracebacks; one warning instead, naming what and the fix."""
    runs = tmp_path / "läufe"
    done, _ = train(smoke_shards, runs, {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"},
                    "wandb.mode=offline")
    assert done.returncode == 0, done.stdout[-3000:]
    warnings = [line for line in done.stdout.splitlines() if "W&B could not start (" in line]
    assert len(warnings) == 1 and "training on without it; metrics.jsonl in " in warnings[0]
    assert "W&B could not start (run.output_dir holds bytes that this locale's" in warnings[0]
    assert warnings[0].endswith("run under a UTF-8 locale (LC_ALL=C.UTF-8) to log to W&B")
    assert "Logging error" not in done.stdout and "Traceback" not in done.stdout
    assert training_steps(runs / "pretrain") == [1, 2, 3]
