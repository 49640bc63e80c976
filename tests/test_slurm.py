"""The real SLURM job scripts on a real one-node SLURM cluster (slurm/local-cluster.sh)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import REPO, run_bounded

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
CLUSTER = REPO / "slurm" / "local-cluster.sh"


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (apt-get install, slurmd); CI runs as root")
    for action in ("install", "start"):
        done = run_bounded(["bash", str(CLUSTER), action], timeout=600)
        assert done.returncode == 0, f"local-cluster.sh {action} failed:\n{done.stdout}"


def job_env(tmp_path: Path, shards: Path) -> dict[str, str]:
    return {
        "PEGASUS_VENV": sys.prefix,
        "PEGASUS_PRETRAIN_CONFIG": "configs/smoke/pretrain.yaml",
        "PEGASUS_FINETUNE_CONFIG": "configs/smoke/finetune.yaml",
        "PEGASUS_SHARDS": str(shards),
        "PEGASUS_RUNS": str(tmp_path / "runs"),
        "PEGASUS_EXTRA_ARGS": "train.max_steps=3 wandb.mode=disabled data.batch_size=16",
    }


def job_state(job: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\S+)", out)
    code = re.search(r"ExitCode=(\S+)", out)
    return (state.group(1) if state else "UNKNOWN", code.group(1) if code else "?")


def wait_for(job: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, code = job_state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            text = log.read_text() if log.exists() else "(no log)"
            assert (state, code) == ("COMPLETED", "0:0"), f"job {job}: {state} {code}\n{text[-5000:]}"
            return
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout}s; state {job_state(job)}")


def test_pretrain_then_finetune_through_sbatch_with_afterok(cluster, smoke_shards, tmp_path):
    env = job_env(tmp_path, smoke_shards)
    out = run_bounded(["bash", "slurm/submit-pipeline.sh", f"--output={tmp_path}/%x-%j.out"],
                      timeout=60, env=env)
    assert out.returncode == 0, out.stdout
    pretrain, finetune = re.search(r"pretrain job (\d+), finetune job (\d+)", out.stdout).groups()
    print(f"SLURM jobs: pretrain {pretrain}, finetune {finetune}")
    wait_for(pretrain, tmp_path / f"pegasus-pretrain-{pretrain}.out")
    wait_for(finetune, tmp_path / f"pegasus-finetune-{finetune}.out")
    log = (tmp_path / f"pegasus-finetune-{finetune}.out").read_text()
    run = tmp_path / "runs" / "finetune"
    assert f"initialised finetune from {tmp_path}/runs/pretrain/checkpoints/step_00000003" in log
    assert (run / "samples" / "pegasus.png").is_file()
    assert (run / "checkpoints" / "step_00000003" / "model.safetensors").is_file()


def test_two_tasks_rendezvous_as_two_machines(cluster, smoke_shards, tmp_path):
    env = job_env(tmp_path, smoke_shards)
    out = run_bounded(["sbatch", "--parsable", "--ntasks=2", "--ntasks-per-node=2",
                       f"--output={tmp_path}/%x-%j.out", "slurm/pretrain.sh"], timeout=60, env=env)
    assert out.returncode == 0, out.stdout
    job = out.stdout.strip()
    print(f"SLURM job (2 machines): {job}")
    log = tmp_path / f"pegasus-pretrain-{job}.out"
    wait_for(job, log)
    text = log.read_text()
    assert "2 machine(s) x 1 process(es)" in text
    assert "world_size=2" in text and "backend=gloo" in text
    assert (tmp_path / "runs" / "pretrain" / "checkpoints" / "step_00000003").is_dir()


def test_usr1_preemption_requeues_and_resumes_to_the_same_weights(cluster, smoke_shards, tmp_path):
    """SIGUSR1 (what --signal=B:USR1@120 sends) -> checkpoint, requeue, resume, same result."""
    args = "train.max_steps=120 wandb.mode=disabled data.batch_size=16 train.log_every=1"
    jobs = {}
    for name in ("plain", "preempted"):
        env = {**job_env(tmp_path / name, smoke_shards), "PEGASUS_EXTRA_ARGS": args}
        out = run_bounded(["sbatch", "--parsable", f"--output={tmp_path}/{name}-%j.out",
                           "slurm/pretrain.sh"], timeout=60, env=env)
        assert out.returncode == 0, out.stdout
        jobs[name] = out.stdout.strip()
    print(f"SLURM jobs: uninterrupted {jobs['plain']}, preempted {jobs['preempted']}")
    job, run = jobs["preempted"], tmp_path / "preempted" / "runs" / "pretrain"
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and
               len((run / "metrics.jsonl").read_text().splitlines()) >= 20):
        assert time.monotonic() < deadline, f"job {job} made no progress: {job_state(job)}"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    deadline = time.monotonic() + 120
    # Requeued means pending again with one restart (it passes through other states).
    while not (job_state(job)[0] == "PENDING" and "Restarts=1" in subprocess.run(
            ["scontrol", "show", "job", job], capture_output=True, text=True).stdout):
        assert time.monotonic() < deadline, f"job {job} was not requeued: {job_state(job)}"
        time.sleep(0.5)
    # SLURM holds a requeued job back for about two minutes; let it start now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    log = tmp_path / f"preempted-{job}.out"
    wait_for(job, log)
    wait_for(jobs["plain"], tmp_path / f"plain-{jobs['plain']}.out")
    text = log.read_text()
    assert "stopped for preemption" in text and "resumed from" in text
    final = "checkpoints/step_00000120/model.safetensors"
    reference = tmp_path / "plain" / "runs" / "pretrain" / final
    assert (run / final).read_bytes() == reference.read_bytes()  # to the bit
