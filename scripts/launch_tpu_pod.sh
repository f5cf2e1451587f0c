#!/usr/bin/env bash
# Run one training program on every worker of a Cloud TPU VM (pod slice): the same command on all hosts.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b [PROJECT=my-project] \
#     bash scripts/launch_tpu_pod.sh CONFIG WORKDIR [--config.a.b=value ...]
#
#   CONFIG    experiments/X.py[:arg], relative to the checkout on the workers
#   WORKDIR   a folder every worker sees at the same path (NFS / Filestore / a gcsfuse mount): all hosts write
#             their shards of each checkpoint there, process 0 writes metrics.jsonl and samples
#   the rest  passed on to `python -m rlaif_jax.train` unchanged (config overrides, absl flags)
#
# Environment:
#   TPU_NAME, ZONE     required: the TPU VM and its zone
#   PROJECT            gcloud project (default: gcloud's configured one)
#   REPO_DIR           the checkout on every worker (default: ~/rlaif_jax); copy it first, e.g.
#                      gcloud compute tpus tpu-vm scp --recurse . $TPU_NAME:~/rlaif_jax --zone $ZONE --worker=all
#   SETUP              a command run first on every worker, e.g. "source .venv/bin/activate" or
#                      "pip install -e . -q" (default: none)
#   PYTHON             the interpreter on the workers (default: python3)
#   REMOTE_ENV         extra "NAME=value NAME2=value" exported on every worker (e.g. WANDB_API_KEY=...,
#                      HF_TOKEN=... for gated models)
#   DRY_RUN=1          print the gcloud command instead of running it
#
# Every worker runs the same command. The training program calls `jax.distributed.initialize()` itself: on a
# Cloud TPU VM it finds the coordinator (worker 0), the process count and its own index from the TPU metadata;
# RLAIF_DISTRIBUTED=1 (exported below) tells it to initialise even where the environment does not announce a
# cluster. Each process then loads only its own rows of every batch.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//' | head -n -1 >&2; exit 2; }
[ $# -ge 2 ] || usage
: "${TPU_NAME:?set TPU_NAME (the TPU VM name); see the usage at the top of this script}"
: "${ZONE:?set ZONE (the TPU zone, e.g. us-central2-b)}"
CONFIG="$1"
WORKDIR="$2"
shift 2

REPO_DIR="${REPO_DIR:-~/rlaif_jax}"
PYTHON="${PYTHON:-python3}"

# The remote command: every word quoted for the remote shell, except REPO_DIR (so "~" expands there).
train_cmd=$(printf '%q ' "$PYTHON" -m rlaif_jax.train "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
remote="cd $REPO_DIR && export RLAIF_DISTRIBUTED=1"
if [ -n "${REMOTE_ENV:-}" ]; then
  remote="$remote ${REMOTE_ENV}"
fi
if [ -n "${SETUP:-}" ]; then
  remote="$remote && ${SETUP}"
fi
remote="$remote && ${train_cmd% }"

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE")
if [ -n "${PROJECT:-}" ]; then
  cmd+=(--project "$PROJECT")
fi
cmd+=(--worker=all --command "$remote")

if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
