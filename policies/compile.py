"""Regional torch.compile of a transformer: every block compiled on its own, the loop between blocks eager.

Where it sits in a policy's preparation: LAST, after gradient checkpointing, HiF8 (its quantize-dequantize is
the opaque custom op ``mixgrpo::hif8_qdq``), LoRA, sequence parallelism and FSDP have changed the blocks, so the
compiled code is the code that runs (FSDP2's per-block hooks and the SSP/Ulysses all-to-alls stay outside the
block graphs; activation checkpointing wraps the compiled block call). Compiling a block compiles its
``forward`` lazily, at the first call, so "compile time" is paid inside the first rollout and the first update.

Recompiles: blocks of one kind share one graph (parameters are graph inputs). A block is specialised once per
grad mode (rollouts run under no_grad, updates with grad) and per block kind; with ``dynamic=None`` the first
size change (rollout batch vs. update micro-batch) recompiles that dimension as dynamic once, after which no
size change recompiles. The recompile limit is raised so that these few variants per kind never exhaust it
(at the limit dynamo silently falls back to eager).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["CompileStats", "apply_compile", "compile_seconds", "maybe_compile", "resolve_compile"]

log = logging.getLogger(__name__)

_RECOMPILE_LIMIT = 64


def resolve_compile(setting: bool | str, device: torch.device | str) -> bool:
    """``policy.compile`` as a yes/no: ``auto`` compiles on CUDA only (CPU compile time rarely pays back)."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"policy.compile must be auto, true or false, got {setting!r}")


def compile_seconds() -> float:
    """Seconds this process has spent in dynamo/inductor compilation so far (all frames)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(sum(times) for name, times in compilation_time_metrics.items() if name == "_compile.compile_inner"))


@dataclass
class CompileStats:
    """Compile time seen around the transformer's calls; ``seconds`` grows only while something (re)compiles."""

    blocks: int = 0
    seconds: float = 0.0
    calls_that_compiled: int = 0
    _before: list[float] = field(default_factory=list, repr=False)


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(transformer).__name__} has no .blocks ModuleList to compile; set policy.compile=false")
    return list(blocks)


def apply_compile(transformer: nn.Module, *, backend: str = "inductor", dynamic: bool | None = None,
                  mode: str | None = None) -> CompileStats:
    """Compile each block of ``transformer.blocks`` in place (``nn.Module.compile``: names and state dict unchanged).

    Returns a :class:`CompileStats` (also at ``transformer.compile_stats``) that a forward hook keeps up to date
    and that logs one line each time a transformer call spent time compiling (the first rollout, the first update,
    and any recompile, which should not recur after the first iteration).
    """
    blocks = _blocks(transformer)
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), _RECOMPILE_LIMIT))
    for block in blocks:
        block.compile(backend=backend, dynamic=dynamic, mode=mode)
    stats = CompileStats(blocks=len(blocks))

    def before(module, args, kwargs):
        stats._before.append(compile_seconds())

    def after(module, args, kwargs, output):
        spent = compile_seconds() - stats._before.pop()
        if spent > 0:
            stats.seconds += spent
            stats.calls_that_compiled += 1
            log.info("torch.compile: %.1f s compiling %d blocks during this call (%.1f s in all, grad=%s)",
                     spent, len(blocks), stats.seconds, torch.is_grad_enabled())

    transformer.register_forward_pre_hook(before, with_kwargs=True)
    transformer.register_forward_hook(after, with_kwargs=True)
    transformer.compile_stats = stats
    return stats


def maybe_compile(transformer: nn.Module, setting: bool | str, device: torch.device | str) -> CompileStats | None:
    """:func:`apply_compile` when ``policy.compile`` (``setting``) resolves to true on ``device``, else nothing."""
    if not resolve_compile(setting, device):
        return None
    return apply_compile(transformer)


def time_first_call(fn, *args, **kwargs):
    """(result, wall seconds) of one call; for benchmarks reporting compile-inclusive first-call time."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
