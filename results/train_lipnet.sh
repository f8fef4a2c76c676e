#!/usr/bin/env bash
# The lipnet runs behind results/lipnet-fgsm (adversarial training), seed 1: none-fgsm-s1
# and fastclip-fgsm-s1 (and composite-fgsm-s1: lipnet-composite with fastclip-composite,
# configs/mnist-lipnet-fastclip-composite-fgsm.toml), FGSM-RS at Linf 0.3 (Wong et al. 2020, step 1.25 eps), 8 epochs
# instead of the configs' 20 (eps warm-up 3 epochs, lr / 10 after 6) to fit a 2-core
# session.  Two runs at a time, one thread each.
# Run from the repository root:  bash results/train_lipnet.sh [RUN ...]   (default: both)
set -euo pipefail
export OMP_NUM_THREADS=1
rc=".venv/bin/robustclip"
declare -A args=(
  [none-fgsm-s1]="--config configs/mnist-lipnet-none-fgsm.toml --epochs 8 --set train.step_size=6 --set train.adversarial.warmup_epochs=3"
  [fastclip-fgsm-s1]="--config configs/mnist-lipnet-fastclip-fgsm.toml --epochs 8 --set train.step_size=6 --set train.adversarial.warmup_epochs=3"
  [composite-fgsm-s1]="--config configs/mnist-lipnet-fastclip-composite-fgsm.toml --epochs 8 --set train.step_size=6 --set train.adversarial.warmup_epochs=3"
)
mkdir -p runs/lipnet
for run in ${*:-none-fgsm-s1 fastclip-fgsm-s1}; do
  echo "$rc train ${args[$run]} --seed ${run##*-s} --out runs/lipnet/$run"
done | xargs -P 2 -I{} bash -c '{} > "runs/lipnet/$(echo {} | sed "s/.*--out runs\/lipnet\///").log" 2>&1'
