"""How long scoring takes: measured seconds per token by model size, for estimates before a run.

Each figure is chunked teacher-forced scoring of one model (`score(model, codes, "chunked")`), measured by
bench/token_cost.py (7B-width models with fewer layers, demo models; telemetry off, after a warm-up) and
bench/hub_7b.py (Moshi 7B from kyutai's Hub layout, through the CLI) on a 2-core AMD EPYC (AVX2, no native bfloat16:
bfloat16 matmuls run 2.4x slower than float32 there) shared with other jobs (load average 5-9): they vary by up to
2x from one hour to the next and are on the slow side. Between two model sizes the cost is interpolated linearly in
the parameter count; above the largest it grows in proportion; CPU time is taken as inversely proportional to the
threads. GPU figures are not measured yet: `seconds_per_token` says None, and `gpu_seconds_per_token` gives the
estimates of GPU_ESTIMATES (labelled as such, for ZeroGPU's duration), until bench/gpu_moshi7b.py's figures replace
them.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import torch

FRAME_RATE_HZ = 12.5  # Mimi tokens per second of audio


@dataclass(frozen=True)
class TokenCost:
    """One measurement of chunked scoring speed."""

    params: int  # parameters of the LMModel scored (TTT layers included)
    seconds_per_token: float  # wall time per token of one model
    device: str  # "cpu"
    dtype: torch.dtype  # of the model (TTT fast weights float32 in any case)
    threads: int  # torch.get_num_threads() of the measurement
    model: str  # what was scored


MEASURED: tuple[TokenCost, ...] = (
    TokenCost(1_618_816, 0.038, "cpu", torch.float32, 2, "demo fair_baseline (bench/token_cost.py --demo)"),
    TokenCost(1_802_001, 0.056, "cpu", torch.float32, 2, "demo ttt"),
    TokenCost(1_521_856_512, 0.34, "cpu", torch.float32, 2, "Moshi kwargs, 2 temporal layers (bench/token_cost.py)"),
    TokenCost(1_521_856_512, 0.83, "cpu", torch.bfloat16, 2, "Moshi kwargs, 2 temporal layers"),
    TokenCost(2_755_031_040, 2.41, "cpu", torch.bfloat16, 2, "Moshi kwargs, 8 temporal layers"),
    # The baseline of the CLI run of bench/hub_7b.py (8 s of speech, 100 tokens, telemetry on); the TTT model over it
    # (3 TTT layers, 7.9e9 parameters) ran at 3.8 s per token in the same process, as the machine's load fell.
    TokenCost(7_687_729_152, 4.56, "cpu", torch.bfloat16, 2, "Moshi 7B (moshiko kwargs, bench/hub_7b.py)"),
)


def seconds_per_token(
    params: int, device: torch.device | str, dtype: torch.dtype, threads: int | None = None
) -> float | None:
    """About how many seconds one model of `params` parameters takes per token of chunked scoring.

    Args:
        params: the model's parameter count.
        device, dtype: of the model; None comes back for a combination never measured (any GPU, so far).
        threads: CPU threads used (default: torch.get_num_threads()).
    Returns:
        Seconds per token, or None.
    """
    device_type = torch.device(device).type
    points = sorted((m for m in MEASURED if m.device == device_type and m.dtype == dtype), key=lambda m: m.params)
    if not points:
        return None
    threads = threads or torch.get_num_threads()
    below = [m for m in points if m.params <= params]
    above = [m for m in points if m.params > params]
    if not below:  # smaller than every measured model: Python overhead dominates, take the smallest's cost
        low = high = points[0]
        seconds = low.seconds_per_token
    elif not above:  # larger than every measured model: in proportion to the parameters
        low = high = below[-1]
        seconds = low.seconds_per_token * params / low.params
    else:
        low, high = below[-1], above[0]
        share = (params - low.params) / (high.params - low.params)
        seconds = low.seconds_per_token + share * (high.seconds_per_token - low.seconds_per_token)
    measured_threads = (low.threads + high.threads) / 2
    return seconds * measured_threads / threads


def scoring_seconds(
    models: tp.Iterable[torch.nn.Module], tokens: int, device: torch.device | str, threads: int | None = None
) -> float | None:
    """About how long scoring `tokens` tokens with each of `models` takes (one after the other); None if any
    model's device and dtype were never measured."""
    total = 0.0
    for model in models:
        params = sum(t.numel() for t in model.parameters())
        dtype = model_dtype(model)
        cost = seconds_per_token(params, device, dtype, threads)
        if cost is None:
            return None
        total += cost * tokens
    return total


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of the model's parameters are in (TTT fast weights stay float32 in a bfloat16 model)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.get)


MOSHI_7B_PARAMS = 7_687_729_152  # moshiko's LMModel (moshi's default LM kwargs, no TTT)
MOSHI_7B_WEIGHT_BYTES = 15_375_458_304  # its weights in bfloat16 (bench/hub_7b.py: weight_bytes of the baseline)


@dataclass(frozen=True)
class GpuEstimate:
    """Seconds per token of one model on one GPU in bfloat16: an ESTIMATE, not a measurement (no GPU has run this
    code yet). Replace the figures with 1 / the tokens/s that bench/gpu_moshi7b.py prints for Moshi 7B."""

    moshi_7b_s: float  # per token of one Moshi 7B model (MOSHI_7B_PARAMS); other sizes in proportion
    floor_s: float  # per token of any model however small: kernel launches and Python, not arithmetic
    derivation: str  # how the figure was estimated


GPU_ESTIMATES = {
    "stream": GpuEstimate(
        0.080,
        0.002,
        "moshi runs Moshi 7B in real time on one GPU: at most one 80 ms frame per step (temporal transformer, then "
        "the depth transformer's 8 codebooks); stream scoring does the same work per token, without moshi's CUDA "
        "graphs, so the real-time bound itself; the floor: ~300 kernel launches per token at ~7 us",
    ),
    "chunked": GpuEstimate(
        0.010,
        0.0002,
        "the app scores chunks of 25 tokens: one temporal-transformer call reads the 15 GB of weights once per chunk "
        "(memory-bound, ~5-10 ms on an H200 slice) and the depth transformer runs once per chunk, so about 1/25 of a "
        "stream step (0.0032 s), taken 3x for telemetry, TTT and Mimi; the floor: a stream step's launches per chunk",
    ),
}


def gpu_seconds_per_token(params: int, mode: str) -> float:
    """ESTIMATED seconds per token of one model of `params` parameters on one GPU in bfloat16 (GPU_ESTIMATES):
    Moshi 7B's figure scaled by the parameter count, never below the per-token floor.

    Args:
        params: the model's parameter count (TTT layers included).
        mode: "stream" (one token per call), or "chunked" / "full" (chunks or the whole clip at once).
    """
    estimate = GPU_ESTIMATES["stream" if mode == "stream" else "chunked"]
    return max(estimate.floor_s, estimate.moshi_7b_s * params / MOSHI_7B_PARAMS)
