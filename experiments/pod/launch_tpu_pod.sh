#!/usr/bin/env bash
# Multi-host data-parallel fine-tuning on a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts x 4 chips).
#
# Every host runs the same command (--worker=all); jax.distributed.initialize() finds the other
# hosts by itself on a TPU slice, so no --coordinator is needed. Process 0 writes logs and the
# report; all hosts take part in checkpoint saves, so WORKDIR must be storage every host sees:
# a gs:// bucket (or a shared filesystem path).
#
# Usage:
#   TPU_NAME=my-pod ZONE=us-central2-b WORKDIR=gs://my-bucket/jaxfood/run1 \
#     experiments/pod/launch_tpu_pod.sh [extra train.py options, e.g. --set steps=2000]
#
# Preemption: rerun the same command with the same WORKDIR; training resumes from the latest
# checkpoint and ends where an uninterrupted run would.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
: "${WORKDIR:?set WORKDIR, e.g. gs://bucket/jaxfood/run1}"
PROJECT_FLAG=${PROJECT:+--project "$PROJECT"}
REPO_URL=${REPO_URL:-}                   # optional: git URL to clone on each host
REPO_DIR=${REPO_DIR:-\$HOME/jaxfood}     # where the code lives on each host
GRAPH=${GRAPH:-}                         # optional: graph directory (gs:// not supported: copy it first)
PRESET=${PRESET:-large}                  # simulator preset used when GRAPH is empty
SETUP=${SETUP:-1}                        # 1: (re)install the environment on every host first

extra=""
for a in "$@"; do extra+=" $(printf '%q' "$a")"; done
graph_arg="--preset ${PRESET}"
[ -n "$GRAPH" ] && graph_arg="--graph ${GRAPH}"

setup_cmd="true"
if [ "$SETUP" = "1" ]; then
  clone=""
  [ -n "$REPO_URL" ] && clone="( [ -d ${REPO_DIR} ] || git clone ${REPO_URL} ${REPO_DIR} ) &&"
  setup_cmd="${clone} cd ${REPO_DIR} && python3 -m venv .venv && . .venv/bin/activate && \
pip install -q -U pip && pip install -q -e . && pip install -q -U 'jax[tpu]'"
fi

run_cmd="cd ${REPO_DIR} && . .venv/bin/activate && \
python experiments/pod/train.py ${graph_arg} --workdir ${WORKDIR} ${extra} \
  2>&1 | tee -a /tmp/jaxfood_train_\$(hostname).log"

# shellcheck disable=SC2086
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG --worker=all \
  --command="${setup_cmd} && ${run_cmd}"
