"""The driver: the controller process that runs the loop and holds no model on a GPU of its own.

- ``trainer``: ``Trainer.run``, rollout -> score -> advantages -> update -> log -> checkpoint
- ``prompts``: prompt sources (toy world, text and JSONL files) as records
- ``preflight``: checks of a whole experiment before the run directory is made or any model loads
- ``ray_workers``: N worker groups x S ranks as Ray actors in one torch.distributed world

May import anything of ``mixgrpo`` except the CLI; nothing but the CLI imports it.
"""
