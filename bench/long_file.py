"""Long files at flat memory: the evaluate CLI's peak RSS and wall time on a long speech file against a 2-minute one,
streamed vs whole-clip Mimi codes on speech, and the scores of the streamed codes in every mode.

A benchmark, not a test: everything is measured in the same run, so the ratios are what to read. The speech is
espeak-ng (several voices and speeds reading public-domain text), concatenated by sox with random gaps into 16 kHz
FLAC files of the asked lengths (LibriLight's format) under --workdir; nothing is committed.

Usage: NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1 python -m bench.long_file [--short-min 2] [--long-min 60]
           [--workdir /tmp/moshi_ttt_long] [--score-tokens 750] [--skip-cli]
Needs espeak-ng, sox and GNU time (/usr/bin/time) on the PATH, and the demo checkpoints (demo_assets/).

Measured (2-core shared CPU, 1 thread, demo models, chunked): peak RSS 751 MB on 2 min (1,500 tokens, 20.8 s wall)
and 850 MB on 60 min (45,000 tokens, 287 s): 1.13x. The difference is telemetry: its pending fast-weight copies
(scoring/telemetry.py, FLUSH_EVERY updates) are freed into glibc's heap, which keeps growing slowly; with
--no-telemetry the scoring adds 8 MB on 2 min and 13 MB on 10 min, and with MALLOC_MMAP_THRESHOLD_=131072 telemetry
is flat too (+70 vs +73 MB) but TTT scoring is 40% slower. Streamed vs whole-clip codes on 2 min of speech: 99.78%
equal (all 8 codebooks equal at 99.67% of the tokens); vs moshi's server-style encoding 99.71%. Scores of the
streamed codes: chunked and stream within 1.2e-5 nats of full.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

from moshi_ttt import load, score  # noqa: E402
from moshi_ttt.data.audio import check_audio, encode, load_audio  # noqa: E402
from moshi_ttt.data.stream import encode_blocks, encode_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo_assets"
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
TEXTS = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, "
    "it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of "
    "Darkness, it was the spring of hope, it was the winter of despair.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
    "a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood.",
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and "
    "nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of "
    "the world.",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends of worms and an "
    "oozy smell, nor yet a dry, bare, sandy hole with nothing in it to sit down on or to eat.",
    "The sun shone, having no alternative, on the nothing new. Murphy sat out of it, as though he were free, in a "
    "mew in West Brompton.",
    "Happy families are all alike; every unhappy family is unhappy in its own way. Everything was in confusion in "
    "the Oblonskys' house.",
    "Whether I shall turn out to be the hero of my own life, or whether that station will be held by anybody else, "
    "these pages must show. To begin my life with the beginning of my life, I record that I was born on a Friday.",
)


def speech_pool(workdir: Path, seed: int = 0) -> list[Path]:
    """espeak-ng readings of TEXTS in several voices and speeds (22.05 kHz WAV), made once per workdir."""
    pool_dir = workdir / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i, text in enumerate(TEXTS):
        for voice in VOICES:
            path = pool_dir / f"{i}_{voice}.wav"
            if not path.exists():
                speed, pitch = rng.randint(135, 185), rng.randint(30, 70)
                subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                               check=True, capture_output=True)  # fmt: skip
            paths.append(path)
    return paths


def long_speech(workdir: Path, pool: list[Path], minutes: float, seed: int) -> Path:
    """A 16 kHz mono FLAC of `minutes` of pool readings in random order with random 0.2-1.5 s gaps (sox)."""
    out = workdir / f"speech_{minutes:g}min.flac"
    if out.exists():
        return out
    rng = random.Random(seed)
    gaps = {}
    for tenths in range(2, 16):
        gaps[tenths] = workdir / "pool" / f"gap_{tenths}.wav"
        if not gaps[tenths].exists():
            subprocess.run(["sox", "-n", "-r", "22050", "-c", "1", "-b", "16", str(gaps[tenths]), "trim", "0",
                            f"{tenths / 10}"], check=True)  # fmt: skip
    parts, total_s, pieces = [], 0.0, []
    durations = {p: float(subprocess.run(["soxi", "-D", str(p)], check=True, capture_output=True, text=True).stdout)
                 for p in pool}  # fmt: skip
    while total_s < minutes * 60:
        clip, tenths = rng.choice(pool), rng.randint(2, 15)
        parts += [clip, gaps[tenths]]
        total_s += durations[clip] + tenths / 10
    for start in range(0, len(parts), 200):  # sox opens every input at once: concatenate in pieces
        piece = workdir / f"piece_{seed}_{start // 200}.wav"
        subprocess.run(["sox", *map(str, parts[start : start + 200]), str(piece)], check=True)
        pieces.append(piece)
    subprocess.run(["sox", *map(str, pieces), "-r", "16000", str(out), "trim", "0", str(minutes * 60), "vol", "0.8"],
                   check=True)  # fmt: skip
    for piece in pieces:
        piece.unlink()
    return out


def run_cli(audio: Path, out: Path, extra: list[str]) -> dict:
    """The evaluate CLI (demo models, chunked) under GNU time: peak RSS, wall time, and what results.json says."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "moshi_ttt.evaluate", "--audio", str(audio), "--mode",
           "chunked", "--out", str(out), *extra]  # fmt: skip
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the CLI failed on {audio}:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    doc = json.loads(next(out.glob("*/results.json")).read_text())
    runs = {name: {"tokens_per_s": run["tokens_per_s"], "mean_loss": run["mean_loss"]} for name, run in
            doc["runs"].items()}  # fmt: skip
    return {"peak_rss_mb": rss_kb / 1024, "wall_s": seconds, "tokens": doc["audio"]["tokens"], "runs": runs,
            "scoring_peak_mb": next(iter(doc["runs"].values()))["peak_memory_mb"]}  # fmt: skip


