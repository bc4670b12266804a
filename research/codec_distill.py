"""A distilled content codec (issue 21): a Mimi-class codec whose codes carry content that survives random
sub-frame shifts of the audio, so that a language model can copy an earlier reading of a passage.

Design (teacher -> quantizer -> student -> decoder), all of it moshi's own classes (`MimiModel` built by
`moshi_ttt.data.codec.build_codec` from the shipped config shape), one thread, seeded:

1. Teacher (no network): per 80 ms frame t (samples [1920 t, 1920 (t + 1)) of the clip as encoded), the 80-band
   log-mel (25 ms Hann windows, 10 ms hop; `frontend_probe.log_mel`'s filters) averaged over a *causal* window of
   W ms whose last mel window ends 148 samples before the frame's end (zeros left of the clip, as the causal encoder
   sees), normalised per band with the training set's global mean and std. A fixed linear map A [80, 64] gives the
   target latent z* = f A: dims 0..31 the top-32 PCA of f (the semantic split), dims 32..59 seven 4-dim groups (the
   acoustic split; "bands": the top-4 PCA of 7 groups of consecutive mel bands, or "global": global PCs 1..28 in
   groups of 4), dims 60..63 zero. `--shapes hann` weights the window with a Hann bump instead of uniformly (a mel
   frame entering or leaving the window moves the average little: more agreement under offsets at equal persistence);
   `--min-band-std S` leaves out the bands whose std in the training clips is below S (above espeak-ng's 11 kHz:
   without it a user's light noise there sends the teacher's codes far out of range).
2. Quantizer: moshi's `SplitResidualVectorQuantizer` (n_q 8, 256 bins, dimension 32, input dimension 64) with its
   input projections set to select z's halves, the semantic codebook k-means of z*[:32] (256 codes), and the 7
   acoustic stages a product quantizer: stage k's codewords are zero outside dims 4k..4k+3 of the acoustic half, so
   the residual VQ's nearest-codeword search at stage k sees only subspace k (not a residual of residuals).
   Codewords live in `EuclideanCodebook` buffers (embedding_sum = codeword, cluster_usage = 1, initialized = 1).
3. Student: the MimiModel encoder path (SEANet encoder, encoder transformer, conv downsample) trained to regress z*
   (MSE on `_encode_to_unquantized_latent`) on random crops starting at a random sample of training clips
   (`codec_training.make_audio(31, "train", ...)`, or with `--train-dir` clips of the LM's own natural_mix audio:
   the codec then learns on the kind of audio users give it), the target computed on the same crop; light gain on
   the crop and light noise on the input only. `--consistency L` adds L times the squared difference between the
   latents of a crop and of the same crop moved by a random sub-frame offset (frame by frame; batches of pairs).
4. Measures (held-out `make_audio(32, "heldout", 6, 8.0)`, `codec_training`/`frontend_probe`'s functions): shipped
   codec, the teacher through the same quantizer (no network), the student codec.
5. Decoder: SEANet decoder + decoder transformer + upsample + quantizer output projections trained from the frozen
   codes with the multi-scale log-mel L1 (`codec_training.mel_distance`).

Stages (each reads what the earlier ones wrote under --work):
    teacher   features, normalisation, PCA, codebooks for W in --widths x acoustic layout in --layouts, measured;
              the best (mean speech-aligned agreement minus mean persistence) kept as WORK/teacher.pt
    student   trains the encoder (--steps), installs the quantizer, measures, saves WORK/codec (and --codes-out,
              then touches --ready)
    decoder   trains the decoder side (--decoder-steps) from WORK/codec, saves WORK/codec_dec (and --decoder-out),
              checks its codes equal the codes codec's, writes decoded.wav / input.wav
Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.codec_distill --work /tmp/i21d/codec/work --stages teacher student decoder
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from moshi_ttt.data.codec import build_codec, load_codec, save_codec  # noqa: E402
from research.codec_training import (  # noqa: E402
    FRAME,
    REPO,
    SAMPLE_RATE,
    make_audio,
    mel_distance,
    mel_filters,
    reconstruction,
)
from research.frontend_probe import HOP, N_FFT, WIN, fmt, kmeans, measure  # noqa: E402

N_MELS = 80
PAD_MEL = 30  # mel frames of zeros left of the audio (7200 samples, more than any window)
SEM, GROUPS, GDIM = 32, 7, 4
_FB = mel_filters(N_FFT, N_MELS)
_WINDOW = torch.hann_window(WIN)


def window_weights(n: int, shape: str) -> torch.Tensor:
    """[n] weights (sum 1, oldest first) of the teacher's averaging window over n mel frames: "box" (uniform) or
    "hann" (a Hann bump that fades in and out, so a mel frame entering or leaving the window moves the average
    little)."""
    if shape == "box":
        return torch.full((n,), 1.0 / n)
    if shape == "hann":
        w = torch.hann_window(n + 2, periodic=False, dtype=torch.float64)[1:-1]
        return (w / w.sum()).float()
    raise ValueError(f"unknown window shape {shape!r} (box or hann)")


def causal_features(audio: torch.Tensor, width_ms: float, shape: str = "box") -> torch.Tensor:
    """[B, N] audio (N a multiple of 1920) -> [B, T, 80] log-mel averaged over the n = width / 10 ms mel frames whose
    25 ms windows end at most 120 samples before each frame's end (zeros left of the clip), uniformly ("box") or
    with `window_weights(n, shape)`."""
    n = int(round(width_ms / 10))
    pad = PAD_MEL if shape == "box" else max(PAD_MEL, n + 5)  # mel frames of zeros left of the audio
    x = torch.nn.functional.pad(audio, (pad * HOP, (N_FFT - WIN) // 2))  # right: zero-weight samples
    spec = torch.stft(x, N_FFT, HOP, WIN, _WINDOW, center=False, return_complex=True).abs() ** 2  # [B, F, K]
    mel = torch.log(_FB @ spec + 1e-6)  # [B, 80, K]; mel window k: samples [240 k + 212, 240 k + 812) - pad
    T = audio.shape[-1] // FRAME
    last = 8 * torch.arange(T) + pad + 4  # the last mel window, ending at 1920 (t + 1) - 148
    if shape != "box":
        idx = last[:, None] - (n - 1) + torch.arange(n)  # [T, n] mel frames, oldest first
        return (mel[..., idx] @ window_weights(n, shape)).transpose(1, 2)
    # the box by cumulative sums (bit-identical to the build of v2)
    cs = torch.nn.functional.pad(mel.cumsum(-1), (1, 0))  # cs[..., k] = sum of mel frames < k
    return ((cs[..., last + 1] - cs[..., last + 1 - n]) / n).transpose(1, 2)


class Teacher:
    """z* = ((features - mean) / std) @ A; a torch-saveable dict."""

    def __init__(
        self, width_ms: float, mean: torch.Tensor, std: torch.Tensor, A: torch.Tensor, layout: str, shape: str = "box"
    ):
        self.width_ms, self.mean, self.std, self.A, self.layout, self.shape = width_ms, mean, std, A, layout, shape

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:  # [B, N] -> [B, 64, T]
        f = (causal_features(audio, self.width_ms, self.shape) - self.mean) / self.std
        return (f @ self.A).transpose(1, 2)

    def state(self) -> dict:
        return {"width_ms": self.width_ms, "mean": self.mean, "std": self.std, "A": self.A, "layout": self.layout,
                "shape": self.shape}  # fmt: skip


def pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k principal directions [D, k] of centred x [N, D] (sign fixed: largest entry positive)."""
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    v = vh[:k].T.float()
    return v * torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))


