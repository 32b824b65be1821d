"""Seeds of one configuration aggregated (mean and spread across seeds), and what the reward plots draw: a mean +- std
band, integer iteration ticks, and a rolling mean even on short runs."""

import numpy as np
import pytest
from matplotlib.ticker import MaxNLocator
from results_synthetic import write_synthetic_run

from mixgrpo import analysis, plots


@pytest.fixture
def seeds_of_two_configs(tmp_path):
    paths = {f"lr{lr}_s{seed}": write_synthetic_run(tmp_path / f"lr{lr}_s{seed}", lr=lr, seed=seed, iterations=6,
                                                     videos=False)
             for lr in (1e-4, 3e-4) for seed in (0, 1, 2)}
    return analysis.load_runs(paths)


def test_runs_that_differ_only_by_seed_form_one_configuration(seeds_of_two_configs):
    groups = seeds_of_two_configs.configurations()
    assert sorted(groups) == ["train.lr=0.0001", "train.lr=0.0003"]
    assert all(len(runs) == 3 for runs in groups.values())
    aggregated = {run.name: run for run in seeds_of_two_configs.aggregate_seeds()}
    assert sorted(aggregated) == ["train.lr=0.0001 (3 seeds)", "train.lr=0.0003 (3 seeds)"]
    low = aggregated["train.lr=0.0001 (3 seeds)"].metrics.set_index("iteration")
    members = [r.metrics.set_index("iteration")["reward/mean"] for r in groups["train.lr=0.0001"]]
    np.testing.assert_allclose(low["reward/mean"], np.mean(members, axis=0), rtol=1e-12)
    np.testing.assert_allclose(low["reward/mean@seed_std"], np.std(members, axis=0, ddof=1), rtol=1e-9)
    assert (low["reward/mean@seed_std"] > 0).all() and (low["seeds"] == 3).all()


def test_run_names_and_trackers_do_not_split_seeds_of_one_configuration(tmp_path):
    paths = [write_synthetic_run(tmp_path / f"s{seed}", seed=seed, iterations=3, videos=False,
                                 tracking={"run_name": f"sweep-seed{seed}", "backends": backends})
             for seed, backends in ((0, []), (1, ["tensorboard"]))]
    paths.append(write_synthetic_run(tmp_path / "lr", lr=1e-3, iterations=3, videos=False,
                                     tracking={"run_name": "other"}))
    runs = analysis.load_runs(paths)
    assert "config.tracking.run_name" in runs.varying
    groups = runs.configurations()
    assert sorted(groups) == ["train.lr=0.0001", "train.lr=0.001"]
    assert [r.name for r in groups["train.lr=0.0001"]] == ["s0", "s1"]


def _figure_of(monkeypatch):
    drawn = {}
    original = plots._save

    def keep(fig, path):
        drawn["fig"] = fig
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return drawn


def test_reward_plot_draws_a_band_integer_ticks_and_a_rolling_mean_on_a_short_run(tmp_path, monkeypatch):
    drawn = _figure_of(monkeypatch)
    run = analysis.load_run(write_synthetic_run(tmp_path / "short", iterations=4, videos=False))
    plots.plot_reward_curves(run, tmp_path / "curves.png")
    ax = drawn["fig"].axes[0]
    assert ax.get_title() == "reward/mean"
    assert len(ax.collections) == 1  # the band: reward/mean +- reward/std
    band = ax.collections[0].get_paths()[0].vertices
    mean, std = run.metrics["reward/mean"].to_numpy(), run.metrics["reward/std"].to_numpy()
    assert band[:, 1].max() == pytest.approx((mean + std).max()) and band[:, 1].min() == pytest.approx((mean - std).min())
    raw, smooth = ax.lines
    assert not np.allclose(raw.get_ydata(), smooth.get_ydata())  # a real rolling mean even with 4 iterations
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    ax.figure.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_aggregated_seeds_plot_one_curve_per_configuration_with_the_seed_band(seeds_of_two_configs, tmp_path,
                                                                             monkeypatch):
    drawn = _figure_of(monkeypatch)
    plots.plot_reward_curves(seeds_of_two_configs.aggregate_seeds(), tmp_path / "seeds.png")
    ax = drawn["fig"].axes[0]
    assert len(ax.collections) == 2 and len(ax.lines) == 4  # per configuration: a band, raw and smoothed lines
    labels = [line.get_label() for line in ax.lines if not line.get_label().startswith("_")]
    assert labels == ["train.lr=0.0001 (3 seeds)", "train.lr=0.0003 (3 seeds)"]
