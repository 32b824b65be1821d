"""A synthetic transformer built on the meta device and materialised after FSDP sharding holds, shard by shard,
exactly the values of an unsharded build (each rank writes its torch.chunk of every parameter); and `gathered`
lets ranks run different numbers of no-grad forwards (a rollout's) without hanging."""

from __future__ import annotations

import pytest
import torch

from policies.parallel.fsdp import apply_fsdp, full_tensor, gathered
from policies.synthetic import build_synthetic_policy, materialize_
from tests.parallel.sp_harness import run_ranks

pytestmark = pytest.mark.dist


def _build():
    return build_synthetic_policy(preset="tiny", num_frames=5, height=64, width=64, layout="dual_end",
                                  num_full_blocks=2, device="meta").transformer


def _check(rank, world):
    reference = materialize_(_build(), "cpu", seed=7)
    sharded = _build()
    apply_fsdp(sharded)
    materialize_(sharded, "cpu", seed=7)
    for (name, ref), (_, param) in zip(reference.named_parameters(), sharded.named_parameters()):
        assert torch.equal(full_tensor(param.detach()), ref.detach()), name
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(latents, torch.tensor([500.0]), text)
        with gathered(sharded):
            for _ in range(rank + 1):  # rank 0 runs one forward, rank 1 two: no collective may be left waiting
                out = sharded(latents, torch.tensor([500.0]), text)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_meta_built_transformer_materialises_the_same_values_sharded():
    run_ranks(_check, 2)
