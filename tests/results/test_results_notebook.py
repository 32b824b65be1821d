"""experiments/analysis.ipynb executes headlessly on a synthetic run and shows curves, tables and a video."""

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "experiments" / "analysis.ipynb"


def test_analysis_notebook_runs(synthetic_run, tmp_path, monkeypatch):
    from results_synthetic import write_synthetic_run

    monkeypatch.setenv("MIXGRPO_RUN_DIR", str(synthetic_run))
    others = [write_synthetic_run(tmp_path / f"seed{s}", seed=s, iterations=4, videos=False) for s in (1, 2)]
    monkeypatch.setenv("MIXGRPO_COMPARE_RUNS", ",".join(str(p) for p in others))
    # The kernelspec launches `python`: make that this interpreter, whichever way pytest was started.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it clean"
    # Raises CellExecutionError (with the traceback) if any cell fails.
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    kinds = [key for out in outputs for key in out.get("data", {})]
    # rewards, diagnostics, prompts, window, training-samples sheet, evaluation sheet, the runs compared
    assert kinds.count("image/png") == 7
    html = "".join(out["data"].get("text/html", "") for out in outputs if "data" in out)
    assert html.count("data:video/mp4;base64,") == 2 and "a red ball bouncing" in html and "end_00_eval.mp4" in html
    assert (synthetic_run / "report" / "reward_curves.png").is_file()