def fit_teacher(
    feats: torch.Tensor, width_ms: float, layout: str, shape: str = "box", min_band_std: float = 0.0
) -> Teacher:
    """feats [N, 80] raw training features -> the teacher's normalisation and map A [80, 64]. Bands whose raw std is
    below `min_band_std` (those the training speech never reaches: above espeak-ng's 11 kHz, where a user's noise
    then lands hundreds of stds away) are left out: zero rows of A."""
    mean, std = feats.mean(0), feats.std(0) + 1e-3
    f = (feats - mean) / std
    dead = feats.std(0) < min_band_std
    f[:, dead] = 0.0
    A = torch.zeros(N_MELS, 64)
    glob = pca(f, SEM + GROUPS * GDIM)
    A[:, :SEM] = glob[:, :SEM]
    if layout == "global":
        A[:, SEM : SEM + GROUPS * GDIM] = glob[:, : GROUPS * GDIM]
    else:  # bands: 7 groups of consecutive mel bands, top-4 PCs of each
        edges = np.linspace(0, N_MELS, GROUPS + 1).round().astype(int)
        for g in range(GROUPS):
            lo, hi = edges[g], edges[g + 1]
            A[lo:hi, SEM + GDIM * g : SEM + GDIM * (g + 1)] = pca(f[:, lo:hi], GDIM)
    A[dead] = 0.0
    return Teacher(width_ms, mean, std, A, layout, shape)


