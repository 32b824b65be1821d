"""analysis (load_run/load_runs/tables), plots and `mixgrpo report` on synthetic runs written with RunLog."""

import shutil

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
from results_synthetic import PROMPTS, TRENDS, write_synthetic_run

from mixgrpo import analysis, plots
from mixgrpo.results.report import default_out_dir, main
from mixgrpo.results.runlog import RunLog


def test_load_run_frames_config_events(synthetic_run):
    run = analysis.load_run(synthetic_run)
    assert run.name == "synthetic" and run.config["train"]["lr"] == 1e-4
    assert len(run.metrics) == 12 and run.metrics["iteration"].dtype == "int64"
    assert len(run.samples) == 12 * 6 and set(run.samples["prompt"]) == set(PROMPTS)
    with_video = run.samples[run.samples["video_path"] != ""]
    assert len(with_video) == 6 and all(run.video(p).is_file() for p in with_video["video_path"])
    assert run.events["kind"].tolist() == ["warning"] and str(run.events["time"].dt.tz) == "UTC"


def test_events_skip_a_line_being_written(synthetic_run):
    with open(synthetic_run / "events.jsonl", "a") as f:
        f.write('{"time": "2026-01-01T00:00:00+00:00", "kind": "fa')
    assert analysis.load_run(synthetic_run).events["kind"].tolist() == ["warning"]


@pytest.mark.parametrize("missing", ["config.yaml", "metrics.parquet", "samples.parquet"])
def test_not_a_run_directory_names_the_missing_file(synthetic_run, missing):
    (synthetic_run / missing).unlink()
    with pytest.raises(ValueError, match=rf"not a run directory: {missing} is missing"):
        analysis.load_run(synthetic_run)


def test_load_runs_concatenates_with_flattened_config(tmp_path):
    a = write_synthetic_run(tmp_path / "a", lr=1e-4, videos=False)
    b = write_synthetic_run(tmp_path / "b", lr=3e-4, iterations=8, videos=False, seed=1)
    runs = analysis.load_runs([a, b])
    assert runs.metrics.columns[0] == "run"
    assert runs.metrics.groupby("run").size().to_dict() == {"a": 12, "b": 8}
    assert runs.metrics.groupby("run")["config.train.lr"].unique().map(list).to_dict() == {"a": [1e-4], "b": [3e-4]}
    assert runs.samples.groupby("config.train.lr").size().to_dict() == {1e-4: 72, 3e-4: 48}
    assert runs.varying == ["config.train.lr", "config.train.iterations", "config.train.seed"]
    assert runs.configs.loc["a", "config.rewards"] == '[{"name": "toy"}, {"name": "motion"}]'
    # Same folder name under different parents: names are made unique, not merged.
    c = write_synthetic_run(tmp_path / "other" / "a", videos=False)
    assert [r.name for r in analysis.load_runs([a, c]).runs] == [f"{tmp_path.name}/a", "other/a"]


def test_per_prompt_improvement_signs_and_values(synthetic_run):
    table = analysis.per_prompt_improvement(synthetic_run)
    by_prompt = table.set_index("prompt")
    # first quarter = iterations 0..2 (mean 1), last = 9..11 (mean 10): delta = 9 * trend per iteration.
    for prompt, trend in zip(PROMPTS, TRENDS):
        assert by_prompt.loc[prompt, "delta"] == pytest.approx(9 * trend, abs=0.005)
        assert by_prompt.loc[prompt, ["n_first", "n_last"]].tolist() == [6, 6]
    assert table["prompt"].tolist() == list(PROMPTS)  # sorted by delta, best first
    assert np.sign(table["improvement_pct"]).tolist() == [1, 1, -1]
    with pytest.raises(ValueError, match="first is the fraction"):
        analysis.per_prompt_improvement(synthetic_run, first=3)
    with pytest.raises(ValueError, match=r"choose one of \['reward', 'reward/toy'"):
        analysis.per_prompt_improvement(synthetic_run, reward="pickscore")


