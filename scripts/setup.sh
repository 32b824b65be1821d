#!/usr/bin/env bash
# Set up a virtual environment with everything mixgrpo needs, on a fresh machine.
# It pins a torch + torchvision pair that import together; on a GPU cluster with its own torch build, run
# it with MIXGRPO_TORCH=skip after installing that torch.
# PyPI's Linux torch wheels bundle CUDA (about 3 GB of nvidia-* wheels, even for the CPU quickstart); PyPI has no
# CPU-only build. Where the PyTorch CPU wheel index is reachable, point MIXGRPO_TORCH_INDEX at it to install the
# small CPU-only torch instead, e.g. MIXGRPO_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${MIXGRPO_TORCH:-cpu}" != "skip" ]; then
  # torchvision (needed by open_clip) only imports beside a matching torch build, so pin the pair.
  index=()
  if [ -n "${MIXGRPO_TORCH_INDEX:-}" ]; then index=(--index-url "$MIXGRPO_TORCH_INDEX"); fi
  python -m pip install -q "${index[@]}" "torch==${MIXGRPO_TORCH_VERSION:-2.14.1}" \
    "torchvision==${MIXGRPO_TORCHVISION_VERSION:-0.29.1}"
fi
python -m pip install -q -e ".[test]"
echo "mixgrpo installed in .venv (activate with: . .venv/bin/activate)"
