# Sourced by every job script: repository root, site settings, modules, virtual environment, image.
cd "${MRGEN_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f hpc/slurm/site.env ] || { echo "run from the mrgen-dist checkout (or set MRGEN_HOME)" >&2; exit 1; }
# shellcheck source=site.env
source hpc/slurm/site.env
if [ -n "$MRGEN_MODULES" ]; then module load $MRGEN_MODULES; fi
if [ -n "$MRGEN_VENV" ]; then source "$MRGEN_VENV/bin/activate"; fi
mkdir -p logs "$MRGEN_WORK"

# run CMD...: inside the Apptainer image when MRGEN_IMAGE is set (GPUs passed with --nv), else directly
IMAGE_PREFIX=()
if [ -n "$MRGEN_IMAGE" ]; then IMAGE_PREFIX=(apptainer exec --nv --bind "$PWD" --pwd "$PWD" "$MRGEN_IMAGE"); fi
run() { "${IMAGE_PREFIX[@]}" "$@"; }
echo "[$(date -Is)] job ${SLURM_JOB_ID:-local}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID} on $(hostname -s)" \
  "restart ${SLURM_RESTART_COUNT:-0}"
