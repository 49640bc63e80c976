#!/usr/bin/env bash
# Submit both phases: finetune starts only if pretrain succeeds (afterok).
#   slurm/submit-pipeline.sh [sbatch options for both jobs]
#   slurm/submit-pipeline.sh -p gpu -A myproject --nodes=4 --gpus-per-node=8
#   slurm/submit-pipeline.sh --gpus-per-node=0 --cpus-per-task=1    # CPU-only cluster
# The PEGASUS_* variables of slurm/job.sh reach both jobs (sbatch exports the
# environment); choose the configs with PEGASUS_PRETRAIN_CONFIG and
# PEGASUS_FINETUNE_CONFIG. Prints both job ids.
set -euo pipefail
cd "$(dirname "$0")/.."  # the jobs find the checkout from the submit directory
if [ -n "${PEGASUS_CONFIG:-}" ]; then
    echo "submit-pipeline.sh: PEGASUS_CONFIG would give both phases the same recipe;" \
         "set PEGASUS_PRETRAIN_CONFIG and PEGASUS_FINETUNE_CONFIG instead" >&2
    exit 2
fi
command -v sbatch >/dev/null || { echo "submit-pipeline.sh: sbatch not found: run this on a SLURM login node" >&2; exit 1; }
mkdir -p slurm/logs  # committed, but sbatch fails without a log if a copy of the checkout lacks it
pretrain=$(sbatch --parsable "$@" slurm/pretrain.sh)
pretrain=${pretrain%%;*}  # --parsable prints "id;cluster" on multi-cluster setups
finetune=$(sbatch --parsable --dependency=afterok:"$pretrain" "$@" slurm/finetune.sh)
finetune=${finetune%%;*}
echo "pretrain job $pretrain, finetune job $finetune (after pretrain succeeds)"
