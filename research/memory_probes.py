"""Is a TTT pair's gain on natural repeats memory? Two probes on repeat clips (research/natural_corpus.py repeat).

- split: on the frames of readings 2+3 (aligned to reading 1 as `natural_eval ceiling`), TTT's gain against the
  baseline on the codes reading 1 could give (copyable: equal to reading 1's code at the aligned frame) and on the
  others. A memory that copies gains more on the copyable ones.
- recall: the trained TTT block's own answer at each frame of readings 2 and 3 (the inner loop run on the block's
  q, k, v from W_base, `scripts.demo_recipe.block_answers`; without the decay) decoded as the nearest stored
  target (cosine, among frames at least 20 tokens back): the share that lands within one frame of reading 1's aligned
  frame, and the mean share of stored targets ranked above that frame (0.5: no memory).

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.memory_probes split R --baseline B --ttt T
    python -m research.memory_probes recall R [R2 ...] --ttt T
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import soundfile as sf
import torch
import torch.nn.functional as F

FRAME = 1920  # samples per codec frame at 24 kHz


def split(clips: Path, baseline: Path, ttt: Path) -> dict:
    """Per codebook: the share of copyable codes, and TTT's gain (%) on them and on the others."""
    from research.natural_eval import _aligned

    _, rows = _aligned(clips, baseline, ttt, 0)
    base = torch.cat([r[0] for r in rows], -1)  # [K, frames]
    other = torch.cat([r[3] for r in rows], -1)
    copyable = torch.cat([r[2][0] == r[1] for r in rows], -1)
    valid = torch.isfinite(base) & torch.isfinite(other)
    out = {"frames": int(valid[0].sum())}
    for name, sel in (("copyable", copyable & valid), ("other", ~copyable & valid)):
        b, t = (base * sel).nan_to_num().sum(-1), (other * sel).nan_to_num().sum(-1)
        out[name] = {"share": [round(float(x), 3) for x in sel.double().mean(-1)],
                     "gain_pct_per_codebook": [round(100 * float(1 - x / y), 2) for x, y in zip(t, b, strict=True)],
                     "gain_pct": round(100 * float(1 - t.sum() / b.sum()), 2)}  # fmt: skip
    return out


def recall(clips: Path, ttt: Path, min_back: int = 20) -> dict:
    """Per later reading: the share of its frames whose decoded answer lands within one frame of reading 1's aligned
    frame, and the mean share of stored targets ranked above that frame."""
    from moshi_ttt import load, ttt_blocks
    from moshi_ttt.data.stream import encode_streaming
    from scripts.demo_recipe import block_answers

    checkpoint = load(str(ttt), load_mimi=True)
    model = checkpoint.model.eval()
    layer = min(ttt_blocks(model))
    inner = ttt_blocks(model)[layer].cfg.inner
    if inner != "mlp":
        raise ValueError(f"{ttt}: recall reads a TTT-MLP block, this one is inner={inner!r}")
    hits: dict[int, list[bool]] = {2: [], 3: []}
    ranks: dict[int, list[float]] = {2: [], 3: []}
    for name, meta in json.loads((clips / "index.json").read_text()).items():
        if len(meta.get("readings") or []) != 3:
            continue
        audio, _ = sf.read(clips / f"{name}.wav", dtype="float32")
        codes = encode_streaming(checkpoint.mimi, torch.from_numpy(audio))[0]
        _, answers, targets, _ = block_answers(model, codes, layer)
        sim = F.normalize(answers, dim=-1) @ F.normalize(targets, dim=-1).T  # [T, T]
        (s1, _), *later = meta["readings"]
        for k, (s, e) in enumerate(later, start=2):
            offset = (s - s1) / FRAME
            for t in range(round(s / FRAME) + 2, round(e / FRAME) - 1):
                row = sim[t, : t - min_back]  # stored targets far enough back
                aligned = round(t - offset) + 1  # the target stored under reading 1's frame (one-token shift)
                if not 0 <= aligned < row.shape[0]:
                    continue
                hits[k].append(abs(int(row.argmax()) - aligned) <= 1)
                ranks[k].append(float((row > row[aligned]).double().mean()))
    return {f"reading {k}": {"within_one_frame": round(sum(hits[k]) / max(len(hits[k]), 1), 3),
                             "ranked_above": round(sum(ranks[k]) / max(len(ranks[k]), 1), 3), "frames": len(hits[k])}
            for k in hits}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe", choices=("split", "recall"))
    parser.add_argument("clips", type=Path, nargs="+", help="repeat clip folders (wav + index.json)")
    parser.add_argument("--baseline", type=Path, help="split: the fair baseline")
    parser.add_argument("--ttt", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.probe == "split" and args.baseline is None:
        parser.error("split needs --baseline")
    torch.set_num_threads(1)
    for clips in args.clips:
        result = split(clips, args.baseline, args.ttt) if args.probe == "split" else recall(clips, args.ttt)
        print(clips, json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
