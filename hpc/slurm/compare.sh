#!/usr/bin/env bash
#SBATCH --job-name=mrgen-compare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --output=logs/%x-%j.out
# Compare models: one Slurm array task per model config (and cohort), then the comparison table after the
# whole array.
#
#   hpc/slurm/compare.sh STORE OUT CONFIG[:noise][@NAME] [CONFIG[:noise][@NAME] ...]
#   hpc/slurm/compare.sh COHORT=STORE[,COHORT=STORE ...] OUT CONFIG[:noise][@NAME] [...]
#   hpc/slurm/compare.sh /scratch/store runs/compare hpc/configs/demo.yaml hpc/configs/vae.yaml
#   hpc/slurm/compare.sh template=runs/t/store,physics=runs/p/store runs/compare hpc/configs/compare/atlas.yaml:noise
#
# With named cohorts (one store each), every config runs on every cohort as one array of cohorts x configs
# tasks, with its outputs in OUT/COHORT/NAME/, and the table (mrgen-compare --cohorts) judges each config on
# every cohort: a config "meets targets" only where it meets them on all of them. One config per family,
# fixed before it is scored: the same file on every cohort, the same MRGEN_TRAIN_OVERRIDES.
#
# Run it (not sbatch it) from anywhere; it submits and prints the job ids, one per line: `models ID` (the
# array) and `table ID`. Array task i, for the i-th CONFIG (of the (i / #CONFIGs)-th cohort), named after
# its file (NAME = basename without .yaml), with its outputs in OUT/NAME/ (OUT/COHORT/NAME/):
#   mrgen-train --config CONFIG data.store=STORE train.out=OUT/NAME/run --overwrite $MRGEN_TRAIN_OVERRIDES
#   mrgen-export onnx --model OUT/NAME/run --precision $MRGEN_PRECISION --out OUT/NAME/decoder.onnx
#   mrgen-fid score --store STORE --model OUT/NAME/decoder.onnx --scanner all --repeats R --n-generated N
#                   --out OUT/NAME/results [--noise]
#   mrgen-fid diagnose --store STORE --run OUT/NAME/run --out OUT/NAME/results [--noise]
#   mrgen-fid report OUT/NAME/results
# or, for a translator (a family of the mrgen-translator contract, e.g. hpc/configs/compare/stargan.yaml):
#   mrgen-export onnx --model OUT/NAME/run --precision $MRGEN_PRECISION --out OUT/NAME/translator.onnx
#   mrgen-fid translation --store STORE --model OUT/NAME/translator.onnx --out OUT/NAME/results
# then, once every task succeeded (afterok), one job:
#   mrgen-compare OUT/NAME1/results OUT/NAME2/results ... --names NAME1,NAME2,... --out OUT
#   (with cohorts: OUT/COHORT/NAME/results for every cohort and config, --cohorts COHORT,...)
# which writes OUT/compare.md, compare.csv and compare.png (and compare-translation.csv / .png for translators).
#
# CONFIG@NAME is a model built on another of the comparison's models (the refiner, hpc/configs/compare/refiner.yaml,
# over a coarse generator): it trains with model.coarse=OUT[/COHORT]/NAME/run, the run of the config named NAME on
# the same cohort, in a second array that starts once the first (every config without @) succeeded.
#
# CONFIG:noise scores samples and reconstructions that draw the model's learned observation noise (mrgen-fid --noise;
# the model needs one: the atlas family, or model.observation_noise: scanner); its NAME gets `-noise`, so a config
# can be run with and without it.
# R = $MRGEN_COMPARE_REPEATS (default 1), N = $MRGEN_COMPARE_N_GENERATED (default 500) generated slices per
# scanner, the same for every model so that FIDs compare at equal n. Each task trains in one process (on one
# GPU when MRGEN_GPUS_PER_NODE > 0); multi-node training is train.sh's job. MRGEN_COMPARE_PARALLEL caps how
# many tasks run at once; hpc/configs/compare/thesis-size.env sets the thesis-size run. Site settings come from
# hpc/slurm/site.env and the environment, as for pipeline.sh. Logs: logs/mrgen-compare-model-ARRAY_TASK.out
# and logs/mrgen-compare-ID.out.
set -euo pipefail

usage() {
  echo "usage: $0 STORE|COHORT=STORE[,COHORT=STORE...] OUT CONFIG[:noise][@NAME] [CONFIG[:noise][@NAME] ...]" >&2
  exit 2
}

