#!/usr/bin/env bash
# Run the single-GPU benchmarks back to back on one machine, logging each to $OUT (default runs/bench).
#   bash experiments/bench/gpu_suite.sh hif8 rewards iteration   # any subset, in order
# Where ray / open_clip / diffusers are not installed, a tarball of them can be unpacked first:
#   MIXGRPO_SITE=.device-site.tar.xz bash experiments/bench/gpu_suite.sh ...
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-runs/bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${MIXGRPO_SITE:-}" ]; then
  mkdir -p /tmp/mixgrpo-site && tar -xJf "$MIXGRPO_SITE" -C /tmp/mixgrpo-site && export PYTHONPATH=/tmp/mixgrpo-site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
date -u | tee -a "$out/gpu.txt"
status=0
for part in "$@"; do
  case "$part" in
    hif8) python experiments/bench/hif8_overhead.py --json "$out/hif8.json" 2>&1 | tee "$out/hif8.log" ;;
    rewards) python experiments/bench/reward_throughput.py --device cuda 2>&1 | tee "$out/rewards.log" ;;
    iteration) python experiments/bench/iteration_time.py --device cuda 2>&1 | tee "$out/iteration.log" ;;
    dit) python experiments/bench/dit_speed.py --json "$out/dit.json" 2>&1 | tee "$out/dit.log" ;;
    *) echo "unknown part $part (hif8, rewards, iteration, dit)"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]:-0}" -eq 0 ] || status=1
done
exit $status
