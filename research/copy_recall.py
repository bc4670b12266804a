"""Does a trained pair copy at all? Losses of the 2nd+3rd readings of synthetic copy clips (random codes, the
training recipes' `copy_clip`: only an in-context memory predicts the repeats), TTT vs fair baseline, the first
reading as the control. Fresh clips from a seed the training never drew from.

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.copy_recall --baseline B --ttt T --count 16 --seed 123
    python -m research.copy_recall --baseline B --ttt T --count 16 --seed 123 --noise 0.35   # fuzzy repeats
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from moshi_ttt import load
from research.recipe_long_carry import fuzzed
from scripts.demo_recipe import clip_losses


def copy_clip_with_readings(
    rng: random.Random, card: int = 256, n_q: int = 8, noise: float = 0.0
) -> tuple[torch.Tensor, list]:
    """moshi_ttt.training.clip_mix.copy_clip's layout with the readings' frame spans: lead-in 1-12 frames, a
    57-150-frame passage, twice (19-60 frames of filler, the passage; with `noise` > 0 each of its codes changed
    with that probability, `recipe_long_carry.fuzzed`)."""
    g = torch.Generator().manual_seed(rng.randrange(2**62))
    passage = torch.randint(0, card, (n_q, rng.randint(57, 150)), generator=g)
    parts, spans, t = [torch.randint(0, card, (n_q, rng.randint(1, 12)), generator=g)], [], 0
    t = parts[0].shape[1]
    spans.append((t, t + passage.shape[1]))
    parts.append(passage)
    t += passage.shape[1]
    for _ in range(2):
        filler = torch.randint(0, card, (n_q, rng.randint(19, 60)), generator=g)
        parts.append(filler)
        t += filler.shape[1]
        spans.append((t, t + passage.shape[1]))
        parts.append(fuzzed(passage, noise, g, card) if noise > 0 else passage)
        t += passage.shape[1]
    return torch.cat(parts, dim=1), spans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--ttt", type=Path, required=True)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--noise", type=float, default=0.0, help="share of the later readings' codes changed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    clips = [copy_clip_with_readings(rng, noise=args.noise) for _ in range(args.count)]
    out = {}
    for name, path in (("baseline", args.baseline), ("ttt", args.ttt)):
        model = load(path).model.eval()
        first, later = [], []
        for codes, spans in clips:
            loss = clip_losses(model, codes)  # [8, T]
            first.append(float(loss[:, spans[0][0] + 1 : spans[0][1]].nanmean()))
            later += [float(loss[:, s + 1 : e].nanmean()) for s, e in spans[1:]]
        out[name] = {"reading1": sum(first) / len(first), "readings23": sum(later) / len(later)}
    for key in ("reading1", "readings23"):
        out[f"{key}_gain_pct"] = round(100 * (1 - out["ttt"][key] / out["baseline"][key]), 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