# parse_stores SPEC: fills COHORTS and STORES from `STORE` (one unnamed cohort) or `C1=S1,C2=S2,...`
parse_stores() {
  COHORTS=() STORES=()
  local item cohort
  if [[ "$1" != *=* ]]; then COHORTS=(""); STORES=("$1"); return; fi
  IFS=, read -r -a items <<< "$1"
  for item in "${items[@]}"; do
    cohort=${item%%=*}
    case "$cohort" in
      ""|*/*|*" "*) echo "compare.sh: cohort name '$cohort' in '$item' must be non-empty, without / or spaces" >&2; exit 1 ;;
    esac
    for other in "${COHORTS[@]}"; do
      [ "$other" != "$cohort" ] || { echo "compare.sh: cohort $cohort named twice" >&2; exit 1; }
    done
    COHORTS+=("$cohort")
    STORES+=("${item#*=}")
  done
}

# dir_of OUT COHORT NAME: a task's output folder
dir_of() { echo "$1${2:+/$2}/$3"; }

# name_of SPEC: the model's name, the config file's basename without .yaml/.yml (+ -noise for CONFIG:noise)
name_of() {
  local spec=${1%@*} config name
  config=${spec%:noise}
  name=$(basename "$config")
  name=${name%.yaml}
  name=${name%.yml}
  if [ "$spec" != "$config" ]; then name+=-noise; fi
  echo "$name"
}

submit() {
  [ $# -ge 3 ] || usage
  local out spec config name specs=() names=() stores_spec="" i
  parse_stores "$1"
  out=$(realpath -m "$2")
  shift 2
  for i in "${!STORES[@]}"; do
    STORES[$i]=$(realpath -m "${STORES[$i]}")
    [ -f "${STORES[$i]}/manifest.json" ] || { echo "compare.sh: no store at ${STORES[$i]} (no manifest.json)" >&2; exit 1; }
    stores_spec+="${stores_spec:+,}${COHORTS[$i]:+${COHORTS[$i]}=}${STORES[$i]}"
  done
  local coarse first=() second=()
  for spec in "$@"; do
    config=${spec%@*}
    config=${config%:noise}
    [ -f "$config" ] || { echo "compare.sh: config $config does not exist" >&2; exit 1; }
    name=$(name_of "$spec")
    case "$name" in
      *,*|"") echo "compare.sh: $config: the model name '$name' must be non-empty, without commas" >&2; exit 1 ;;
    esac
    for other in "${names[@]}"; do
      [ "$other" != "$name" ] || { echo "compare.sh: two configs named $name: rename one" >&2; exit 1; }
    done
    specs+=("$(realpath "$config")${spec#"$config"}")
    names+=("$name")
  done
  # the models built on another (CONFIG@NAME) train in a second array, after the first, which holds NAME
  local first_names=()
  for i in "${!specs[@]}"; do
    if [[ "${specs[$i]}" == *@* ]]; then second+=("${specs[$i]}"); else first+=("${specs[$i]}"); first_names+=("${names[$i]}"); fi
  done
  for spec in "${second[@]}"; do
    coarse=${spec##*@}
    [[ " ${first_names[*]} " == *" $coarse "* ]] || {
      echo "compare.sh: $spec: $coarse is not the name of a config of this comparison without @" >&2; exit 1; }
  done
  [ ${#first[@]} -gt 0 ] || { echo "compare.sh: every config is built on another (@NAME); name at least one without" >&2; exit 1; }

  cd "$(dirname "$0")/../.."
  source hpc/slurm/site.env
  if [ -n "$MRGEN_VENV" ]; then source "$MRGEN_VENV/bin/activate"; fi
  mkdir -p logs "$out"
  export MRGEN_HOME=$PWD MRGEN_WORK=$out MRGEN_VENV MRGEN_IMAGE MRGEN_MODULES MRGEN_GPUS_PER_NODE MRGEN_PRECISION \
    MRGEN_TRAIN_OVERRIDES MRGEN_COMPARE_REPEATS=${MRGEN_COMPARE_REPEATS:-1} \
    MRGEN_COMPARE_N_GENERATED=${MRGEN_COMPARE_N_GENERATED:-500}
  local gpu_opts=()
  if [ "$MRGEN_GPUS_PER_NODE" -gt 0 ]; then gpu_opts=(--gpus=1); fi
  local models table built="" after
  # MRGEN_COMPARE_PARALLEL=P: at most P models at once (e.g. 1 on a small machine, where they would share cores)
  models=$(sbatch --parsable --job-name=mrgen-compare-model \
    --array=0-$((${#COHORTS[@]} * ${#first[@]} - 1))${MRGEN_COMPARE_PARALLEL:+%$MRGEN_COMPARE_PARALLEL} \
    --output=logs/%x-%A_%a.out \
    "${gpu_opts[@]}" hpc/slurm/compare.sh --model "$stores_spec" "$out" "${first[@]}")
  after=$models
  if [ ${#second[@]} -gt 0 ]; then
    built=$(sbatch --parsable --job-name=mrgen-compare-model --dependency=afterok:"$models" \
      --array=0-$((${#COHORTS[@]} * ${#second[@]} - 1))${MRGEN_COMPARE_PARALLEL:+%$MRGEN_COMPARE_PARALLEL} \
      --output=logs/%x-%A_%a.out \
      "${gpu_opts[@]}" hpc/slurm/compare.sh --model "$stores_spec" "$out" "${second[@]}")
    after=$models:$built
  fi
  table=$(sbatch --parsable --job-name=mrgen-compare --dependency=afterok:"$after" --output=logs/%x-%j.out \
    hpc/slurm/compare.sh --table "$stores_spec" "$out" "${names[@]}")
  local c spec task prefix
  for prefix in "" "built "; do
    if [ -z "$prefix" ]; then local stage_specs=("${first[@]}"); else stage_specs=("${second[@]}"); fi
    task=0
    for c in "${!COHORTS[@]}"; do
      for spec in "${stage_specs[@]}"; do
        echo "${prefix}task $task: $(name_of "$spec") ($spec${COHORTS[$c]:+ on ${COHORTS[$c]}}) -> $(dir_of "$out" "${COHORTS[$c]}" "$(name_of "$spec")")"
        task=$((task + 1))
      done
    done
  done
  echo "models $models"
  if [ -n "$built" ]; then echo "built $built"; fi
  echo "table $table"
}

# one array task: train, export, score, diagnose and report one model on one cohort
model_task() {
  parse_stores "$1"
  local out=$2
  shift 2
  source hpc/slurm/common.sh
  local task=${SLURM_ARRAY_TASK_ID:?compare.sh --model runs as an array task: use hpc/slurm/compare.sh STORE OUT CONFIG...}
  [ "$task" -lt $((${#COHORTS[@]} * $#)) ] || { echo "compare.sh: array task $task, but ${#COHORTS[@]} cohort(s) x $# config(s)" >&2; exit 1; }
  local specs=("$@")
  local spec=${specs[$((task % $#))]} cohort=${COHORTS[$((task / $#))]} store=${STORES[$((task / $#))]}
  local config name dir noise=() coarse=()
  config=${spec%@*}
  if [ "$config" != "$spec" ]; then coarse=("model.coarse=$(dir_of "$out" "$cohort" "${spec##*@}")/run"); fi
  if [ "${config%:noise}" != "$config" ]; then noise=(--noise); fi
  config=${config%:noise}
  name=$(name_of "$spec")
  dir=$(dir_of "$out" "$cohort" "$name")
  # one cache of real Inception features for all models (they share the store; the keys name it)
  export MRGEN_FID_CACHE=${MRGEN_FID_CACHE:-$out/fid-cache}
  echo "array task $task: $name ($config${noise[*]:+, sampled with noise}${cohort:+, cohort $cohort}), outputs in $dir"
  # shellcheck disable=SC2086  # MRGEN_TRAIN_OVERRIDES: several key=value words
  run mrgen-train --config "$config" "data.store=$store" "train.out=$dir/run" "${coarse[@]}" --overwrite $MRGEN_TRAIN_OVERRIDES
  if [ "$(run mrgen-export kind --model "$dir/run")" = translator ]; then
    [ ${#noise[@]} -eq 0 ] || { echo "compare.sh: $config is a translator: :noise is for generators" >&2; exit 1; }
    run mrgen-export onnx --model "$dir/run" --precision "$MRGEN_PRECISION" --out "$dir/translator.onnx"
    run mrgen-fid translation --store "$store" --model "$dir/translator.onnx" --out "$dir/results"
    return
  fi
  run mrgen-export onnx --model "$dir/run" --precision "$MRGEN_PRECISION" --out "$dir/decoder.onnx"
  run mrgen-fid score --store "$store" --model "$dir/decoder.onnx" --scanner all --repeats "$MRGEN_COMPARE_REPEATS" \
    --n-generated "$MRGEN_COMPARE_N_GENERATED" --out "$dir/results" "${noise[@]}"
  run mrgen-fid diagnose --store "$store" --run "$dir/run" --out "$dir/results" "${noise[@]}"
  run mrgen-fid report "$dir/results"
}

# after the array: the comparison table of every model (on every cohort)
table_task() {
  parse_stores "$1"
  local out=$2
  shift 2
  source hpc/slurm/common.sh
  local results=() names=() cohorts=() name cohort
  for cohort in "${COHORTS[@]}"; do
    for name in "$@"; do
      results+=("$(dir_of "$out" "$cohort" "$name")/results")
      names+=("$name")
      cohorts+=("$cohort")
    done
  done
  local by_cohort=()
  if [ -n "${COHORTS[0]}" ]; then by_cohort=(--cohorts "$(IFS=,; echo "${cohorts[*]}")"); fi
  run mrgen-compare "${results[@]}" --names "$(IFS=,; echo "${names[*]}")" "${by_cohort[@]}" --out "$out"
}

case "${1:-}" in
  --model) shift; [ $# -ge 3 ] || usage; model_task "$@" ;;
  --table) shift; [ $# -ge 3 ] || usage; table_task "$@" ;;
  -h|--help|"") usage ;;
  *) submit "$@" ;;
esac