def code_agreement(audio: Path) -> dict:
    """Shares of equal codes: the reference streamed codes vs whole-clip codes and vs moshi's server-style
    encoding (one frame per call, moshi's ring KV cache as it is)."""
    mimi = load(str(DEMO / "fair_baseline"), load_mimi=True).mimi
    info = check_audio(audio, max_seconds=None)
    start = time.perf_counter()
    streamed = encode_file(mimi, info)  # [1, 8, T]
    streamed_s = time.perf_counter() - start
    start = time.perf_counter()
    server = torch.cat(list(encode_blocks(mimi, [load_audio(audio, max_seconds=None).samples], frames_per_call=1,
                                          exact_window=False)), dim=-1)  # fmt: skip
    server_s = time.perf_counter() - start
    whole = encode(mimi, load_audio(audio, max_seconds=None))

    def share(other: torch.Tensor) -> dict:
        equal = (other == streamed).float()  # [1, 8, T]
        return {"all": equal.mean().item(), "per_codebook": [round(v, 4) for v in equal.mean(dim=(0, 2)).tolist()],
                "tokens_all_8_equal": equal.all(dim=1).float().mean().item()}  # fmt: skip

    return {"tokens": streamed.shape[-1], "vs_whole_clip": share(whole), "vs_server_style": share(server),
            "encode_s": {"streamed_25_frames": streamed_s, "server_style_1_frame": server_s},
            "codes": streamed}  # fmt: skip


def mode_agreement(codes: torch.Tensor, tokens: int) -> dict:
    """Max |loss difference| of the streamed codes' scores in chunked and stream mode against full, per demo model."""
    found = {}
    for name in ("fair_baseline", "ttt"):
        model = load(str(DEMO / name)).model
        x = codes[..., :tokens]
        full = score(model, x, "full").loss
        found[name] = {mode: (score(model, x, mode).loss - full).nan_to_num().abs().max().item()
                       for mode in ("chunked", "stream")}  # fmt: skip
        found[name]["mean_loss_full"] = full.nanmean().item()
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--short-min", type=float, default=2.0)
    p.add_argument("--long-min", type=float, default=60.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/moshi_ttt_long"))
    p.add_argument("--score-tokens", type=int, default=750, help="tokens scored in each mode (stream mode is slow)")
    p.add_argument("--skip-cli", action="store_true", help="only the codes and modes comparisons")
    p.add_argument("--no-telemetry", action="store_true", help="run the CLI with --no-telemetry")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.workdir.mkdir(parents=True, exist_ok=True)
    pool = speech_pool(args.workdir)
    short = long_speech(args.workdir, pool, args.short_min, seed=1)
    print(f"speech: {len(pool)} espeak-ng readings; files {short.name}", end="")
    long = None if args.skip_cli else long_speech(args.workdir, pool, args.long_min, seed=2)
    print(f", {long.name}" if long else "", flush=True)
    codes = code_agreement(short)
    print(f"streamed vs whole-clip codes on {codes['tokens']} tokens of speech (demo codec): "
          f"{codes['vs_whole_clip']['all']:.2%} equal (per codebook {codes['vs_whole_clip']['per_codebook']}), "
          f"all 8 equal at {codes['vs_whole_clip']['tokens_all_8_equal']:.2%} of the tokens")  # fmt: skip
    print(f"streamed vs moshi's server-style codes (1 frame per call, ring as is): "
          f"{codes['vs_server_style']['all']:.2%} equal (per codebook {codes['vs_server_style']['per_codebook']}); "
          f"encoding {codes['encode_s']['streamed_25_frames']:.1f} s (25 frames/call) vs "
          f"{codes['encode_s']['server_style_1_frame']:.1f} s (1 frame/call)", flush=True)  # fmt: skip
    modes = mode_agreement(codes["codes"], args.score_tokens)
    for name, found in modes.items():
        print(f"scores of the streamed codes, {name}, {args.score_tokens} tokens: max |chunked - full| "
              f"{found['chunked']:.2e}, max |stream - full| {found['stream']:.2e} nats "
              f"(mean loss {found['mean_loss_full']:.4f})", flush=True)  # fmt: skip
    if args.skip_cli:
        return
    results = {}
    for label, audio in (("short", short), ("long", long)):
        out = args.workdir / f"out_{label}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        results[label] = found = run_cli(audio, out, ["--no-telemetry"] if args.no_telemetry else [])
        speeds = ", ".join(f"{k} {v['tokens_per_s']:.0f} tokens/s" for k, v in found["runs"].items())
        print(f"CLI on {audio.name} ({found['tokens']} tokens): peak RSS {found['peak_rss_mb']:.0f} MB, wall "
              f"{found['wall_s']:.1f} s ({speeds}; scoring peak +{found['scoring_peak_mb']:.0f} MB)",
              flush=True)  # fmt: skip
    ratio = results["long"]["peak_rss_mb"] / results["short"]["peak_rss_mb"]
    print(f"peak RSS {args.long_min:g} min / {args.short_min:g} min = {ratio:.3f} (target <= 1.3); wall "
          f"{results['long']['wall_s'] / results['short']['wall_s']:.1f}x for "
          f"{results['long']['tokens'] / results['short']['tokens']:.1f}x the tokens")  # fmt: skip


if __name__ == "__main__":
    main()
