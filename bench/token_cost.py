"""Seconds per token of chunked scoring by model size, on this machine: the figures of moshi_ttt/scoring/cost.py.

Moshi-shaped models of 7B width with fewer temporal layers (random weights, built on the meta device then filled:
no 7B random initialisation), and the demo models, are scored on random codes in chunked mode, one model at a time,
after a warm-up. The full Moshi 7B figure comes from bench/hub_7b.py (its CLI run), which loads the real layout.

Usage:
    NO_TORCH_COMPILE=1 python -m bench.token_cost --layers 2 8 --dtypes bfloat16 float32 --tokens 50
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

from moshi_ttt import load, score  # noqa: E402
from moshi_ttt.compat.moshi import default_lm_kwargs  # noqa: E402
from moshi_ttt.data.checkpoints.common import meta_lm  # noqa: E402
from moshi_ttt.evaluate import DEMO_CHECKPOINTS  # noqa: E402

WEIGHT_STD = 0.02


def random_model(num_layers: int, dtype: torch.dtype):
    """Moshi 7B's kwargs with `num_layers` temporal layers, uniform random weights (norm scales 1)."""
    config = {**default_lm_kwargs(), "num_layers": num_layers}
    model = meta_lm(config, dtype)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    bound = WEIGHT_STD * 3**0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".alpha"):
                param.fill_(1.0)
            else:
                param.uniform_(-bound, bound, generator=generator)
    return model.eval()


def seconds_per_token(model, tokens: int) -> float:
    codes = torch.randint(0, model.card, (1, model.dep_q, tokens), generator=torch.Generator().manual_seed(1))
    score(model, codes[..., :4], "chunked", telemetry=False)  # warm-up
    start = time.perf_counter()
    score(model, codes, "chunked", telemetry=False)
    return (time.perf_counter() - start) / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="*", default=[2, 8], help="temporal layers of the 7B-width models")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--demo", action="store_true", help="also the demo models (float32)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.demo:
        for name, path in DEMO_CHECKPOINTS.items():
            model = load(path).model
            params = sum(t.numel() for t in model.parameters())
            rows.append({"model": f"demo {name}", "params": params, "dtype": "float32",
                         "seconds_per_token": seconds_per_token(model, args.tokens)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    for layers in args.layers:
        for dtype in args.dtypes:
            model = random_model(layers, getattr(torch, dtype))
            params = sum(t.numel() for t in model.parameters())
            rows.append({"model": f"7B width, {layers} layers", "params": params, "dtype": dtype,
                         "seconds_per_token": seconds_per_token(model, args.tokens)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            del model
    for row in rows:
        row.update(device="cpu", threads=args.threads, tokens=args.tokens)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
