#!/usr/bin/env bash
# Data-parallel fine-tuning on one host with several GPUs (one process drives all local GPUs:
# pmap over them), or on several such hosts (one process per host, same coordinator).
#
# Usage, one host:
#   WORKDIR=runs/gpu1 experiments/pod/launch_multi_gpu.sh [--set steps=2000 ...]
# Several hosts (run on every host; NUM_PROCESSES hosts, PROCESS_ID = 0 .. NUM_PROCESSES-1):
#   COORDINATOR=10.0.0.2:8476 NUM_PROCESSES=2 PROCESS_ID=0 WORKDIR=/shared/run1 \
#     experiments/pod/launch_multi_gpu.sh
#
# CUDA_VISIBLE_DEVICES picks the GPUs (default: all). Rerunning with the same WORKDIR resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIR=${WORKDIR:-runs/multi_gpu}
GRAPH=${GRAPH:-}
PRESET=${PRESET:-large}
graph_arg=(--preset "$PRESET")
[ -n "$GRAPH" ] && graph_arg=(--graph "$GRAPH")
dist_args=()
if [ -n "${COORDINATOR:-}" ]; then
  dist_args=(--coordinator "$COORDINATOR" --num-processes "${NUM_PROCESSES:?}" --process-id "${PROCESS_ID:?}")
fi
# Let XLA take GPU memory as it needs it instead of preallocating 75% per process.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
mkdir -p "$WORKDIR"
exec python experiments/pod/train.py "${graph_arg[@]}" --workdir "$WORKDIR" "${dist_args[@]}" "$@" \
  2>&1 | tee -a "$WORKDIR/train_$(hostname)_${PROCESS_ID:-0}.log"
