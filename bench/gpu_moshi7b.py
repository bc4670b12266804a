"""Scoring speed and memory on the real Moshi 7B configuration with random weights (a benchmark, not a test).

Baseline vs TTT on layers "29,30,31" and on "middle", measured in the same run: tokens/s of full, chunked and
stream scoring, ms per stream step, peak GPU memory of chunked scoring at two lengths (flat in T is the goal).
Targets on one H100: chunked TTT >= 0.8x the baseline's chunked tokens/s, stream <= 25 ms per token, memory flat.
Its figures (1 / tokens/s of the baseline, chunked and stream) replace the ESTIMATES that ZeroGPU's durations use,
`GPU_ESTIMATES` in moshi_ttt/scoring/cost.py: nothing else holds GPU costs.

Usage:
    NO_TORCH_COMPILE=1 python -m bench.gpu_moshi7b                       # GPU, bfloat16, moshiko's LM config
    NO_TORCH_COMPILE=1 python -m bench.gpu_moshi7b --small --device cpu  # the same script on a small config
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402

from moshi_ttt import TTTConfig, apply_ttt, score  # noqa: E402
from moshi_ttt.compat.moshi import default_lm_kwargs  # noqa: E402

SMALL_OVERRIDES = {  # --small: same structure (16 codebooks, delays, depformer per step), tiny widths
    "dim": 256, "num_heads": 4, "num_layers": 32, "depformer_dim": 64, "depformer_dim_feedforward": 128,
    "depformer_num_heads": 2, "depformer_num_layers": 2, "text_card": 100, "context": 300, "hidden_scale": 2,
}  # fmt: skip


def build(args, layers: str | None) -> LMModel:
    kwargs = default_lm_kwargs()
    if args.small:
        kwargs.update(SMALL_OVERRIDES)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = LMModel(**kwargs, device=args.device, dtype=dtype).eval()
    if layers is not None:
        apply_ttt(model, TTTConfig(layers=layers, mini_batch_size=args.mini_batch_size))
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(args, model: LMModel, mode: str, steps: int) -> tuple[float, float]:
    """(tokens/s, peak memory MB) of scoring `steps` random tokens; GPU peak is reset per call."""
    codes = torch.randint(0, model.card, (1, 8, steps), device=args.device)
    score(model, codes[..., : min(steps, 64)], mode, telemetry=False)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(args.device)
    start = time.perf_counter()
    score(model, codes, mode, chunk_size=args.chunk_size if mode == "chunked" else None, telemetry=False)
    sync(args.device)
    elapsed = time.perf_counter() - start
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak, never reset
    return steps / elapsed, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--small", action="store_true", help="small widths (for a CPU dry run)")
    p.add_argument(
        "--chunk-size", type=int, help="default: score's (250 tokens; 240 = whole mini-batches of 16 for TTT models)"
    )
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=3000, help="tokens for full and chunked timing")
    p.add_argument("--stream-tokens", type=int, default=200)
    p.add_argument("--memory-tokens", type=int, nargs=2, default=[3000, 24000], help="chunked memory at two T")
    p.add_argument("--variants", default="baseline,29,30,31,middle")
    args = p.parse_args()
    variants = {"baseline": None}
    spec = args.variants.split(",")
    if "29" in spec:
        variants["ttt 29,30,31"] = "29,30,31"
    if "middle" in spec:
        variants["ttt middle"] = "middle"
    print(f"{'small' if args.small else 'Moshi 7B'} config, random weights, {args.dtype} on {args.device}")
    rows = {}
    for name, layers in variants.items():
        model = build(args, layers)
        row = {}
        for mode, steps in (("full", args.tokens), ("chunked", args.tokens), ("stream", args.stream_tokens)):
            row[mode], row[f"{mode}_mb"] = timed(args, model, mode, steps)
        for steps in args.memory_tokens:
            _, row[f"chunked_mb_{steps}"] = timed(args, model, "chunked", steps)
        rows[name] = row
        base = rows["baseline"]
        short, long = args.memory_tokens
        print(
            f"{name:14s} full {row['full']:8.1f} tok/s ({row['full'] / base['full']:.2f}x) | "
            f"chunked {row['chunked']:8.1f} tok/s ({row['chunked'] / base['chunked']:.2f}x) | "
            f"stream {1000 / row['stream']:7.2f} ms/token ({row['stream'] / base['stream']:.2f}x) | "
            f"chunked peak {row[f'chunked_mb_{short}']:.0f} MB at T={short}, {row[f'chunked_mb_{long}']:.0f} MB "
            f"at T={long}",
            flush=True,
        )
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
