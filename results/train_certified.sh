#!/usr/bin/env bash
# The certified-trained lipnets behind results/lipnet-certified, seed 1: none-margin-s1
# and fastclip-margin-sound-s1 (runs/lipnet/fastclip-margin-s1 is the stopped run of that
# config's earlier version), exactly configs/mnist-lipnet-{none,fastclip}-margin.toml
# (Lipschitz-margin training at L2 1.58 against the sound network bound, temperature 4,
# Adam, 8 epochs).  Two runs at a time, one thread each.
# Run from the repository root:  bash results/train_certified.sh [RUN ...]   (default: both)
set -euo pipefail
export OMP_NUM_THREADS=1
rc=".venv/bin/robustclip"
declare -A configs=(
  [none-margin-s1]="configs/mnist-lipnet-none-margin.toml"
  [fastclip-margin-sound-s1]="configs/mnist-lipnet-fastclip-margin.toml"
)
mkdir -p runs/lipnet
for run in ${*:-none-margin-s1 fastclip-margin-sound-s1}; do
  echo "$rc train --config ${configs[$run]} --out runs/lipnet/$run"
done | xargs -P 2 -I{} bash -c '{} > "runs/lipnet/$(echo {} | sed "s/.*--out runs\/lipnet\///").log" 2>&1'
