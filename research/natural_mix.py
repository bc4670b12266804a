"""The training data of the long-carry recipe (issue 21): natural speech of research/natural_corpus.py's train split,
encoded with a given codec, in the layout scripts/demo_recipe.py reads (a work dir with corpus/index.json and
codes.safetensors), plus long files for carried streams.

- short repeat clips (`short/`): a 4-10 s passage read three times at sub-frame offsets, 1.5-6 s of other sentences
  between, light noise (read whole by the recipe: the first 416 tokens);
- plain clips (`work/`, kind "plain"): ~20 s of ordinary sentences, never repeating (random crops);
- repeat clips (`work/`, kind "repeat"): natural_corpus's repeat clips (8-14 s passages, 2-8 s gaps): crops, and the
  last few the recipe's validation;
- long files (`long/`): natural_corpus's long files (passages coming back minutes later), streamed in carried chunks.

Everything is drawn from the train split's voices (natural_corpus.VOICE_SPLITS): never the held-out ones.

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.natural_mix audio --out D --short 900 --plain 120 --repeat 60 --long 3 --long-minutes 12
    python -m research.natural_mix codes --out D --codec C       # D/{work,short}/codes.safetensors, D/long/*.pt
    (a set may be made in parts, e.g. two processes with other seeds and --out dirs: the recipe reads them all)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from research.natural_corpus import SAMPLE_RATE, Grammar, deliver, long_clip, random_voice, repeat_clip, speak  # noqa: E402

FRAME = 1920


def plain_clip(rng: random.Random, seconds: float, split: str = "train") -> np.ndarray:
    """Ordinary sentences of one voice of `split` with pauses, at a random level and SNR (never repeating)."""
    audio, _ = speak(Grammar(rng), random_voice(rng, split), rng, seconds)
    return deliver(audio, rng, rng.uniform(-30, -18), rng.uniform(25, 40))


def write_set(directory: Path, clips: dict[str, tuple[np.ndarray, list, str]]) -> None:
    """WAVs under directory/corpus and the index the recipe reads (name -> kind, split, readings in samples);
    nothing for no clips."""
    if not clips:
        return
    (directory / "corpus").mkdir(parents=True, exist_ok=True)
    index = {}
    for name, (audio, readings, kind) in clips.items():
        sf.write(directory / "corpus" / f"{name}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
        index[name] = {"kind": kind, "split": "train", "readings": readings, "samples": len(audio)}
    (directory / "corpus" / "index.json").write_text(json.dumps(index, indent=1))


def make_audio(args) -> None:
    start = time.perf_counter()
    rng = random.Random(args.seed)
    short = {}
    for i in range(args.short):  # the first --aligned-short on codec-frame boundaries (the strongest copy signal)
        clip = repeat_clip(rng, "train", (4.0, 10.0), (1.5, 6.0), i < args.aligned_short)
        short[f"short_{i:04d}"] = (clip.audio, clip.readings, "repeat")
    write_set(args.out / "short", short)
    print(f"{args.short} short clips ({time.perf_counter() - start:.0f} s)", flush=True)
    work = {}
    for i in range(args.repeat):
        clip = repeat_clip(rng, "train", (8.0, 14.0), (2.0, 8.0))
        work[f"repeat_{i:04d}"] = (clip.audio, clip.readings, "repeat")
    for i in range(args.plain):
        work[f"plain_{i:04d}"] = (plain_clip(rng, 20.0), [], "plain")
    write_set(args.out / "work", work)
    print(f"{args.repeat} repeat and {args.plain} plain clips ({time.perf_counter() - start:.0f} s)", flush=True)
    (args.out / "long").mkdir(parents=True, exist_ok=True)
    for i in range(args.long):
        clip = long_clip(rng, "train", args.long_minutes)
        sf.write(args.out / "long" / f"long_{i}.wav", clip.audio, SAMPLE_RATE, subtype="PCM_16")
        print(f"long file {i}: {len(clip.audio) / SAMPLE_RATE / 60:.1f} min ({time.perf_counter() - start:.0f} s)")


@torch.no_grad()
def encode_clips(out: Path, encode) -> None:
    """OUT/{short,work}/codes.safetensors: every clip of OUT/{short,work}/corpus through `encode` (audio [N] ->
    codes [K, T]), int16."""
    start = time.perf_counter()
    for part in ("short", "work"):
        if not (out / part / "corpus" / "index.json").exists():
            continue
        index = json.loads((out / part / "corpus" / "index.json").read_text())
        codes = {}
        for name in index:
            audio, _ = sf.read(out / part / "corpus" / f"{name}.wav", dtype="float32")
            codes[name] = encode(torch.from_numpy(audio)).to(torch.int16).contiguous()
        save_file(codes, str(out / part / "codes.safetensors"))
        print(f"{part}: {len(codes)} clips encoded ({time.perf_counter() - start:.0f} s)", flush=True)


@torch.no_grad()
def encode_all(args) -> None:
    from moshi_ttt.data.codec import load_codec

    mimi = load_codec(args.codec)
    encode_clips(args.out, lambda samples: mimi.encode(samples[None, None])[0])
    start = time.perf_counter()
    block = FRAME * 750  # 60 s blocks of whole frames (as research/long_drift.py)
    for wav in sorted((args.out / "long").glob("long_*.wav")):
        audio, _ = sf.read(wav, dtype="float32")
        parts = [mimi.encode(torch.from_numpy(audio[i : i + block])[None, None]) for i in range(0, len(audio), block)]
        torch.save(torch.cat(parts, dim=-1)[0], wav.with_suffix(".pt"))  # [8, T]
        print(f"{wav.name} encoded ({time.perf_counter() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("audio", "codes"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--codec", type=Path, help="codes: the codec directory")
    parser.add_argument("--short", type=int, default=900)
    parser.add_argument("--aligned-short", type=int, default=0, help="of the short clips, on codec-frame boundaries")
    parser.add_argument("--repeat", type=int, default=60)
    parser.add_argument("--plain", type=int, default=120)
    parser.add_argument("--long", type=int, default=3)
    parser.add_argument("--long-minutes", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=9090)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.stage == "audio":
        make_audio(args)
    else:
        if args.codec is None:
            parser.error("codes needs --codec")
        encode_all(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
