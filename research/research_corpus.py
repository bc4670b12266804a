"""Data for the issue-13 research scripts (research/: probe_memory, recipe_search, recipe_joint), with the saved
codec.

Usage:
    # codes of a corpus made by `build_demo_assets.py --stage corpus --work W`, encoded with demo_assets/codec
    # (the codec is not refit: the same codes as the build's, checked on the demo clips' WAV checksums)
    NO_TORCH_COMPILE=1 python -m research.research_corpus codes --work W
    # N short repeat clips (a 4.5-12 s passage read 3 times, 1.5 s+ of filler between) in their own work dir
    NO_TORCH_COMPILE=1 python -m research.research_corpus short --work S --count 240
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from moshi_ttt.data.codec import load_codec
from scripts.demo_corpus import read_corpus, short_repeat_clips

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("codes", "short"))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--count", type=int, default=240)
    parser.add_argument("--codec", type=Path, default=REPO / "demo_assets" / "codec")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    mimi = load_codec(args.codec)
    if args.what == "codes":
        _, audio = read_corpus(args.work)
    else:
        index, audio = short_repeat_clips(args.count)
        (args.work / "corpus").mkdir(parents=True, exist_ok=True)
        (args.work / "corpus" / "index.json").write_text(json.dumps(index, indent=1))
    with torch.no_grad():
        codes = {name: mimi.encode(a)[0].contiguous() for name, a in audio.items()}  # [8, frames] each
    save_file(codes, str(args.work / "codes.safetensors"))
    print(f"{len(codes)} clips, {sum(c.shape[1] for c in codes.values())} frames -> {args.work / 'codes.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