def test_window_breakdown_and_compare_runs(tmp_path):
    a = write_synthetic_run(tmp_path / "a", videos=False)
    b = write_synthetic_run(tmp_path / "b", iterations=8, videos=False)
    table = analysis.window_breakdown(a)
    assert table.index.tolist() == [0, 1, 2, 3] and table["iterations"].tolist() == [3, 3, 3, 3]
    # window start 0 holds iterations 0, 4, 8: loss = 1/(1+it).
    assert table.loc[0, "loss"] == pytest.approx(np.mean([1, 1 / 5, 1 / 9]))
    assert (table["reward/next_delta"] > 0).all()

    wide = analysis.compare_runs([a, b], "loss")
    assert wide.shape == (12, 2) and wide["b"].isna().sum() == 4
    assert wide.loc[3, "a"] == pytest.approx(0.25)
    smooth = analysis.compare_runs([a, b], "loss", window=2)
    assert smooth.loc[1, "a"] == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError, match="'nope' is not logged"):
        analysis.compare_runs([a], "nope")


def test_plots_write_pngs(tmp_path, synthetic_run):
    run = analysis.load_run(synthetic_run)
    curves = iio.imread(plots.plot_reward_curves([run], tmp_path / "r.png"))
    single = iio.imread(plots.plot_curves(run, ["loss"], tmp_path / "l.png"))
    assert curves.shape[1] > 2 * single.shape[1]  # three reward panels side by side vs one
    empty = analysis.per_prompt_improvement(run).assign(delta=np.nan)
    assert plots.plot_per_prompt_improvement(empty, tmp_path / "e.png").stat().st_size > 0
    with pytest.raises(ValueError, match="per_prompt_improvement"):
        plots.plot_per_prompt_improvement(pd.DataFrame({"x": [1]}), tmp_path / "bad.png")


def test_component_columns_get_their_own_panel(tmp_path, synthetic_run):
    run = analysis.load_run(synthetic_run)
    plain = iio.imread(plots.plot_reward_curves([run], tmp_path / "plain.png"))
    parts = {f"reward/toy/{c}/mean": run.metrics["reward/toy/mean"] * w for c, w in (("colour", 0.9), ("shape", 1.1))}
    run.metrics = run.metrics.assign(**parts)
    assert plots.reward_metrics([run]) == ["reward/mean", "reward/motion/mean", "reward/toy/mean"]
    assert plots.reward_components([run]) == {"reward/toy/mean": ["reward/toy/colour/mean", "reward/toy/shape/mean"]}
    with_parts = iio.imread(plots.plot_reward_curves([run], tmp_path / "parts.png"))
    # Three reward panels in a row, then one shared panel for both components on a second row.
    assert with_parts.shape[1] == plain.shape[1] and with_parts.shape[0] > 1.5 * plain.shape[0]
    assert "reward/toy/colour/mean" in analysis.window_breakdown(run).columns


def test_report_writes_plots_and_table(tmp_path, capsys, synthetic_run_template):
    a = shutil.copytree(synthetic_run_template, tmp_path / "a")
    b = write_synthetic_run(tmp_path / "b", lr=3e-4, iterations=8, videos=False)
    out = tmp_path / "out"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "config.train.lr" in printed and "events in a: 1 warning" in printed
    expected = {"summary.csv", "reward_curves.png", "diagnostics.png", "a_prompts.csv", "a_prompts.png",
                "a_window.png", "a_samples.png", "b_prompts.csv", "b_prompts.png", "b_window.png"}
    assert {p.name for p in out.iterdir()} == expected
    for png in out.glob("*.png"):
        assert iio.imread(png).std() > 1, png.name  # drawn, not blank
    summary = pd.read_csv(out / "summary.csv").set_index("run")
    assert summary.loc["a", "iterations"] == 12 and summary.loc["b", "nfe_per_iter"] == 20
    assert summary.loc["a", "improvement_pct"] > 0
    assert default_out_dir([a]) == a / "report" and default_out_dir([a, b]) == tmp_path.resolve() / "report"


def test_report_bad_path_fails_clearly(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("a: 1\n")
    assert main([str(tmp_path / "half")]) == 2
    assert "metrics.parquet is missing" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_report_on_a_run_that_has_not_logged_yet(tmp_path, capsys):
    RunLog(tmp_path / "fresh").write_config({"train": {"lr": 1e-4}})
    assert main([str(tmp_path / "fresh")]) == 0
    assert "fresh" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "fresh" / "report" / "summary.csv")["iterations"].tolist() == [0]
    assert (tmp_path / "fresh" / "report" / "reward_curves.png").is_file()
    columns = analysis.load_runs(str(tmp_path / "fresh")).metrics.columns.tolist()
    assert columns == ["run", "iteration", "config.train.lr"]
