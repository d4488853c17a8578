#!/usr/bin/env bash
#SBATCH --job-name=mrgen-convert
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --output=logs/%x-%j.out
# NIfTI volumes ($MRGEN_INPUT) -> slice store ($MRGEN_STORE). Rejected inputs are listed in the store's
# rejected.csv and do not fail the job (mrgen-convert exit status 3); errors do. A store made from other
# inputs or parameters is not replaced unless MRGEN_CONVERT_OVERWRITE=1; work of a killed conversion waits in
# $MRGEN_STORE/.staging and is resumed by the next run.
#
# In parts, for cohorts of thousands of volumes (MRGEN_CONVERT_PARTS=N):
#   sbatch --array=1-N hpc/slurm/convert.sh                                  # task k: part k/N
#   sbatch --dependency=afterok:ARRAY_ID hpc/slurm/convert.sh merge          # the N parts -> $MRGEN_STORE
# Part k is written to $MRGEN_STORE.parts/part-k (a store of its own, resumable as above); the merge links the
# parts' shards into $MRGEN_STORE (one manifest, one split by subject over all parts), so the parts' folder can
# be deleted afterwards. pipeline.sh submits both when MRGEN_CONVERT_PARTS > 1.
set -euo pipefail
source hpc/slurm/common.sh
parts=${MRGEN_CONVERT_PARTS:-1}
status=0
overwrite=()
if [ "${MRGEN_CONVERT_OVERWRITE:-0}" = 1 ]; then overwrite=(--overwrite); fi
if [ "${1:-}" = merge ]; then
  folders=()
  for k in $(seq 1 "$parts"); do folders+=("$MRGEN_STORE.parts/part-$k"); done
  run mrgen-convert merge "${folders[@]}" --out "$MRGEN_STORE" "${overwrite[@]}" || status=$?
elif [ "$parts" -gt 1 ]; then
  k=${SLURM_ARRAY_TASK_ID:?MRGEN_CONVERT_PARTS=$parts: submit convert.sh as an array, sbatch --array=1-$parts}
  run mrgen-convert "$MRGEN_INPUT" --out "$MRGEN_STORE.parts/part-$k" --part "$k/$parts" \
    --workers "${SLURM_CPUS_PER_TASK:-1}" "${overwrite[@]}" || status=$?
else
  run mrgen-convert "$MRGEN_INPUT" --out "$MRGEN_STORE" --workers "${SLURM_CPUS_PER_TASK:-1}" "${overwrite[@]}" \
    || status=$?
fi
if [ "$status" = 3 ]; then echo "some inputs were rejected: see rejected.csv in the store"; status=0; fi
exit "$status"
