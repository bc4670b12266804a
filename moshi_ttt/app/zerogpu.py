"""ZeroGPU on Hugging Face Spaces: the Run handler asks for a GPU for as long as its clip needs with the models chosen.

`spaces.GPU(duration=fn)` calls `fn` with the handler's own arguments before each run, in the server's main process
(the handler then runs in a worker process that holds the GPU), so the estimate reads the run's raw values through
the same specs as the handler (by name, in the specs' order) and the sizes of the models chosen. A clip that cannot
fit in what ZeroGPU grants one call is refused there, before any GPU is asked for. Off Spaces (no `spaces`
package) `on_gpu` changes nothing. Gradio-free.

The seconds per token are ESTIMATES (`moshi_ttt.scoring.cost.GPU_ESTIMATES`): no GPU has run this code yet.
"""

from __future__ import annotations

import math
import typing as tp
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import soundfile as sf

from moshi_ttt.app.engine import LIVE_MODES
from moshi_ttt.app.inputs import InputError, Spec
from moshi_ttt.app.models import ModelCache
from moshi_ttt.data.audio import FRAME_RATE
from moshi_ttt.data.checkpoints import weight_bytes
from moshi_ttt.scoring.cost import MOSHI_7B_PARAMS, MOSHI_7B_WEIGHT_BYTES, gpu_seconds_per_token

# Start-up allowance of a call: forking the worker and starting CUDA (a few seconds), then moving the weights that
# were packed at start-up onto the GPU, estimated at 2 GB/s (read from the Space's disk): 8 s for Moshi 7B with a
# TTT checkpoint over it. Both are estimates; a worker kept warm between calls skips them, so they are pessimistic.
GPU_START_S = 10
GPU_TRANSFER_BYTES_PER_S = 2e9
# The most one call may ask for: 300 s. ZeroGPU's scheduler refuses a longer duration ("ZeroGPU illegal duration",
# spaces' client.schedule); its maintainers give 5 minutes as the most one call can request
# (huggingface.co/spaces/zero-gpu-explorers/README, discussions 7 and 98).
ZEROGPU_MAX_S = 300
REFUSED_S = 5.0  # the clip's seconds assumed for inputs the handler will refuse before any model runs
# GPU seconds per second of audio to encode a clip and decode its codes (the codec's reconstruction): an ESTIMATE,
# not measured on a GPU (moshi's server runs Mimi both ways in real time with room to spare; 20x real time here).
RECONSTRUCTION_GPU_S_PER_AUDIO_S = 0.05

try:  # the `spaces` package is there only on Spaces
    import spaces  # type: ignore[import-not-found]

    HAS_SPACES = True  # ZeroGPU's CUDA emulation at start-up comes with it

    def on_gpu(duration: Callable[..., int]) -> Callable:
        """The decorator that runs a handler on a ZeroGPU slice for `duration(*its arguments)` seconds."""
        return spaces.GPU(duration=duration)

except ImportError:
    HAS_SPACES = False

    def on_gpu(duration: Callable[..., int]) -> Callable:
        """Off Spaces: the handler as it is."""
        return lambda fn: fn


@dataclass(frozen=True)
class RunSize:
    """The models one run scores, as ZeroGPU's estimate needs them."""

    params: tuple[int, ...]  # parameters of each model scored, one after the other (TTT layers included)
    weight_bytes: int  # distinct bytes of weights a GPU worker moves onto its GPU as it starts


def cache_sizes(cache: ModelCache) -> Callable[[Sequence[str]], RunSize]:
    """The sizes of the allowed checkpoints, read from the models loaded when this is called, loading none.

    Call it when the handler is built: on ZeroGPU that is after the start-up loading and before `launch`, after
    which `spaces` has packed the weights away from the server's process (its worker gets them), and they can no
    longer be read there. A checkpoint not loaded then (a Hub checkpoint added later) counts as Moshi 7B.

    Returns:
        `sizes(names)`: the parameters of each named model, and the bytes a worker moves onto its GPU as it starts:
        every model loaded at start-up (spaces moves all it packed), plus 7B's for each model not loaded.
    """
    loaded = {name: ckpt for name in cache.names() if (ckpt := cache.loaded(name)) is not None}
    params = {name: sum(p.numel() for p in ckpt.model.parameters()) for name, ckpt in loaded.items()}
    packed = weight_bytes(*(m for ckpt in loaded.values() for m in (ckpt.model, ckpt.mimi) if m is not None))

    def sizes(names: Sequence[str]) -> RunSize:
        unknown = len({name for name in names if name not in params})
        return RunSize(tuple(params.get(name, MOSHI_7B_PARAMS) for name in names),
                       packed + unknown * MOSHI_7B_WEIGHT_BYTES)  # fmt: skip

    return sizes


def run_models(raw: dict, specs: dict[str, Spec]) -> tuple[str | None, list[str]]:
    """The Run event's models from its raw values: (baseline, [TTT checkpoint]); None / [] for refused names."""
    return _checked(specs, "baseline", raw), [name for name in [_checked(specs, "ttt", raw)] if name]


def compare_models(raw: dict, specs: dict[str, Spec]) -> tuple[str | None, list[str]]:
    """The Compare event's models: (baseline, the TTT checkpoints compared, one per setting in turn)."""
    return _checked(specs, "baseline", raw), list(_checked(specs, "compare_checkpoints", raw) or ())


