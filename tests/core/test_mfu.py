import pytest

from mixgrpo.engine.mfu import PEAK_ENV, mfu, mfu_metrics, peak_flops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA B200", 2.25e15),
])
def test_known_cards(name, peak):
    assert peak_flops(name, env={}) == peak


def test_unknown_card_cpu_and_override():
    assert peak_flops("NVIDIA GeForce GT 710", env={}) is None
    assert peak_flops(None, env={}) is None
    assert peak_flops(None, env={PEAK_ENV: "1e15"}) == 1e15
    assert peak_flops("NVIDIA H100 80GB HBM3", env={PEAK_ENV: "5e14"}) == 5e14
    with pytest.raises(ValueError, match=PEAK_ENV):
        peak_flops("NVIDIA H100", env={PEAK_ENV: "fast"})


def test_mfu_values_and_absent_on_cpu():
    assert mfu(989.4e12 * 2 * 4 * 0.5, 2.0, ranks=4, peak=989.4e12) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, ranks=1, peak=None) is None
    got = mfu_metrics(flops={"rollout": 3e12, "update": 1e12}, seconds={"rollout": 1.0, "update": 1.0,
                      "iteration": 4.0}, ranks=2, peak=1e12)
    assert got == {"perf/mfu/rollout": 1.5, "perf/mfu/update": 0.5, "perf/mfu/iteration": 0.5}
    assert mfu_metrics(flops={"rollout": 3e12}, seconds={"rollout": 1.0, "iteration": 1.0}, ranks=1,
                       peak=None) == {}
