#!/usr/bin/env bash
#SBATCH --job-name=mrgen-fid
#SBATCH --array=0-3
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --output=logs/%x-%A_%a.out
# One array task per scanner: task i evaluates the i-th scanner of the store's vocabulary (--array=0-3 for
# the method's four; pipeline.sh sizes the array from the store). Each task reports into its own ClearML task,
# named by scanner and linked to $MRGEN_CLEARML_PARENT when set.
set -euo pipefail
source hpc/slurm/common.sh
task=${SLURM_ARRAY_TASK_ID:?fid.sh is an array job: sbatch --array=0-N hpc/slurm/fid.sh}
scanner=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['vocabulary'][int(sys.argv[2])])" \
  "$MRGEN_STORE/manifest.json" "$task")
echo "array task $task: scanner $scanner"
run mrgen-fid --store "$MRGEN_STORE" --model "$MRGEN_ONNX" --scanner "$scanner" --repeats "$MRGEN_FID_REPEATS" \
  --out "$MRGEN_FID_OUT" --tracker clearml
