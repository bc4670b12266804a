"""Drift over a long file (issue 21): the demo TTT model with the fast-weight decay at a few values vs off, against
the fair baseline, per 2,000-token bin. No retraining: the decay is a TTTConfig option written into a copy of the
checkpoint's config.json.

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.natural_corpus long --out W/long.wav --minutes 25 --seed 2121
    python -m research.long_drift encode --work W            # W/long.wav -> W/long_codes.pt (demo_assets/codec)
    python -m research.long_drift score --work W --decay 0 0.01 0.03 --baseline
    python -m research.long_drift table --work W
    python -m research.long_drift plot --work W              # W/long_drift.svg: loss per bin, drift per update
    # the demo corpus's own kind of speech (its six espeak-ng voices and grammar, unseen sentences, no noise):
    python -m research.long_drift make-demo --work W2 --minutes 26 && python -m research.long_drift encode --work W2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from moshi_ttt import load, score  # noqa: E402
from moshi_ttt.data.audio import encode  # noqa: E402
from moshi_ttt.data.codec import load_codec  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "demo_assets"
BIN = 2000  # tokens per bin of the table (160 s)
FRAME_RATE = 12.5


def encode_long(work: Path, codec: Path = ASSETS / "codec") -> Path:
    """W/long.wav -> W/long_codes.pt [1, 8, T], encoded in 60 s blocks of whole frames (the demo codec is causal
    with a short receptive field: blocks cut on frame boundaries change only the frames next to a cut)."""
    audio, sr = sf.read(work / "long.wav", dtype="float32")
    if sr != 24000:
        raise ValueError(f"expected 24 kHz audio, got {sr}")
    mimi = load_codec(codec)
    block = 1920 * 750
    codes = [encode(mimi, torch.from_numpy(audio[i : i + block])) for i in range(0, len(audio), block)]
    out = work / "long_codes.pt"
    torch.save(torch.cat(codes, dim=-1), out)
    return out


def make_demo_style(work: Path, minutes: float, seed: int = 4242) -> Path:
    """W/long.wav + long.json: the shipped corpus's kind of clips (scripts/demo_corpus.py: six espeak-ng voices, its
    grammar, new sentences from `seed`), alternating 60 s plain clips and repeat clips (a 10-17 s passage read three
    times, frame-aligned as in the demo clips), concatenated to `minutes`."""
    import random

    import numpy as np

    from scripts.demo_corpus import SAMPLE_RATE, SentenceMaker, plain_clip, repeat_clip

    maker, rng = SentenceMaker(seed), random.Random(seed + 1)
    parts, texts, readings, length, n = [], [], [], 0, 0
    while length < minutes * 60 * SAMPLE_RATE:
        if n % 2:
            clip = repeat_clip(f"r{n}", maker, rng, rng.uniform(10, 17), rng.uniform(4, 12))
            for i, (a, b) in enumerate(clip.readings):
                readings.append((length + a, length + b))
                texts.append(f"[passage {n}: reading {i + 1}]")
        else:
            clip = plain_clip(f"p{n}", maker, rng, 60.0)
        parts.append(clip.audio)
        length += len(clip.audio)
        n += 1
    work.mkdir(parents=True, exist_ok=True)
    sf.write(work / "long.wav", np.concatenate(parts), SAMPLE_RATE, subtype="PCM_16")
    (work / "long.json").write_text(json.dumps({"text": "\n".join(texts), "readings": readings}))
    return work / "long.wav"


def decayed_checkpoint(work: Path, decay: float) -> Path:
    """A copy of demo_assets/ttt whose config sets `ttt.decay` (weights shared by a symlink)."""
    directory = work / f"ttt_decay_{decay:g}"
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((ASSETS / "ttt" / "config.json").read_text())
    config["ttt"]["decay"] = decay
    config["mimi"] = str(ASSETS / "codec")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    weights = directory / "model.safetensors"
    if not weights.exists():
        shutil.copyfile(ASSETS / "ttt" / "model.safetensors", weights)
    return directory


def score_run(work: Path, name: str, ref: Path, reset_every: int | None = None) -> dict:
    codes = torch.load(work / "long_codes.pt")
    model = load(ref).model
    start = time.perf_counter()
    with torch.no_grad():
        result = score(model, codes, mode="chunked", reset_every=reset_every)
    run = {"loss_per_token": result.loss_per_token[0].tolist(), "seconds": time.perf_counter() - start}
    if result.telemetry is not None:
        layer = next(iter(result.telemetry.layers.values()))
        run["drift_W1"] = layer.drift["W1"][0].tolist()
        if "W2" in layer.drift:  # TTT-Linear layers have W1 only
            run["drift_W2"] = layer.drift["W2"][0].tolist()
        run["update_step"] = layer.update_step.tolist()
    (work / f"run_{name}.json").write_text(json.dumps(run))
    return run


def _bins(values: list[float]) -> list[float]:
    out = []
    for i in range(0, len(values), BIN):
        part = [v for v in values[i : i + BIN] if v is not None and not math.isnan(v)]
        out.append(sum(part) / len(part))
    return out


def _drift_at_bin_ends(run: dict, tokens: int) -> list[float]:
    """Drift of W1 after the last update of each bin."""
    out = []
    for end in (min(i + BIN, tokens) for i in range(0, tokens, BIN)):
        last = [d for s, d in zip(run["update_step"], run["drift_W1"], strict=True) if s <= end]
        out.append(last[-1] if last else 0.0)
    return out


def passage_losses(work: Path, loss: list[float]) -> tuple[float, float]:
    """Mean loss of first readings and of returning readings of the long file's passages."""
    meta = json.loads((work / "long.json").read_text())
    seen, first, again = set(), [], []
    for line, (start, end) in zip(meta["text"].splitlines(), meta["readings"], strict=True):
        n = line.split(":")[0]
        span = loss[int(start / 1920) + 1 : min(int(end / 1920), len(loss))]
        span = [v for v in span if v is not None and not math.isnan(v)]
        (again if n in seen else first).extend(span)
        seen.add(n)
    return sum(first) / max(len(first), 1), sum(again) / max(len(again), 1)


