#!/usr/bin/env bash
# Phase 1 (pretrain on the CIFAR-10 + STL-10 mix) as a SLURM job. Submit from
# the repository root (both phases in order: slurm/submit-pipeline.sh):
#   sbatch slurm/pretrain.sh
#   sbatch -p PARTITION -A ACCOUNT --nodes=4 --gpus-per-node=8 slurm/pretrain.sh
#   sbatch --gpus-per-node=0 --cpus-per-task=1 slurm/pretrain.sh   # CPU-only cluster
# Options on sbatch's command line override the #SBATCH lines below.
#
# Environment (all optional; full list and defaults in slurm/job.sh):
#   PEGASUS_ROOT [$SLURM_SUBMIT_DIR]  PEGASUS_VENV [$PEGASUS_ROOT/.venv]
#   PEGASUS_CONFIG [configs/pretrain.yaml]  PEGASUS_SHARDS, PEGASUS_RUNS,
#   PEGASUS_RUN_NAME [the config's]  PEGASUS_EXTRA_ARGS [none]
# Log: slurm/logs/pegasus-pretrain-<job id>.out (appended to across requeues).
#
# One task per node; it starts one training process per GPU of the node.
# 16 CPUs per task: the data.num_workers=2 loader workers of each of 8 GPU
# processes (one node). --mem=0: all of each node's memory, asked for explicitly
# (a site default can be a few GB a CPU; with data.mode=memory each process
# holds its decoded shard set in host memory while it loads, the size the
# start-up line prints); on a shared CPU node ask for a share (sbatch --mem=16G).
# SIGUSR1 120 s before the time limit to the batch shell:
# the trainers checkpoint and the job requeues itself (see slurm/job.sh).
#SBATCH --job-name=pegasus-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
# SLURM runs a copy of this file from its spool folder: find the checkout from
# the submit directory (or PEGASUS_ROOT), not from $0. exec keeps this shell's
# pid, which is the one --signal=B: targets.
exec bash "${PEGASUS_ROOT:-${SLURM_SUBMIT_DIR:?submit with sbatch from the repository root}}/slurm/job.sh" pretrain
