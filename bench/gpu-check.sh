#!/usr/bin/env bash
# What only a GPU can show, in one command on one GPU machine (about 5 minutes, estimated: never timed):
#
#   bench/gpu-check.sh              # writes runs/gpu-check/, prints one table at the end
#
# Rows: the bench's rows on CUDA (loaders, device-resident start-up, trainer vs
# bare loop, achieved TFLOP/s, MFU against the datasheet peak, the paper recipe's projected
# time), the smoke pipeline's two phases under torchrun on one GPU (a process group of one,
# NCCL), torch.profiler over 20 steps of the paper model's trainer in bf16 at 128 and at
# 1024 images per GPU (kernels, ops, host and device ms a step: bench/profile_step.py),
# then the paper recipe's model on GPU 0 in
# bf16, with cudnn.benchmark, fp16 (the loss scale and the updates it dropped, scaler_skipped_steps),
# bf16 with torch.compile and channels_last followed by `pegasus-dist sample`,
# the reference recipe (configs/reference/pretrain.yaml: ACAI, the patch discriminator, the
# logistic likelihood) in bf16 under torch.cuda.set_sync_debug_mode("warn") then resumed
# (the synchronising calls warned, the step it resumed from: bench/sync_debug.py) and in fp16
# (the loss scale beside scaler_skipped_steps), also with VQGAN's adaptive weight (its gradients
# taken under the loss scale), and with two GPUs or more a 2-process NCCL run.
# It has not run on a GPU yet (docs/performance.md says so); without one it stops at once, in one line.
# A step that fails is a row marked failed, naming its log, and the check goes on (exit 1 at the end);
# each row is also written to $OUT/rows.md as it is measured.
#
# Environment: OUT [runs/gpu-check], BIN [.venv/bin], STEPS [300] steps a run,
# SYNC_STEPS [20] steps of the sync-debug run before its resume (to twice as many).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
BIN=${BIN:-.venv/bin}
STEPS=${STEPS:-300}
SYNC_STEPS=${SYNC_STEPS:-20}

