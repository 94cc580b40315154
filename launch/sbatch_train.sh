#!/bin/bash
# `dinov2-patho train` under plain sbatch + srun, without submitit or torchrun: one task
# per GPU, torch.distributed's env:// variables set from SLURM's. Arguments are those of
# `dinov2-patho train` except --output-dir (OUTPUT_DIR below). For example:
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=8 \
#       --partition=gpu --time=24:00:00 launch/sbatch_train.sh \
#       --config-file configs/train/vitl14_t1_bs.yaml data.index=/data/index data.slides=/data/slides
#
# Environment: PYTHON (the project's venv python; default: python3 on PATH),
# OUTPUT_ROOT (default runs/slurm), OUTPUT_DIR (default OUTPUT_ROOT/JOBNAME_JOBID).
# Preemption and time limits: SIGUSR2 (sent 120 s before the limit, or by
# `scancel --signal=USR2`) makes every rank checkpoint and exit at the next iteration;
# the script then requeues the job, which keeps its id, hence its OUTPUT_DIR, and resumes
# from the latest checkpoint.
#SBATCH --job-name=dinov2-patho-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x_%j.out

set -euo pipefail

PYTHON=${PYTHON:-python3}
OUTPUT_ROOT=${OUTPUT_ROOT:-runs/slurm}
OUTPUT_DIR=${OUTPUT_DIR:-$OUTPUT_ROOT/${SLURM_JOB_NAME}_${SLURM_JOB_ID}}
mkdir -p "$OUTPUT_DIR/logs"
printf '%s\n' "$(date -Is) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: $0 $*" \
    >> "$OUTPUT_DIR/logs/command.txt"

# every task: the first node hosts the rendezvous; the port follows the job id
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export WORLD_SIZE=$SLURM_NTASKS
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# RANK and LOCAL_RANK differ per task: set them inside the task
srun --kill-on-bad-exit=1 bash -c \
    'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID exec "$0" -m dinov2_patho train --output-dir "$@"' \
    "$PYTHON" "$OUTPUT_DIR" "$@"

# a clean stop before the last iteration was a preemption: come back later
status=0
"$PYTHON" -m dinov2_patho.run.status "$OUTPUT_DIR" || status=$?
if [ "$status" -eq 3 ]; then
    scontrol requeue "$SLURM_JOB_ID"
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi
