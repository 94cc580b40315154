#!/usr/bin/env bash
# DINOv2 pretraining on one node with torchrun: one process per GPU (NCCL), or
# NPROC CPU processes (gloo) where there is no GPU. Extra arguments are config overrides.
# Python: PYTHON, else the project's .venv/bin/python when it exists, else python3 on PATH.
#
#   launch/torchrun_train.sh configs/train/vitl14_t1_bs.yaml runs/vitl14 data.index=IDX data.slides=SLIDES
#   NPROC=2 launch/torchrun_train.sh configs/train/cpu_smoke.yaml runs/smoke data.index=IDX data.slides=SLIDES
#
# Re-running the same command resumes from OUTPUT_DIR/checkpoints/latest. SIGTERM (what
# torchrun forwards on Ctrl-C or a scheduler's stop) checkpoints at the next iteration.
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 CONFIG_FILE OUTPUT_DIR [key.path=value ...]" >&2
    exit 2
fi
config=$1
output_dir=$2
shift 2

# The project's venv python when there is one, so nothing needs activating; PYTHON overrides it.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
# One intra-op thread per process unless told otherwise: ranks and DataLoader workers share the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
    -m dinov2_patho train --config-file "$config" --output-dir "$output_dir" "$@"
