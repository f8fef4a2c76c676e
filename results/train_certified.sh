#!/usr/bin/env bash
# The certified-trained lipnet behind results/lipnet-certified, seed 1: none-margin-s1,
# exactly configs/mnist-lipnet-none-margin.toml (Lipschitz-margin training at L2 1.58
# against the sound network bound, temperature 4, Adam, 8 epochs).  One thread.
# Run from the repository root:  bash results/train_certified.sh
set -euo pipefail
export OMP_NUM_THREADS=1
mkdir -p runs/lipnet
.venv/bin/robustclip train --config configs/mnist-lipnet-none-margin.toml \
  --out runs/lipnet/none-margin-s1 > runs/lipnet/none-margin-s1.log 2>&1
