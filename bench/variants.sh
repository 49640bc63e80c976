#!/usr/bin/env bash
# The recipes compared in docs/reference-run.md ("Variants"): both phases of the
# reference run on the real CIFAR-10 shards, each variant on the same short
# budget, in bf16 on the CPU, scored by the project's classifier.
#
#   pegasus-dist prepare --source folder:../shared/data/cifar10-jpg.tar.gz --out shards/cifar10-jpg
#   pegasus-dist classifier --config configs/reference/pretrain.yaml
#   # the perceptual variants' own network: another seed and depth than the judge above
#   pegasus-dist classifier --config configs/reference/pretrain.yaml --for-loss
#   bench/variants.sh                 # every variant; or name some: bench/variants.sh vae acai
#
# Each variant is configs/reference's schedule (half-width model, batch 64, bf16) with every
# loss and decoder option of the reference recipe off, then its own overrides: its name lists
# all it adds (the reference recipe itself is acai-logistic-patch-gan-resize-perceptual).
# Writes runs/variants/<name>/{pretrain,finetune}; each phase's grids are scored
# when it ends (samples/quality.json); `seconds` holds the wall time of both phases.
set -euo pipefail
cd "$(dirname "$0")/.."
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-4}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-10}
OUT=${OUT:-runs/variants}
BIN=${BIN:-.venv/bin}

PLAIN=(loss.acai_weight=0 model.likelihood=bernoulli model.upsample=transpose loss.patch_gan_weight=0
       loss.perceptual_weight=0)
declare -A VARIANTS=(
  [vae]=""
  [free-bits]="loss.free_bits=0.25 loss.kl_warmup_steps=1000"
  [beta-0.25]="loss.beta=0.25"
  [acai]="loss.acai_weight=1536"
  [acai-free-bits]="loss.acai_weight=1536 loss.free_bits=0.25 loss.kl_warmup_steps=1000"
  [acai-resize]="loss.acai_weight=1536 model.upsample=resize"
  [acai-logistic]="loss.acai_weight=1536 model.likelihood=logistic"
  [acai-logistic-patch-gan]="loss.acai_weight=1536 model.likelihood=logistic loss.patch_gan_weight=300"
  [acai-logistic-patch-gan-resize]="loss.acai_weight=1536 model.likelihood=logistic loss.patch_gan_weight=300 model.upsample=resize"
  [acai-logistic-patch-gan-resize-fm]="loss.acai_weight=1536 model.likelihood=logistic loss.patch_gan_weight=300 model.upsample=resize loss.feature_matching_weight=3072"
  [acai-logistic-patch-gan-resize-adaptive]="loss.acai_weight=1536 model.likelihood=logistic loss.patch_gan_weight=0.8 loss.patch_gan_adaptive=true model.upsample=resize"
  [acai-logistic-patch-gan-resize-perceptual]="loss.acai_weight=1536 model.likelihood=logistic loss.patch_gan_weight=300 model.upsample=resize loss.perceptual_weight=9216 loss.perceptual_network=runs/reference/perceptual"
  [acai-logistic-patch-gan-resize-perceptual-3072]="loss.acai_weight=1536 model.likelihood=logistic loss.patch_gan_weight=300 model.upsample=resize loss.perceptual_weight=3072 loss.perceptual_network=runs/reference/perceptual"
  [logistic-patch-gan-resize]="loss.acai_weight=0 model.likelihood=logistic loss.patch_gan_weight=300 model.upsample=resize"
  [acai-logistic-ema]="loss.acai_weight=1536 model.likelihood=logistic train.ema_decay=0.999"
  [wide]="model.channels=[64,128,256,512] model.fc_dims=[512,512,256] model.latent_dim=128"
)
ORDER=(vae free-bits beta-0.25 acai acai-free-bits acai-resize acai-logistic acai-logistic-patch-gan
       acai-logistic-patch-gan-resize acai-logistic-patch-gan-resize-fm acai-logistic-patch-gan-resize-adaptive
       acai-logistic-patch-gan-resize-perceptual acai-logistic-patch-gan-resize-perceptual-3072
       logistic-patch-gan-resize acai-logistic-ema wide)

for name in "${@:-${ORDER[@]}}"; do
  [[ -v "VARIANTS[$name]" ]] || { echo "unknown variant $name; known: ${ORDER[*]}" >&2; exit 2; }
  # shellcheck disable=SC2206  # the overrides are words on purpose
  common=("run.output_dir=$OUT/$name" train.mixed_precision=bf16 wandb.mode=offline
          quality.classifier=runs/reference/classifier "${PLAIN[@]}" ${VARIANTS[$name]})
  start=$(date +%s)
  "$BIN/pegasus-dist" train --config configs/reference/pretrain.yaml "train.epochs=$PRETRAIN_EPOCHS" "${common[@]}"
  "$BIN/pegasus-dist" train --config configs/reference/finetune.yaml "train.epochs=$FINETUNE_EPOCHS" \
    "train.init_from=$OUT/$name/pretrain" "${common[@]}"
  echo $(( $(date +%s) - start )) > "$OUT/$name/seconds"
  "$BIN/pegasus-dist" sample --checkpoint "$OUT/$name/finetune" --method analogy "${common[@]}"
done
