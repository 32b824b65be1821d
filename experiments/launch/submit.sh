#!/usr/bin/env bash
# Submit a Mix-GRPO run to a running Ray cluster (see docs/ray.md).
#
#   RAY_ADDRESS=http://127.0.0.1:8265 experiments/launch/submit.sh wan1.3b_mixgrpo \
#       rollout.num_workers=4 rollout.sp_size=2 --run-dir /shared/runs/wan13b
#
# The driver (controller + learner) needs a GPU: --entrypoint-num-gpus 1 places it on a GPU node and keeps the
# rollout workers off its GPU. Each rollout worker group then takes rollout.sp_size GPUs on one node.
# Resuming after a failure is the same command with --resume and the same --run-dir (on shared storage).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG [key=value ...] [--run-dir DIR] [--resume]" >&2
  exit 2
fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the job server address of the cluster, e.g. http://127.0.0.1:8265}"

CONFIG="$1"
shift
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"

# With token authentication on (RAY_AUTH_MODE=token on every node), the CLI sends the token from
# RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
exec ray job submit \
  --address "$RAY_ADDRESS" \
  --runtime-env experiments/launch/runtime_env.yaml \
  --entrypoint-num-gpus 1 \
  --entrypoint-num-cpus 4 \
  -- python -m mixgrpo train "$CONFIG" rollout.backend=ray "$@"
