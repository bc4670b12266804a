"""The joint recipe (J8) with carried long-file rows and the fast-weight decay (issue 21, plan step 1).

Both models (the demo LM and the same LM plus J8's TTT block, from one seeded init) train on the same batches: a
batch is `clip_rows` independent rows of J8's kind (whole short repeat clips, synthetic copy clips, crops of plain
and repeat clips: `ClipMixBatcher`, every row from W_base) and `stream_rows` rows that read long files in consecutive
chunks of seq_len tokens with the fast weights carried from chunk to chunk (`moshi_ttt.ttt.carry`, through
`Trainer.train_on`'s new_file mask: a clip row restarts every batch, a stream row only when it starts a file). The
TTT block has `TTTConfig.decay` set, so it learns to read the decayed states it meets on long input. The fair
baseline ignores the mask (no TTT layer). Run one process per model (`--kind`); the batches are the same (seeded).

Data: a research/natural_mix.py directory (D/work, D/short, D/long), encoded with one codec.

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1; the two at once):
    python -m research.recipe_long_carry --data D --codec C --kind ttt --steps 1200 --decay 0.005 --save O
    python -m research.recipe_long_carry --data D --codec C --kind fair_baseline --steps 1200 --decay 0.005 --save O
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

from moshi_ttt import ttt_blocks  # noqa: E402
from moshi_ttt.data.checkpoints import load, save  # noqa: E402
from moshi_ttt.training.clip_mix import ClipMixBatcher, ClipMixConfig  # noqa: E402
from moshi_ttt.training.paired import pair_member, seeded_lm  # noqa: E402
from moshi_ttt.training.trainer import Trainer  # noqa: E402
from scripts.demo_lm_config import LM_CONFIG  # noqa: E402
from scripts.demo_recipe import JointRecipe, read_work, reading_losses  # noqa: E402


def fuzzy_copy_clip(rng: random.Random, length: int, noise: tuple[float, float], card: int = 256, n_q: int = 8):
    """`clip_mix.copy_clip`'s layout (a passage of random codes read three times, random filler between) with the
    2nd and 3rd readings changed as a natural repeat changes them: each code, with a probability q drawn per clip in
    `noise`, is replaced by the passage's code one frame before or after (half of them) or by a random code.

    Returns:
        Codes [n_q, <= length] (int64).
    """
    g = torch.Generator().manual_seed(rng.randrange(2**62))
    q = rng.uniform(*noise)
    passage = torch.randint(0, card, (n_q, rng.randint(57, 150)), generator=g)  # [n_q, P]
    parts = [torch.randint(0, card, (n_q, rng.randint(1, 12)), generator=g), passage]
    for _ in range(2):
        reading = fuzzed(passage, q, g, card)
        parts += [torch.randint(0, card, (n_q, rng.randint(19, 60)), generator=g), reading]
    return torch.cat(parts, dim=1)[:, :length]


def fuzzed(passage: torch.Tensor, q: float, g: torch.Generator, card: int = 256) -> torch.Tensor:
    """A later reading of `passage` [n_q, P] as a natural repeat gives it: each code, with probability q, replaced
    by the passage's code one frame before or after (half of them) or by a random code."""
    changed = torch.rand(passage.shape, generator=g) < q
    neighbour = torch.rand(passage.shape, generator=g) < 0.5
    step = torch.where(torch.rand(passage.shape, generator=g) < 0.5, -1, 1)
    cols = (torch.arange(passage.shape[1]) + step).clamp(0, passage.shape[1] - 1)  # [n_q, P]
    other = torch.where(neighbour, passage.gather(1, cols), torch.randint(0, card, passage.shape, generator=g))
    return torch.where(changed, other, passage)


class FuzzyCopyBatcher(ClipMixBatcher):
    """`ClipMixBatcher` whose copy rows are `fuzzy_copy_clip`s (the same draws otherwise)."""

    def __init__(self, short, long, cfg, noise: tuple[float, float]):
        super().__init__(short, long, cfg)
        self.noise = noise

    def copy_row(self, rng: random.Random, length: int) -> torch.Tensor:
        return fuzzy_copy_clip(rng, length, self.noise, self.card, self.n_q)


