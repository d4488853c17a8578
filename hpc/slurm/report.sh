#!/usr/bin/env bash
#SBATCH --job-name=mrgen-report
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --output=logs/%x-%j.out
# The per-scanner results -> conditioning check, FID table and boxplot, attached to the ClearML parent task.
set -euo pipefail
source hpc/slurm/common.sh
run mrgen-fid conditioning --store "$MRGEN_STORE" --model "$MRGEN_ONNX" --out "$MRGEN_FID_OUT"
run mrgen-fid report "$MRGEN_FID_OUT" --tracker clearml
