"""Held-out evaluation of a model pair on natural speech (issue 21): plain clips in held-out voices, and the
figures of `python -m moshi_ttt.evaluate` runs on natural repeat clips (research/natural_corpus.py repeat).

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.natural_eval plain --out P --count 6 --seed 11     # held-out voices, ~25 s, no repeats
    python -m moshi_ttt.evaluate --audio R/*.wav --baseline B --ttt T --out E
    python -m research.natural_eval summary E [E2 ...]                    # readings 1 / 2+3 and whole clips
    python -m research.natural_eval copyable R --codec C                  # what a perfect copy could predict
    python -m research.natural_eval ceiling R --baseline B [--ttt T]      # the loss a copying memory could reach
    python -m research.natural_eval fuzzy R --baseline B [--ttt T]        # ... copying nearby frames or codes too
    python -m research.natural_eval segments E [E2 ...]                   # readings against the speech between them
"""

from __future__ import annotations

import argparse
import csv
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


SEGMENTS = ("reading 1", "between 1 and 2", "reading 2", "between 2 and 3", "reading 3")


def segments(out: Path) -> dict:
    """Gain of TTT against the baseline per segment of the repeat clips of one evaluate output: the readings and the
    other sentences between them, which come as late in the clip as the readings but never repeat (a time-matched
    control: what a later reading gains beyond them is memory, the rest is adaptation to the clip). Per-token losses
    from each clip's results.csv, readings (in samples) from the index.json beside the clips."""
    totals = {name: [0.0, 0.0, 0] for name in SEGMENTS}  # baseline sum, TTT sum, tokens
    for f in json.loads((out / "index.json").read_text())["files"]:
        clip = Path(f["path"])
        index_file = clip.parent / "index.json"
        readings = (
            json.loads(index_file.read_text()).get(clip.stem, {}).get("readings") if index_file.exists() else None
        )
        if not readings or len(readings) != 3:
            continue
        loss: dict[str, list[float]] = {"baseline": [], "ttt": []}
        with open(out / f["dir"] / "results.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                loss[row["run"]].append(float(row["loss"]))
        (s1, e1), (s2, e2), (s3, e3) = [(round(s / 1920), round(e / 1920)) for s, e in readings]
        for name, (a, b) in zip(SEGMENTS, ((s1, e1), (e1, s2), (s2, e2), (e2, s3), (s3, e3)), strict=True):
            totals[name][0] += sum(loss["baseline"][a:b])
            totals[name][1] += sum(loss["ttt"][a:b])
            totals[name][2] += len(loss["baseline"][a:b])
    if not any(n for *_, n in totals.values()):
        raise ValueError(f"{out}: no clip with three readings in its corpus index")
    return {name: {"tokens": n, "baseline": round(b / n, 4), "ttt": round(t / n, 4),
                   "gain_pct": round(100 * (1 - t / b), 2)} for name, (b, t, n) in totals.items() if n}  # fmt: skip


def _repeat_frames(meta: dict) -> list[tuple[int, int, int]]:
    """(first frame of reading 1, first frame of the later reading, frames) for readings 2 and 3: the first whole
    frames at the nearest alignment (the readings' sample offsets are known), two frames short of a reading."""
    (s1, e1), *later = meta["readings"]
    return [(round(s1 / 1920) + 1, round(s / 1920) + 1, (e1 - s1) // 1920 - 2) for s, _ in later]


def _aligned(clips: Path, baseline: Path, ttt: Path | None, window: int, encode=None):
    """Per reading 2 or 3 of every clip (frames of `_repeat_frames`, moved in by `window` where reading 1 starts
    too early): the baseline's loss of each code [K, n], the codes [K, n], reading 1's codes at the aligned frame
    shifted by -window..window [2 window + 1, K, n] and the TTT model's loss [K, n] (None without --ttt); the
    baseline's codec (moshi's streaming encoding, as `moshi_ttt.evaluate`; or `encode`, audio [N] -> codes [K, T],
    e.g. `research.teacher_codes`) and chunked teacher-forced scoring."""
    import torch

    from moshi_ttt import load, score
    from moshi_ttt.data.stream import encode_streaming

    base = load(str(baseline), load_mimi=True)
    other = load(str(ttt)) if ttt is not None else None
    if other is not None and other.mimi_ref != base.mimi_ref:
        raise ValueError(f"{ttt} reads codes of {other.mimi_ref}, {baseline} of {base.mimi_ref}: not one codec")
    index, rows = json.loads((clips / "index.json").read_text()), []
    with torch.no_grad():
        for name, meta in index.items():
            audio, _ = sf.read(clips / f"{name}.wav", dtype="float32")
            samples = torch.from_numpy(audio)
            codes = encode_streaming(base.mimi, samples)[0] if encode is None else encode(samples)  # [K, T]
            loss = score(base.model, codes[None], mode="chunked").loss[0].double()  # [K, T]
            loss_ttt = score(other.model, codes[None], mode="chunked").loss[0].double() if other is not None else None
            for a, b, n in _repeat_frames(meta):
                if a < window:
                    a, b, n = window, b + window - a, n - (window - a)
                ctx = torch.stack([codes[:, a + s : a + s + n] for s in range(-window, window + 1)])
                rows.append((loss[:, b : b + n], codes[:, b : b + n], ctx,
                             None if loss_ttt is None else loss_ttt[:, b : b + n]))  # fmt: skip
    return base, rows


def ceiling(clips: Path, baseline: Path, ttt: Path | None = None, encode=None) -> dict:
    """The loss of the readings 2+3 frames of `copyable` that a memory copying reading 1 could reach on top of the
    baseline: per codebook k the mixture p = a_k [x = copy] + (1 - a_k) p_base(x) (a proper distribution), a_k
    fitted on these very frames (an upper bound for any copy of the aligned code). Codes from the baseline's codec
    (moshi's streaming encoding, as `moshi_ttt.evaluate`) or from `encode` (audio [N] -> codes [K, T]), losses from
    chunked teacher-forced scoring."""
    import torch

    _, rows = _aligned(clips, baseline, ttt, 0, encode)
    p = torch.cat([torch.exp(-loss) for loss, *_ in rows], -1)  # [K, frames]
    m = torch.cat([(ctx[0] == x).double() for _, x, ctx, _ in rows], -1)
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
    if ttt is not None:
        ttt_mean = float(mean(torch.cat([t for *_, t in rows], -1)).mean())
        out |= {"ttt_loss": round(ttt_mean, 4), "ttt_gain_pct": round(100 * (1 - ttt_mean / base_loss), 2)}
    return out


def fuzzy_ceiling(clips: Path, baseline: Path, ttt: Path | None = None, window: int = 2) -> dict:
    """`ceiling` for fuzzier copies: a memory that may copy reading 1's code from a frame up to `window` frames
    off the aligned one, and one that puts its mass on codes *near* the copied one (a kernel over the codebook's
    codewords). Per codebook k, p = w_0 p_base(x) + sum_s w_s K_tau(x | code of reading 1 at aligned + s), where
    K_tau(x | c) is proportional to exp(-|e_x - e_c|^2 / tau) over the codebook's entries e (tau -> 0: the exact copy),
    weights and tau fitted (L-BFGS) on these very frames: an upper bound for such a memory. Frames where any
    codebook's baseline probability underflows are dropped (none on the sets measured)."""
    import torch

    base, rows = _aligned(clips, baseline, ttt, window)
    from research.codec_distill import quantizer_layers

    books = [layer._codebook.embedding for layer in quantizer_layers(base.mimi)]
    dist = torch.stack([((e.double()[:, None] - e.double()[None]) ** 2).sum(-1) for e in books])  # [K, bins, bins]
    p = torch.cat([torch.exp(-loss) for loss, *_ in rows], -1)  # [K, N]
    x = torch.cat([codes for _, codes, *_ in rows], -1)
    ctx = torch.cat([c for *_, c, _ in rows], -1)  # [2 window + 1, K, N]
    keep = torch.isfinite(p).all(0) & (p > 0).all(0)
    p, x, ctx = p[:, keep], x[:, keep], ctx[:, :, keep]
    base_loss = float(-p.log().mean())

    def fit(k: int, offsets: list[int], kernel: bool) -> float:
        sq = torch.stack([dist[k][ctx[window + s, k], x[k]] for s in offsets])  # [S, N]
        rows_of = [dist[k][ctx[window + s, k]] for s in offsets]  # [N, bins] each
        scale = dist[k][dist[k] > 0].median()
        logits = torch.zeros(len(offsets) + 1, dtype=torch.float64, requires_grad=True)
        log_tau = torch.zeros((), dtype=torch.float64, requires_grad=True)

        def nll() -> torch.Tensor:  # in log space: a narrow kernel underflows
            log_w = torch.log_softmax(logits, 0)
            if kernel:
                tau = scale * torch.exp(log_tau.clamp(-30.0, 10.0))
                log_kern = torch.stack([-sq[j] / tau - torch.logsumexp(-r / tau, -1) for j, r in enumerate(rows_of)])
            else:
                log_kern = torch.where(sq == 0, 0.0, -torch.inf)
            terms = torch.cat([(log_w[0] + p[k].log())[None], log_w[1:, None] + log_kern])
            return -torch.logsumexp(terms, 0).mean()

        opt = torch.optim.LBFGS([logits, log_tau], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = nll()
            value.backward()
            return value

        for _ in range(3):
            opt.step(closure)
        with torch.no_grad():
            return float(nll())

    out = {"frames": int(keep.sum()), "window": window, "baseline_loss": round(base_loss, 4)}
    out["copyable_aligned"] = [round(float(v), 3) for v in (ctx[window] == x).double().mean(-1)]
    out["copyable_in_window"] = [round(float(v), 3) for v in (ctx == x).any(0).double().mean(-1)]
    near = list(range(-window, window + 1))
    for name, offsets, kernel in (("exact", [0], False), ("exact_window", near, False), ("kernel", [0], True),
                                  ("kernel_window", near, True)):  # fmt: skip
        loss = sum(fit(k, offsets, kernel) for k in range(p.shape[0])) / p.shape[0]
        out[f"{name}_gain_pct"] = round(100 * (1 - loss / base_loss), 2)
    if ttt is not None:
        ttt_mean = float(torch.cat([t for *_, t in rows], -1)[:, keep].mean())
        out["ttt_gain_pct"] = round(100 * (1 - ttt_mean / base_loss), 2)
    return out


def copyable(clips: Path, codec: Path | None, encode=None) -> dict:
    """Per codebook, the share of the frames of readings 2 and 3 whose code equals reading 1's at the nearest frame
    alignment (the readings' sample offsets are known): the most a memory that copies reading 1 can get right.
    Codes from `codec`'s whole-file encoding, or from `encode` (audio [N] -> codes [K, T])."""
    import torch

    from moshi_ttt.data.codec import load_codec

    if encode is None:
        mimi = load_codec(codec)

        def encode(samples: torch.Tensor) -> torch.Tensor:
            return mimi.encode(samples[None, None])[0]

    index, same, total = json.loads((clips / "index.json").read_text()), 0, 0
    with torch.no_grad():
        for name, meta in index.items():
            audio, _ = sf.read(clips / f"{name}.wav", dtype="float32")
            codes = encode(torch.from_numpy(audio))  # [K, T]
            for a, b, n in _repeat_frames(meta):
                same += (codes[:, a : a + n] == codes[:, b : b + n]).float().sum(-1)
                total += n
    if not total:
        raise ValueError(f"{clips}: no frames of a later reading (index.json names no repeat clip)")
    return {"copyable_per_codebook": [round(x, 3) for x in (same / total).tolist()], "frames": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("plain", "summary", "copyable", "ceiling", "fuzzy", "segments"))
    parser.add_argument("--baseline", type=Path, help="ceiling: the baseline checkpoint")
    parser.add_argument("--ttt", type=Path, help="ceiling: a TTT checkpoint scored on the same frames")
    parser.add_argument("--window", type=int, default=2, help="fuzzy: frames either side of the aligned one")
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
        if args.stage == "fuzzy":
            print(path, json.dumps(fuzzy_ceiling(path, args.baseline, args.ttt, args.window)), flush=True)
            continue
        if args.stage == "segments":
            print(path, json.dumps(segments(path)), flush=True)
            continue
        print(path, json.dumps(summary(path) if args.stage == "summary" else copyable(path, args.codec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
