#!/usr/bin/env bash
# Submit both phases: finetune starts only if pretrain succeeds (afterok).
#   slurm/submit-pipeline.sh [sbatch options for both jobs, e.g. -p gpu --gpus-per-node=8]
# Run from the repository root; the PEGASUS_* variables of slurm/job.sh apply to both.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p slurm/logs  # sbatch does not create the --output folder
pretrain=$(sbatch --parsable "$@" slurm/pretrain.sh)
finetune=$(sbatch --parsable --dependency=afterok:"$pretrain" "$@" slurm/finetune.sh)
echo "pretrain job $pretrain, finetune job $finetune (after pretrain succeeds)"
