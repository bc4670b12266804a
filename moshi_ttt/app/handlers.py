"""The app's event handlers and the Run event's inputs.

`run_specs` is the one place that lists the Run event's inputs, in order: the layout builds the inputs list (and
each control) from it, the handler validates its raw values through it, ZeroGPU's estimate reads them through it,
and the API's parameter names are its keys.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator

import gradio as gr

from moshi_ttt.app import outputs
from moshi_ttt.app.engine import LIVE_MODES, compare_file, live_options
from moshi_ttt.app.inputs import AudioFile, Choice, Flag, HubReference, InputError, Number, Spec, validate
from moshi_ttt.app.models import ModelCache, build_allow_list
from moshi_ttt.app.resources import RunFolders, StopRequests
from moshi_ttt.app.zerogpu import gpu_duration, on_gpu
from moshi_ttt.reports import headline

logger = logging.getLogger("moshi_ttt.app")

MAX_SECONDS = 600.0  # hard server cap on the scored duration (--max-seconds lowers it); the slider's maximum
HUB_SPECS = {"hub": HubReference("Hub checkpoint", info="add an hf://owner/repo checkpoint to the dropdowns")}


def run_specs(
    names: list[str], upload_roots: list[str], examples: list[str], max_seconds: float = MAX_SECONDS
) -> dict[str, Spec]:
    """What the Run event accepts, input by input, in the order of its inputs (see moshi_ttt/app/inputs.py).

    Args:
        names: the checkpoints offered (the model cache's allow-list).
        upload_roots: folders whose files may be scored (Gradio's upload folder).
        examples: the demo clips offered, which may be scored too.
        max_seconds: the server's cap on the scored duration (the slider's maximum).
    Returns:
        {input name: spec}; the layout builds each control from its spec, so the UI's bounds are the server's.
    """
    baseline = next((n for n in names if "baseline" in n), names[0] if names else None)
    ttt = next((n for n in names if "ttt" in n.lower()), names[-1] if names else None)
    return {
        "audio": AudioFile("Audio", roots=tuple(upload_roots), files=tuple(examples)),
        "baseline": Choice("Baseline checkpoint", tuple(names), default=baseline),
        "ttt": Choice("TTT checkpoint", tuple(names), default=ttt),
        "mini_batch_size": Number("TTT mini_batch_size", 1, 64, integer=True, default=16),
        "persistent_states": Flag("persistent_states", default=True, info="keep the fast weights through the clip"),
        "mode": Choice("Mode", tuple(LIVE_MODES), default="chunked", radio=True),
        "max_seconds": Number("Max duration (s)", 5, max_seconds, default=min(120, max_seconds), step=5),
        "allow_silence": Flag("allow silence", info="score a silent clip anyway"),
    }


def event_signature(specs: dict[str, Spec]) -> inspect.Signature:
    """The signature Gradio reads from a handler `(request, *values)`: the request, which Gradio fills in (it looks
    for a `gr.Request` annotation among the parameters before any `*args`), then one parameter per spec, which
    names the API's parameters after the specs' keys."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    request = inspect.Parameter("request", kind, annotation=gr.Request)
    return inspect.Signature([request] + [inspect.Parameter(name, kind) for name in specs])


def refuse(message: str) -> gr.Error:
    """A user error: one log line, no traceback, the message shown as it is."""
    logger.warning("run refused: %s", message)
    return gr.Error(message, print_exception=False)


def session_of(request: gr.Request | None) -> str | None:
    """The browser session's hash of a request (None for a direct call)."""
    return request.session_hash if request is not None else None


def run_handler(
    cache: ModelCache,
    specs: dict[str, Spec],
    runs: RunFolders,
    known_clips: list[str] | None = None,
    stops: StopRequests | None = None,
) -> Callable[..., Iterator[tuple]]:
    """The Run button.

    Args:
        cache: the shared models.
        specs: the Run event's inputs (`run_specs`).
        runs: where each run's downloads go.
        known_clips: demo clips whose transcripts name their readings (a per-reading table for their copies).
        stops: the Stop button's flags; a Stop ends the run with partial results.
    Returns:
        `run(request, *values)`, the raw values in the order of `specs`: validates them, then yields the outputs
        of `outputs.OUTPUT_NAMES` at each step. Progress goes to the status line beside the plot, never over it.
    """
    known = list(known_clips or [])
    stops = stops or StopRequests()

    @on_gpu(gpu_duration(specs))
    def run(request: gr.Request, *values):
        try:
            args = validate(specs, values)
        except InputError as e:
            raise refuse(str(e)) from None
        for name in (args["baseline"], args["ttt"]):
            cache.get(name)  # a checkpoint that fails to load is a fault of the server: its traceback is logged
        options = live_options(LIVE_MODES[args["mode"]], args["mini_batch_size"], args["persistent_states"])
        session = session_of(request)
        stop_requested = stops.start(session)
        readings = headline.readings_of_known_clip(args["audio"], known)
        updates = compare_file(cache, args["audio"], args["baseline"], args["ttt"], options, args["max_seconds"],
                               allow_silence=args["allow_silence"], readings=readings,
                               stop_requested=stop_requested)  # fmt: skip
        yield outputs.starting(options.mode).for_gradio()
        try:
            for update in updates:
                if not update.complete:
                    yield outputs.live(update).for_gradio()
                    continue
                downloads = outputs.write_downloads(runs.new(session), update)
                yield outputs.final(update, downloads).for_gradio()
        except FileNotFoundError:
            raise refuse("The audio file is no longer on the server; upload it again.") from None
        except ValueError as e:  # the library's one-sentence errors about the audio and the checkpoints' fit
            raise refuse(str(e)) from None

    run.__signature__ = event_signature(specs)
    return run


def add_hub_checkpoint(cache: ModelCache) -> Callable[[object], tuple]:
    """The "Add" button next to the Hub field (only with --allow-hub): puts an hf:// reference on the allow-list.

    Returns:
        `add(text)` -> updates of the baseline and TTT dropdowns' choices, and a one-line note.
    """

    def add(text):
        try:
            ref = validate(HUB_SPECS, [text])["hub"]
        except InputError as e:
            raise refuse(str(e)) from None
        cache.allow_list.update(build_allow_list([], [ref], use_env=False))
        names = cache.names()
        return gr.update(choices=names), gr.update(choices=names), f"Added {ref}: choose it in the dropdowns."

    return add
