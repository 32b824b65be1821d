"""Run input/output: what a run writes and how people read it back.

- ``runlog``: the run directory (config, metrics/samples/eval parquet, events, the lock)
- ``tracking``: TensorBoard / wandb / MLflow trackers and the console line
- ``media``: mp4s and contact sheets
- ``analysis``: ``load_run`` / ``load_runs`` as pandas DataFrames
- ``plots``, ``report``: reward curves and the ``mixgrpo report`` table
- ``export``: ``mixgrpo export`` to PEFT or diffusers folders

May import: ``mixgrpo.config`` and ``mixgrpo.engine.checkpoint`` (export reads checkpoints), ``policies``. Never
``mixgrpo.driver``.
"""
