#!/usr/bin/env bash
#SBATCH --job-name=mrgen-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Multi-GPU, multi-node training: one srun task per node runs `accelerate launch` with this node's machine
# rank; the main address and port come from the allocation. Before the time limit or on preemption Slurm
# sends USR1 to this shell; it is passed on as SIGTERM, the training saves a checkpoint, requeues the job
# (scontrol requeue) and exits 75; the requeued job resumes by itself (--resume auto).
#   sbatch --nodes=2 --gpus-per-node=4 hpc/slurm/train.sh      (with MRGEN_GPUS_PER_NODE=4 in site.env)
set -uo pipefail
source hpc/slurm/common.sh

nodes=${SLURM_NNODES:-1}
gpus=${MRGEN_GPUS_PER_NODE}
if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "$gpus" != 0 ]; then gpus=$SLURM_GPUS_ON_NODE; fi
if [ "$gpus" -gt 0 ]; then
  per_node=$gpus
  launch=(--config_file "$MRGEN_ACCELERATE_CONFIG")
else
  per_node=$MRGEN_CPU_PROCS
  export ACCELERATE_USE_CPU=1
  launch=(--multi_gpu --mixed_precision no --dynamo_backend no)
fi
world=$((nodes * per_node))
# Node-local staging (MRGEN_STAGE=1): many sites ask jobs to read their input from node-local disk rather than
# from the shared file system at every start. One task per node copies the store there (its manifest and shards;
# the training checks every shard against the manifest as it loads), named by the job id, so a requeued job
# resumes with the same data.store; each start copies, and each end removes the copy.
store=$MRGEN_STORE
if [ "$MRGEN_STAGE" = 1 ]; then
  stage="${MRGEN_STAGE_DIR:-${TMPDIR:-/tmp}}/mrgen-store-${SLURM_JOB_ID:-$$}"
  SECONDS=0
  if ! srun --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
       bash -c 'rm -rf "$2" && mkdir -p "$2" && cp -r "$1"/. "$2"/' _ "$MRGEN_STORE" "$stage"; then
    echo "staging $MRGEN_STORE to $stage failed (is there room on the node's disk? MRGEN_STAGE_DIR)" >&2
    exit 1
  fi
  echo "staged $MRGEN_STORE ($(du -sh "$MRGEN_STORE" | cut -f1)) to $stage on $nodes node(s) in $SECONDS s"
  store=$stage
fi
master=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
port=$((20000 + ${SLURM_JOB_ID:-0} % 20000))
train=(-m mrgen_dist.commands.train --config "$MRGEN_CONFIG" --resume auto "data.store=$store" "train.out=$MRGEN_RUN"
       "train.world_size=$world" $MRGEN_TRAIN_OVERRIDES)
if [ "$world" -eq 1 ]; then
  cmd=(python "${train[@]}")
else
  cmd=(accelerate launch "${launch[@]}" --num_machines "$nodes" --num_processes "$world"
       --main_process_ip "$master" --main_process_port "$port" --machine_rank @NODEID@ "${train[@]}")
fi
cmd=("${IMAGE_PREFIX[@]}" "${cmd[@]}")
echo "training: $nodes node(s) x $per_node process(es), main $master:$port"
# one task per node; @NODEID@ becomes that node's rank. exec: the task is the launcher (or python) itself, so
# a SIGTERM to the step's tasks reaches it (and the launcher passes it on to the training processes)
srun --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'exec "${@//@NODEID@/$SLURM_NODEID}"' _ "${cmd[@]}" &
step=$!
# SIGTERM to the step's tasks (not to srun, which would cancel the step): they stop at a step boundary
trap 'echo "[$(date -Is)] preemption warning: stopping at the next step boundary"; scancel --signal=TERM "$SLURM_JOB_ID"' USR1 TERM
status=0
while kill -0 "$step" 2>/dev/null; do wait "$step"; status=$?; done
echo "training step exited with status $status"
if [ "$MRGEN_STAGE" = 1 ]; then  # a requeued job copies again: the node it lands on may be another one
  srun --ntasks="$nodes" --ntasks-per-node=1 rm -rf "$stage"
fi
exit "$status"