class CarryMixBatcher:
    """Batches of `clips.cfg.batch_size` independent clip rows and `rows` stream rows.

    Stream row r reads a long file's codes [8, T] chunk after chunk; at the end of its file it takes a random file
    from its start (flagged in new_file: its TTT state restarts from W_base). Rows start at a random chunk of a
    random file. Everything is drawn from one seeded random.Random: both processes see the same batches.
    """

    def __init__(self, clips: ClipMixBatcher, files: list[torch.Tensor], rows: int, chunk: int, seed: int):
        if rows and not files:
            raise ValueError("stream rows asked for but no long file was given")
        self.clips, self.files, self.chunk = clips, files, chunk
        self.rng = random.Random(seed + 7)
        self.cursor = []  # [file, position] per stream row
        for _ in range(rows):
            f = self.rng.randrange(len(files))
            self.cursor.append([f, self.rng.randrange(files[f].shape[1] // chunk) * chunk, True])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio codes [clip rows + stream rows, 8, chunk] and new_file [B] bool."""
        audio, _ = self.clips.next_batch()  # [C, 8, chunk]
        rows, new = [], []
        for c in self.cursor:
            if c[1] + self.chunk > self.files[c[0]].shape[1]:
                c[:] = [self.rng.randrange(len(self.files)), 0, True]
            rows.append(self.files[c[0]][:, c[1] : c[1] + self.chunk])
            new.append(c[2])
            c[1], c[2] = c[1] + self.chunk, False
        mask = torch.tensor([True] * audio.shape[0] + new)  # clip rows always restart
        return (torch.cat([audio, torch.stack(rows)]) if rows else audio), mask

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        raise NotImplementedError("no resume in this research recipe")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, nargs="+", required=True, help="research/natural_mix.py directories, encoded")
    p.add_argument("--codec", type=Path, required=True, help="the codec the data was encoded with (mimi_ref)")
    p.add_argument("--kind", choices=("ttt", "fair_baseline"), required=True)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--decay", type=float, default=0.005, help="TTTConfig.decay of the TTT block")
    p.add_argument("--clip-rows", type=int, default=4)
    p.add_argument("--stream-rows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=416)
    p.add_argument("--short-frac", type=float, default=0.45, help="of the clip rows")
    p.add_argument("--copy-frac", type=float, default=0.35, help="of the clip rows")
    p.add_argument("--decay-start", type=float, default=0.5)
    p.add_argument("--val", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--minutes", type=float, default=0.0, help="stop (and save) after this wall time; 0: no limit")
    p.add_argument(
        "--fit-minutes", type=float, default=0.0,
        help="set the steps (at most --steps) so that the TTT run ends in this wall time, from its speed over the "
        "first 20 steps (the warm-up: the schedule does not depend on the total yet); the TTT process writes them to "
        "SAVE/steps.txt and the baseline process waits for that file, so both run the same steps",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, required=True)
    p.add_argument(
        "--init", type=Path, help="start from INIT/<kind> (a saved pair of this recipe) instead of the seeded init"
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--mini-batch-size", type=int, help="the TTT block's mini_batch_size (default: the recipe's, 16)")
    p.add_argument("--base-lr", type=float, help="the TTT block's inner base_lr (default: the recipe's, 4)")
    p.add_argument("--inner", choices=("mlp", "linear"), help="the TTT block's inner model (default: mlp)")
    p.add_argument("--layers", help="the TTT block's layers, TTTConfig.layers (default: the recipe's, 0)")
    p.add_argument("--read", choices=("before", "after"), help="the TTT block reads the layer input before attention "
                   "or the residual after it (default: the recipe's, before)")  # fmt: skip
    p.add_argument("--heads", type=int, help="the TTT block's heads (default: the recipe's, 1)")
    p.add_argument("--copy-noise", type=float, nargs=2, metavar=("LO", "HI"),
                   help="fuzzy copy clips: the later readings' codes changed with a probability drawn in [LO, HI] "
                   "per clip (default: exact copies)")  # fmt: skip
    p.add_argument("--alpha", type=float, help="the TTT block's gate init (default: the recipe's, 0.1)")
    p.add_argument(
        "--mimi-ref", help="the codec reference written into the saved checkpoints (default: --codec, resolved); "
        "changes nothing else (scripts/build_demo_assets.py saves '../codec')",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    recipe = JointRecipe(
        steps=args.steps, batch_size=args.clip_rows, seq_len=args.seq_len, short_frac=args.short_frac,
        copy_frac=args.copy_frac, decay_start=args.decay_start, eval_every=args.eval_every, val=args.val,
    )  # fmt: skip
    for field in ("lr", "mini_batch_size", "base_lr", "inner", "layers", "read", "heads", "alpha"):
        if getattr(args, field) is not None:
            recipe = dataclasses.replace(recipe, **{field: getattr(args, field)})
    ttt_cfg = dataclasses.replace(recipe.ttt_config(), decay=args.decay)
    index, codes, short, files = {}, {}, {}, []
    for i, d in enumerate(args.data):
        if (d / "work" / "codes.safetensors").exists():
            part_index, part_codes = read_work(d / "work")
            index.update({f"{i}/{n}": v for n, v in part_index.items()})
            codes.update({f"{i}/{n}": c for n, c in part_codes.items()})
        if (d / "short" / "codes.safetensors").exists():
            short.update({f"{i}/{n}": c for n, c in read_work(d / "short")[1].items()})
        files += [torch.load(f).long() for f in sorted((d / "long").glob("long_*.pt"))]
    rep = [n for n, v in index.items() if v["kind"] == "repeat"]
    pla = [n for n, v in index.items() if v["kind"] == "plain"]
    val = {n: codes[n] for n in rep[-args.val :] + pla[-args.val :]}
    crops = [codes[n] for n in rep[: -args.val] + pla[: -args.val]]
    mix = ClipMixConfig(args.clip_rows, args.seq_len, args.short_frac, args.copy_frac, args.seed)
    if args.copy_noise is None:
        clips = ClipMixBatcher(list(short.values()), crops, mix)
    else:
        clips = FuzzyCopyBatcher(list(short.values()), crops, mix, tuple(args.copy_noise))
    source = CarryMixBatcher(clips, files, args.stream_rows, args.seq_len, args.seed)
    member = "ttt" if args.kind == "ttt" else "baseline"
    model = pair_member(member, seeded_lm(LM_CONFIG, args.seed), ttt_cfg, recipe.ttt_start(args.seed))
    if args.init is not None:
        start_from = load(str(args.init / args.kind)).model
        model.load_state_dict(start_from.state_dict(), strict=True)
    trainer = Trainer(model, source, recipe.train_config())
    tokens = sum(f.shape[1] for f in files)
    print(f"[{args.kind}] {len(short)} short clips, {len(crops)} crop clips, {len(val)} val clips, "
          f"{len(files)} long files ({tokens} tokens); decay {args.decay}", flush=True)  # fmt: skip
    history, losses, start = {}, [], time.time()
    while trainer.step_count < trainer.cfg.steps:
        losses.append(trainer.step())
        step = trainer.step_count
        if args.fit_minutes and step == 20:
            steps_file = args.save / "steps.txt"
            if args.kind == "ttt":
                per_step = (time.time() - start) / 20
                fitted = min(args.steps, int(0.92 * args.fit_minutes * 60 / per_step))
                args.save.mkdir(parents=True, exist_ok=True)
                steps_file.write_text(str(fitted))
            while not steps_file.exists():
                time.sleep(5)
            trainer.cfg = dataclasses.replace(trainer.cfg, steps=int(steps_file.read_text()))
            print(f"[{args.kind}] steps set to {trainer.cfg.steps} ({(time.time() - start) / 20:.2f} s per step)")
        if step == trainer.cfg.steps:
            args.steps = step
        if step % args.eval_every == 0 or step == args.steps:
            history[step] = reading_losses(model, val, index)
            gates = {i: round(float(torch.tanh(b.gating_alpha.detach()).abs().mean()), 3)
                     for i, b in ttt_blocks(model).items()}  # fmt: skip
            print(f"[{args.kind}] step {step} train {sum(losses[-20:]) / len(losses[-20:]):.4f} val "
                  f"{json.dumps({k: round(v, 4) for k, v in history[step].items()})} gate {gates} "
                  f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
        if args.minutes and time.time() - start > args.minutes * 60:
            print(f"[{args.kind}] stopped at the time limit after step {step} of {trainer.cfg.steps}", flush=True)
            break
    model.eval()
    args.save.mkdir(parents=True, exist_ok=True)
    save(
        args.save / args.kind,
        model,
        lm_config=LM_CONFIG,
        mimi_ref=args.mimi_ref or str(args.codec.resolve()),
        overwrite=True,
    )
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "val": history, "train_losses": losses,
              "steps_done": trainer.step_count, "seconds": time.time() - start}  # fmt: skip
    (args.save / f"{args.kind}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
