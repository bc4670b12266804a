"""The outer loop (imported by module, nothing re-exported here).

- `trainer`: `Trainer` and `TrainConfig` (AdamW on the audio loss, exact resume);
- `schedule`: `LrSchedule` (warm-up, hold, cosine decay: one formula);
- `paired`: a TTT model and its fair baseline from one init, on the same batches for the same steps;
- `data`: files read in order with carried TTT state (`CodeBatcher`), code caching, the `BatchSource` protocol;
- `clip_mix`: batches of independent clips (short clips, crops, synthetic copy clips) for recipes from scratch.
- `run_dir`: the CLI's output folder: saves stamped with their step, the checks before a new run or a resume.

The command line is `python -m moshi_ttt.train`.
"""
