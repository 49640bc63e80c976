#!/usr/bin/env bash
# Phase 2 (finetune on horses and birds, from the pretrain run's weights) as a
# SLURM job. Submit from the repository root after pretrain has finished, or
# with a dependency (slurm/submit-pipeline.sh does both phases this way):
#   sbatch --dependency=afterok:PRETRAIN_JOB_ID slurm/finetune.sh
#   PEGASUS_PRETRAIN_RUN=runs/pretrain sbatch -p PARTITION -A ACCOUNT slurm/finetune.sh
#   sbatch --gpus-per-node=0 --cpus-per-task=1 slurm/finetune.sh   # CPU-only cluster
# Options on sbatch's command line override the #SBATCH lines below.
#
# Environment (all optional; full list and defaults in slurm/job.sh):
#   PEGASUS_ROOT [$SLURM_SUBMIT_DIR]  PEGASUS_VENV [$PEGASUS_ROOT/.venv]
#   PEGASUS_CONFIG [configs/finetune.yaml]  PEGASUS_SHARDS, PEGASUS_RUNS,
#   PEGASUS_RUN_NAME [the config's]  PEGASUS_EXTRA_ARGS [none]
#   PEGASUS_PRETRAIN_RUN  the run whose weights start finetune (train.init_from=)
#                         [$PEGASUS_RUNS/pretrain, or the config's train.init_from]
# Log: slurm/logs/pegasus-finetune-<job id>.out (appended to across requeues).
#
# Same layout and preemption handling as slurm/pretrain.sh (see slurm/job.sh).
#SBATCH --job-name=pegasus-finetune
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
# the submit directory (or PEGASUS_ROOT), not from $0.
exec bash "${PEGASUS_ROOT:-${SLURM_SUBMIT_DIR:?submit with sbatch from the repository root}}/slurm/job.sh" finetune
