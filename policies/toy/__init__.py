"""The toy world: procedural videos + captions, a tiny hybrid OSP-Next in pixel space, and its pretraining.

``build_toy_policy()`` returns the pretrained base that ``mixgrpo train`` post-trains by default;
``world`` holds the caption grammar, the renderer and the train / eval prompt lists.
"""

from policies.toy import world
from policies.toy.policy import ToyPolicyConfig, build_toy_policy, load_toy_policy, make_toy_policy, save_toy_policy

__all__ = ["ToyPolicyConfig", "build_toy_policy", "load_toy_policy", "make_toy_policy", "save_toy_policy", "world"]
