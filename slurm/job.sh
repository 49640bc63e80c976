#!/usr/bin/env bash
# The body of every pegasus-dist SLURM job; slurm/pretrain.sh and
# slurm/finetune.sh set their #SBATCH options and run `job.sh PHASE`.
#
# One task per node runs `accelerate launch`, which starts one training
# process per GPU of that node (one process on a CPU-only node). The tasks
# rendezvous as machines 0..N-1 at the first host of the allocation.
#
# Environment (all optional):
#   PEGASUS_ROOT          repository checkout           [$SLURM_SUBMIT_DIR]
#   PEGASUS_VENV          virtualenv to activate        [$PEGASUS_ROOT/.venv, if it exists]
#   PEGASUS_PRETRAIN_CONFIG  pretrain's training config  [configs/pretrain.yaml]
#   PEGASUS_FINETUNE_CONFIG  finetune's training config  [configs/finetune.yaml]
#   PEGASUS_SHARDS        shard folder (data.shards)    [the config's]
#   PEGASUS_RUNS          runs folder (run.output_dir)  [the config's]
#   PEGASUS_RUN_NAME      run name (run.name)           [the config's]
#   PEGASUS_PRETRAIN_RUN  finetune only: run whose weights start finetune
#                         (train.init_from)             [$PEGASUS_RUNS/pretrain, or the config's]
#   PEGASUS_EXTRA_ARGS    more section.key=value overrides, space separated
#   PEGASUS_PORT          rendezvous port               [20000 + job id % 20000]
#
# Preemption: the scripts ask SLURM for SIGUSR1 two minutes before the time
# limit (--signal=B:USR1@120). This shell forwards it to every training
# process, which finishes its step, checkpoints and exits; the job is then
# requeued (--requeue) and resumes from that checkpoint by itself.
set -euo pipefail

phase=${1:?usage: job.sh pretrain|finetune}
root=${PEGASUS_ROOT:-${SLURM_SUBMIT_DIR:?run this through sbatch, or set PEGASUS_ROOT}}
cd "$root"
venv=${PEGASUS_VENV:-$root/.venv}
if [ -f "$venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
fi

config_var="PEGASUS_${phase^^}_CONFIG"
config=${!config_var:-configs/$phase.yaml}
overrides=()
[ -n "${PEGASUS_SHARDS:-}" ] && overrides+=("data.shards=$PEGASUS_SHARDS")
[ -n "${PEGASUS_RUNS:-}" ] && overrides+=("run.output_dir=$PEGASUS_RUNS")
[ -n "${PEGASUS_RUN_NAME:-}" ] && overrides+=("run.name=$PEGASUS_RUN_NAME")
if [ "$phase" = finetune ]; then
    pretrain_run=${PEGASUS_PRETRAIN_RUN:-${PEGASUS_RUNS:+$PEGASUS_RUNS/pretrain}}
    [ -n "$pretrain_run" ] && overrides+=("train.init_from=$pretrain_run")
fi
read -r -a extra <<< "${PEGASUS_EXTRA_ARGS:-}"
overrides+=("${extra[@]}")

main_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-0}
procs_per_machine=$(( gpus_per_node > 0 ? gpus_per_node : 1 ))
# One task per node in production: tasks == nodes. The tests run 2 tasks on one
# node to exercise the same multi-machine path.
machines=${SLURM_NTASKS:-1}
export PEGASUS_LAUNCH_ARGS="--num_machines $machines \
--num_processes $(( machines * procs_per_machine )) \
--main_process_ip $main_host --main_process_port ${PEGASUS_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))} \
--rdzv_backend static --same_network --mixed_precision no --dynamo_backend no \
$([ $(( machines * procs_per_machine )) -gt 1 ] && echo --multi_gpu)"
echo "job $SLURM_JOB_ID: $phase on $SLURM_JOB_NUM_NODES node(s), $machines machine(s) x" \
     "$procs_per_machine process(es), main host $main_host, config $config"

stop_requested=0
forward_stop() {
    stop_requested=1
    echo "job $SLURM_JOB_ID: stop signal: asking the trainers to checkpoint and exit"
    # On every node, signal this job's trainers (python [-u] .../pegasus_dist/train.py
    # with our SLURM_JOB_ID), not the launchers, whose command lines also name the
    # script and which would die of SIGUSR1, nor another job's trainers.
    # shellcheck disable=SC2016
    srun --overlap --ntasks-per-node=1 bash -c '
        for pid in $(pgrep -f "python[0-9.]* (-u )?[^ ]*pegasus_dist/train\.py"); do
            if tr "\0" "\n" < "/proc/$pid/environ" | grep -qx "SLURM_JOB_ID=$SLURM_JOB_ID"; then
                kill -USR1 "$pid"
            fi
        done' || true
}
trap forward_stop USR1 TERM

# The task's shell expands SLURM_PROCID, so each task gets its own machine rank.
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch $PEGASUS_LAUNCH_ARGS \
    --machine_rank "$SLURM_PROCID" pegasus_dist/train.py "$@"' \
    bash --config "$config" "${overrides[@]}" &
step=$!
status=0
wait "$step" || status=$?
# `wait` returns early when a trapped signal arrives: wait for the step itself.
while kill -0 "$step" 2>/dev/null; do wait "$step" || status=$?; done

if [ "$stop_requested" = 1 ]; then
    echo "job $SLURM_JOB_ID: stopped for preemption (exit $status): requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
