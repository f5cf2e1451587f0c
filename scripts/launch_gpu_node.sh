#!/usr/bin/env bash
# Run the training program on one multi-GPU node: one process that drives all the node's GPUs.
#
#   bash scripts/launch_gpu_node.sh CONFIG WORKDIR [--config.a.b=value ...]
#
#   CONFIG    experiments/X.py[:arg]
#   WORKDIR   run folder (checkpoints, metrics.jsonl, samples); an existing one is resumed
#   the rest  passed on to `python -m rlaif_jax.train` unchanged
#
# Environment:
#   CUDA_VISIBLE_DEVICES   which GPUs the process uses (default: all); the mesh spans every visible GPU
#   PYTHON                 interpreter (default: python3; activate the venv first, or PYTHON=.venv/bin/python)
#   MEM_FRACTION           share of each GPU's memory JAX preallocates (default 0.9; policy, reference, judge
#                          and the KV cache all live there)
#   Several nodes without SLURM: start this script on every node with
#     COORDINATOR=host0:1234 NUM_NODES=N NODE_RANK=i   (i = 0 on host0)
#   and the processes join through jax.distributed.initialize (the training program's multi-host flags).
#   DRY_RUN=1              print the command instead of running it
#
# JAX drives all local GPUs from one process, so a single node needs no distributed setup at all.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//' | head -n -1 >&2; exit 2; }
[ $# -ge 2 ] || usage
CONFIG="$1"
WORKDIR="$2"
shift 2

# The package comes from this checkout; CONFIG and WORKDIR stay relative to the current folder.
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${MEM_FRACTION:-0.9}"

cmd=("$PYTHON" -m rlaif_jax.train "--config=$CONFIG" "--workdir=$WORKDIR")
if [ -n "${COORDINATOR:-}" ]; then
  : "${NUM_NODES:?COORDINATOR is set: also set NUM_NODES (processes in all) and NODE_RANK (the index of this node)}"
  : "${NODE_RANK:?COORDINATOR is set: also set NODE_RANK (0 on the coordinator host)}"
  cmd+=("--coordinator_address=$COORDINATOR" "--num_processes=$NUM_NODES" "--process_id=$NODE_RANK")
fi
cmd+=("$@")

if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