def quantizer_layers(mimi) -> list:
    """moshi's `SplitResidualVectorQuantizer` stages in code order: the semantic one, then the 7 acoustic ones (each
    holds its codewords in `layer._codebook`)."""
    return [mimi.quantizer.rvq_first.vq.layers[0], *mimi.quantizer.rvq_rest.vq.layers]


def install_quantizer(mimi, z: torch.Tensor, iters: int, seed: int) -> None:
    """Sets mimi's split quantizer: input projections select z's halves, output projections put them back, the
    semantic codebook k-means of z[:, :32], acoustic stage k the k-means of z[:, 32 + 4k : 36 + 4k] embedded with
    zeros elsewhere. z: [N, 64] training targets."""
    gen = torch.Generator().manual_seed(seed)
    q = mimi.quantizer
    eye = torch.eye(32)
    with torch.no_grad():
        q.rvq_first.input_proj.weight.copy_(torch.cat([eye, torch.zeros(32, 32)], 1)[..., None])
        q.rvq_rest.input_proj.weight.copy_(torch.cat([torch.zeros(32, 32), eye], 1)[..., None])
        q.rvq_first.output_proj.weight.copy_(torch.cat([eye, torch.zeros(32, 32)], 0)[..., None])
        q.rvq_rest.output_proj.weight.copy_(torch.cat([torch.zeros(32, 32), eye], 0)[..., None])
        books = [kmeans(z[:, :SEM], 256, iters, gen)]
        for g in range(GROUPS):
            sub = kmeans(z[:, SEM + GDIM * g : SEM + GDIM * (g + 1)], 256, iters, gen)
            book = torch.zeros(256, 32)
            book[:, GDIM * g : GDIM * (g + 1)] = sub
            books.append(book)
        for layer, book in zip(quantizer_layers(mimi), books, strict=True):
            cb = layer._codebook
            cb.embedding_sum.copy_(book)
            cb.cluster_usage.fill_(1.0)
            cb._initialized.fill_(1.0)
            cb._embedding = None
            cb._cached_initialized = False


class TeacherCodec:
    """Duck-typed codec for the measures: the teacher's z* through a MimiModel's quantizer."""

    def __init__(self, teacher: Teacher, mimi):
        self.teacher, self.quantizer = teacher, mimi.quantizer
        self.num_codebooks, self.cardinality = mimi.num_codebooks, mimi.cardinality

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.encode(self.teacher(x[:, 0]))


# The demo codec's shape (v1's, kept by v2): Mimi's SEANet ratios, one projected transformer layer each side, split
# RVQ of 1 + 7 codebooks of 256; SEANet's filters are the one choice (--n-filters).
CODEC_SHAPE = {
    "channels": 1,
    "frame_rate": 12.5,
    "num_codebooks": 8,
    "quantizer": {"bins": 256, "dimension": 32, "input_dimension": 64, "n_q": 8, "output_dimension": 64},
    "sample_rate": 24000,
    "seanet": {
        "activation": "ELU",
        "causal": True,
        "channels": 1,
        "compress": 2,
        "dilation_base": 2,
        "dimension": 64,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "last_kernel_size": 3,
        "n_residual_layers": 1,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "residual_kernel_size": 3,
        "true_skip": True,
    },
    "transformer": {
        "causal": True,
        "context": 250,
        "conv_layout": True,
        "d_model": 64,
        "dim_feedforward": 128,
        "gating": "none",
        "input_dimension": 64,
        "layer_scale": 0.01,
        "max_period": 10000,
        "norm": "layer_norm",
        "num_heads": 4,
        "num_layers": 1,
        "output_dimensions": [64],
        "positional_embedding": "rope",
    },
}


