#!/usr/bin/env bash
# The README's first command on a fresh clone, timed: setup, then the main job, then what the run shows.
#
#   bash experiments/bench/newcomer_path.sh [REPO]      # REPO: a path or URL to clone (default: this checkout)
#
# The clone goes to a temporary folder that is removed at the end. The goal is setup + main job <= 5 minutes on
# 2 cores; the load average is printed because other work on the machine slows both phases.
set -euo pipefail
repo="${1:-$(cd "$(dirname "$0")/../.." && pwd)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/mixgrpo"
cd "$work/mixgrpo"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
bash scripts/setup.sh > setup.log 2>&1 || { tail -20 setup.log; exit 1; }
setup_done=$(date +%s)
.venv/bin/mixgrpo train > train.log 2>&1 || { tail -20 train.log; exit 1; }
end=$(date +%s)
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "setup $((setup_done - start)) s, mixgrpo train $((end - setup_done)) s, total $((end - start)) s"
.venv/bin/python - <<'PY'
import pandas as pd

metrics = pd.read_parquet("runs/quickstart/metrics.parquet")
reward = metrics["reward/mean"]
quarter = max(len(reward) // 4, 1)
print(f"training reward, last quarter over first: {reward.tail(quarter).mean() / reward.head(quarter).mean() - 1:+.1%}")
evals = pd.read_parquet("runs/quickstart/eval.parquet").groupby("iteration")["reward"].mean()
print(f"evaluation reward, base -> end: {evals.iloc[0]:.3f} -> {evals.iloc[-1]:.3f}")
print(f"ratio0 range: {metrics['ratio/first_step'].min():.4f} .. {metrics['ratio/first_step'].max():.4f}")
PY
