#!/usr/bin/env bash
# The smallcnn runs behind results/smallcnn-fgsm (adversarial training), seed 1:
# none-fgsm-s1 and fastclip-fgsm-s1, exactly their configs (Wong et al. 2020's MNIST
# recipe: FGSM-RS at Linf 0.3, step 1.25 eps, Adam on a cyclic lr, 10 epochs; eps
# ramped up over 3 epochs, early stopping at catastrophic overfitting).  Two runs at a
# time, one thread each.
# Run from the repository root:  bash results/train_smallcnn.sh [RUN ...]   (default: both)
set -euo pipefail
export OMP_NUM_THREADS=1
rc=".venv/bin/robustclip"
declare -A configs=(
  [none-fgsm-s1]="configs/mnist-smallcnn-none-fgsm.toml"
  [fastclip-fgsm-s1]="configs/mnist-smallcnn-fastclip-fgsm.toml"
)
mkdir -p runs/smallcnn
for run in ${*:-none-fgsm-s1 fastclip-fgsm-s1}; do
  echo "$rc train --config ${configs[$run]} --out runs/smallcnn/$run"
done | xargs -P 2 -I{} bash -c '{} > "runs/smallcnn/$(echo {} | sed "s/.*--out runs\/smallcnn\///").log" 2>&1'
