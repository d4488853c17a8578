#!/usr/bin/env bash
#SBATCH --job-name=mrgen-fid
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --output=logs/%x-%A_%a.out
# One array task per scanner: task i evaluates the i-th scanner of the store's vocabulary. The array size
# comes from the store: fanout.sh (which pipeline.sh runs after export) submits --array=0-(scanners - 1);
# by hand, e.g. --array=0-3 for the method's four. Each task reports into its own ClearML task, named by
# scanner and linked to $MRGEN_CLEARML_PARENT when set.
set -euo pipefail
source hpc/slurm/common.sh
task=${SLURM_ARRAY_TASK_ID:?fid.sh is an array job: sbatch hpc/slurm/fanout.sh (or sbatch --array=0-N hpc/slurm/fid.sh)}
scanner=$(python - "$MRGEN_STORE/manifest.json" "$task" <<'PY'
import json, sys
vocabulary = json.load(open(sys.argv[1]))["vocabulary"]
task = int(sys.argv[2])
n = len(vocabulary)
if task >= n:
    sys.exit(f"fid.sh: array task {task}, but the store has {n} scanner(s): use --array=0-{n - 1} (or fanout.sh)")
print(vocabulary[task])
PY
)
echo "array task $task: scanner $scanner"
run mrgen-fid --store "$MRGEN_STORE" --model "$MRGEN_ONNX" --scanner "$scanner" --repeats "$MRGEN_FID_REPEATS" \
  --out "$MRGEN_FID_OUT" --tracker clearml
