"""Reproducible build of demo_assets/: a synthetic speech corpus, a small Mimi-architecture codec, the TTT LM with
its fair baseline, and the evaluation written to demo_assets/MANIFEST.md.

Needs: espeak-ng (`apt-get install espeak-ng`) and the Python requirements of this repo. CPU only, seeded; stages
cache their outputs in --work (outside the repo) and can be run one by one:

    NO_TORCH_COMPILE=1 python -m scripts.build_demo_assets --stage all --work /tmp/demo_work
    NO_TORCH_COMPILE=1 python -m scripts.build_demo_assets --stage eval   # re-evaluates the saved assets

(from the repo root). Stages: corpus (espeak-ng clips) -> codec (k-means/EMA codebooks, codes of every clip; or
codes: the corpus encoded with the codec already in --out, as these assets were) -> short (short repeat clips,
encoded) -> joint (the TTT model and its fair baseline, trained from one initialisation on the same batches:
moshi_ttt.training's paired training with JOINT_RECIPE, scripts/demo_recipe.py; --variant trains one, so both can
run at once) -> eval (losses, MANIFEST.md).
Bit-stability holds for a fixed --threads on the same machine and torch build (float sums depend on both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import soundfile as sf
import torch
from safetensors.torch import save_file

from moshi_ttt.data.checkpoints import save
from moshi_ttt.data.codec import build_codec, load_codec, save_codec
from scripts.demo_corpus import (
    SAMPLE_RATE,
    SentenceMaker,
    check_espeak,
    plain_clip,
    read_corpus,
    repeat_clip,
    short_repeat_clips,
)
from scripts.demo_eval import evaluate, write_manifest
from scripts.demo_lm_config import LM_CONFIG
from scripts.demo_recipe import VARIANTS, JointRecipe, train_joint

REPO = Path(__file__).resolve().parent.parent
STAGES = ("corpus", "codec", "short", "joint", "eval")

# --- corpus: (name prefix, count, kind, split). Durations in seconds. ---
# The baseline learns from every training clip (crops shorter than a passage and its next reading); the TTT
# training reads the repeat clips whole, each passage seen only a few times, so that a passage is remembered from
# the clip, not from the weights.
CORPUS = [("train_plain", 100, "plain", "train"), ("train_repeat", 80, "repeat", "train")]
CORPUS += [("heldout_plain", 4, "plain", "heldout"), ("heldout_repeat", 3, "repeat", "heldout")]
PLAIN_S, PASSAGE_S, FILLER_S = 20.0, 10.0, 5.0
DEMO_CLIPS = {"heldout_repeat_00": "demo_repeat", "heldout_plain_00": "demo_plain"}

# --- codec: Mimi's layout (SEANet ratios 8,6,5,4 -> 25 Hz, conv downsample -> 12.5 Hz; 1 + 7 codebooks), small. ---
CODEC_DIM = 64
CODEC_CONFIG = {
    "sample_rate": SAMPLE_RATE, "channels": 1, "frame_rate": 12.5, "num_codebooks": 8,
    "seanet": {
        "channels": 1, "dimension": CODEC_DIM, "causal": True, "n_filters": 8, "n_residual_layers": 1,
        "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0, "kernel_size": 7,
        "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none", "pad_mode": "constant",
        "ratios": [8, 6, 5, 4], "true_skip": True,
    },
    "quantizer": {
        "dimension": 32, "n_q": 8, "bins": 256, "input_dimension": CODEC_DIM, "output_dimension": CODEC_DIM,
    },
    "transformer": {
        "d_model": CODEC_DIM, "num_heads": 4, "num_layers": 1, "causal": True, "layer_scale": 0.01, "context": 250,
        "conv_layout": True, "max_period": 10000, "gating": "none", "norm": "layer_norm",
        "positional_embedding": "rope", "dim_feedforward": 128, "input_dimension": CODEC_DIM,
        "output_dimensions": [CODEC_DIM],
    },
}  # fmt: skip
CODEC_PASSES = 40  # training-mode quantizer passes: 8 k-means initialisations (one level each), then EMA updates

SHORT_CLIPS = 1440  # short repeat clips (demo_corpus.short_repeat_clips), each seen ~2.5 times in training
# The models (scripts/demo_recipe.py, MANIFEST.md "Issue 13", recipe J8): the TTT LM and its fair baseline trained
# from the same seeded initialisation on the same batches for the same steps; the TTT model adds one TTT block in
# layer 0 that reads the layer input beside attention (one head of width 128, share_qk started as a one-token shift,
# wq = wv = identity). Both in one process (lockstep), or one each (--variant): both at once on 2 cores.
JOINT_RECIPE = JointRecipe(
    layers="0", read="before", heads=1, inner="mlp", mini_batch_size=16, base_lr=4.0, alpha=0.1, batch_size=6,
    seq_len=416, short_frac=0.33, copy_frac=0.33, steps=1800, lr=3e-3, decay_start=0.5, eval_every=100,
)  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- corpus
def stage_corpus(work: Path, out: Path, seed: int) -> None:
    check_espeak()
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    maker, rng, index = SentenceMaker(seed), random.Random(seed + 1), {}
    for prefix, count, kind, split in CORPUS:
        for i in range(count):
            name = f"{prefix}_{i:02d}"
            if kind == "plain":
                clip = plain_clip(name, maker, rng, PLAIN_S * (2 if name in DEMO_CLIPS else 1))
            else:
                clip = repeat_clip(name, maker, rng, PASSAGE_S, FILLER_S)
            sf.write(corpus / f"{name}.wav", clip.audio, SAMPLE_RATE, subtype="PCM_16")
            index[name] = {
                "kind": kind, "split": split, "text": clip.text, "voice": dataclasses.asdict(clip.voice),
                "samples": len(clip.audio), "readings": clip.readings,
            }  # fmt: skip
    (corpus / "index.json").write_text(json.dumps(index, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    for name, demo in DEMO_CLIPS.items():
        (out / f"{demo}.wav").write_bytes((corpus / f"{name}.wav").read_bytes())
        (out / f"{demo}.txt").write_text(index[name]["text"] + "\n")
    total = {
        s: sum(v["samples"] for v in index.values() if v["split"] == s) / SAMPLE_RATE / 60 for s in ("train", "heldout")
    }
    log(f"corpus: {len(index)} clips, {total['train']:.1f} min train, {total['heldout']:.1f} min held out")


# ---------------------------------------------------------------- codec
def stage_codec(work: Path, out: Path, seed: int) -> None:
    index, audio = read_corpus(work)
    torch.manual_seed(seed)
    mimi = build_codec(CODEC_CONFIG)  # encoder, decoder and projections stay random (see MANIFEST.md)
    with torch.no_grad():
        latents = {n: mimi._encode_to_unquantized_latent(a) for n, a in audio.items()}  # [1, D, frames]
        train = torch.cat([latents[n] for n, v in index.items() if v["split"] == "train"], dim=2)
        mimi.quantizer.train()
        for _ in range(CODEC_PASSES):
            mimi.quantizer(train, mimi.frame_rate)  # moshi's k-means init, EMA updates, dead-code replacement
        mimi.quantizer.eval()
        codes = {n: mimi.quantizer.encode(lat)[0].contiguous() for n, lat in latents.items()}  # [8, frames]
    save_codec(out / "codec", mimi, CODEC_CONFIG)
    reloaded = load_codec(out / "codec")
    with torch.no_grad():
        name = next(iter(DEMO_CLIPS))
        if not torch.equal(reloaded.encode(audio[name])[0], codes[name]):
            raise RuntimeError("the saved codec does not reproduce the codes it was fit with")
    write_codes(work, index, codes)


def write_codes(work: Path, index: dict, codes: dict[str, torch.Tensor]) -> None:
    """work/codes.safetensors and codec_report.json (held-out codebook usage)."""
    heldout = torch.cat([codes[n] for n, v in index.items() if v["split"] == "heldout"], dim=1)
    bins = CODEC_CONFIG["quantizer"]["bins"]
    usage = [len(torch.unique(heldout[k])) / bins for k in range(heldout.shape[0])]
    save_file(codes, str(work / "codes.safetensors"))
    report = {"usage_heldout": usage, "heldout_frames": heldout.shape[1], "passes": CODEC_PASSES}
    (work / "codec_report.json").write_text(json.dumps(report, indent=1))
    log(f"codec: held-out codebook usage {[f'{u:.0%}' for u in usage]} on {heldout.shape[1]} frames")
    if min(usage) < 0.5:
        log("WARNING: a codebook uses < 50% of its entries on held-out speech")


def stage_codes(work: Path, out: Path) -> None:
    """The corpus encoded with the codec already in `out` (no refit): the k-means fit of stage codec is
    bit-stable only on the CPU and torch build that ran it, so a rebuild elsewhere starts from the shipped codec."""
    index, audio = read_corpus(work)
    mimi = load_codec(out / "codec")
    with torch.no_grad():
        codes = {n: mimi.encode(a)[0].contiguous() for n, a in audio.items()}  # [8, frames]
    write_codes(work, index, codes)


# ---------------------------------------------------------------- short repeat clips
def stage_short(work: Path, out: Path) -> None:
    """SHORT_CLIPS short repeat clips (new sentences, the six voices), encoded with the codec in `out`."""
    index, audio = short_repeat_clips(SHORT_CLIPS)
    (work / "short" / "corpus").mkdir(parents=True, exist_ok=True)
    (work / "short" / "corpus" / "index.json").write_text(json.dumps(index, indent=1))
    mimi = load_codec(out / "codec")
    with torch.no_grad():
        codes = {name: mimi.encode(a)[0].contiguous() for name, a in audio.items()}  # [8, frames] each
    save_file(codes, str(work / "short" / "codes.safetensors"))
    log(f"short: {len(codes)} clips, {sum(c.shape[1] for c in codes.values())} frames")


# ---------------------------------------------------------------- joint training: ttt + fair baseline
def stage_joint(work: Path, out: Path, seed: int, threads: int, variants: tuple[str, ...]) -> None:
    """Trains the asset models named in `variants` with JOINT_RECIPE (both in lockstep when both are named) and
    saves them to `out`, with their validation history and held-out scores in work/joint_<name>.json."""
    trained = train_joint(JOINT_RECIPE, variants, work, work / "short", seed, threads, heldout=True, log=log)
    for name, (model, result) in trained.items():
        save(out / name, model, lm_config=LM_CONFIG, mimi_ref="../codec", overwrite=True)
        (work / f"joint_{name}.json").write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=[*STAGES, "codes", "all"], default="all")
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_work"), help="cache of the stages' outputs")
    parser.add_argument("--out", type=Path, default=REPO / "demo_assets", help="where the assets go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument(
        "--variant", choices=tuple(VARIANTS), help="stage joint: train only this model (run both at once on 2 cores)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.work.mkdir(parents=True, exist_ok=True)
    timings = {}
    for stage in STAGES if args.stage == "all" else (args.stage,):
        start = time.time()
        log(f"stage {stage}")
        if stage == "corpus":
            stage_corpus(args.work, args.out, args.seed)
        elif stage == "codec":
            stage_codec(args.work, args.out, args.seed)
        elif stage == "codes":
            stage_codes(args.work, args.out)
        elif stage == "short":
            stage_short(args.work, args.out)
        elif stage == "joint":
            stage_joint(
                args.work, args.out, args.seed, args.threads, (args.variant,) if args.variant else tuple(VARIANTS)
            )
        else:
            results = evaluate(args.work, args.out)
            write_manifest(args.work, args.out, results)
        timings[stage] = time.time() - start
        log(f"stage {stage} done in {timings[stage]:.0f} s")
    commands = args.work / "commands.json"
    old_commands = json.loads(commands.read_text()) if commands.exists() else {}
    command = "python -m scripts.build_demo_assets " + " ".join(sys.argv[1:] if argv is None else argv)
    commands.write_text(json.dumps({**old_commands, f"{args.stage} {args.variant or ''}".strip(): command}, indent=1))
    path = args.work / f"timings{'_' + args.variant if args.variant else ''}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **timings}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
