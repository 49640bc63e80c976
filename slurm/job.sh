#!/usr/bin/env bash
# The body of every pegasus-dist SLURM job, the one place that knows how to turn
# a SLURM allocation into `accelerate launch` arguments. slurm/pretrain.sh and
# slurm/finetune.sh only hold their #SBATCH options and run `job.sh PHASE`.
#
# Layout: ONE task per node (#SBATCH --ntasks-per-node=1). Each task runs
# `accelerate launch`, which starts one training process per GPU of its node
# (one process on a CPU-only node). The tasks rendezvous as machines 0..N-1:
#   --num_machines      N = SLURM_NTASKS (= SLURM_NNODES with one task per node;
#                       the tests run 2 tasks on one node to exercise this path)
#   --machine_rank      SLURM_PROCID of the task
#   --num_processes     N x processes per machine
#   --main_process_ip   first host of the allocation
#   --main_process_port 20000 + job id % 20000 (same port after a requeue: same job id)
#   --multi_gpu         when there is more than one process in all. On CPU-only
#                       nodes too: accelerate's --cpu cannot be combined with
#                       --multi_gpu and alone starts a single process, so the
#                       trainer builds Accelerator(cpu=True) itself when CUDA
#                       is absent, and the processes form one gloo group.
#
# Environment (all optional; [default]):
#   PEGASUS_ROOT          repository checkout               [$SLURM_SUBMIT_DIR]
#   PEGASUS_VENV          virtualenv to activate            [$PEGASUS_ROOT/.venv, if it exists]
#   PEGASUS_CONFIG        training config of this job       [configs/pretrain.yaml or configs/finetune.yaml]
#   PEGASUS_PRETRAIN_CONFIG, PEGASUS_FINETUNE_CONFIG
#                         the same for one phase only (win over PEGASUS_CONFIG;
#                         what slurm/submit-pipeline.sh needs, as one environment
#                         reaches both of its jobs)
#   PEGASUS_SHARDS        shard folder (data.shards=)       [the config's]
#   PEGASUS_RUNS          runs folder (run.output_dir=)     [the config's]
#   PEGASUS_RUN_NAME      run name (run.name=)              [the config's]
#                         the run directory is $PEGASUS_RUNS/$PEGASUS_RUN_NAME
#   PEGASUS_PRETRAIN_RUN  finetune only: run directory whose weights start
#                         finetune (train.init_from=)       [$PEGASUS_RUNS/pretrain if PEGASUS_RUNS
#                                                            is set, else the config's]
#   PEGASUS_EXTRA_ARGS    more section.key=value overrides, space separated
#   PEGASUS_PROCS_PER_NODE  training processes per machine  [GPUs of the node: SLURM_GPUS_ON_NODE,
#                                                            else nvidia-smi -L; 1 without GPUs]
#   PEGASUS_PORT          rendezvous port                   [20000 + job id % 20000]
#   PEGASUS_SOCKET_IFNAME network interface of gloo and NCCL (GLOO_SOCKET_IFNAME,
#                         NCCL_SOCKET_IFNAME)               [the one holding the main host's address]
#   PEGASUS_TRAIN_SCRIPT  script that accelerate launches   [pegasus_dist/train.py]
#                         (a stand-in, to try the SLURM plumbing alone)
# Partition, account, nodes, GPUs, CPUs and time are sbatch's own options
# (-p, -A, --nodes, --gpus-per-node, --cpus-per-task, --time) on its command line.
#
# Preemption: the job scripts ask SLURM for SIGUSR1 two minutes before the time
# limit (--signal=B:USR1@120, B: = to this batch shell only). The trap below
# forwards it, and SIGTERM, to the training processes of this job on this node;
# every rank stops at the same step (the ranks agree on stop signals every
# step), checkpoints and exits; this script then requeues the job (--requeue),
# and the requeued job resumes from that checkpoint by itself.
# It deliberately does not signal the srun step as a whole: its tasks are the
# `accelerate launch` launchers, which die of SIGUSR1 (no handler) and would
# take the trainers down before they checkpoint.
set -euo pipefail

die() { echo "job.sh: $*" >&2; exit 1; }

