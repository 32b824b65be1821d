from reward_fixtures import tiny_open_clip, tiny_pickscore  # noqa: F401  (fixtures of the reward tests)
