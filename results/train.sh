#!/usr/bin/env bash
# The training runs behind results/: MNIST simpleconv at the tutorial's hyper-parameters,
# 5 methods x 3 seeds x 15 epochs (what fits about an hour of this 2-core machine for all
# 15 runs together; the tutorial trained 60-80 epochs).
# Run from the repository root:  bash results/train.sh
# Two runs at a time, one thread each (2-core machine); longest runs first.
set -euo pipefail
export OMP_NUM_THREADS=1
rc=".venv/bin/robustclip"
EPOCHS=15
mkdir -p runs/results
jobs=()
for m in fastclip-composite miyato gouk fastclip none; do
  for s in 1 2 3; do
    jobs+=("$rc train --config configs/mnist-simpleconv-$m.toml --epochs $EPOCHS --seed $s --out runs/results/$m-s$s")
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c '{} > "runs/results/$(echo {} | sed "s/.*--out runs\/results\///").log" 2>&1'
