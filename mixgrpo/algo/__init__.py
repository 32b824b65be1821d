"""The algorithm, as pure functions and small objects: no processes, devices, files or models of its own.

- ``sde``: flow-matching SDE / ODE / DPM-Solver++ steps with their log-probabilities (fp32)
- ``sampler``: the mixed SDE/ODE sampler that turns a velocity function into a :class:`Trajectory`
- ``window``: the sliding-window schedulers that choose which denoising steps are SDE (and trained)
- ``advantages``: group-relative advantages from raw reward scores
- ``loss``: the clipped surrogate and KL terms

May import: torch, ``policies.base`` (the policy protocol). Never ``mixgrpo.engine``, ``mixgrpo.driver``,
``mixgrpo.results`` or ``mixgrpo.config`` (tests/core/test_layout.py checks it).
"""