gpus=$("$BIN/python" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$gpus" = 0 ]; then
    echo "gpu-check: no CUDA GPU is visible to torch (torch.cuda.device_count() is 0): run it on a GPU machine" >&2
    exit 2
fi
mkdir -p "$OUT"
rows=()
failures=0
# Each row also goes to rows.md as soon as it is measured: a run cut short keeps the rows it made.
: > "$OUT/rows.md"
row() { rows+=("$(printf '| %s | %s |' "$1" "$2")"); printf '%s\n' "${rows[-1]}" >> "$OUT/rows.md"; }
# A step that fails is a row of its own and the check goes on: one GPU session shows every row it can.
# Usage: failed ROW WHY
failed() { echo "gpu-check: $1: $2" >&2; failures=$((failures + 1)); row "$1" "**failed**: $2"; }

if ! "$BIN/pegasus-dist" bench --images 20000 --steps 20 --process-steps 60 --out "$OUT/bench.json" \
        | tee "$OUT/bench.md"; then
    failed "the bench's rows on CUDA" "see $OUT/bench.md"
fi
"$BIN/pegasus-dist" prepare --source synthetic:4000 --out "$OUT/shards"

# Model FLOP utilisation: the bench's achieved bf16 TFLOP/s against the GPU's dense bf16
# peak from NVIDIA's datasheets (TFLOP/s without sparsity: H100 SXM and H200 989, H100 NVL
# 835, H100 PCIe 756, A100 312, L40S 362).
label="paper model, bf16: achieved, MFU, projected recipe"
if mfu=$("$BIN/python" - "$OUT/bench.json" 2> "$OUT/mfu.log" <<'EOF'
import json, sys
import torch
PEAKS = {"H200": 989, "H100 NVL": 835, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362}
name = torch.cuda.get_device_name(0)
peak = next((tflops for model, tflops in PEAKS.items() if model in name), None)
rows = {row["name"].strip(): row for row in json.load(open(sys.argv[1]))["rows"]}
achieved = rows["achieved, bf16"]["value"]
recipe = next(row for key, row in rows.items() if key.startswith("paper recipe"))
share = f"MFU {achieved / peak:.1%} of {peak} TFLOP/s" if peak else f"no datasheet peak listed for {name}"
print(f"{achieved:.1f} TFLOP/s, {share}; paper recipe projected at {recipe['value']:,.1f} {recipe['unit']}")
EOF
); then row "$label" "$mfu"; else failed "$label" "see $OUT/mfu.log"; fi

# One GPU under torchrun: a process group of one (NCCL), the smoke pipeline's two phases.
label="1 GPU under torchrun, smoke pretrain + finetune"
for phase in pretrain finetune; do
    init=()
    [ "$phase" = finetune ] && init=("train.init_from=$OUT/nccl-1/pretrain")
    "$BIN/python" -m torch.distributed.run --standalone --nproc_per_node 1 pegasus_dist/train.py \
        --config "configs/smoke/$phase.yaml" "data.shards=$OUT/shards" "run.output_dir=$OUT/nccl-1" \
        train.mixed_precision=bf16 wandb.mode=disabled "${init[@]}" > "$OUT/nccl-1-$phase.log" 2>&1 \
        || { failed "$label" "the $phase phase: see $OUT/nccl-1-$phase.log"; break; }
done
if [ -f "$OUT/nccl-1/finetune/samples/pegasus.png" ]; then
    row "$label" "$(grep -o 'world_size=1 .*backend=[a-z]*' "$OUT/nccl-1-pretrain.log" | head -n 1); \
$(find "$OUT/nccl-1" -name pegasus.png | wc -l) Pegasus grids"
fi

# torch.profiler, 20 steps of the paper model's trainer in bf16 at each batch, on synthetic images of
# its own: is a step bound by kernel launches (host ms above device ms)? One line a batch size.
if profile=$("$BIN/python" -m bench.profile_step --batch 128 --batch 1024 --steps 20 --precision bf16 \
        2> "$OUT/profile.log"); then
    while IFS= read -r line; do
        row "torch.profiler, paper model, bf16, ${line%%:*} per GPU" "${line#*: }"
    done <<< "$profile"
else
    failed "torch.profiler, paper model, bf16" "see $OUT/profile.log"
fi

# One run of a recipe (CONFIG: the paper's configs/pretrain.yaml, or the reference one) on the
# synthetic set at batch 128, and its row: the last logged step. Usage: train NAME ROW CONFIG [overrides...]
train() {
    local name=$1 label=$2 config=$3 result
    shift 3
    local started=$SECONDS
    if ! "$BIN/pegasus-dist" train --config "$config" "data.shards=$OUT/shards" \
            "run.output_dir=$OUT/$name" "train.max_steps=$STEPS" train.log_every=50 data.batch_size=128 \
            wandb.mode=disabled "$@" > "$OUT/$name.log" 2>&1; then
        failed "$label" "see $OUT/$name.log"
        return
    fi
    if result=$("$BIN/python" - "$OUT/$name/pretrain/metrics.jsonl" "$((SECONDS - started))" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"pretrain/loss"' in line]
last = rows[-1]
scale = f", loss scale {last['pretrain/loss_scale']:g}" if "pretrain/loss_scale" in last else ""
if "pretrain/patch_gan_adaptive_weight" in last:  # the weight the discriminator's term got
    scale += f", adaptive weight {last['pretrain/patch_gan_adaptive_weight']:.0f}"
print(f"{last['pretrain/images_per_s']:,.0f} images/s, loss {last['pretrain/loss']:.1f} at step "
      f"{last['step']}, scaler_skipped_steps {last['pretrain/scaler_skipped_steps']}{scale}, "
      f"{sys.argv[2]} s in all")
EOF
    ); then
        row "$label" "$result"
    else
        failed "$label" "no logged row in $OUT/$name/pretrain/metrics.jsonl"
    fi
}

paper=configs/pretrain.yaml
train bf16 "bf16, 1 GPU" "$paper" train.mixed_precision=bf16
train fp16 "fp16 with loss scaling, 1 GPU" "$paper" train.mixed_precision=fp16
train cudnn "bf16, cudnn.benchmark, 1 GPU" "$paper" train.mixed_precision=bf16 train.cudnn_benchmark=true
train compiled "bf16, torch.compile + channels_last, 1 GPU" "$paper" train.mixed_precision=bf16 \
    train.compile=true train.channels_last=true
label="pegasus-dist sample of the compiled run"
if "$BIN/pegasus-dist" sample --checkpoint "$OUT/compiled/pretrain" --out "$OUT/compiled-samples" \
        > "$OUT/sample.log" 2>&1; then
    row "$label" "$(find "$OUT/compiled-samples" -name '*.png' | wc -l) grids in $OUT/compiled-samples"
else
    failed "$label" "see $OUT/sample.log"
fi

# The reference recipe (ACAI, the patch discriminator, the logistic likelihood) in bf16 with every
# synchronising CUDA call warned (bench/sync_debug.py), to SYNC_STEPS, then the same run to twice as
# many: it must resume from SYNC_STEPS. Start-up, checkpoints, sampling and evaluation warn too.
reference=configs/reference/pretrain.yaml
sync_debug() {
    "$BIN/python" -m bench.sync_debug --config "$reference" "data.shards=$OUT/shards" \
        "run.output_dir=$OUT/sync-debug" "train.max_steps=$1" train.log_every=10 data.batch_size=128 \
        train.mixed_precision=bf16 wandb.mode=disabled > "$OUT/sync-debug-$1.log" 2>&1
}
label="reference recipe, bf16, set_sync_debug_mode(\"warn\"), 1 GPU"
logs=("$OUT/sync-debug-$SYNC_STEPS.log" "$OUT/sync-debug-$((2 * SYNC_STEPS)).log")
if ! sync_debug "$SYNC_STEPS"; then
    failed "$label" "the run to step $SYNC_STEPS: see ${logs[0]}"
elif ! sync_debug "$((2 * SYNC_STEPS))"; then
    failed "$label" "the run to step $((2 * SYNC_STEPS)): see ${logs[1]}"
else
    resumed=$(sed -n 's/.*resumed from .*, step \([0-9]*\)$/\1/p' "${logs[1]}")
    ended=$(sed -n 's/.* done at step \([0-9]*\): .*/\1/p' "${logs[1]}")
    # Each place that warned (Python's file:line, or C++'s for a warning from autograd's threads), counted.
    places=$OUT/sync-debug-places.txt
    cat "${logs[@]}" | { grep 'called a synchronizing CUDA operation' || true; } \
        | sed -e 's/: UserWarning: .*//' -e 's/^\[W[^]]* \([^ ]*\)\] Warning: .*/\1/' | sort | uniq -c \
        | sort -rn > "$places"
    warned=$(awk '{ n += $1 } END { print n + 0 }' "$places")
    if [ "$resumed" = "$SYNC_STEPS" ]; then
        row "$label" "$warned synchronising calls warned in 2 runs of $SYNC_STEPS steps, at \
$(wc -l < "$places") places ($places); resumed from step $resumed, done at step $ended"
    else
        failed "$label" "did not resume from step $SYNC_STEPS (resumed from: ${resumed:-none}): see ${logs[1]}"
    fi
fi
train fp16-reference "reference recipe, fp16 with loss scaling, 1 GPU" "$reference" train.mixed_precision=fp16
train fp16-adaptive "reference recipe with VQGAN's adaptive weight, fp16, 1 GPU" "$reference" \
    train.mixed_precision=fp16 loss.patch_gan_weight=0.8 loss.patch_gan_adaptive=true
if [ "$gpus" -ge 2 ]; then
    port=$((20000 + RANDOM % 20000))
    label="2 GPUs, one NCCL group, DDP bucket view and bf16 gradients"
    if "$BIN/accelerate" launch --config_file launch/gpu-1node.yaml --num_processes 2 \
            --main_process_port "$port" pegasus_dist/train.py --config configs/smoke/pretrain.yaml \
            "data.shards=$OUT/shards" "run.output_dir=$OUT/nccl" train.max_steps=50 train.mixed_precision=bf16 \
            wandb.mode=disabled train.ddp_bucket_view=true train.ddp_bf16_gradients=true > "$OUT/nccl.log" 2>&1; then
        row "$label" "$(grep -o 'world_size=2.*bf16_gradients=True' "$OUT/nccl.log" | head -n 1)"
    else
        failed "$label" "see $OUT/nccl.log"
    fi
fi

echo
echo "| gpu-check ($("$BIN/python" -c "import torch; print(torch.cuda.get_device_name(0))"), $gpus GPU(s)) | |"
echo "|---|---|"
printf '%s\n' "${rows[@]}"
echo "(the bench's own table is above and in $OUT/bench.md)"
if [ "$failures" -gt 0 ]; then
    echo "gpu-check: $failures step(s) failed (the rows marked failed name their logs)" >&2
    exit 1
fi