def _checked(specs: dict[str, Spec], name: str, raw: dict) -> tp.Any:
    try:
        return specs[name].check(raw.get(name)) if name in specs else None
    except InputError:
        return None


def gpu_duration(
    specs: dict[str, Spec],
    sizes: Callable[[Sequence[str]], RunSize],
    refuse: Callable[[str], Exception],
    runs: Callable[[dict], int] | None = None,
    models: Callable[[dict, dict[str, Spec]], tuple[str | None, list[str]]] = run_models,
) -> Callable[..., int]:
    """ZeroGPU's `duration` for the Run (or Compare) handler whose inputs `specs` describes.

    Args:
        specs: the event's specs (`handlers.run_specs`): "audio", "mode" (chunked without it), "max_seconds" and
            the checkpoints are read.
        sizes: the sizes of the models of given names (`cache_sizes`).
        refuse: makes the exception raised for a clip that cannot fit (the handler's one-sentence user error).
        runs: how many times the event scores the clip (Compare: once per setting; a refused value may count as
            1); None: once.
        models: (baseline, TTT checkpoints) from the raw values by name (`run_models`, `compare_models`); each run
            scores the baseline and one TTT checkpoint, the largest counted.
    Returns:
        A function of the handler's arguments (Gradio's request, then the raw values in the specs' order) giving
        whole seconds: a start-up allowance (with moving the models' weights onto the GPU) plus the scored tokens
        (the clip's length, at most its max_seconds) times the estimated cost per token of the models in the
        run's mode. A refused or unreadable value counts as a 5 s clip: the handler refuses it before any model
        runs. It raises `refuse(message)` when the estimate passes ZEROGPU_MAX_S, naming the duration that fits.
    """

    def seconds(request: tp.Any, *values: object) -> int:
        raw = _by_name(specs, values)
        duration_s = _clip_seconds(specs, raw)
        try:
            mode = LIVE_MODES[specs["mode"].check(raw.get("mode"))] if "mode" in specs else "chunked"
        except InputError:
            mode = "chunked"
        baseline, ttt = models(raw, specs)
        size = sizes([name for name in (baseline, *ttt) if name])
        per_model = [gpu_seconds_per_token(params, mode) for params in size.params]
        # One run: the baseline (first) and one TTT checkpoint (the dearest of those compared in turn).
        per_token_s = (per_model[0] if baseline else 0.0) + max(per_model[1 if baseline else 0 :], default=0.0)
        start_s = GPU_START_S + size.weight_bytes / GPU_TRANSFER_BYTES_PER_S
        per_second_s = FRAME_RATE * per_token_s * (runs(raw) if runs else 1)  # GPU seconds per second of audio
        needed = start_s + duration_s * per_second_s
        if needed > ZEROGPU_MAX_S:
            fits_s = math.floor((ZEROGPU_MAX_S - start_s) / per_second_s) if per_second_s else 0
            raise refuse(too_long_message(needed, fits_s, mode))
        return math.ceil(needed)

    return seconds


def reconstruction_duration(specs: dict[str, Spec], sizes: Callable[[Sequence[str]], RunSize]) -> Callable[..., int]:
    """ZeroGPU's `duration` for the codec's reconstruction (app/reconstruction.py: the clip encoded and decoded).

    Args:
        specs: its event's specs ("audio" and "max_seconds" are read, as `gpu_duration` reads them).
        sizes: the sizes of the models of given names (`cache_sizes`): a worker moves every packed model as it starts.
    Returns:
        A function of the handler's arguments giving whole seconds: the start-up allowance plus the clip's seconds
        times RECONSTRUCTION_GPU_S_PER_AUDIO_S, at most ZEROGPU_MAX_S (600 s of audio ask for 30 s).
    """

    def seconds(request: tp.Any, *values: object) -> int:
        duration_s = _clip_seconds(specs, _by_name(specs, values))
        start_s = GPU_START_S + sizes([]).weight_bytes / GPU_TRANSFER_BYTES_PER_S
        return min(math.ceil(start_s + duration_s * RECONSTRUCTION_GPU_S_PER_AUDIO_S), ZEROGPU_MAX_S)

    return seconds


def _by_name(specs: dict[str, Spec], values: Sequence[object]) -> dict[str, object]:
    """An event's raw values by input name; a missing one reads as None (the handler refuses it)."""
    names = list(specs)
    return {names[i]: value for i, value in enumerate(values[: len(names)])}


def _clip_seconds(specs: dict[str, Spec], raw: dict) -> float:
    """The seconds of audio an event reads: the clip's duration, at most its max_seconds; REFUSED_S for values the
    handler refuses before any model runs."""
    try:
        path = specs["audio"].check(raw.get("audio"))
        return min(sf.info(path).duration, specs["max_seconds"].check(raw.get("max_seconds")))
    except (InputError, RuntimeError, TypeError, sf.LibsndfileError):
        return REFUSED_S


def too_long_message(needed_s: float, fits_s: int, mode: str) -> str:
    """The sentence a visitor reads when a clip would need more GPU time than one ZeroGPU call may have."""
    other = " or the chunked mode" if mode == "stream" else ""
    fit = f"lower Max duration to {fits_s} s{other}" if fits_s >= 5 else f"choose smaller models{other}"
    return (
        f"This run would need about {needed_s:.0f} s of GPU time (an estimate for these models), more than the "
        f"{ZEROGPU_MAX_S} s ZeroGPU grants one run: {fit}."
    )
