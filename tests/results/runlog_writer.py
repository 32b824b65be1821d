"""Subprocess for the concurrent-read test: logs ITERATIONS iterations into RUN_DIR with short sleeps."""

import sys
import time

from mixgrpo.results.runlog import RunLog

run_dir, iterations = sys.argv[1], int(sys.argv[2])
log = RunLog(run_dir)
log.write_config({"train": {"lr": 1e-4}})
for it in range(iterations):
    log.log_samples(
        [
            {"iteration": it, "prompt": f"p{g}", "group": g, "seed": g, "sample": s, "reward": 0.1 * it,
             "reward/toy": 0.1 * it, "advantage": 0.0}
            for g in range(2)
            for s in range(2)
        ]
    )
    log.log_metrics({"iteration": it, "reward/mean": 0.1 * it, "loss": 1.0 / (1 + it)})
    time.sleep(0.01)
log.close()
