#!/usr/bin/env bash
#SBATCH --job-name=mrgen-fanout
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --output=logs/%x-%j.out
# After export (pipeline.sh submits it with afterok): the FID array, one task per scanner of the store's
# vocabulary, and the report after the whole array. The array is sized from $MRGEN_STORE/manifest.json, which
# does not exist yet when pipeline.sh submits the chain. Prints the job ids, one per line: `fid ID`, `report ID`.
# Also usable on its own once the store and $MRGEN_ONNX exist:  sbatch hpc/slurm/fanout.sh
set -euo pipefail
source hpc/slurm/common.sh
n=$(python - "$MRGEN_STORE/manifest.json" <<'PY'
import json, sys
try:
    with open(sys.argv[1]) as f:
        vocabulary = json.load(f)["vocabulary"]
except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(f"fanout.sh: cannot read the scanner vocabulary of {sys.argv[1]}: {e!r}")
if not isinstance(vocabulary, list) or not vocabulary:
    sys.exit(f"fanout.sh: {sys.argv[1]}: empty or malformed vocabulary")
print(len(vocabulary))
PY
)
echo "store $MRGEN_STORE: $n scanner(s), FID array 0-$((n - 1))"
fid=$(sbatch --parsable --array=0-$((n - 1)) hpc/slurm/fid.sh)
report=$(sbatch --parsable --dependency=afterok:"$fid" hpc/slurm/report.sh)
echo "fid $fid"
echo "report $report"
