"""Reproducible build of demo_assets/: a synthetic speech corpus, a small Mimi-architecture codec, a baseline LM, the
TTT model with its fair baseline, and the evaluation written to demo_assets/MANIFEST.md.

Needs: espeak-ng (`apt-get install espeak-ng`) and the Python requirements of this repo. CPU only, seeded; stages
cache their outputs in --work (outside the repo) and can be run one by one:

    NO_TORCH_COMPILE=1 python scripts/build_demo_assets.py --stage all --work /tmp/demo_work
    NO_TORCH_COMPILE=1 python scripts/build_demo_assets.py --stage eval   # re-evaluates the saved assets

Stages: corpus (espeak-ng clips) -> codec (k-means/EMA codebooks, codes of every clip) -> baseline (plain LM
training) -> ttt (TTT model and fair baseline, same extra steps) -> eval (losses, MANIFEST.md).
Bit-stability holds for a fixed --threads on the same machine and torch build (float sums depend on both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: moshi_ttt without installing

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from demo_corpus import FRAME, SAMPLE_RATE, SentenceMaker, check_espeak, plain_clip, repeat_clip  # noqa: E402
from demo_eval import evaluate, write_manifest  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from moshi_ttt import TTTConfig, apply_ttt, ttt_blocks  # noqa: E402
from moshi_ttt.checkpoints import load, save  # noqa: E402
from moshi_ttt.codec import build_codec, load_codec, save_codec  # noqa: E402
from moshi_ttt.sequence import model_codes  # noqa: E402
from moshi_ttt.train import TrainConfig, Trainer, audio_loss  # noqa: E402
from moshi_ttt.train_data import CodeBatcher, training_codes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = ("corpus", "codec", "baseline", "ttt", "eval")

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

# --- LM: moshi's LMModel, small; attention context 50 tokens = 4 s. ---
LM_CONFIG = {
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1], "n_q": 8, "dep_q": 8, "card": 256, "text_card": 8,
    "existing_text_padding_id": 3, "dim": 128, "num_heads": 4, "num_layers": 4, "hidden_scale": 4.0,
    "causal": True, "context": 50, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 64, "depformer_dim_feedforward": 128,
    "depformer_num_heads": 2, "depformer_num_layers": 1, "depformer_context": 8, "depformer_max_period": 10000,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "depformer_multi_linear": True,
}  # fmt: skip
BASELINE = {"steps": 150, "batch_size": 12, "seq_len": 100, "lr": 3e-3, "warmup": 30}
# share_qk (ttt-lm-pytorch's causal convolutions on one q/k projection), started as a one-token shift: the key of
# token t is made from token t - 1 and its query from token t, so the fast weights store "what followed" and a query
# can recall it (see MANIFEST.md, "What was tried", for the runs without them).
TTT = TTTConfig(layers="1,2,3", mini_batch_size=16, base_lr=4.0, gating_alpha_init=0.1, share_qk=True)
# Only the TTT weights train (the baseline's weights stay frozen: training them too overfits the 80 clips within
# ~100 steps), so the fair baseline is the baseline itself. Chunks of 864 tokens hold a whole clip (every clip is
# < 69 s): a passage and its readings sit in one backpropagation graph. W_base at 3x lr, the gate at 10x lr.
EXTRA = TrainConfig(
    steps=300, batch_size=2, chunk_size=864, lr=3e-3, weight_lr_multiplier=3.0, alpha_lr_multiplier=10.0
)


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


def read_corpus(work: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    corpus = work / "corpus"
    index = json.loads((corpus / "index.json").read_text())
    audio = {}
    for name in index:
        data, sr = sf.read(corpus / f"{name}.wav", dtype="float32")
        assert sr == SAMPLE_RATE
        pad = (-len(data)) % FRAME  # whole frames: the codec gives one code per 1920 samples
        audio[name] = torch.from_numpy(np.pad(data, (0, pad)))[None, None]  # [1, 1, samples]
    return index, audio


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
    heldout = torch.cat([codes[n] for n, v in index.items() if v["split"] == "heldout"], dim=1)
    bins = CODEC_CONFIG["quantizer"]["bins"]
    usage = [len(torch.unique(heldout[k])) / bins for k in range(heldout.shape[0])]
    save_codec(out / "codec", mimi, CODEC_CONFIG)
    reloaded = load_codec(out / "codec")
    with torch.no_grad():
        name = next(iter(DEMO_CLIPS))
        if not torch.equal(reloaded.encode(audio[name])[0], codes[name]):
            raise RuntimeError("the saved codec does not reproduce the codes it was fit with")
    save_file(codes, str(work / "codes.safetensors"))
    report = {"usage_heldout": usage, "heldout_frames": heldout.shape[1], "passes": CODEC_PASSES}
    (work / "codec_report.json").write_text(json.dumps(report, indent=1))
    log(f"codec: held-out codebook usage {[f'{u:.0%}' for u in usage]} on {heldout.shape[1]} frames")
    if min(usage) < 0.5:
        log("WARNING: a codebook uses < 50% of its entries on held-out speech")


def read_codes(work: Path, split: str) -> dict[str, torch.Tensor]:
    index = json.loads((work / "corpus" / "index.json").read_text())
    codes = load_file(str(work / "codes.safetensors"))
    return {n: codes[n].long() for n, v in index.items() if v["split"] == split}


# ---------------------------------------------------------------- baseline
def stage_baseline(work: Path, seed: int) -> None:
    index = json.loads((work / "corpus" / "index.json").read_text())
    # All training clips, so that the TTT model's extra training adds no data the baseline has not seen: random
    # crops of 100 tokens, where a 50-token attention window cannot reach an earlier reading of a passage.
    files = list(read_codes(work, "train").values())
    heldout = [c for n, c in read_codes(work, "heldout").items() if index[n]["kind"] == "plain"]
    torch.manual_seed(seed)
    model = LMModel(device="cpu", dtype=torch.float32, **LM_CONFIG).train()
    cfg = BASELINE
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(seed)
    weights = [f.shape[1] for f in files]
    losses, heldout_losses = [], {}
    for step in range(cfg["steps"]):
        crops = []
        for f in rng.choices(files, weights=weights, k=cfg["batch_size"]):
            start = rng.randrange(0, f.shape[1] - cfg["seq_len"] + 1)
            crops.append(f[:, start : start + cfg["seq_len"]])
        warm = min(1.0, (step + 1) / cfg["warmup"])
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * warm * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))
        loss = audio_loss(model, model_codes(model, torch.stack(crops)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            with torch.no_grad():
                model.eval()
                val = [audio_loss(model, model_codes(model, c[None])).item() for c in heldout]
                model.train()
            heldout_losses[step + 1] = float(np.mean(val))
            train_loss = np.mean(losses[-50:])
            log(f"baseline step {step + 1}/{cfg['steps']}: loss {train_loss:.4f}, held out {np.mean(val):.4f}")
    save(work / "baseline", model, lm_config=LM_CONFIG, overwrite=True)
    (work / "baseline_losses.json").write_text(json.dumps({"train": losses, "heldout": heldout_losses}))


# ---------------------------------------------------------------- ttt + fair baseline
VARIANTS = ("ttt", "fair_baseline")


def stage_ttt(work: Path, out: Path, seed: int, variants: tuple[str, ...] = VARIANTS) -> None:
    """The TTT model: the baseline plus TTT layers, only those trained ("ttt"); the fair baseline: the baseline,
    whose weights that training leaves unchanged, with its loss on the same training batches ("fair_baseline")."""
    index = json.loads((work / "corpus" / "index.json").read_text())
    files = [c for n, c in read_codes(work, "train").items() if index[n]["kind"] == "repeat"]
    cfg = dataclasses.replace(EXTRA, seed=seed)
    for name in variants:
        model = load(str(work / "baseline")).model
        torch.manual_seed(seed)  # after the load: the TTT initialisation must not depend on how loading works
        if name == "ttt":
            apply_ttt(model, TTT)
            for block in ttt_blocks(model).values():
                block.init_qk_shift()
            trainer = Trainer(model, files, cfg)
            losses = trainer.run(on_step=lambda s, v: s % 20 == 0 and log(f"ttt step {s}: loss {v:.4f}"))
        else:  # frozen: the loss of the same batches in the same order
            batcher = CodeBatcher(files, cfg.batch_size, cfg.chunk_size, cfg.seed)
            with torch.no_grad():
                losses = [
                    audio_loss(model, training_codes(model, batcher.next_batch()[0])).item() for _ in range(cfg.steps)
                ]
        save(out / name, model.eval(), lm_config=LM_CONFIG, mimi_ref="../codec", overwrite=True)
        (work / f"extra_losses_{name}.json").write_text(json.dumps(losses))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_work"), help="cache of the stages' outputs")
    parser.add_argument("--out", type=Path, default=REPO / "demo_assets", help="where the assets go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument(
        "--variant", choices=VARIANTS, help="stage ttt: train only this model (run both in parallel on 2 cores)"
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
        elif stage == "baseline":
            stage_baseline(args.work, args.seed)
        elif stage == "ttt":
            stage_ttt(args.work, args.out, args.seed, (args.variant,) if args.variant else VARIANTS)
        else:
            results = evaluate(args.work, args.out)
            write_manifest(args.work, args.out, results)
        timings[stage] = time.time() - start
        log(f"stage {stage} done in {timings[stage]:.0f} s")
    commands = args.work / "commands.json"
    old_commands = json.loads(commands.read_text()) if commands.exists() else {}
    command = "python scripts/build_demo_assets.py " + " ".join(sys.argv[1:] if argv is None else argv)
    commands.write_text(json.dumps({**old_commands, f"{args.stage} {args.variant or ''}".strip(): command}, indent=1))
    path = args.work / f"timings{'_' + args.variant if args.variant else ''}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **timings}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
