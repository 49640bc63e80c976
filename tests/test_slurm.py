"""The real SLURM job scripts on a real one-node SLURM cluster (slurm/local-cluster.sh).

The fixture installs SLURM with apt and starts the cluster (root only; CI runs
as root). Jobs are submitted with ``--gpus-per-node=0 --cpus-per-task=1``: the
scripts ask for 8 GPUs and 16 CPUs of a real node by default.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_ARGS
from processes import REPO, run_bounded

pytestmark = [pytest.mark.slurm, pytest.mark.process]
CLUSTER = REPO / "slurm" / "local-cluster.sh"
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the local node has 2 CPUs, no GPU
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE")

# The real trainer, 50 ms slower per step (its fault plan's hooks), so that a signal
# lands mid-run on any machine (a step of the tiny model takes milliseconds). Same arithmetic,
# same weights.
SLOW_TRAINER = """\
from pegasus_dist.training.hooks import fault_plan
from pegasus_dist.training.loop import main

main(hooks=fault_plan("slow:ms=50"))
"""


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (apt-get install, slurmd); CI runs as root")
    for action in ("install", "start"):
        done = run_bounded(["bash", str(CLUSTER), action], timeout=600)
        assert done.returncode == 0, f"slurm/local-cluster.sh {action} failed:\n{done.stdout}"
    # A node configured with fewer CPUs than the host has would leave the two-task
    # job pending until the timeout (nproc once read the tests' OMP_NUM_THREADS=1).
    cpus = run_bounded(["sinfo", "-h", "-o", "%c"], timeout=30).stdout.strip()
    assert cpus == str(len(os.sched_getaffinity(0))), f"the local node has {cpus} CPUs configured"


def job_env(tmp_path: Path, shards: Path, steps: int = 3) -> dict[str, str]:
    return {
        "PEGASUS_VENV": sys.prefix,
        "PEGASUS_PRETRAIN_CONFIG": "configs/smoke/pretrain.yaml",
        "PEGASUS_FINETUNE_CONFIG": "configs/smoke/finetune.yaml",
        "PEGASUS_SHARDS": str(shards),
        "PEGASUS_RUNS": str(tmp_path / "runs"),
        "PEGASUS_EXTRA_ARGS": " ".join([f"train.max_steps={steps}", "wandb.mode=disabled",
                                        "data.batch_size=16", *TINY_ARGS]),  # the tiny model
    }


def sbatch(*args: str, env: dict[str, str]) -> str:
    out = run_bounded(["sbatch", "--parsable", *CPU_NODE, *args], timeout=60, env=env)
    assert out.returncode == 0, f"sbatch {' '.join(args)} failed:\n{out.stdout}"
    return out.stdout.strip().split(";")[0]


def show_job(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                          timeout=30).stdout


def job_state(job: str) -> tuple[str, str, int]:
    """(JobState, ExitCode, Restarts) from `scontrol show job` (no accounting database for sacct)."""
    out = show_job(job)
    state = re.search(r"JobState=(\S+)", out)
    code = re.search(r"ExitCode=(\S+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "UNKNOWN", code.group(1) if code else "?",
            int(restarts.group(1)) if restarts else -1)


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text()[-chars:] if log.exists() else f"(no log at {log})"


def wait_for(job: str, log: Path, timeout: float = 240) -> None:
    """Wait until the job ends; assert it COMPLETED with exit 0:0, else show its log.

    The timeout is under pytest-timeout's 300 s, so that a stuck job is cancelled
    and reported with its state (scontrol's Reason) and log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, code, _ = job_state(job)
        if state in FINAL:
            assert (state, code) == ("COMPLETED", "0:0"), f"job {job}: {state} {code}\n{tail(log)}"
            return
        time.sleep(1)
    info = show_job(job)
    subprocess.run(["scancel", job], timeout=30)
    raise AssertionError(f"job {job} did not finish in {timeout}s:\n{info}\n{tail(log)}")


def job_processes(job: str) -> list[int]:
    """Processes on this (the only) node that belong to the job."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"SLURM_JOB_ID={job}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            pass
    return pids


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.5)


def metrics_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_pretrain_then_finetune_through_sbatch_with_afterok(cluster, smoke_shards, tmp_path):
    env = job_env(tmp_path, smoke_shards)
    out = run_bounded(["bash", "slurm/submit-pipeline.sh", *CPU_NODE, f"--output={tmp_path}/%x-%j.out"],
                      timeout=60, env=env)
    assert out.returncode == 0, out.stdout
    pretrain, finetune = re.search(r"pretrain job (\d+), finetune job (\d+)", out.stdout).groups()
    print(f"SLURM jobs: pretrain {pretrain}, finetune {finetune}")
    assert f"afterok:{pretrain}" in show_job(finetune) or job_state(finetune)[0] != "PENDING"
    wait_for(pretrain, tmp_path / f"pegasus-pretrain-{pretrain}.out")
    wait_for(finetune, tmp_path / f"pegasus-finetune-{finetune}.out")
    log = (tmp_path / f"pegasus-finetune-{finetune}.out").read_text()
    run = tmp_path / "runs" / "finetune"
    assert f"initialised finetune from {tmp_path}/runs/pretrain/checkpoints/step_00000003" in log, log
    assert (run / "samples" / "pegasus.png").is_file(), log[-4000:]
    assert (run / "checkpoints" / "step_00000003" / "model.safetensors").is_file(), log[-4000:]


def test_pipeline_refuses_one_config_for_both_phases(tmp_path):
    out = run_bounded(["bash", "slurm/submit-pipeline.sh"], timeout=30,
                      env={"PEGASUS_CONFIG": "configs/smoke/pretrain.yaml"})
    assert out.returncode == 2 and "PEGASUS_PRETRAIN_CONFIG" in out.stdout, out.stdout


def test_several_nodes_with_a_loopback_main_host_stop_at_once_asking_for_the_interface():
    """gloo would bind every node to 127.0.0.1 and hang until its timeout: job.sh stops first.

    job.sh as SLURM would run it for a 2-node job, up to the point where it would start srun.
    """
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
           "PEGASUS_VENV": sys.prefix, "PEGASUS_CONFIG": "configs/smoke/pretrain.yaml"}
    done = run_bounded(["bash", "slurm/job.sh", "pretrain"], timeout=60, env=env)
    assert done.returncode == 1, done.stdout
    assert done.stdout.strip() == (
        "job.sh: cannot tell which network interface reaches localhost from the other nodes (found "
        "'lo'): set PEGASUS_SOCKET_IFNAME to the cluster network's interface (see 'ip -br addr')")


def test_two_tasks_rendezvous_as_two_machines(cluster, smoke_shards, tmp_path):
    env = job_env(tmp_path, smoke_shards)
    del env["PEGASUS_PRETRAIN_CONFIG"]
    env["PEGASUS_CONFIG"] = "configs/smoke/pretrain.yaml"  # the one-job spelling
    job = sbatch("--ntasks=2", "--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.out",
                 "slurm/pretrain.sh", env=env)
    print(f"SLURM job (2 machines): {job}")
    log = tmp_path / f"pegasus-pretrain-{job}.out"
    wait_for(job, log)
    text = log.read_text()
    assert "2 machine(s) x 1 process(es)" in text, text[-6000:]
    assert "--num_machines 2 --num_processes 2" in text and "--multi_gpu" in text, text[-6000:]
    assert "world_size=2" in text and "backend=gloo" in text, text[-6000:]
    iface = re.search(r"network interface (\S+),", text)  # exported as GLOO_/NCCL_SOCKET_IFNAME
    assert iface and Path("/sys/class/net", iface.group(1)).exists(), text[-6000:]
    assert (tmp_path / "runs" / "pretrain" / "checkpoints" / "step_00000003").is_dir(), text[-6000:]


def test_usr1_preemption_requeues_and_resumes_to_the_same_weights(cluster, smoke_shards, tmp_path):
    """SIGUSR1 (what --signal=B:USR1@120 sends) -> checkpoint, requeue, resume, same result."""
    (tmp_path / "slow_train.py").write_text(SLOW_TRAINER)
    extra = " ".join(["train.max_steps=120", "wandb.mode=disabled", "data.batch_size=16", "train.log_every=1",
                      *TINY_ARGS])
    jobs = {}
    for name in ("plain", "preempted"):
        env = {**job_env(tmp_path / name, smoke_shards), "PEGASUS_EXTRA_ARGS": extra}
        if name == "preempted":
            env["PEGASUS_TRAIN_SCRIPT"] = str(tmp_path / "slow_train.py")
        jobs[name] = sbatch(f"--output={tmp_path}/{name}-%j.out", "slurm/pretrain.sh", env=env)
    print(f"SLURM jobs: uninterrupted {jobs['plain']}, preempted {jobs['preempted']}")
    job, run = jobs["preempted"], tmp_path / "preempted" / "runs" / "pretrain"
    log = tmp_path / f"preempted-{job}.out"
    wait_until(lambda: metrics_lines(run) >= 20 or job_state(job)[0] in FINAL, 180,
               f"job {job} to train 20 steps")
    assert job_state(job)[0] not in FINAL, f"job {job} ended before the signal\n{tail(log)}"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    # Requeued: pending again with one restart (it passes through other states).
    wait_until(lambda: job_state(job)[0] == "PENDING" and job_state(job)[2] == 1, 120,
               f"job {job} to be requeued\n{tail(log)}")
    assert "stopped for preemption" in log.read_text(), tail(log)
    # SLURM holds a requeued job back for a while; start it now, once the first
    # run's processes are gone and a second has passed (slurmd refuses a job
    # credential issued in the same second as the requeue revoked the old one).
    wait_until(lambda: not job_processes(job), 60, f"the first run of job {job} to exit")
    time.sleep(1.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
    wait_for(job, log)
    wait_for(jobs["plain"], tmp_path / f"plain-{jobs['plain']}.out")
    text = log.read_text()
    assert "resumed from" in text, text[-6000:]
    final = "checkpoints/step_00000120/model.safetensors"
    reference = tmp_path / "plain" / "runs" / "pretrain" / final
    assert (run / final).read_bytes() == reference.read_bytes()  # to the bit


def test_scancel_cancels_without_requeue(cluster, smoke_shards, tmp_path):
    """A user's scancel (SIGTERM) must end the job, not requeue it like the SIGUSR1 warning."""
    (tmp_path / "slow_train.py").write_text(SLOW_TRAINER)
    env = {**job_env(tmp_path, smoke_shards, steps=120),
           "PEGASUS_TRAIN_SCRIPT": str(tmp_path / "slow_train.py")}
    job = sbatch(f"--output={tmp_path}/%x-%j.out", "slurm/pretrain.sh", env=env)
    print(f"SLURM job (scancel): {job}")
    log, run = tmp_path / f"pegasus-pretrain-{job}.out", tmp_path / "runs" / "pretrain"
    wait_until(lambda: (run / "metrics.jsonl").exists() or job_state(job)[0] in FINAL, 180,
               f"job {job} to start training")
    subprocess.run(["scancel", job], check=True, timeout=30)
    wait_until(lambda: job_state(job)[0] in FINAL and not job_processes(job), 90,
               f"job {job} to end\n{tail(log)}")
    time.sleep(1)
    state, _, restarts = job_state(job)
    assert (state, restarts) == ("CANCELLED", 0), f"job {job}: {state}, {restarts} restarts\n{tail(log)}"
