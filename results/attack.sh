#!/usr/bin/env bash
# The evaluations behind results/, on the runs made by results/train.sh.
# Run from the repository root:  bash results/attack.sh [main] [transfer] [ensembles] [seeds] [plots] [lipnet] [lipnet_composite] [lipnet_composite_l2] [lipnet_l2] [l2_independent] [gain] [smallcnn] [smallcnn_rawstart] [smallcnn_wide] [smallcnn_wide_l2] [smallcnn_wide_e20] [smallcnn_baselines] [smallcnn_baselines_l2] [certified] [certified_long] [certified_e24] [certified_e24_budgets] [certified_composite] [certified_gouk] [certified_miyato]
# (no argument: each of them in that order but l2_independent, which lipnet_l2 runs)
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
keep_training() {  # keep_training OUT RUNS_DIR RUN...: each run's metrics, config and
  # environment beside the results, in OUT/training
  local out=$1 dir=$2; shift 2
  mkdir -p "$out/training"
  for m in "$@"; do
    for f in metrics.csv config.toml environment.json; do cp "$dir/$m/$f" "$out/training/$m.$f"; done
  done
}
merged() {  # merged OUT: run the caller's cmds two at a time (one thread each), merge the
  # caller's folders (one per command) into OUT, and record the commands in OUT/command.txt
  local out=$1
  rm -rf "${folders[@]}" "$out"
  printf '%s\n' "${cmds[@]}" | OMP_NUM_THREADS=1 xargs -P 2 -I{} bash -c '{} > /dev/null'
  .venv/bin/python results/merge.py "${folders[@]}" --out "$out"
  { printf '%s\n' "${cmds[@]}"
    echo ".venv/bin/python results/merge.py ${folders[*]} --out $out"
  } > "$out/command.txt"
}
main() {  # the standard evaluation, one model per command, merged
  local cmds=() folders=()
  for m in none-s1 fastclip-s1 fastclip-composite-s1 miyato-s1 gouk-s1; do  # per model: the standard
    # evaluation, then foolbox's L2 attacks beside it
    cmds+=("$rc attack $R/$m --suite attacks/mnist-results.toml --limit 100 --seed 0 --out runs/eval/$m && .venv/bin/python results/compare_l2.py $R/$m --limit 100 --out runs/eval/$m")
    folders+=("runs/eval/$m")
  done
  merged results/mnist-simpleconv
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
lipnet() {  # the FGSM-RS-trained lipnets of results/train_lipnet.sh: the standard evaluation at
  # Linf, one model per command, merged; each run's config and per-epoch metrics beside it
  local out=results/lipnet-fgsm models="none-fgsm-s1 fastclip-fgsm-s1" cmds=() folders=()
  for m in $models; do
    cmds+=("$rc attack runs/lipnet/$m --suite attacks/mnist-results.toml --norm Linf --limit 100 --seed 0 --out runs/eval-lipnet/$m")
    folders+=("runs/eval-lipnet/$m")
  done
  merged "$out"
  keep_training "$out" runs/lipnet $models
}
lipnet_composite() {  # the FGSM-RS-trained lipnet-composite (fastclip-composite) of
  # results/train_lipnet.sh, as lipnet: the standard evaluation at Linf
  local out=results/lipnet-composite-fgsm cmds=() folders=()
  cmds=("$rc attack runs/lipnet/composite-fgsm-s1 --suite attacks/mnist-results.toml --norm Linf --limit 100 --seed 0 --out runs/eval-lipnet/composite-fgsm-s1")
  folders=("runs/eval-lipnet/composite-fgsm-s1")
  merged "$out"
  keep_training "$out" runs/lipnet composite-fgsm-s1
}
lipnet_composite_l2() {  # the same model under the standard evaluation at L2 1.0/1.58/2.0, with the
  # certified accuracy its sound bound gives at each radius, and foolbox's L2 attacks beside it
  local out=results/lipnet-composite-fgsm-l2 cmds=() folders=()
  cmds=("$rc attack runs/lipnet/composite-fgsm-s1 --suite attacks/mnist-results.toml --norm L2 --limit 100 --seed 0 --out runs/eval-lipnet-l2/composite-fgsm-s1 && .venv/bin/python results/compare_l2.py runs/lipnet/composite-fgsm-s1 --limit 100 --out runs/eval-lipnet-l2/composite-fgsm-s1")
  folders=("runs/eval-lipnet-l2/composite-fgsm-s1")
  merged "$out"
}
lipnet_l2() {  # the same two lipnets under the standard evaluation at L2 1.0/1.58/2.0, with the
  # certified accuracy their sound bounds give at each radius
  local cmds=() folders=()
  for m in none-fgsm-s1 fastclip-fgsm-s1; do
    cmds+=("$rc attack runs/lipnet/$m --suite attacks/mnist-results.toml --norm L2 --limit 100 --seed 0 --out runs/eval-lipnet-l2/$m")
    folders+=("runs/eval-lipnet-l2/$m")
  done
  merged results/lipnet-fgsm-l2
  l2_independent
}
l2_independent() {  # foolbox's FMN-L2 and L2 PGD beside the lipnets' L2 table (written into it)
  local cmd=".venv/bin/python results/compare_l2.py runs/lipnet/none-fgsm-s1 runs/lipnet/fastclip-fgsm-s1 --limit 100 --out results/lipnet-fgsm-l2"
  $cmd > /dev/null
  grep -qxF "$cmd" results/lipnet-fgsm-l2/command.txt || echo "$cmd" >> results/lipnet-fgsm-l2/command.txt
}
gain() {  # how much of their Lipschitz budget the lipnets use on pairs of test digits
  local out=results/lipnet-gain
  .venv/bin/python results/layer_gain.py runs/lipnet/none-fgsm-s1 runs/lipnet/fastclip-fgsm-s1 \
    runs/lipnet/fastclip-margin-s1 --limit 1000 --out "$out" > /dev/null
  echo ".venv/bin/python results/layer_gain.py runs/lipnet/none-fgsm-s1 runs/lipnet/fastclip-fgsm-s1 runs/lipnet/fastclip-margin-s1 --limit 1000 --out $out" > "$out/command.txt"
}
smallcnn_models() {  # smallcnn_models OUT NORMS RUN...: the standard evaluation of the
  # runs/smallcnn RUNs at Linf 0.1/0.2/0.3 (NORMS "Linf"), L2 1.0/1.58/2.0 (NORMS "L2";
  # certified accuracy from the sound bound at each L2 radius) or both ("L2 Linf") on the
  # first 200 test images (the cascade takes 7 minutes per 256 robust images and budget
  # here), one model per command, merged, with foolbox's FMN and PGD of each norm beside
  # it; each run's config and metrics beside it
  local out=$1 norms=$2 cmds=() folders=(); shift 2
  local only="" evals=runs/eval-smallcnn
  case "$norms" in Linf) only=" --norm Linf";; L2) only=" --norm L2" evals=runs/eval-smallcnn-l2;; esac
  for m in "$@"; do
    local cmd="$rc attack runs/smallcnn/$m --suite attacks/mnist-results.toml$only --limit 200 --seed 0 --out $evals/$m"
    for n in $norms; do
      local script=compare_linf; [ "$n" = L2 ] && script=compare_l2
      cmd+=" && .venv/bin/python results/$script.py runs/smallcnn/$m --limit 200 --out $evals/$m"
    done
    cmds+=("$cmd")
    folders+=("$evals/$m")
  done
  merged "$out"
  keep_training "$out" runs/smallcnn "$@"
}
smallcnn() {  # the FGSM-RS-trained smallcnns of results/train_smallcnn.sh, random start clipped
  smallcnn_models results/smallcnn-fgsm "L2 Linf" none-fgsm-s1 fastclip-fgsm-s1
}
smallcnn_rawstart() {  # the same, trained from the raw random start (Wong et al.'s MNIST code)
  smallcnn_models results/smallcnn-fgsm-rawstart "L2 Linf" none-fgsm-rawstart-s1 fastclip-fgsm-rawstart-s1
}
smallcnn_wide() {  # the wide smallcnn, trained from the raw random start, one norm a part (its
  # cascade costs about 3 times smallcnn's)
  smallcnn_models results/smallcnn-wide-fgsm-rawstart Linf wide-none-fgsm-rawstart-s1
}
smallcnn_wide_l2() {
  smallcnn_models results/smallcnn-wide-fgsm-rawstart-l2 L2 wide-none-fgsm-rawstart-s1
}
smallcnn_wide_e20() {  # the wide smallcnn trained for 20 epochs, Linf
  smallcnn_models results/smallcnn-wide-fgsm-rawstart-e20 Linf wide-none-fgsm-rawstart-e20-s1
}
smallcnn_baselines() {  # the raw-start recipe with miyato and gouk, Linf
  smallcnn_models results/smallcnn-baselines-fgsm-rawstart Linf miyato-fgsm-rawstart-s1 gouk-fgsm-rawstart-s1
}
smallcnn_baselines_l2() {  # the same two at L2
  smallcnn_models results/smallcnn-baselines-fgsm-rawstart-l2 L2 miyato-fgsm-rawstart-s1 gouk-fgsm-rawstart-s1
}
certified_runs() {  # certified_runs OUT FULL_OUT RUN...: the certified-trained lipnets of
  # results/train_certified.sh: the standard evaluation of the first RUN at L2 1.58 on the
  # first 100 test images with the certified accuracy of its sound bound (one budget, one
  # model: lipnet's cascade takes about 25 minutes per budget and 100 images here),
  # foolbox's L2 attacks beside it, every RUN's config and metrics in OUT; and the
  # certified accuracy of every RUN on the whole test set at L2 1.0/1.58/2.0 (beside
  # PGD-L2, 10 steps) in FULL_OUT
  local out=$1 full=$2 m=$3; shift 2
  local cmds=("$rc attack runs/lipnet/$m --suite attacks/mnist-results.toml --norm L2 --eps 1.58 --limit 100 --seed 0 --out runs/eval-certified/$m && .venv/bin/python results/compare_l2.py runs/lipnet/$m --limit 100 --out runs/eval-certified/$m")
  local folders=("runs/eval-certified/$m")
  merged "$out"
  keep_training "$out" runs/lipnet "$@"
  run "$full" $rc attack "${@/#/runs/lipnet/}" --attack pgdl2 --steps 10 --norm L2 --eps 1.0 --eps 1.58 --eps 2.0 --seed 0
}
certified() {  # 8 epochs, none and fastclip
  certified_runs results/lipnet-certified results/lipnet-certified-full none-margin-s1 fastclip-margin-sound-s1
}
certified_long() {  # none for 16 epochs
  certified_runs results/lipnet-certified-long results/lipnet-certified-long-full none-margin-long-s1
}
certified_e24() {  # none for 24 epochs
  certified_runs results/lipnet-certified-e24 results/lipnet-certified-e24-full none-margin-e24-s1
}
certified_e24_budgets() {  # the 24-epoch model under the standard evaluation at the other
  # budgets: Linf 0.1/0.2/0.3 and L2 1.0/2.0 (first 100 test images), the independent
  # attacks of each norm beside it
  local m=none-margin-e24-s1 cmds=() folders=(runs/eval-certified-linf/none-margin-e24-s1 runs/eval-certified-l2/none-margin-e24-s1)
  cmds=("$rc attack runs/lipnet/$m --suite attacks/mnist-results.toml --norm Linf --limit 100 --seed 0 --out ${folders[0]} && .venv/bin/python results/compare_linf.py runs/lipnet/$m --limit 100 --out ${folders[0]}"
        "$rc attack runs/lipnet/$m --suite attacks/mnist-results.toml --norm L2 --eps 1.0 --eps 2.0 --limit 100 --seed 0 --out ${folders[1]} && .venv/bin/python results/compare_l2.py runs/lipnet/$m --limit 100 --out ${folders[1]}")
  merged results/lipnet-certified-e24-budgets
}
certified_composite() {  # lipnet-composite + fastclip-composite, 8 epochs, its BatchNorms
  # priced by the batch's variance in training (7fce4e2)
  certified_runs results/lipnet-certified-composite results/lipnet-certified-composite-full composite-margin-batch-s1
}
certified_gouk() {  # lipnet + gouk, 8 epochs
  certified_runs results/lipnet-certified-gouk results/lipnet-certified-gouk-full gouk-margin-s1
}
certified_miyato() {  # lipnet + miyato, 8 epochs
  certified_runs results/lipnet-certified-miyato results/lipnet-certified-miyato-full miyato-margin-s1
}
plots() {  # from the runs' metrics.csv (results/train.sh); their environment.json says where they ran
  .venv/bin/python results/plot_training.py $R results/training
}
for part in "${@:-main transfer ensembles seeds plots lipnet lipnet_composite lipnet_composite_l2 lipnet_l2 gain smallcnn smallcnn_rawstart smallcnn_wide smallcnn_wide_l2 smallcnn_wide_e20 smallcnn_baselines smallcnn_baselines_l2 certified certified_long certified_e24 certified_e24_budgets certified_composite certified_gouk certified_miyato}"; do
  for p in $part; do "$p"; done
done
