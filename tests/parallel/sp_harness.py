"""Run a function on N gloo ranks (forked CPU processes) and re-raise any rank's failure in the test."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.tensor  # noqa: F401  (see below)
import torch.multiprocessing as mp

# torch.testing.assert_close imports torch.distributed.tensor on first use once a process group exists; that
# import takes seconds. Importing it here, before forking, pays it once per session instead of once per rank.


def _entry(rank: int, world: int, store: str, fn, args) -> None:
    # One thread per rank: the ranks share a couple of cores, and forked OpenMP pools are not to be trusted.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` processes joined in one gloo group (file rendezvous)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        # fork: workers inherit the imported modules (starting takes milliseconds instead of seconds).
        mp.start_processes(_entry, args=(world, store, fn, args), nprocs=world, start_method="fork")
