"""Held-out evaluation of a model pair on natural speech (issue 21): plain clips in held-out voices, and the
figures of `python -m moshi_ttt.evaluate` runs on natural repeat clips (research/natural_corpus.py repeat).

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.natural_eval plain --out P --count 6 --seed 11     # held-out voices, ~25 s, no repeats
    python -m moshi_ttt.evaluate --audio R/*.wav --baseline B --ttt T --out E
    python -m research.natural_eval summary E [E2 ...]                    # readings 1 / 2+3 and whole clips
    python -m research.natural_eval copyable R --codec C                  # what a perfect copy could predict
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import soundfile as sf

from research.natural_corpus import SAMPLE_RATE
from research.natural_mix import plain_clip


def summary(out: Path) -> dict:
    """Mean losses (baseline, TTT) over the clips of one evaluate output: reading 1, readings 2+3 (each reading's
    mean loss, averaged over readings and clips), whole clips; gains = 1 - TTT / baseline in %."""
    files = json.loads((out / "index.json").read_text())["files"]
    first, later, whole = [], [], []
    for f in files:
        whole.append((f["mean_loss"]["baseline"], f["mean_loss"]["ttt"]))
        for r in f.get("readings") or []:
            pair = (r["baseline loss"], r["TTT loss"])
            (first if r["reading"] == 1 else later).append(pair)

    def gain(pairs: list[tuple[float, float]]) -> dict:
        if not pairs:
            return {}
        b, t = sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)
        per = [100 * (1 - p[1] / p[0]) for p in pairs]
        return {"baseline": round(b, 4), "ttt": round(t, 4), "gain_pct": round(100 * (1 - t / b), 2),
                "min_pct": round(min(per), 2), "max_pct": round(max(per), 2), "n": len(pairs)}  # fmt: skip

    return {"clips": len(files), "reading1": gain(first), "readings23": gain(later), "whole": gain(whole)}


def copyable(clips: Path, codec: Path) -> dict:
    """Per codebook, the share of the frames of readings 2 and 3 whose code equals reading 1's at the nearest frame
    alignment (the readings' sample offsets are known): the most a memory that copies reading 1 can get right."""
    import torch

    from moshi_ttt.data.codec import load_codec

    mimi, index = load_codec(codec), json.loads((clips / "index.json").read_text())
    same, total = torch.zeros(mimi.num_codebooks), 0
    with torch.no_grad():
        for name, meta in index.items():
            audio, _ = sf.read(clips / f"{name}.wav", dtype="float32")
            codes = mimi.encode(torch.from_numpy(audio)[None, None])[0]  # [K, T]
            (s1, e1), *later = meta["readings"]
            for s, _ in later:
                a, b = round(s1 / 1920) + 1, round(s / 1920) + 1  # the first whole frames, aligned
                n = (e1 - s1) // 1920 - 2
                same += (codes[:, a : a + n] == codes[:, b : b + n]).float().sum(-1)
                total += n
    return {"copyable_per_codebook": [round(x, 3) for x in (same / total).tolist()], "frames": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("plain", "summary", "copyable"))
    parser.add_argument("--codec", type=Path, default=Path("demo_assets/codec"))
    parser.add_argument("paths", type=Path, nargs="*")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    if args.stage == "plain":
        args.out.mkdir(parents=True, exist_ok=True)
        rng = random.Random(args.seed)
        for i in range(args.count):
            sf.write(args.out / f"heldout_plain_{i:03d}.wav", plain_clip(rng, args.seconds, "heldout"), SAMPLE_RATE,
                     subtype="PCM_16")  # fmt: skip
        print(f"{args.count} clips in {args.out}")
        return 0
    for path in args.paths:
        print(path, json.dumps(summary(path) if args.stage == "summary" else copyable(path, args.codec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
