#!/usr/bin/env bash
# Submit the whole chain with afterok dependencies and print the job ids:
#   convert (or an array of parts, then merge) -> train -> export -> fanout -> fid (array, one task per scanner) -> report
# The store does not exist yet at submission, so fanout.sh, once export is done, sizes the FID array from the
# store's manifest and submits it and the report; their ids are in its log (logs/mrgen-fanout-ID.out).
# Settings come from hpc/slurm/site.env and the environment. Run from the repository root.
#   hpc/slurm/pipeline.sh               (MRGEN_INPUT=/data/nifti MRGEN_WORK=/scratch/run1 ... in front)
set -euo pipefail
cd "$(dirname "$0")/../.."
source hpc/slurm/site.env
if [ -n "$MRGEN_VENV" ]; then source "$MRGEN_VENV/bin/activate"; fi
mkdir -p logs
export MRGEN_HOME=$PWD MRGEN_INPUT MRGEN_WORK MRGEN_STORE MRGEN_RUN MRGEN_ONNX MRGEN_FID_OUT MRGEN_CONFIG MRGEN_CONVERT_OVERWRITE MRGEN_CONVERT_PARTS \
  MRGEN_TRAIN_OVERRIDES MRGEN_PRECISION MRGEN_FID_REPEATS MRGEN_CLEARML_PROJECT MRGEN_VENV MRGEN_IMAGE \
  MRGEN_GPUS_PER_NODE MRGEN_CPU_PROCS MRGEN_MODULES MRGEN_ACCELERATE_CONFIG

# the ClearML parent task of this run; array tasks and the report link to it
MRGEN_CLEARML_PARENT=$(python -m mrgen_dist.commands.clearml_parent --project "$MRGEN_CLEARML_PROJECT" \
  --name "pipeline $(basename "$MRGEN_WORK")" | tail -n 1)
export MRGEN_CLEARML_PARENT

gpu_opts=()
if [ "$MRGEN_GPUS_PER_NODE" -gt 0 ]; then gpu_opts=(--gpus-per-node="$MRGEN_GPUS_PER_NODE"); fi
train_opts=(--ntasks-per-node=1 --cpus-per-task="${MRGEN_TRAIN_CPUS:-2}")

if [ "$MRGEN_CONVERT_PARTS" -gt 1 ]; then  # an array of parts, then the merge that makes the store
  parts=$(sbatch --parsable --array=1-"$MRGEN_CONVERT_PARTS" hpc/slurm/convert.sh)
  convert=$(sbatch --parsable --dependency=afterok:"$parts" hpc/slurm/convert.sh merge)
  echo "convert-parts $parts"
else
  convert=$(sbatch --parsable hpc/slurm/convert.sh)
fi
train=$(sbatch --parsable --dependency=afterok:"$convert" "${gpu_opts[@]}" "${train_opts[@]}" hpc/slurm/train.sh)
export_job=$(sbatch --parsable --dependency=afterok:"$train" hpc/slurm/export.sh)
fanout=$(sbatch --parsable --dependency=afterok:"$export_job" hpc/slurm/fanout.sh)
echo "clearml parent $MRGEN_CLEARML_PARENT"
echo "convert $convert"
echo "train $train"
echo "export $export_job"
echo "fanout $fanout"
echo "then: fanout $fanout submits the FID array and the report (their ids in logs/mrgen-fanout-$fanout.out)"
