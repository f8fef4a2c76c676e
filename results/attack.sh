#!/usr/bin/env bash
# The evaluations behind results/, on the runs made by results/train.sh.
# Run from the repository root:  bash results/attack.sh [main] [transfer] [ensembles] [seeds] [plots] [lipnet]
# (no argument: all six, in that order)
# Each output folder gets command.txt (the exact command); robustclip itself writes
# environment.json there (versions, device, git commit, command line).
set -euo pipefail
rc=".venv/bin/robustclip"
R=runs/results
run() {  # run OUT_DIR COMMAND...
  local out=$1; shift
  "$@" --out "$out" --overwrite
  echo "$*" --out "$out" --overwrite > "$out/command.txt"
}
main() {  # the standard evaluation, one model per command (run two at a time on 2 cores), merged
  local models="none-s1 fastclip-s1 fastclip-composite-s1 miyato-s1 gouk-s1" out=results/mnist-simpleconv
  local cmds=() folders=()
  for m in $models; do  # per model: the standard evaluation, then foolbox's L2 attacks beside it
    cmds+=("$rc attack $R/$m --suite attacks/mnist-results.toml --limit 100 --seed 0 --out runs/eval/$m && .venv/bin/python results/compare_l2.py $R/$m --limit 100 --out runs/eval/$m")
    folders+=("runs/eval/$m")
  done
  rm -rf runs/eval "$out"
  printf '%s\n' "${cmds[@]}" | OMP_NUM_THREADS=1 xargs -P 2 -I{} bash -c '{} > /dev/null'
  .venv/bin/python results/merge.py "${folders[@]}" --out "$out"
  { printf '%s\n' "${cmds[@]}"
    echo ".venv/bin/python results/merge.py ${folders[*]} --out $out"
  } > "$out/command.txt"
}
# Seeds 3 of none and fastclip were not retrained after the last code changes (the
# 2-core machine fit only the composite's seeds): the transfer matrix and the ensembles
# use seeds 1 and 2.
transfer() {
  run results/transfer $rc transfer $R/none-s1 $R/none-s2 $R/fastclip-s1 $R/fastclip-s2 \
      --attack pgd --eps 0.1 --eps 0.3 --limit 1000 --seed 0 --no-surrogates
}
ensembles() {  # the standard evaluation (Linf 0.1: every member is at 0% from 0.2 on) with
  # PGD-50 beside it, on 300 images, two commands side by side
  local suite="--suite attacks/mnist-results.toml --norm Linf --eps 0.1 --limit 300 --seed 0"
  export -f run; export rc R
  printf '%s\n' "run results/ensemble-none $rc attack $R/none-s1 $R/none-s2 --ensemble $suite" \
                 "run results/ensemble-fastclip $rc attack $R/fastclip-s1 $R/fastclip-s2 --ensemble $suite" \
    | OMP_NUM_THREADS=1 xargs -P 2 -I{} bash -c '{} > /dev/null'
}
seeds() {  # the composite's robustness, the headline claim, on its other seeds (as the headline)
  run results/seeds-composite $rc attack $R/fastclip-composite-s2 $R/fastclip-composite-s3 \
      --suite attacks/mnist-results.toml --norm Linf --limit 100 --seed 0
}
lipnet_eval() {  # lipnet_eval OUT NORM RUN...: the standard evaluation of runs/lipnet/RUN at
  # NORM's budgets, one command per model side by side, merged; each run's config and
  # per-epoch metrics copied beside the table
  local out=$1 norm=$2; shift 2
  local cmds=() folders=()
  for m in "$@"; do
    cmds+=("$rc attack runs/lipnet/$m --suite attacks/mnist-results.toml --norm $norm --limit 100 --seed 0 --out runs/eval-lipnet/$m")
    folders+=("runs/eval-lipnet/$m")
  done
  rm -rf "${folders[@]}" "$out"
  printf '%s\n' "${cmds[@]}" | OMP_NUM_THREADS=1 xargs -P 2 -I{} bash -c '{} > /dev/null'
  .venv/bin/python results/merge.py "${folders[@]}" --out "$out"
  mkdir -p "$out/training"
  for m in "$@"; do
    for f in metrics.csv config.toml environment.json; do cp "runs/lipnet/$m/$f" "$out/training/$m.$f"; done
  done
  { printf '%s\n' "${cmds[@]}"
    echo ".venv/bin/python results/merge.py ${folders[*]} --out $out"
  } > "$out/command.txt"
}
lipnet() {  # the FGSM-RS-trained lipnets of results/train_lipnet.sh, at Linf
  lipnet_eval results/lipnet-fgsm Linf none-fgsm-s1 fastclip-fgsm-s1
}
plots() {  # from the runs' metrics.csv (results/train.sh); their environment.json says where they ran
  .venv/bin/python results/plot_training.py $R results/training
}
for part in "${@:-main transfer ensembles seeds plots lipnet}"; do
  for p in $part; do "$p"; done
done
