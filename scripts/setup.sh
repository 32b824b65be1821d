#!/usr/bin/env bash
# Set up a virtual environment with everything mixgrpo needs, on a fresh machine.
# CPU machines get the CPU build of torch; on a GPU machine install your CUDA torch first, then run this
# with MIXGRPO_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${MIXGRPO_TORCH:-cpu}" != "skip" ]; then
  python -m pip install -q "torch==${MIXGRPO_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[test]"
echo "mixgrpo installed in .venv (activate with: . .venv/bin/activate)"