def table(work: Path) -> str:
    runs = {p.stem[4:]: json.loads(p.read_text()) for p in sorted(work.glob("run_*.json"))}
    base = runs["baseline"]["loss_per_token"]
    base_bins = _bins(base)
    lines = ["| model | overall (gain vs fair) | worst bin gain | returning passages gain | loss per 2,000-token "
             "bin | drift W1 at bin ends |", "|---|---:|---:|---:|---|---|"]  # fmt: skip
    b_first, b_again = passage_losses(work, base)
    for name, run in runs.items():
        loss = run["loss_per_token"]
        bins = _bins(loss)
        valid = [v for v in loss if v is not None and not math.isnan(v)]
        base_valid = [v for v in base if v is not None and not math.isnan(v)]
        overall = 100 * (1 - (sum(valid) / len(valid)) / (sum(base_valid) / len(base_valid)))
        worst = min(100 * (1 - b / f) for b, f in zip(bins, base_bins, strict=True))
        _, again = passage_losses(work, loss)
        drift = " ".join(f"{d:.2f}" for d in _drift_at_bin_ends(run, len(loss))) if "drift_W1" in run else "-"
        lines.append(f"| {name} | {overall:+.2f}% | {worst:+.2f}% | {100 * (1 - again / b_again):+.2f}% | "
                     f"{' '.join(f'{b:.3f}' for b in bins)} | {drift} |")  # fmt: skip
    return "\n".join(lines)


def _polyline(
    xs: list[float],
    ys: list[float],
    box: tuple[float, float, float, float],
    span: tuple[float, float],
    x_max: float,
    colour: str,
) -> str:
    """One SVG polyline of (xs, ys) in the panel box (left, top, width, height), y from span[0] to span[1]."""
    left, top, width, height = box
    lo, hi = span
    points = " ".join(f"{left + width * x / x_max:.1f},{top + height * (1 - (y - lo) / (hi - lo)):.1f}"
                      for x, y in zip(xs, ys, strict=True))  # fmt: skip
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>'


