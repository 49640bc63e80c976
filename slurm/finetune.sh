#!/usr/bin/env bash
# Phase 2 (finetune on horses and birds, from the pretrain run's weights) as a
# SLURM job. Submit from the repository root, after pretrain or with a dependency:
#   sbatch --dependency=afterok:PRETRAIN_JOB_ID slurm/finetune.sh
# The pretrain run is $PEGASUS_PRETRAIN_RUN (see slurm/job.sh), by default the
# config's train.init_from (runs/pretrain). Logs: slurm/logs/<job name>-<job id>.out.
#SBATCH --job-name=pegasus-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append     # a requeued run adds to the same log
set -euo pipefail
exec bash "${PEGASUS_ROOT:-$SLURM_SUBMIT_DIR}/slurm/job.sh" finetune
