"""ZeroGPU on Hugging Face Spaces: the Run handler asks for a GPU for as long as its clip needs.

`spaces.GPU(duration=fn)` calls `fn` with the handler's own arguments before each run, so the estimate reads the
run's raw values through the same specs as the handler (by name, in the specs' order). Off Spaces (no `spaces`
package) `on_gpu` changes nothing. Gradio-free.
"""

from __future__ import annotations

import typing as tp
from collections.abc import Callable

import soundfile as sf

from moshi_ttt.app.engine import LIVE_MODES
from moshi_ttt.app.inputs import InputError, Spec
from moshi_ttt.data.audio import FRAME_RATE

# ZeroGPU seconds per scored token for both models together: estimates from bench/gpu_moshi7b.py's targets on one
# H100 (stream <= 25 ms per token and model; chunked far faster), plus a fixed start-up allowance.
GPU_S_PER_TOKEN = {"stream": 0.06, "chunked": 0.015}
GPU_START_S = 30
REFUSED_S = 5.0  # the clip's seconds assumed for inputs the handler will refuse before any model runs

try:  # the `spaces` package is there only on Spaces
    import spaces  # type: ignore[import-not-found]

    def on_gpu(duration: Callable[..., int]) -> Callable:
        """The decorator that runs a handler on a ZeroGPU slice for `duration(*its arguments)` seconds."""
        return spaces.GPU(duration=duration)

except ImportError:

    def on_gpu(duration: Callable[..., int]) -> Callable:
        """Off Spaces: the handler as it is."""
        return lambda fn: fn


def gpu_duration(specs: dict[str, Spec], runs: Callable[[dict], int] | None = None) -> Callable[..., int]:
    """ZeroGPU's `duration` for the Run (or Compare) handler whose inputs `specs` describes.

    Args:
        specs: the event's specs (`handlers.run_specs`): "audio", "mode" (chunked without it) and "max_seconds"
            are read.
        runs: how many times the event scores the clip with both models, from the raw values by name (Compare:
            once per setting; a refused value may count as 1); None: once.
    Returns:
        A function of the handler's arguments (Gradio's request, then the raw values in the specs' order) giving
        whole seconds: a start-up allowance plus the scored tokens (the clip's length, at most its max_seconds)
        times the mode's cost per token. A refused or unreadable value counts as a 5 s clip: the handler refuses it
        before any model runs.
    """

    def seconds(request: tp.Any, *values: object) -> int:
        names = list(specs)  # the values by name; a missing one reads as None and is refused below
        raw = {names[i]: value for i, value in enumerate(values[: len(names)])}
        try:
            path = specs["audio"].check(raw.get("audio"))
            duration_s = min(sf.info(path).duration, specs["max_seconds"].check(raw.get("max_seconds")))
        except (InputError, RuntimeError, TypeError, sf.LibsndfileError):
            duration_s = REFUSED_S
        try:
            stream = "mode" in specs and LIVE_MODES[specs["mode"].check(raw.get("mode"))] == "stream"
        except InputError:
            stream = False
        per_token = GPU_S_PER_TOKEN["stream" if stream else "chunked"]
        return int(GPU_START_S + duration_s * FRAME_RATE * per_token * (runs(raw) if runs else 1))

    return seconds
