"""Mix-GRPO: the algorithm, the loop, the CLI."""
