"""The per-rank engine: what one process (the local trainer, or one rank of a Ray worker group) runs.

- ``policy_factory``: builds the experiment's policy (the one place concrete policy kinds are named)
- ``rollout``: samples a request's prompt groups into trajectories and videos
- ``learner``: the update step (clipped surrogate over the window steps, optimizer, EMA, KL reference)
- ``worker``: one rank that samples and learns, and the local (in-process) worker set
- ``checkpoint``: atomic, checksummed checkpoint folders

May import: ``mixgrpo.algo``, ``mixgrpo.config`` (the experiment's sections), ``policies``, ``rewards``. Never
``mixgrpo.driver`` or ``mixgrpo.results``.
"""