def codec_config(n_filters: int) -> dict:
    config = copy.deepcopy(CODEC_SHAPE)
    config["seanet"]["n_filters"] = n_filters
    return config


def summary(name: str, r: dict) -> str:
    sa, p = r["speech_aligned_agreement"], r["persistence"]
    return (
        f"{name}: speech-aligned {fmt(sa)} (mean {np.mean(sa):.3f}) | cross {fmt(r['cross_agreement'])} | "
        f"persistence {fmt(p)} (mean {np.mean(p):.3f}) | aligned {fmt(r['aligned_agreement'])} | "
        f"bits {fmt(r['usage_bits'])}"
    )


def score(r: dict) -> float:
    return float(np.mean(r["speech_aligned_agreement"]) - np.mean(r["persistence"]))


def stage_teacher(args, log, train, heldout) -> None:
    results = {"demo_assets codec": measure(load_codec(REPO / "demo_assets" / "codec"), heldout)}  # for comparison
    log(summary("demo_assets codec", results["demo_assets codec"]))
    best = None
    for shape, width in [(s, w) for s in args.shapes for w in args.widths]:
        feats = torch.cat([causal_features(torch.from_numpy(a)[None], width, shape)[0] for a in train])
        for layout in args.layouts:
            teacher = fit_teacher(feats, width, layout, shape, args.min_band_std)
            mimi = build_codec(codec_config(args.n_filters))
            z = torch.cat([teacher(torch.from_numpy(a)[None])[0].T for a in train])  # [frames, 64]
            install_quantizer(mimi, z, args.iters, args.seed)
            name = f"teacher {width:.0f} ms, {layout}" + ("" if shape == "box" else f", {shape}")
            r = measure(TeacherCodec(teacher, mimi), heldout)
            results[name] = r | {"score": score(r), "train_frames": len(feats)}
            log(summary(name, r) + f" | score {score(r):.3f} ({len(feats)} frames)")
            if best is None or score(r) > best[0]:
                best = (score(r), name, teacher, mimi)
    log(f"chosen: {best[1]}")
    torch.save(
        {"teacher": best[2].state(), "quantizer": best[3].quantizer.state_dict(), "name": best[1]},
        args.work / "teacher.pt",
    )
    (args.work / "teacher_figures.json").write_text(json.dumps(results, indent=1))


def load_teacher(work: Path) -> tuple[Teacher, dict, str]:
    """WORK/teacher.pt -> the teacher, its quantizer's state dict and its name."""
    saved = torch.load(work / "teacher.pt")
    return Teacher(**saved["teacher"]), saved["quantizer"], saved["name"]


def crops(clips: list[np.ndarray], rng: random.Random, batch: int, frames: int) -> torch.Tensor:
    """[B, frames * 1920] crops starting at a random sample, gain +-3 dB."""
    out = []
    for _ in range(batch):
        audio = rng.choice(clips)
        o = rng.randrange(0, len(audio) - frames * FRAME)
        out.append(audio[o : o + frames * FRAME] * 10 ** (rng.uniform(-3, 3) / 20))
    return torch.from_numpy(np.stack(out).astype(np.float32))


