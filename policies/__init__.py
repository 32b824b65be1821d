"""Video diffusion models wrapped as flow-matching policies. Knows nothing about RL."""

from policies.base import FlowPolicy, Policy, PolicySpec

__all__ = ["FlowPolicy", "Policy", "PolicySpec"]
