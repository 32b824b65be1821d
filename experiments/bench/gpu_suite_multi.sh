#!/usr/bin/env bash
# The multi-GPU benchmark batch on one host (NCCL, NVLink multicast off), logs and JSON to $OUT (default runs/bench).
#   bash experiments/bench/gpu_suite_multi.sh 4 sp rollout dit40    # GPU count, then any subset of the parts
#   bash experiments/bench/gpu_suite_multi.sh 4 learner-smoke scaling13b   # the colocated learner (issue 09)
set -uo pipefail
cd "$(dirname "$0")/../.."
n=$1; shift
out=${OUT:-runs/bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${MIXGRPO_SITE:-}" ]; then
  mkdir -p /tmp/mixgrpo-site && tar -xJf "$MIXGRPO_SITE" -C /tmp/mixgrpo-site && export PYTHONPATH=/tmp/mixgrpo-site:$PYTHONPATH
fi
nvidia-smi -L | tee "$out/gpus_$n.txt"; date -u | tee -a "$out/gpus_$n.txt"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$out/$name.log"; }
for part in "$@"; do
  case "$part" in
    sp)
      run sp_blocks_${n}gpu 150 torchrun --nproc-per-node "$n" experiments/bench/sp_blocks.py --iters 3 --out "$out/sp_blocks_${n}gpu.json"
      run sp_forward_${n}gpu 240 torchrun --nproc-per-node "$n" experiments/bench/sp_forward.py --iters 3 --out "$out/sp_forward_${n}gpu.json"
      python experiments/bench/sp_projection.py --blocks "$out/sp_blocks_${n}gpu.json" --forward "$out/sp_forward_${n}gpu.json" \
        --out "$out/sp_projection_${n}gpu.md" 2>&1 | tail -30 ;;
    rollout)
      workers=1; w=2; while [ "$w" -le "$n" ]; do workers="$workers,$w"; w=$((w * 2)); done   # 1,2,4,... up to n
      run rollout_throughput_${n}gpu 200 python experiments/bench/rollout_throughput.py --workers "$workers" --steps 8 --group 2 --prompts 8 ;;
    learner-smoke)  # tiny models through the colocated learner on all n GPUs: LoRA + HiF8 + KL + EMA, then FSDP + SSP
      run learner_smoke_lora_${n}gpu 150 python experiments/bench/iteration_scaling.py --tiny --gpus "$n" \
        --config osp_next_14b_hif8_videoalign --out "$out/learner_smoke_lora.json"
      run learner_smoke_fsdp_${n}gpu 150 python experiments/bench/iteration_scaling.py --tiny --gpus "$n" --sp "$n" \
        learner.sharding=fsdp --out "$out/learner_smoke_fsdp.json" ;;
    scaling13b)  # synthetic 1.3B, 480P, 33 frames, 8 prompts x 4 videos per iteration on 1, n, n/2 GPUs
      for g in 1 "$n" $((n / 2)); do
        run scaling13b_${g}gpu $((g == 1 ? 300 : 180)) python experiments/bench/iteration_scaling.py --gpus "$g" \
          --config osp_next_14b_hif8_videoalign --steps 4 --window 1 --out "$out/scaling13b_${g}gpu.json"
      done
      python experiments/bench/iteration_scaling.py --table "$out"/scaling13b_*gpu.json ;;
    dit40)
      run sp_forward40_${n}gpu 240 torchrun --nproc-per-node "$n" experiments/bench/sp_forward.py --layers 40 --full-blocks 8 \
        --modes dense-ulysses hybrid-ssp --warmup 1 --iters 2 --out "$out/sp_forward40_${n}gpu.json" ;;
  esac
done
