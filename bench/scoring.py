"""Scoring speed and memory on a demo-sized random model on CPU: tokens/s per mode, peak memory vs sequence length.

A benchmark, not a test. Everything is measured in the same run, so the ratios are what to read.
The model has the demo checkpoints' shape, read from demo_assets/*/config.json (dim 128, 4 layers, context 50,
card 256; the TTT model's TTTConfig as shipped) and random weights.

Usage: NO_TORCH_COMPILE=1 python -m bench.scoring [--threads 2] [--tokens 1500] [--stream-tokens 300]
           [--memory-tokens 1500 6000]
Memory is measured in a fresh subprocess per (model, mode, T): the peak RSS while scoring T tokens (Linux VmHWM,
reset after a 100-token warm-up) above the RSS of the warm process, and the whole process's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402

from moshi_ttt import TTTConfig, apply_ttt, score  # noqa: E402

# The demo checkpoints' shapes, read from the shipped configs (scripts/build_demo_assets.py writes them).
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_assets"
DEMO_LM = json.loads((DEMO_DIR / "fair_baseline" / "config.json").read_text())["lm_config"]
DEMO_TTT = TTTConfig.from_dict(json.loads((DEMO_DIR / "ttt" / "config.json").read_text())["ttt"])


def demo_model(ttt: bool) -> LMModel:
    torch.manual_seed(0)
    model = LMModel(**DEMO_LM, device="cpu", dtype=torch.float32).eval()
    return apply_ttt(model, DEMO_TTT) if ttt else model


def codes(steps: int) -> torch.Tensor:
    return torch.randint(0, DEMO_LM["card"], (1, 8, steps), generator=torch.Generator().manual_seed(0))


def tokens_per_s(model: LMModel, mode: str, steps: int, repeats: int, telemetry: bool) -> float:
    x = codes(steps)
    score(model, x[..., : min(steps, 100)], mode, telemetry=telemetry)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        score(model, x, mode, telemetry=telemetry)
        best = min(best, time.perf_counter() - start)
    return steps / best


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM (peak RSS) of this process from /proc, in MB (Linux)."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(ttt: bool, mode: str, steps: int, threads: int) -> None:
    """Runs in a subprocess: peak RSS while scoring `steps` tokens, above the RSS after a 100-token warm-up.

    Writing 5 to /proc/self/clear_refs resets the kernel's peak-RSS counter (VmHWM), so the peak is the scoring's.
    """
    torch.set_num_threads(threads)
    model = demo_model(ttt)
    x = codes(steps)
    score(model, x[..., :100], mode)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    warm = _status_mb("VmRSS")
    score(model, x, mode)
    print(json.dumps({"warm_mb": warm, "peak_mb": _status_mb("VmHWM")}))


def measure_memory(ttt: bool, mode: str, steps: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.scoring", "--child", json.dumps([ttt, mode, steps, threads])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1500, help="tokens for full and chunked timing")
    p.add_argument("--stream-tokens", type=int, default=300, help="tokens for stream timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-tokens", type=int, nargs=2, default=[1500, 6000])
    p.add_argument("--no-telemetry", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        memory_child(*json.loads(args.child))
        return
    torch.set_num_threads(args.threads)
    telemetry = not args.no_telemetry
    print(f"demo-sized random model, CPU, {args.threads} thread(s), telemetry {'on' if telemetry else 'off'}")
    speeds = {}
    for ttt in (False, True):
        model = demo_model(ttt)
        name = "ttt" if ttt else "baseline"
        for mode, steps in (("full", args.tokens), ("chunked", args.tokens), ("stream", args.stream_tokens)):
            speeds[name, mode] = tokens_per_s(model, mode, steps, args.repeats if mode != "stream" else 1, telemetry)
            print(f"  {name:8s} {mode:7s} {speeds[name, mode]:9.1f} tokens/s", flush=True)
    for name in ("baseline", "ttt"):
        ratio = speeds[name, "chunked"] / speeds[name, "stream"]
        print(f"  {name}: chunked / stream = {ratio:.1f}x")
    for mode in ("full", "chunked", "stream"):
        print(f"  {mode}: ttt / baseline tokens/s = {speeds['ttt', mode] / speeds['baseline', mode]:.2f}")
    short, long = args.memory_tokens
    print(f"peak RSS while scoring, above the warm process (fresh process per row), T = {short} vs {long}:")
    for ttt in (False, True):
        for mode in ("chunked", "stream", "full"):
            a, b = (measure_memory(ttt, mode, steps, args.threads) for steps in (short, long))
            above = [m["peak_mb"] - m["warm_mb"] for m in (a, b)]
            print(
                f"  {'ttt' if ttt else 'baseline':8s} {mode:7s} {above[0]:7.1f} MB -> {above[1]:7.1f} MB "
                f"(process peak {a['peak_mb']:.0f} -> {b['peak_mb']:.0f} MB, {b['peak_mb'] / a['peak_mb'] - 1:+.1%})",
                flush=True,
            )


if __name__ == "__main__":
    main()