phase=${1:-}
[[ $phase == pretrain || $phase == finetune ]] || die "usage: job.sh pretrain|finetune"
[ -n "${SLURM_JOB_ID:-}" ] || die "run this through sbatch (slurm/$phase.sh), not directly"
root=${PEGASUS_ROOT:-${SLURM_SUBMIT_DIR:-}}
[ -d "$root/pegasus_dist" ] \
    || die "PEGASUS_ROOT='$root' is not the pegasus-dist checkout: submit from the repository root or set PEGASUS_ROOT"
cd "$root"

if [ -n "${PEGASUS_VENV:-}" ]; then
    [ -f "$PEGASUS_VENV/bin/activate" ] \
        || die "PEGASUS_VENV=$PEGASUS_VENV has no bin/activate (create it with 'make install', or unset PEGASUS_VENV)"
    # shellcheck disable=SC1091
    source "$PEGASUS_VENV/bin/activate"
elif [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
command -v accelerate >/dev/null \
    || die "accelerate is not on PATH: run 'make install' in $root, or set PEGASUS_VENV to an environment that has it"

# The phase's own variable, then PEGASUS_CONFIG, then the paper recipe.
phase_config_var="PEGASUS_${phase^^}_CONFIG"
config=${!phase_config_var:-${PEGASUS_CONFIG:-configs/$phase.yaml}}
[ -f "$config" ] || die "training config $config not found (relative paths start at $root)"
train_script=${PEGASUS_TRAIN_SCRIPT:-pegasus_dist/train.py}

overrides=()
if [ -n "${PEGASUS_SHARDS:-}" ]; then overrides+=("data.shards=$PEGASUS_SHARDS"); fi
if [ -n "${PEGASUS_RUNS:-}" ]; then overrides+=("run.output_dir=$PEGASUS_RUNS"); fi
if [ -n "${PEGASUS_RUN_NAME:-}" ]; then overrides+=("run.name=$PEGASUS_RUN_NAME"); fi
if [ "$phase" = finetune ]; then
    pretrain_run=${PEGASUS_PRETRAIN_RUN:-${PEGASUS_RUNS:+$PEGASUS_RUNS/pretrain}}
    if [ -n "$pretrain_run" ]; then overrides+=("train.init_from=$pretrain_run"); fi
fi
if [ -n "${PEGASUS_EXTRA_ARGS:-}" ]; then
    read -r -a extra <<< "$PEGASUS_EXTRA_ARGS"
    overrides+=("${extra[@]}")
fi

# Processes per machine: the GPUs SLURM gave this node (the batch host; the
# nodes of one job are assumed alike), else the GPUs nvidia-smi sees unless
# the job asked for none (--gpus-per-node=0), else one CPU process.
gpus=${SLURM_GPUS_ON_NODE:-0}
if [ "$gpus" = 0 ] && [ "${SLURM_GPUS_PER_NODE:-}" != 0 ] && command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
procs_per_machine=${PEGASUS_PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
machines=${SLURM_NTASKS:-1}
total=$(( machines * procs_per_machine ))
main_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${PEGASUS_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}

# The config file is the multi-node template with every per-job value given
# here; naming it keeps a personal `accelerate config` default file
# (~/.cache/huggingface/accelerate/default_config.yaml) out of the job.
# mixed_precision "no": the training config's train.mixed_precision decides.
launch_args=(--config_file launch/multinode-template.yaml
             --num_machines "$machines" --num_processes "$total"
             --main_process_ip "$main_host" --main_process_port "$port"
             --rdzv_backend static --same_network --mixed_precision no --dynamo_backend no)
if [ "$total" -gt 1 ]; then
    launch_args+=(--multi_gpu)
elif [ "$gpus" = 0 ]; then
    launch_args+=(--cpu)  # one CPU process: the only case where --cpu is the right flag
fi
# One network interface for gloo (the stop-signal group, and the CPU backend)
# and NCCL: the one that holds the main host's address here, on the main host.
# Left to guess, gloo takes the hostname's address, 127.0.1.1 on many systems,
# and a group spanning nodes hangs until its timeout.
iface=${PEGASUS_SOCKET_IFNAME:-}
if [ -z "$iface" ] && command -v ip >/dev/null; then
    main_ip=$(getent ahostsv4 "$main_host" | awk 'NR == 1 {print $1}')
    iface=$(ip -o -4 addr show to "${main_ip:-0.0.0.0}" | awk 'NR == 1 {print $2}')
fi
if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ] && [[ -z $iface || $iface == lo ]]; then
    die "cannot tell which network interface reaches $main_host from the other nodes (found '${iface:-none}'):" \
        "set PEGASUS_SOCKET_IFNAME to the cluster network's interface (see 'ip -br addr')"
fi
if [ -n "$iface" ]; then
    export GLOO_SOCKET_IFNAME=$iface NCCL_SOCKET_IFNAME=$iface
fi
# torchrun would set OMP_NUM_THREADS=1; give each process its share of the task's CPUs.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    threads=$(( ${SLURM_CPUS_PER_TASK:-1} / procs_per_machine ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi

echo "job $SLURM_JOB_ID: $phase on ${SLURM_JOB_NUM_NODES:-1} node(s), $machines machine(s) x" \
     "$procs_per_machine process(es), main host $main_host:$port, network interface ${iface:-unset}," \
     "config $config"
echo "job $SLURM_JOB_ID: accelerate launch ${launch_args[*]} --machine_rank \$SLURM_PROCID" \
     "$train_script --config $config ${overrides[*]}"

requeue=0
# shellcheck disable=SC2317,SC2329  # reached through the traps
forward_stop() {
    echo "job $SLURM_JOB_ID: $1: asking the trainers to checkpoint and exit"
    # The trainers of this node only, from this shell: no helper step that could
    # wait for the GPUs or memory the training step holds. The other nodes learn
    # it within a step: the ranks agree on stop signals every step (StopPoll).
    # A trainer is a process of this job that runs $train_script (argv: python
    # [-u] SCRIPT ...), not a launcher (python .../accelerate launch ... SCRIPT).
    local dir argv
    for dir in /proc/[0-9]*; do
        grep -qzx "SLURM_JOB_ID=$SLURM_JOB_ID" "$dir/environ" 2>/dev/null || continue
        mapfile -d "" -t argv 2>/dev/null < "$dir/cmdline" || continue
        [ "${argv[1]:-}" = -u ] && argv=("${argv[0]}" "${argv[@]:2}")
        if [[ ${argv[0]:-} == *python* && ${argv[1]:-} == "$train_script" ]]; then
            echo "job $SLURM_JOB_ID: SIGUSR1 -> trainer pid ${dir#/proc/} on $(hostname -s)"
            kill -USR1 "${dir#/proc/}" 2>/dev/null || true
        fi
    done
}
# SIGUSR1 is the time-limit warning (or `scancel --signal=USR1 --batch JOB`):
# checkpoint and requeue. SIGTERM is SLURM ending the job (scancel, time limit,
# preemption, which requeues by itself): checkpoint, and let SLURM decide.
# shellcheck disable=SC2317,SC2329
on_usr1() { requeue=1; forward_stop SIGUSR1; }
# shellcheck disable=SC2317,SC2329
on_term() { forward_stop SIGTERM; }
trap on_usr1 USR1
trap on_term TERM

# srun (Slurm >= 22.05) does not hand the job's --cpus-per-task on to the step:
# without it each task could be bound to one CPU. The task's shell expands
# SLURM_PROCID, so each task gets its own machine rank.
# shellcheck disable=SC2016  # expanded by the task's shell
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    bash -c 'exec accelerate launch --machine_rank "$SLURM_PROCID" "$@"' \
    bash "${launch_args[@]}" "$train_script" --config "$config" "${overrides[@]}" &
step=$!
status=0
wait "$step" || status=$?
# `wait` returns early when a trapped signal arrives: wait for the step itself.
while kill -0 "$step" 2>/dev/null; do status=0; wait "$step" || status=$?; done

# Requeue on the SIGUSR1 this script received, not on the trainers' exit code:
# accelerate launch turns their 75 (stopped for a requeue) into 1, like any
# failure. A run that ended anyway is not harmed: requeued, it finds its final
# checkpoint, says it is complete and exits 0.
if [ "$requeue" = 1 ]; then
    echo "job $SLURM_JOB_ID: stopped for preemption (step exit $status): requeueing"
    scontrol requeue "$SLURM_JOB_ID" || echo "job $SLURM_JOB_ID: scontrol requeue failed: not requeued"
    exit 0
fi
exit "$status"
