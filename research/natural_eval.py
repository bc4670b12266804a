"""Held-out evaluation of a model pair on natural speech (issue 21): plain clips in held-out voices, and the
figures of `python -m moshi_ttt.evaluate` runs on natural repeat clips (research/natural_corpus.py repeat).

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.natural_eval plain --out P --count 6 --seed 11     # held-out voices, ~25 s, no repeats
    python -m moshi_ttt.evaluate --audio R/*.wav --baseline B --ttt T --out E
    python -m research.natural_eval summary E [E2 ...]                    # readings 1 / 2+3 and whole clips
    python -m research.natural_eval copyable R --codec C                  # what a perfect copy could predict
    python -m research.natural_eval ceiling R --baseline B [--ttt T]      # the loss a copying memory could reach
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
        per = sorted(100 * (1 - p[1] / p[0]) for p in pairs)
        median = (per[(len(per) - 1) // 2] + per[len(per) // 2]) / 2
        return {"baseline": round(b, 4), "ttt": round(t, 4), "gain_pct": round(100 * (1 - t / b), 2),
                "median_pct": round(median, 2), "min_pct": round(per[0], 2), "max_pct": round(per[-1], 2),
                "n": len(pairs)}  # fmt: skip

    return {"clips": len(files), "reading1": gain(first), "readings23": gain(later), "whole": gain(whole)}


def _repeat_frames(meta: dict) -> list[tuple[int, int, int]]:
    """(first frame of reading 1, first frame of the later reading, frames) for readings 2 and 3: the first whole
    frames at the nearest alignment (the readings' sample offsets are known), two frames short of a reading."""
    (s1, e1), *later = meta["readings"]
    return [(round(s1 / 1920) + 1, round(s / 1920) + 1, (e1 - s1) // 1920 - 2) for s, _ in later]


def ceiling(clips: Path, baseline: Path, ttt: Path | None = None) -> dict:
    """The loss of the readings 2+3 frames of `copyable` that a memory copying reading 1 could reach on top of the
    baseline: per codebook k the mixture p = a_k [x = copy] + (1 - a_k) p_base(x) (a proper distribution), a_k
    fitted on these very frames (an upper bound for any copy of the aligned code). Codes from the baseline's codec
    (moshi's streaming encoding, as `moshi_ttt.evaluate`), losses from chunked teacher-forced scoring."""
    import torch

    from moshi_ttt import load, score
    from moshi_ttt.data.stream import encode_streaming

    base = load(str(baseline), load_mimi=True)
    other = load(str(ttt)) if ttt is not None else None
    if other is not None and other.mimi_ref != base.mimi_ref:
        raise ValueError(f"{ttt} reads codes of {other.mimi_ref}, {baseline} of {base.mimi_ref}: not one codec")
    index = json.loads((clips / "index.json").read_text())
    base_p, match, ttt_loss = [], [], []
    with torch.no_grad():
        for name, meta in index.items():
            audio, _ = sf.read(clips / f"{name}.wav", dtype="float32")
            codes = encode_streaming(base.mimi, torch.from_numpy(audio))
            loss = score(base.model, codes, mode="chunked").loss[0]  # [K, T]
            loss_ttt = score(other.model, codes, mode="chunked").loss[0] if other is not None else None
            for a, b, n in _repeat_frames(meta):
                base_p.append(torch.exp(-loss[:, b : b + n].double()))
                match.append((codes[0, :, a : a + n] == codes[0, :, b : b + n]).double())
                if loss_ttt is not None:
                    ttt_loss.append(loss_ttt[:, b : b + n].double())
    p, m = torch.cat(base_p, -1), torch.cat(match, -1)  # [K, frames]
    valid = torch.isfinite(p)
    p, m = torch.where(valid, p, 1.0), torch.where(valid, m, 0.0)

    def mean(x: torch.Tensor) -> torch.Tensor:  # [..., K, frames] -> [..., K] over the valid frames
        return torch.where(valid, x, 0.0).sum(-1) / valid.sum(-1)

    grid = torch.linspace(0.0, 0.99, 100, dtype=torch.float64)[:, None, None]
    best, at = mean(-torch.log(grid * m + (1 - grid) * p)).min(0)  # the best a_k per codebook
    base_loss = float(mean(-torch.log(p)).mean())
    out = {"frames": int(valid[0].sum()), "copyable_per_codebook": [round(x, 3) for x in mean(m).tolist()],
           "a_per_codebook": [round(float(grid[i]), 2) for i in at], "baseline_loss": round(base_loss, 4),
           "ceiling_loss": round(float(best.mean()), 4),
           "ceiling_gain_pct": round(100 * (1 - float(best.mean()) / base_loss), 2)}  # fmt: skip
    if ttt_loss:
        ttt_mean = float(mean(torch.cat(ttt_loss, -1)).mean())
        out |= {"ttt_loss": round(ttt_mean, 4), "ttt_gain_pct": round(100 * (1 - ttt_mean / base_loss), 2)}
    return out


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
            for a, b, n in _repeat_frames(meta):
                same += (codes[:, a : a + n] == codes[:, b : b + n]).float().sum(-1)
                total += n
    return {"copyable_per_codebook": [round(x, 3) for x in (same / total).tolist()], "frames": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("plain", "summary", "copyable", "ceiling"))
    parser.add_argument("--baseline", type=Path, help="ceiling: the baseline checkpoint")
    parser.add_argument("--ttt", type=Path, help="ceiling: a TTT checkpoint scored on the same frames")
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
        if args.stage == "ceiling":
            print(path, json.dumps(ceiling(path, args.baseline, args.ttt)), flush=True)
            continue
        print(path, json.dumps(summary(path) if args.stage == "summary" else copyable(path, args.codec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
