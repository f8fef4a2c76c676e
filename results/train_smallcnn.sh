#!/usr/bin/env bash
# The smallcnn runs behind results/smallcnn-fgsm and results/smallcnn-fgsm-rawstart
# (adversarial training), seed 1, exactly their configs:
# - none-fgsm-s1, fastclip-fgsm-s1: Wong et al. 2020's MNIST recipe (FGSM-RS at Linf 0.3,
#   step 1.25 eps, Adam on a cyclic lr, 10 epochs) with the random start clipped to
#   [0, 1], eps ramped up over 3 epochs and early stopping at catastrophic overfitting;
# - none-fgsm-rawstart-s1, fastclip-fgsm-rawstart-s1, wide-none-fgsm-rawstart-s1: the
#   recipe as Wong et al.'s MNIST code runs it (first gradient at the raw random start,
#   no warm-up, no early stopping); wide: convs of 32 and 64 channels, dense 1024;
# - wide-none-fgsm-rawstart-e20-s1: the wide run for 20 epochs;
# - miyato-fgsm-rawstart-s1, gouk-fgsm-rawstart-s1: the raw-start recipe with the two
#   baselines' clipping;
# - wide-none-trades-rawstart-s1: the wide run with TRADES (beta 6) on one FGSM-RS step.
# Two runs at a time, one thread each.
# Run from the repository root:  bash results/train_smallcnn.sh [RUN ...]   (default: the first two)
set -euo pipefail
export OMP_NUM_THREADS=1
rc=".venv/bin/robustclip"
declare -A configs=(
  [none-fgsm-s1]="configs/mnist-smallcnn-none-fgsm.toml"
  [fastclip-fgsm-s1]="configs/mnist-smallcnn-fastclip-fgsm.toml"
  [none-fgsm-rawstart-s1]="configs/mnist-smallcnn-none-fgsm-rawstart.toml"
  [fastclip-fgsm-rawstart-s1]="configs/mnist-smallcnn-fastclip-fgsm-rawstart.toml"
  [wide-none-fgsm-rawstart-s1]="configs/mnist-smallcnn-wide-none-fgsm-rawstart.toml"
  [wide-none-fgsm-rawstart-e20-s1]="configs/mnist-smallcnn-wide-none-fgsm-rawstart-e20.toml"
  [miyato-fgsm-rawstart-s1]="configs/mnist-smallcnn-miyato-fgsm-rawstart.toml"
  [gouk-fgsm-rawstart-s1]="configs/mnist-smallcnn-gouk-fgsm-rawstart.toml"
  [wide-none-trades-rawstart-s1]="configs/mnist-smallcnn-wide-none-trades-rawstart.toml"
)
mkdir -p runs/smallcnn
for run in ${*:-none-fgsm-s1 fastclip-fgsm-s1}; do
  echo "$rc train --config ${configs[$run]} --out runs/smallcnn/$run"
done | xargs -P 2 -I{} bash -c '{} > "runs/smallcnn/$(echo {} | sed "s/.*--out runs\/smallcnn\///").log" 2>&1'
