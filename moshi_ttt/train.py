"""Command line of the outer-loop training (`moshi_ttt.training`): TTT layers (optionally all weights) trained on
audio codes, with a learning-rate schedule, optionally a fair baseline trained beside them, and exact resume.

Each file is read in chunks, in order; the TTT state is carried from chunk to chunk (detached) and restarts from
the *current* W_base at file boundaries (`moshi_ttt.ttt.carry`). Attention sees one chunk at a time, so whatever
the model remembers across chunks, it remembers through the fast weights. With --fair-baseline the --init model
without TTT layers trains too, on the same batches for the same steps (`moshi_ttt.training.paired`).

Training files are mono: a stereo file is a dialogue to evaluation (left Moshi, right user), and training on
dialogues is not supported, so it is refused. A resume continues the run in --out as it was started: other settings
(but a longer --steps under a constant lr, or --save-every), other data or other TTT flags are refused.

CLI: python -m moshi_ttt.train --init CKPT (--audio FILE... | --manifest JSONL | --codes F...) --out DIR
     [--ttt-layers middle] [--steps N] [--warmup-steps N --lr-decay cosine --decay-start 0.5]
     [--train-all --fair-baseline] [--resume]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from pathlib import Path

from moshi_ttt.config import TTTConfig, parse_layers
from moshi_ttt.data.checkpoints import LoadedCheckpoint, load
from moshi_ttt.evaluate import UsageError, read_manifest
from moshi_ttt.training.data import cached_codes, read_codes
from moshi_ttt.training.paired import FairPair, PairedTrainer, TTTStart, add_ttt, fair_pair
from moshi_ttt.training.run_dir import FAIR_BASELINE, check_new_run, check_resumable, save_member
from moshi_ttt.training.schedule import DECAYS, LrSchedule
from moshi_ttt.training.trainer import (  # noqa: F401  (the library's names, importable from here as before)
    FAST_WEIGHT_NAMES,
    STATE_JSON,
    STATE_TENSORS,
    TrainConfig,
    Trainer,
    audio_loss,
    param_groups,
)
from moshi_ttt.ttt.apply import ttt_blocks

logger = logging.getLogger(__name__)

# The TTT flags (argparse dest -> TTTConfig field): they build the TTTConfig of a new run's layers; over a checkpoint
# with TTT layers (--resume, or such an --init), each one given must match its config.
TTT_FLAGS = {"ttt_layers": "layers", "mini_batch_size": "mini_batch_size", "base_lr": "base_lr",
             "gating_alpha_init": "gating_alpha_init", "share_qk": "share_qk", "conv_kernel": "conv_kernel",
             "inner": "inner"}  # fmt: skip


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where it has one (not for flags and options without a value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    """The command line's options, in groups (`--help`)."""
    p = argparse.ArgumentParser(
        prog="python -m moshi_ttt.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--init", required=True, help="checkpoint to start from (ours, moshi's or hf://...)")
    p.add_argument("--out", required=True, type=Path, help="output directory (checkpoint, state, code cache)")
    data = p.add_argument_group("training data (one of)").add_mutually_exclusive_group(required=True)
    data.add_argument("--audio", nargs="+", type=Path, help="mono audio files (encoded once with the codec)")
    data.add_argument("--manifest", type=Path,
                      help='JSONL in moshi-finetune\'s layout, one {"path": ...} a line; mono files only')  # fmt: skip
    data.add_argument("--codes", nargs="+", help="safetensors files of audio codes [8, T] (key 'codes')")

    ttt = p.add_argument_group("TTT layers (applied when --init has none)")
    ttt.add_argument("--ttt-layers", help="the layers to wrap, e.g. middle, all or 0,3")
    ttt.add_argument("--mini-batch-size", type=int, default=TTTConfig.mini_batch_size, help="inner-loop tokens")
    ttt.add_argument("--base-lr", type=float, default=TTTConfig.base_lr, help="inner-loop learning rate")
    ttt.add_argument("--gating-alpha-init", type=float, default=TTTConfig.gating_alpha_init, help="gate alpha")
    ttt.add_argument("--share-qk", action="store_true", help="q and k from one projection + causal convolutions")
    ttt.add_argument("--conv-kernel", type=int, default=TTTConfig.conv_kernel, help="with --share-qk")
    ttt.add_argument("--inner", choices=("mlp", "linear"), default=TTTConfig.inner, help="TTT-MLP or TTT-Linear")

    opt = p.add_argument_group("outer loop (AdamW)")
    opt.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps (the schedule's span)")
    opt.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="files read side by side")
    opt.add_argument("--chunk-size", type=int, default=TrainConfig.chunk_size, help="tokens per forward")
    opt.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    opt.add_argument("--weight-lr-multiplier", type=float, default=TrainConfig.weight_lr_multiplier,
                     help="times --lr for W_base")  # fmt: skip
    opt.add_argument("--alpha-lr-multiplier", type=float, default=TrainConfig.alpha_lr_multiplier,
                     help="times --lr for the gate alpha")  # fmt: skip
    opt.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay, help="AdamW weight decay")
    opt.add_argument("--adam-betas", type=float, nargs=2, default=TrainConfig.betas, metavar=("B1", "B2"),
                     help="AdamW moment decays")  # fmt: skip
    opt.add_argument("--grad-clip", type=float, default=TrainConfig.grad_clip, help="max gradient norm; 0: none")
    opt.add_argument("--train-all", action="store_true", help="also train the base model's weights")
    opt.add_argument("--seed", type=int, default=TrainConfig.seed, help="file order and the TTT layers' init")

    schedule = p.add_argument_group("learning-rate schedule (moshi_ttt.training.schedule)")
    schedule.add_argument("--warmup-steps", type=int, default=LrSchedule.warmup_steps, help="linear warm-up; 0: none")
    schedule.add_argument("--lr-decay", choices=DECAYS, default=LrSchedule.decay, help="after the peak")
    schedule.add_argument("--decay-start", type=float, default=LrSchedule.decay_start,
                          help="with --lr-decay cosine: share of the steps held at the peak first")  # fmt: skip

    pair = p.add_argument_group("fair baseline (moshi_ttt.training.paired)")
    pair.add_argument(
        "--fair-baseline", action="store_true",
        help=f"also train --init without TTT layers (needs --ttt-layers and --train-all) on the same batches for the "
        f"same steps, from the same weights; saved in OUT/{FAIR_BASELINE}/",
    )  # fmt: skip

    out = p.add_argument_group("saving and resuming")
    out.add_argument("--save-every", type=int, default=TrainConfig.save_every, help="steps between saves (0: end)")
    out.add_argument("--resume", action="store_true",
                     help="continue the run in --out with its settings and data (a longer --steps under a constant "
                     "lr and --save-every may change)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        trainer, loaded = _build(args, _given_flags(argv))

        def save_all(trainer: Trainer | PairedTrainer) -> None:
            """What --resume reads: checkpoint and training state (of both models with --fair-baseline)."""
            if isinstance(trainer, PairedTrainer):
                _save(args.out / FAIR_BASELINE, trainer.baseline, loaded)
                trainer = trainer.ttt
            _save(args.out, trainer, loaded)

        losses = trainer.run(progress=True, save=save_all)
        save_all(trainer)
    except (ValueError, OSError, KeyError, UsageError) as e:  # OSError: FileNotFoundError, a folder given as file
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = losses[-1] if losses else None
    summary = {"steps": trainer.step_count, "last_loss": last}
    if isinstance(trainer, PairedTrainer):
        summary.update(last_loss=last and last.ttt, fair_baseline_last_loss=last and last.baseline)
    summary = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
    print(json.dumps(summary, allow_nan=False))  # NaN as null: JSON has no NaN
    return 0


def _save(directory: Path, trainer: Trainer, loaded: LoadedCheckpoint) -> None:
    save_member(directory, trainer, loaded)


def _given_flags(argv: list[str] | None) -> set[str]:
    """The dests of the options given on the command line (not left at their defaults)."""
    p = parser()
    for action in p._actions:  # argparse's own list; SUPPRESS leaves an option out of the namespace when not given
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _check_ttt_flags(args, given: set[str], loaded: LoadedCheckpoint) -> None:
    """On --resume, or from an --init that has TTT layers: the TTT flags given must be that checkpoint's (its layers
    are trained as they are; a flag that differs would be ignored, then refused at the resume)."""
    saved = loaded.ttt_config
    flags = [dest for dest in TTT_FLAGS if dest in given]
    if flags and saved is None:
        raise ValueError(f"the run in {args.out} has no TTT layers; drop --{flags[0].replace('_', '-')} to resume it")
    source = "the saved run's" if args.resume else f"--init {args.init}'s"
    differ = []
    for dest in flags:
        now, then = getattr(args, dest), getattr(saved, TTT_FLAGS[dest])
        if dest == "ttt_layers":
            count = len(loaded.model.transformer.layers)
            now, then = parse_layers(now, count), parse_layers(then, count)
        if now != then:
            differ.append(f"--{dest.replace('_', '-')}: {then} then, {now} now")
    if differ:
        raise ValueError(f"the TTT flags must be {source} TTT layers; these differ: {'; '.join(differ)}")


def _build(args, given: set[str]) -> tuple[Trainer | PairedTrainer, LoadedCheckpoint]:
    """The trainer of the CLI: model(s) from --init (or the saved checkpoints on --resume), data, config."""
    if args.fair_baseline and not args.train_all:
        raise ValueError("--fair-baseline needs --train-all: the fair baseline has only the base weights to train")
    if args.resume:
        check_resumable(args.out, args.fair_baseline)
    else:
        check_new_run(args.out)
    loaded = load(args.out / "checkpoint" if args.resume else args.init, load_mimi=args.codes is None)
    if args.resume or ttt_blocks(loaded.model):
        _check_ttt_flags(args, given, loaded)
    if args.codes is not None:
        files = [read_codes(path) for path in args.codes]
    else:
        if loaded.mimi is None:
            raise ValueError(f"{args.init} names no codec to encode audio with; pass --codes instead")
        paths = args.audio if args.audio is not None else read_manifest(args.manifest)
        files = cached_codes(paths, loaded.mimi, str(loaded.mimi_ref), args.out / "codes_cache")
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, chunk_size=args.chunk_size, lr=args.lr,
        weight_lr_multiplier=args.weight_lr_multiplier, alpha_lr_multiplier=args.alpha_lr_multiplier,
        weight_decay=args.weight_decay, betas=tuple(args.adam_betas),
        schedule=LrSchedule(warmup_steps=args.warmup_steps, decay=args.lr_decay, decay_start=args.decay_start),
        grad_clip=args.grad_clip, train_all=args.train_all, seed=args.seed, save_every=args.save_every,
    )  # fmt: skip
    ttt_cfg = None
    if args.ttt_layers:
        ttt_cfg = TTTConfig(**{field: getattr(args, dest) for dest, field in TTT_FLAGS.items()})
    if not args.fair_baseline:
        if ttt_cfg is not None and not ttt_blocks(loaded.model) and not args.resume:
            add_ttt(loaded.model, ttt_cfg, TTTStart(seed=args.seed))
        trainer = Trainer(loaded.model, files, cfg)
        if args.resume:
            trainer.load_state(args.out / "state")
        return trainer, loaded
    if args.resume:
        baseline = load(args.out / FAIR_BASELINE / "checkpoint", load_mimi=False).model
        trainer = PairedTrainer(FairPair(loaded.model, baseline), files, cfg)
        trainer.load_state(args.out / "state", args.out / FAIR_BASELINE / "state")
        return trainer, loaded
    if ttt_cfg is None or ttt_blocks(loaded.model):
        raise ValueError("--fair-baseline needs --ttt-layers and an --init without TTT layers (the fair baseline)")
    base = loaded.model
    pair = fair_pair(lambda: copy.deepcopy(base), ttt_cfg, TTTStart(seed=args.seed))
    return PairedTrainer(pair, files, cfg), loaded


if __name__ == "__main__":
    sys.exit(main())