def plot(work: Path) -> str:
    """An SVG of the long file (no plotting library needed): the mean loss per 2,000-token bin of every run (top)
    and the TTT runs' relative drift of W1 and W2 at each update (bottom), against minutes of audio."""
    runs = {p.stem[4:]: json.loads(p.read_text()) for p in sorted(work.glob("run_*.json"))}
    tokens = len(runs["baseline"]["loss_per_token"])
    minutes = tokens / 12.5 / 60
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    bins = {name: _bins(run["loss_per_token"]) for name, run in runs.items()}
    lo = min(min(b) for b in bins.values())
    hi = max(max(b) for b in bins.values())
    pad = 0.1 * (hi - lo or 1.0)
    top, bottom = (70, 40, 620, 200), (70, 300, 620, 200)
    drifts = {n: r for n, r in runs.items() if "drift_W1" in r}
    d_hi = max([max(r["drift_W1"] + r.get("drift_W2", [])) for r in drifts.values()] or [1.0]) * 1.1 or 1.0
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="720" height="560" font-family="sans-serif" '
             'font-size="12"><rect width="720" height="560" fill="white"/>',
             f'<text x="70" y="28">Mean loss per 2,000-token bin (nats), {minutes:.1f}-minute file</text>',
             '<text x="70" y="288">Relative drift of the fast weights ||W - W_base|| / ||W_base|| at each update'
             "</text>"]  # fmt: skip
    for box, (y_lo, y_hi) in ((top, (lo - pad, hi + pad)), (bottom, (0.0, d_hi))):
        left, y0, width, height = box
        parts.append(f'<rect x="{left}" y="{y0}" width="{width}" height="{height}" fill="none" stroke="#888"/>')
        for frac in (0.0, 0.5, 1.0):
            y = y0 + height * (1 - frac)
            parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{y_lo + frac * (y_hi - y_lo):.2f}'
                         "</text>")  # fmt: skip
        for m in range(0, int(minutes) + 1, 5):
            x = left + width * m / minutes
            parts.append(f'<text x="{x:.1f}" y="{y0 + height + 16}" text-anchor="middle">{m} min</text>')
    for i, (name, b) in enumerate(bins.items()):
        centres = [min((k + 0.5) * BIN, tokens) / 12.5 / 60 for k in range(len(b))]
        parts.append(_polyline(centres, b, top, (lo - pad, hi + pad), minutes, colours[i % len(colours)]))
        parts.append(f'<text x="{700}" y="{60 + 16 * i}" text-anchor="end" fill="{colours[i % len(colours)]}">'
                     f"{name}</text>")  # fmt: skip
    for i, (name, run) in enumerate(drifts.items()):
        xs = [s / 12.5 / 60 for s in run["update_step"]]
        for weight, dash in (("W1", ""), ("W2", ' stroke-dasharray="4 3"')):
            if f"drift_{weight}" not in run:  # TTT-Linear: no W2
                continue
            line = _polyline(xs, run[f"drift_{weight}"], bottom, (0.0, d_hi), minutes, colours[(i + 1) % 5])
            parts.append(line.replace("/>", f"{dash}/>"))
            parts.append(f'<text x="700" y="{320 + 16 * (2 * i + (weight == "W2"))}" text-anchor="end">{name} '
                         f"{weight}{' (dashed)' if dash else ''}</text>")  # fmt: skip
    return "\n".join([*parts, "</svg>"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("make-demo", "encode", "score", "table", "plot"))
    parser.add_argument("--minutes", type=float, default=26.0)
    parser.add_argument("--seed", type=int, default=4242, help="make-demo: 4242 the evaluation file, others training")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--decay", type=float, nargs="*", default=[])
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--checkpoint", type=Path, help="score this checkpoint too, as run --name")
    parser.add_argument("--name", default="checkpoint")
    parser.add_argument("--codec", type=Path, default=ASSETS / "codec", help="encode: the codec")
    parser.add_argument(
        "--baseline-checkpoint",
        type=Path,
        default=ASSETS / "fair_baseline",
        help="score --baseline: the fair baseline (its codec must be the one that encoded the file)",
    )
    parser.add_argument("--reset-every", type=int, nargs="*", default=[], help="TTT without decay, reset every N")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.stage == "make-demo":
        print(make_demo_style(args.work, args.minutes, args.seed))
    elif args.stage == "encode":
        print(encode_long(args.work, args.codec))
    elif args.stage == "score":
        if args.baseline:
            run = score_run(args.work, "baseline", args.baseline_checkpoint)
            print(f"baseline: {run['seconds']:.0f} s")
        if args.checkpoint is not None:
            run = score_run(args.work, args.name, args.checkpoint)
            print(f"{args.name}: {run['seconds']:.0f} s")
        for period in args.reset_every:
            run = score_run(args.work, f"ttt_reset_{period}", ASSETS / "ttt", reset_every=period)
            print(f"reset every {period}: {run['seconds']:.0f} s")
        for decay in args.decay:
            run = score_run(args.work, f"ttt_decay_{decay:g}", decayed_checkpoint(args.work, decay))
            print(f"decay {decay:g}: {run['seconds']:.0f} s")
    elif args.stage == "plot":
        (args.work / "long_drift.svg").write_text(plot(args.work))
        print(args.work / "long_drift.svg")
    else:
        print(table(args.work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
