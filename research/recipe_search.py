"""Short training runs of TTT recipes on the demo baseline, each against a fair baseline (same steps, same data).

Research script for issue 13 (numbers in demo_assets/MANIFEST.md, "What was tried"). It trains on the training
repeat clips minus a validation set (the last --val clips of train_repeat_* and of train_plain_*), reports the
validation losses along the way, and scores the held-out clips only at the end (--heldout): no setting is chosen
on them.

Levers:
  --read before: TTTConfig.branch_input="before_attention", the TTT branch reads the layer's input beside
                 attention, x + attn(x) + gate * TTT(norm(x)), instead of the residual stream after attention;
  --init-identity: wq and wv start as the identity (the probe's hand-set keys, values and queries).
Usage:
    NO_TORCH_COMPILE=1 python -m research.recipe_search --work /tmp/demo_work --layers 0 --read before --steps 150
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from moshi_ttt import TTTConfig, apply_ttt, ttt_blocks
from moshi_ttt.data.checkpoints import load
from moshi_ttt.training.trainer import TrainConfig, Trainer
from scripts.demo_recipe import reading_losses

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/demo_work"))
    p.add_argument("--base", type=Path, default=REPO / "demo_assets" / "fair_baseline")
    p.add_argument("--layers", default="0")
    p.add_argument("--read", choices=("after", "before"), default="before")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--base-lr", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--init-identity", action="store_true")
    p.add_argument("--no-share-qk", action="store_true")
    p.add_argument("--train-all", action="store_true", help="all weights train (the fair baseline: the same)")
    p.add_argument("--baseline-only", action="store_true", help="train the fair baseline (all weights, no TTT)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=864)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-lr-multiplier", type=float, default=3.0)
    p.add_argument("--alpha-lr-multiplier", type=float, default=10.0)
    p.add_argument("--plain-too", action="store_true", help="train on the plain clips as well")
    p.add_argument("--val", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--heldout", action="store_true", help="score the held-out clips at the end")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", type=Path)
    p.add_argument("--tag", default="run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    index = json.loads((args.work / "corpus" / "index.json").read_text())
    codes = {n: c.long() for n, c in load_file(str(args.work / "codes.safetensors")).items()}
    rep = [n for n, v in index.items() if v["split"] == "train" and v["kind"] == "repeat"]
    pla = [n for n, v in index.items() if v["split"] == "train" and v["kind"] == "plain"]
    val = rep[-args.val :] + pla[-args.val :]
    train = rep[: -args.val] + (pla[: -args.val] if args.plain_too else [])
    held = [n for n, v in index.items() if v["split"] == "heldout"]
    model = load(str(args.base)).model
    torch.manual_seed(0)
    if not args.baseline_only:
        cfg = TTTConfig(
            layers=args.layers, mini_batch_size=args.mini_batch_size, base_lr=args.base_lr,
            gating_alpha_init=args.alpha, share_qk=not args.no_share_qk, num_heads=args.heads, init_std=args.init_std,
            branch_input=f"{args.read}_attention",
        )  # fmt: skip
        apply_ttt(model, cfg)
        for block in ttt_blocks(model).values():
            if cfg.share_qk:
                block.init_qk_shift()
            if args.init_identity:
                with torch.no_grad():
                    for lin in (block.wq, block.wv):
                        lin.weight.copy_(torch.eye(lin.weight.shape[0]))
                        lin.bias.zero_()
    tcfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, chunk_size=args.chunk_size, lr=args.lr,
        weight_lr_multiplier=args.weight_lr_multiplier, alpha_lr_multiplier=args.alpha_lr_multiplier,
        train_all=args.train_all or args.baseline_only,
    )  # fmt: skip
    trainer = Trainer(model, [codes[n] for n in train], tcfg)
    val_clips = {n: codes[n] for n in val}
    history = {0: reading_losses(model, val_clips, index)}
    print(f"[{args.tag}] step 0 val {json.dumps(history[0])}", flush=True)
    start, losses = time.time(), []
    while trainer.step_count < args.steps:
        losses.append(trainer.step())
        s = trainer.step_count
        if s % args.eval_every == 0 or s == args.steps:
            history[s] = reading_losses(model, val_clips, index)
            gates = {i: round(float(torch.tanh(b.gating_alpha).abs().mean()), 3) for i, b in ttt_blocks(model).items()}
            print(f"[{args.tag}] step {s} train {sum(losses[-20:]) / len(losses[-20:]):.4f} val "
                  f"{json.dumps({k: round(v, 4) for k, v in history[s].items()})} gate {gates} "
                  f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "val": history, "train_losses": losses}
    if args.heldout:
        result["heldout"] = reading_losses(model, {n: codes[n] for n in held}, index)
        print(f"[{args.tag}] held out {json.dumps(result['heldout'])}", flush=True)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
