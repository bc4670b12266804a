"""CPU tokens/s of baseline vs TTT (all layers, b = 16): whole-sequence forward and chunked streaming.

A benchmark, not a test: prints TTT/baseline ratios measured in the same run.
Usage: NO_TORCH_COMPILE=1 python -m bench.ttt_overhead [--steps 1024] [--chunk 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402

from moshi_ttt import TTTConfig, apply_ttt, exact_streaming  # noqa: E402
from moshi_ttt.compat.sequence import delayed_input, model_codes  # noqa: E402


def bench_model(dim: int, layers: int, context: int) -> LMModel:
    torch.manual_seed(0)
    return LMModel(
        delays=[0, 0] + [1] * 7, n_q=8, dep_q=8, card=256, text_card=32, dim=dim, num_heads=4, num_layers=layers,
        hidden_scale=4, causal=True, context=context, gating="silu", norm="rms_norm_f32",
        positional_embedding="rope", depformer_dim=32, depformer_num_heads=2, depformer_num_layers=1,
        depformer_multi_linear=True, depformer_weights_per_step=True, depformer_pos_emb="none",
    ).eval()  # fmt: skip


def tokens_per_s(fn, steps: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return steps / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1024)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--mini-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    baseline = bench_model(args.dim, args.layers, args.context)
    ttt = apply_ttt(copy.deepcopy(baseline), TTTConfig(layers="all", mini_batch_size=args.mini_batch_size))
    codes = torch.randint(0, 256, (1, 8, args.steps))
    seq = delayed_input(baseline, model_codes(baseline, codes))

    def whole(model):
        return lambda: model.forward_text(seq)

    def chunked(model):
        def run():
            with exact_streaming(model, 1, args.chunk):
                for s in range(0, args.steps, args.chunk):
                    model.forward_text(seq[:, :, s : s + args.chunk])

        return run

    print(f"dim={args.dim} layers={args.layers} T={args.steps} context={args.context} chunk={args.chunk} "
          f"b={args.mini_batch_size} threads={torch.get_num_threads()}")  # fmt: skip
    print(f"{'mode':<10}{'baseline tok/s':>16}{'TTT tok/s':>12}{'TTT/baseline':>14}")
    with torch.no_grad():
        for name, make in (("whole", whole), ("chunked", chunked)):
            base = tokens_per_s(make(baseline), args.steps, args.repeats)
            with_ttt = tokens_per_s(make(ttt), args.steps, args.repeats)
            print(f"{name:<10}{base:>16.0f}{with_ttt:>12.0f}{with_ttt / base:>14.2f}")


if __name__ == "__main__":
    main()