def shifted_pairs(clips: list[np.ndarray], rng: random.Random, pairs: int, frames: int) -> torch.Tensor:
    """[2 * pairs, frames * 1920]: `pairs` crops starting at a random sample, then the same crops moved by a random
    -960..959 samples (so frame t of one is frame t of the other at the nearest alignment), one gain per pair."""
    first, second = [], []
    n = frames * FRAME
    for _ in range(pairs):
        audio = rng.choice(clips)
        o = rng.randrange(FRAME // 2, len(audio) - n - FRAME // 2)
        d, gain = rng.randrange(-FRAME // 2, FRAME // 2), 10 ** (rng.uniform(-3, 3) / 20)
        first.append(audio[o : o + n] * gain)
        second.append(audio[o + d : o + d + n] * gain)
    return torch.from_numpy(np.stack(first + second).astype(np.float32))


def optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, max_norm: float) -> float:
    """One step on `loss` with the gradients of `params` clipped at `max_norm`; returns the loss."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    return loss.item()


def r2(z: torch.Tensor, target: torch.Tensor) -> float:
    """1 - SSE / SST over frames and dims (z, target: [N, D])."""
    return float(1 - ((z - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())


@torch.no_grad()
def heldout_r2(mimi, teacher: Teacher, heldout: list[np.ndarray]) -> dict:
    zs, ts = [], []
    for a in heldout:
        x = torch.from_numpy(a)[None]
        zs.append(mimi._encode_to_unquantized_latent(x[:, None])[0].T)
        ts.append(teacher(x)[0].T)
    z, t = torch.cat(zs), torch.cat(ts)
    used = SEM + GROUPS * GDIM
    return {
        "all": r2(z[:, :used], t[:, :used]),
        "semantic": r2(z[:, :SEM], t[:, :SEM]),
        "acoustic": r2(z[:, SEM:used], t[:, SEM:used]),
    }


def stage_student(args, log, train, heldout) -> None:
    teacher, qstate, name = load_teacher(args.work)
    log(f"teacher: {name}")
    torch.manual_seed(args.seed)
    config = codec_config(args.n_filters)
    mimi = build_codec(config)
    mimi.quantizer.load_state_dict(qstate)
    params = [p for n, p in mimi.named_parameters() if n.startswith(("encoder", "downsample"))]
    opt = torch.optim.Adam(params, lr=args.lr)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    mimi.train()
    running = None
    for step in range(args.steps):
        lr = args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        frames = rng.randrange(args.min_frames, args.max_frames + 1)
        if args.consistency:
            x = shifted_pairs(train, rng, args.batch // 2, frames)
        else:
            x = crops(train, rng, args.batch, frames)
        with torch.no_grad():
            target = teacher(x)  # [B, 64, T]
            rms = x.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-5)
            db = torch.empty(len(x), 1).uniform_(45, 65, generator=gen)
            on = (torch.rand(len(x), 1, generator=gen) < 0.5).float()
            noisy = x + on * rms * 10 ** (-db / 20) * torch.randn(x.shape, generator=gen)
        z = mimi._encode_to_unquantized_latent(noisy[:, None])
        loss = (z - target).pow(2).mean()
        if args.consistency:  # the two crops of a pair, frame by frame (past the first 3: their left edges differ)
            a, b = z[: args.batch // 2, :, 3:], z[args.batch // 2 :, :, 3:]
            loss = loss + args.consistency * (a - b).pow(2).mean()
        value = optimise(opt, loss, params, 5.0)
        running = value if running is None else 0.98 * running + 0.02 * value
        if (step + 1) % 100 == 0:
            log(f"student step {step + 1}/{args.steps} ({time.perf_counter() - start:.0f} s): mse {running:.4f}")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            mimi.eval()
            log(f"  held-out R^2 {json.dumps(heldout_r2(mimi, teacher, heldout))}")
            mimi.train()
        if time.perf_counter() - start > args.max_minutes * 60:
            log(f"student: wall-clock cap hit at step {step + 1} (not deterministic from here)")
            break
    mimi.eval()
    log(f"student trained in {time.perf_counter() - start:.0f} s")
    fit = heldout_r2(mimi, teacher, heldout)
    log(f"held-out R^2 of z vs z*: {json.dumps(fit)}")
    save_codec(args.work / "codec", mimi, config)
    reloaded = load_codec(args.work / "codec")
    same, product = True, True
    for a in heldout:
        x = torch.from_numpy(a)[None, None]
        codes = mimi.encode(x)
        same &= bool(torch.equal(codes, reloaded.encode(x)))
        # the codes expected of a product quantizer: per subspace nearest codeword of the latent
        z = mimi._encode_to_unquantized_latent(x)[0].T
        layers = quantizer_layers(mimi)
        expect = [torch.cdist(z[:, :SEM], layers[0]._codebook.embedding).argmin(-1)]
        for g in range(GROUPS):
            sl = slice(SEM + GDIM * g, SEM + GDIM * (g + 1))
            book = layers[g + 1]._codebook.embedding[:, GDIM * g : GDIM * (g + 1)]
            expect.append(torch.cdist(z[:, sl], book).argmin(-1))
        product &= float((torch.stack(expect) == codes[0]).float().mean()) > 0.999
    log(f"saved and reloaded codec encodes identically: {same}; codes = per-subspace nearest codewords: {product}")
    figures = {"r2": fit, "reload_identical": same, "product_codes": product, "teacher": name}
    figures["student"] = measure(reloaded, heldout)
    log(summary("student codec", figures["student"]))
    (args.work / "student_figures.json").write_text(json.dumps(figures, indent=1))
    if args.codes_out:
        save_codec(args.codes_out, reloaded, config)
        check = load_codec(args.codes_out)
        x = torch.from_numpy(heldout[0])[None, None]
        assert torch.equal(check.encode(x), mimi.encode(x))
        if args.ready:
            args.ready.touch()
        log(f"codes codec saved to {args.codes_out}; {args.ready} touched")


def stage_decoder(args, log, train, heldout) -> None:
    mimi = load_codec(args.work / "codec")
    config = json.loads((args.work / "codec" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("format", "version")}
    frozen = copy.deepcopy(mimi)
    names = [n for n, _ in mimi.named_parameters()]
    train_names = [n for n in names if n.startswith(("decoder", "upsample")) or "output_proj" in n]
    params = [p for n, p in mimi.named_parameters() if n in train_names]
    for n, p in mimi.named_parameters():
        p.requires_grad_(n in train_names)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed + 1)
    opt = torch.optim.Adam(params, lr=args.decoder_lr)
    start = time.perf_counter()
    log(f"decoder: mel distance before {reconstruction(mimi, heldout):.3f}")
    running = None
    for step in range(args.decoder_steps):
        lr = args.decoder_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.decoder_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = crops(train, rng, args.decoder_batch, args.decoder_frames)[:, None]
        with torch.no_grad():
            codes = mimi.encode(x)
        value = optimise(opt, mel_distance(x, mimi.decode(codes)[..., : x.shape[-1]]), params, 1.0)
        running = value if running is None else 0.95 * running + 0.05 * value
        if (step + 1) % 50 == 0:
            log(
                f"decoder step {step + 1}/{args.decoder_steps} ({time.perf_counter() - start:.0f} s): mel {running:.3f}"
            )
        if time.perf_counter() - start > args.decoder_max_minutes * 60:
            log(f"decoder: wall-clock cap hit at step {step + 1} (not deterministic from here)")
            break
    mimi.eval()
    log(f"decoder trained in {time.perf_counter() - start:.0f} s")
    save_codec(args.work / "codec_dec", mimi, config)
    dec = load_codec(args.work / "codec_dec")
    same = all(
        torch.equal(dec.encode(torch.from_numpy(a)[None, None]), frozen.encode(torch.from_numpy(a)[None, None]))
        for a in heldout
    )
    mel = reconstruction(dec, heldout)
    zeros = np.mean([float(mel_distance(torch.from_numpy(a)[None, None], torch.zeros(1, 1, len(a)))) for a in heldout])
    log(f"codec_dec codes equal the codes codec's on held-out: {same}; mel distance {mel:.3f} (zeros {zeros:.3f})")
    if args.decoder_out:
        save_codec(args.decoder_out, dec, config)
    x = torch.from_numpy(heldout[0])[None, None]
    with torch.no_grad():
        y = dec.decode(dec.encode(x))[0, 0, : x.shape[-1]].numpy()
    out = args.decoder_out.parent if args.decoder_out else args.work
    sf.write(out / "decoded.wav", y, SAMPLE_RATE)
    sf.write(out / "input.wav", heldout[0], SAMPLE_RATE)
    (args.work / "decoder_figures.json").write_text(
        json.dumps({"mel_distance": mel, "zeros_mel_distance": zeros, "codes_equal": same}, indent=1)
    )


@torch.no_grad()
def stage_check(args, log, train, heldout) -> None:
    """Whole-file `encode` of the saved codes codec vs streaming encode (one 1920-sample frame per call, moshi's
    `streaming(1)`), on the held-out clips and on their concatenation (longer than the transformer's context)."""
    mimi = load_codec(args.codes_out or args.work / "codec")
    cases = [(f"held-out {i}", a) for i, a in enumerate(heldout)] + [("held-out concatenated", np.concatenate(heldout))]
    for name, audio in cases:
        x = torch.from_numpy(audio)[None, None]
        whole = mimi.encode(x)
        with mimi.streaming(1):
            stream = torch.cat([mimi.encode(x[..., i : i + FRAME]) for i in range(0, x.shape[-1], FRAME)], -1)
        match = (whole == stream).float().mean(-1)[0]
        log(f"check {name} ({x.shape[-1] / SAMPLE_RATE:.1f} s, {whole.shape[-1]} frames): streaming == whole-file "
            f"codes per codebook {fmt(match.tolist(), 3)}")  # fmt: skip


def corpus_audio(args) -> list[np.ndarray]:
    """--train-clips clips of --train-dir's short and work sets (a seeded draw, in a sorted order)."""
    names = sorted(
        (part, name)
        for part in ("short", "work")
        for name in json.loads((args.train_dir / part / "corpus" / "index.json").read_text())
    )
    picked = sorted(random.Random(args.seed).sample(names, min(args.train_clips, len(names))))
    return [sf.read(args.train_dir / part / "corpus" / f"{name}.wav", dtype="float32")[0] for part, name in picked]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--stages", nargs="+", default=["teacher", "student", "decoder"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-clips", type=int, default=80, help="make_audio(31, 'train', n, 8.0)")
    parser.add_argument(
        "--train-dir", type=Path,
        help="train on --train-clips clips of this research.natural_mix directory instead (its short and work "
        "clips, drawn with --seed: the LM's own training audio, with its voices, levels, pauses and noise)",
    )  # fmt: skip
    parser.add_argument("--widths", type=float, nargs="+", default=[160.0, 240.0], help="teacher windows, ms")
    parser.add_argument("--shapes", nargs="+", default=["box"], help="teacher window shapes (box, hann)")
    parser.add_argument(
        "--min-band-std", type=float, default=0.0, help="teacher: leave out mel bands whose raw std is below this"
    )
    parser.add_argument("--layouts", nargs="+", default=["bands", "global"], help="acoustic subspaces")
    parser.add_argument("--iters", type=int, default=25, help="Lloyd iterations per codebook")
    parser.add_argument("--n-filters", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4000, help="student steps")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="student wall-clock cap")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-frames", type=int, default=25, help="crop length, frames of 80 ms")
    parser.add_argument("--max-frames", type=int, default=50)
    parser.add_argument(
        "--consistency", type=float, default=0.0,
        help="student: weight of the squared difference between the latents of a crop and of it moved by a random "
        "sub-frame offset (batches of pairs); 0: plain crops, as v2",
    )  # fmt: skip
    parser.add_argument("--codes-out", type=Path, help="save the codes codec here too")
    parser.add_argument("--ready", type=Path, help="touch this file once --codes-out is written")
    parser.add_argument("--decoder-steps", type=int, default=1500)
    parser.add_argument("--decoder-max-minutes", type=float, default=15.0)
    parser.add_argument("--decoder-lr", type=float, default=2e-3)
    parser.add_argument("--decoder-batch", type=int, default=4)
    parser.add_argument("--decoder-frames", type=int, default=25)
    parser.add_argument("--decoder-out", type=Path, help="save the decoder codec here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = (args.work / "log.txt").open("a")

    def log(line: str) -> None:
        line = f"[{time.strftime('%H:%M:%S', time.gmtime())}] {line}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    t0 = time.perf_counter()
    train = make_audio(31, "train", args.train_clips, 8.0) if args.train_dir is None else corpus_audio(args)
    heldout = make_audio(32, "heldout", 6, 8.0)
    log(f"data: {len(train)} train clips ({sum(map(len, train)) / SAMPLE_RATE / 60:.1f} min), {len(heldout)} "
        f"held-out ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    stages = {"teacher": stage_teacher, "student": stage_student, "decoder": stage_decoder, "check": stage_check}
    for stage in args.stages:
        t = time.perf_counter()
        stages[stage](args, log, train, heldout)
        log(f"stage {stage}: {time.perf_counter() - t:.0f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
