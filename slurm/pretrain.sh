#!/usr/bin/env bash
# Phase 1 (pretrain on the mix) as a SLURM job. Submit from the repository root:
#   mkdir -p slurm/logs && sbatch slurm/pretrain.sh
#   sbatch --nodes=4 --gpus-per-node=8 -p PARTITION -A ACCOUNT slurm/pretrain.sh
# Command-line sbatch options override the #SBATCH lines below; the
# environment variables that choose config, shards and runs are documented in
# slurm/job.sh. Logs: slurm/logs/<job name>-<job id>.out (the folder must exist).
#SBATCH --job-name=pegasus-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append     # a requeued run adds to the same log
set -euo pipefail
exec bash "${PEGASUS_ROOT:-$SLURM_SUBMIT_DIR}/slurm/job.sh" pretrain
