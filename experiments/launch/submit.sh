#!/usr/bin/env bash
# Submit a Mix-GRPO run to a running Ray cluster as a Ray job (see docs/ray.md).
#
#   RAY_ADDRESS=http://127.0.0.1:8265 experiments/launch/submit.sh [--gpus N] [--cpus N] [--no-wait] CONFIG \
#       [key=value ...] [--run-dir DIR] [--resume]
#
# CONFIG is a shipped config (quickstart, osp_next_14b_videoalign, wan1.3b_mixgrpo, ...) or a YAML file of this
# repository. The driver is a controller on the CPU (the worker groups hold the models), so by default it asks the
# cluster for 1 CPU and no GPU; --gpus N reserves GPUs for it (rewards that run inside the driver on a GPU).
# rollout.backend=ray is added unless the overrides say otherwise; the toy world runs on CPUs:
#   experiments/launch/submit.sh quickstart rollout.num_workers=2 --run-dir /shared/runs/quickstart
# Without --no-wait the script follows the job's log until it ends; it exits 1 if the job failed, else 0 (Ray's
# `ray job submit` reports a stopped job as 0).
# Resuming after a failure is the same command with --resume and the same --run-dir (on shared storage).
# Token authentication: the client needs RAY_AUTH_MODE=token as well as the token (RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); RAY_AUTH_MODE defaults to token here.
set -euo pipefail

usage() { echo "usage: $0 [--gpus N] [--cpus N] [--no-wait] CONFIG [key=value ...] [--run-dir DIR] [--resume]" >&2; exit 2; }
gpus=0 cpus=1 wait=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) [[ $# -ge 2 ]] || usage; gpus=$2; shift 2 ;;
    --cpus) [[ $# -ge 2 ]] || usage; cpus=$2; shift 2 ;;
    --no-wait) wait=0; shift ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage
[[ "$1" != -* ]] || { echo "$0: CONFIG comes first after the script's own options (--gpus, --cpus, --no-wait), got '$1'" >&2; usage; }
for value in "$gpus" "$cpus"; do
  [[ "$value" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "$0: --gpus and --cpus take a number, got '$value'" >&2; exit 2; }
done
: "${RAY_ADDRESS:?set RAY_ADDRESS to the job server address of the cluster, e.g. http://127.0.0.1:8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

CONFIG="$1"
shift
cd "$(dirname "$0")/../.."
backend=(rollout.backend=ray)
for arg in "$@"; do [[ "$arg" == rollout.backend=* ]] && backend=(); done

exec ray job submit \
  --address "$RAY_ADDRESS" \
  --runtime-env experiments/launch/runtime_env.yaml \
  --entrypoint-num-cpus "$cpus" \
  --entrypoint-num-gpus "$gpus" \
  $([[ $wait == 1 ]] || echo --no-wait) \
  -- python -m mixgrpo train "$CONFIG" "${backend[@]}" "$@"
