#!/usr/bin/env bash
# Set up a virtual environment with everything mixgrpo needs, on a fresh machine.
# It pins a torch + torchvision pair that import together; on a GPU cluster with its own torch build, run
# it with MIXGRPO_TORCH=skip after installing that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${MIXGRPO_TORCH:-cpu}" != "skip" ]; then
  # torchvision (needed by open_clip) only imports beside a matching torch build, so pin the pair.
  python -m pip install -q "torch==${MIXGRPO_TORCH_VERSION:-2.14.1}" "torchvision==${MIXGRPO_TORCHVISION_VERSION:-0.29.1}"
fi
python -m pip install -q -e ".[test]"
echo "mixgrpo installed in .venv (activate with: . .venv/bin/activate)"
