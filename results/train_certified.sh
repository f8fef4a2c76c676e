#!/usr/bin/env bash
# The certified-trained lipnets behind results/lipnet-certified, seed 1, exactly their
# configs (Lipschitz-margin training at L2 1.58 against the sound network bound,
# temperature 4, Adam):
# - none-margin-s1, fastclip-margin-sound-s1: configs/mnist-lipnet-{none,fastclip}-margin.toml,
#   8 epochs (runs/lipnet/fastclip-margin-s1 is the stopped run of the fastclip config's
#   earlier version);
# - none-margin-long-s1: configs/mnist-lipnet-none-margin-long.toml, the none config for
#   16 epochs, lr / 10 after 12;
# - composite-margin-sound-s1: configs/mnist-lipnet-fastclip-composite-margin.toml (lipnet
#   with conv+BN composites, fastclip-composite), 8 epochs, before 7fce4e2 (its BatchNorms
#   priced by their running variance: stopped, results/lipnet-composite-margin-stopped);
# - composite-margin-batch-s1: the same config from 7fce4e2 on (by the batch's variance);
# - none-margin-e24-s1: configs/mnist-lipnet-none-margin-e24.toml, 24 epochs, lr / 10 after 18;
# - gouk-margin-s1: configs/mnist-lipnet-gouk-margin.toml, the fastclip config with gouk's
#   projection after every step, 8 epochs;
# - miyato-margin-s1: configs/mnist-lipnet-miyato-margin.toml, the fastclip config with
#   miyato's reparametrisation, 8 epochs.
# Two runs at a time, one thread each.
# Run from the repository root:  bash results/train_certified.sh [RUN ...]   (default: the first two)
set -euo pipefail
export OMP_NUM_THREADS=1
rc=".venv/bin/robustclip"
declare -A configs=(
  [none-margin-s1]="configs/mnist-lipnet-none-margin.toml"
  [fastclip-margin-sound-s1]="configs/mnist-lipnet-fastclip-margin.toml"
  [none-margin-long-s1]="configs/mnist-lipnet-none-margin-long.toml"
  [composite-margin-sound-s1]="configs/mnist-lipnet-fastclip-composite-margin.toml"
  [composite-margin-batch-s1]="configs/mnist-lipnet-fastclip-composite-margin.toml"
  [none-margin-e24-s1]="configs/mnist-lipnet-none-margin-e24.toml"
  [gouk-margin-s1]="configs/mnist-lipnet-gouk-margin.toml"
  [miyato-margin-s1]="configs/mnist-lipnet-miyato-margin.toml"
)
mkdir -p runs/lipnet
for run in ${*:-none-margin-s1 fastclip-margin-sound-s1}; do
  echo "$rc train --config ${configs[$run]} --out runs/lipnet/$run"
done | xargs -P 2 -I{} bash -c '{} > "runs/lipnet/$(echo {} | sed "s/.*--out runs\/lipnet\///").log" 2>&1'
