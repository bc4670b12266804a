"""Joint training from scratch: a TTT LM and its fair baseline (same init, same batches, same steps), issue 13.

The command line of the recipes J1-J8 (demo_assets/MANIFEST.md), over the demo build's training
(scripts/demo_recipe.py: the library's paired training, `moshi_ttt.training`, with the build's data and validation).
Both models are the demo's LM (demo_lm_config.LM_CONFIG) from the same seeded initialisation; the TTT model adds
a TTT block (--read before: it reads the layer input beside attention) with wq and wv started as the identity and
the share_qk convolutions as a one-token shift; --inner picks TTT-MLP or TTT-Linear. Every step both see the same
batch: whole short repeat clips (--short-work, passage read 3 times, > 4 s apart), synthetic copy clips
(--copy-frac) and random crops of the demo corpus's training clips. Validation: the last --val training repeat and
plain clips (never trained on); --heldout scores the held-out clips once at the end.
Usage (from the repo root):
    NO_TORCH_COMPILE=1 python -m research.recipe_joint --work /tmp/demo_work --short-work /tmp/short --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from moshi_ttt.data.checkpoints import save
from scripts.demo_lm_config import LM_CONFIG
from scripts.demo_recipe import JointRecipe, train_joint

DEFAULTS = JointRecipe()
KINDS = {"ttt": ("ttt",), "baseline": ("fair_baseline",), "both": ("ttt", "fair_baseline")}  # --kind -> variants


def parser() -> argparse.ArgumentParser:
    """The recipe's options (the fields of scripts.demo_recipe.JointRecipe) and the run's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/demo_work"))
    p.add_argument("--short-work", type=Path, required=True)
    p.add_argument("--kind", choices=tuple(KINDS), default="ttt", help="both: the pair in lockstep, one process")
    p.add_argument("--layers", default=DEFAULTS.layers)
    p.add_argument("--read", choices=("after", "before"), default=DEFAULTS.read)
    p.add_argument("--heads", type=int, default=DEFAULTS.heads)
    p.add_argument("--inner", choices=("mlp", "linear"), default=DEFAULTS.inner, help="TTTConfig.inner")
    p.add_argument("--mini-batch-size", type=int, default=DEFAULTS.mini_batch_size)
    p.add_argument("--base-lr", type=float, default=DEFAULTS.base_lr)
    p.add_argument("--alpha", type=float, default=DEFAULTS.alpha)
    p.add_argument("--init-std", type=float, default=DEFAULTS.init_std)
    p.add_argument("--no-identity", action="store_true")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len)
    p.add_argument("--short-frac", type=float, default=DEFAULTS.short_frac)
    p.add_argument("--copy-frac", type=float, default=DEFAULTS.copy_frac, help="rows of random-code repeat clips")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--alpha-lr-multiplier", type=float, default=DEFAULTS.alpha_lr_multiplier)
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup)
    p.add_argument(
        "--decay-start", type=float, default=DEFAULTS.decay_start,
        help="fraction of the steps at the peak lr before the cosine decay (0: cosine over all steps)",
    )  # fmt: skip
    p.add_argument("--val", type=int, default=DEFAULTS.val)
    p.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every)
    p.add_argument("--heldout", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", type=Path, help="write <tag>.json (and the checkpoint <tag>/) of each model here")
    p.add_argument("--tag", default="joint", help="file name prefix under --save")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    recipe = JointRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(JointRecipe)})
    trained = train_joint(
        recipe, KINDS[args.kind], args.work, args.short_work, args.seed, args.threads, args.heldout,
        log=lambda line: print(line, flush=True),
    )  # fmt: skip
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for name, (model, result) in trained.items():
            tag = args.tag if len(trained) == 1 else f"{args.tag}_{name}"
            (args.save / f"{tag}.json").write_text(json.dumps(result, indent=1))
            save(args.save / tag, model, lm_config=LM_CONFIG, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
