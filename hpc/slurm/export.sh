#!/usr/bin/env bash
#SBATCH --job-name=mrgen-export
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --output=logs/%x-%j.out
# The trained decoder ($MRGEN_RUN) -> checked ONNX file ($MRGEN_ONNX).
set -euo pipefail
source hpc/slurm/common.sh
run mrgen-export onnx --model "$MRGEN_RUN" --precision "$MRGEN_PRECISION" --out "$MRGEN_ONNX"
