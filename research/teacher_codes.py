"""The codes a perfect student would give (issue 21): a `research.codec_distill` teacher (fixed log-mel features,
no network) through its quantizer, used as the codec of natural_mix training data and of natural_eval's measures.

It bounds what distillation can buy: `copyable` and `ceiling` on the teacher's codes against the same on a student
codec's say how much of the copy ceiling the student loses. The LM for `ceiling` is trained on `codes`' output
(`research.recipe_long_carry --data D`; its --codec only names a codec of the same shape).

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1; W: a codec_distill work dir holding teacher.pt):
    python -m research.teacher_codes codes --work W --data D            # D/{short,work}/codes.safetensors
    python -m research.teacher_codes copyable --work W R [R2 ...]
    python -m research.teacher_codes ceiling --work W --baseline B R [R2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

from moshi_ttt.data.codec import build_codec  # noqa: E402
from research import codec_distill, natural_eval, natural_mix  # noqa: E402
from research.codec_training import FRAME  # noqa: E402


class TeacherEncoder:
    """audio [N] -> codes [8, ceil(N / 1920)] long: the teacher's latent of the audio zero-padded to whole frames
    (as moshi's streaming encoding pads the last frame), through the quantizer fitted with it."""

    def __init__(self, work: Path):
        self.teacher, quantizer_state, self.name = codec_distill.load_teacher(work)
        mimi = build_codec(codec_distill.codec_config(8))  # only its quantizer is used
        mimi.quantizer.load_state_dict(quantizer_state)
        self.quantizer = mimi.quantizer

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(samples.reshape(1, -1), (0, -samples.shape[-1] % FRAME))
        return self.quantizer.encode(self.teacher(x))[0].long()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("codes", "copyable", "ceiling"))
    parser.add_argument("--work", type=Path, required=True, help="the codec_distill work dir (teacher.pt)")
    parser.add_argument("--data", type=Path, help="codes: a natural_mix directory")
    parser.add_argument("--baseline", type=Path, help="ceiling: a baseline trained on the teacher's codes")
    parser.add_argument("paths", type=Path, nargs="*", help="natural_corpus repeat sets")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    encode = TeacherEncoder(args.work)
    print(f"teacher: {encode.name}", flush=True)
    if args.stage == "codes":
        if args.data is None:
            parser.error("codes needs --data")
        natural_mix.encode_clips(args.data, encode)
        return 0
    if args.stage == "ceiling" and args.baseline is None:
        parser.error("ceiling needs --baseline")
    for path in args.paths:
        if args.stage == "copyable":
            result = natural_eval.copyable(path, None, encode)
            result["mean"] = round(sum(result["copyable_per_codebook"]) / len(result["copyable_per_codebook"]), 3)
        else:
            result = natural_eval.ceiling(path, args.baseline, encode=encode)
        print(path, json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
