#!/usr/bin/env bash
#SBATCH --job-name=mrgen-convert
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --output=logs/%x-%j.out
# NIfTI volumes ($MRGEN_INPUT) -> slice store ($MRGEN_STORE). Rejected inputs are listed in the store's
# rejected.csv and do not fail the job (mrgen-convert exit status 3); errors do. A store made from other
# inputs or parameters is not replaced unless MRGEN_CONVERT_OVERWRITE=1; work of a killed conversion waits in
# $MRGEN_STORE/.staging and is resumed by the next run.
set -euo pipefail
source hpc/slurm/common.sh
status=0
overwrite=()
if [ "${MRGEN_CONVERT_OVERWRITE:-0}" = 1 ]; then overwrite=(--overwrite); fi
run mrgen-convert "$MRGEN_INPUT" --out "$MRGEN_STORE" --workers "${SLURM_CPUS_PER_TASK:-1}" "${overwrite[@]}" \
  || status=$?
if [ "$status" = 3 ]; then echo "some inputs were rejected: see $MRGEN_STORE/rejected.csv"; status=0; fi
exit "$status"
