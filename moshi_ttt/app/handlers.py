"""The app's event handlers and the Run event's inputs.

`run_specs` is the one place that lists the Run event's inputs, in order: the layout builds the inputs list (and
each control) from it, the handler validates its raw values through it, ZeroGPU's estimate reads them through it,
and the API's parameter names are its keys.
"""

from __future__ import annotations

import inspect
import logging
import typing as tp
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
from gradio.components.plot import PlotData

from moshi_ttt.app import outputs, view
from moshi_ttt.app.compare import MAX_SETTINGS, compare_settings, settings_grid
from moshi_ttt.app.compare_view import COLUMNS as COMPARE_COLUMNS
from moshi_ttt.app.compare_view import compare_figure, compare_rows
from moshi_ttt.app.engine import LIVE_MODES, compare_file, live_options, own_settings_note
from moshi_ttt.app.figure import FigureInfo, to_json
from moshi_ttt.app.inputs import (
    AudioFile,
    Choice,
    Flag,
    HubReference,
    InputError,
    JsonFile,
    MultiChoice,
    Number,
    Spans,
    Spec,
    validate,
)
from moshi_ttt.app.models import CheckpointMismatch, CheckpointNames, CheckpointUnavailable, ModelCache
from moshi_ttt.app.reconstruction import reconstruct_clip
from moshi_ttt.app.reopen import read_results
from moshi_ttt.app.resources import RunFolders, StopRequests, release_memory
from moshi_ttt.app.update_size import COMPARE_LABELS, MAX_TOKENS, check_fits_window, check_update_size, update_size
from moshi_ttt.app.zerogpu import cache_sizes, compare_models, gpu_duration, on_gpu, reconstruction_duration
from moshi_ttt.reports import headline
from moshi_ttt.reports import results as report

logger = logging.getLogger("moshi_ttt.app")

MAX_SECONDS = 600.0  # hard server cap on the scored duration (--max-seconds lowers it); the slider's maximum
# Least time between two figure updates sent to the page. Each update costs the browser a Plotly redraw of the
# 4-row figure (0.1-0.4 s on 2 busy cores, Gradio resizes the plot at each): chunked scoring of 60 s sent 30
# updates in 2 s, which the page drew for 7.5-10 s. Two a second keep the page at the scoring's pace.
FIGURE_INTERVAL_S = 0.8
HUB_SPECS = {"hub": HubReference("Hub checkpoint", info="add an hf://owner/repo checkpoint to the dropdowns")}


def run_specs(
    names: tp.Sequence[str], upload_roots: list[str], examples: list[str], max_seconds: float = MAX_SECONDS
) -> dict[str, Spec]:
    """What the Run event accepts, input by input, in the order of its inputs (see moshi_ttt/app/inputs.py).

    Args:
        names: the checkpoints offered (the model cache's allow-list).
        upload_roots: folders whose files may be scored (Gradio's upload folder).
        examples: the demo clips offered, which may be scored too.
        max_seconds: the server's cap on the scored duration (the slider's maximum).
    Returns:
        {input name: spec}; the layout builds each control from its spec, so the UI's bounds are the server's.
        New inputs go at the end: callers of the API pass values by position.
    """
    baseline = next((n for n in names if "baseline" in n), names[0] if names else None)
    ttt = next((n for n in names if "ttt" in n.lower()), names[-1] if names else None)
    offered = _offered(names)
    return {
        "audio": AudioFile("Audio", roots=tuple(upload_roots), files=tuple(examples)),
        "baseline": Choice("Baseline checkpoint", offered, default=baseline),
        "ttt": Choice("TTT checkpoint", offered, default=ttt),
        # Tokens per fast-weight update: the mini-batch of our TTT blocks, the chunk of In-Place layers; each model's
        # own range is checked once it is loaded (app/update_size.py), and the layout narrows the slider to it.
        "mini_batch_size": Number("TTT mini_batch_size", 1, MAX_TOKENS, integer=True, default=16),
        "persistent_states": Flag("persistent_states", default=True, info="keep the fast weights through the clip"),
        "mode": Choice("Mode", tuple(LIVE_MODES), default="chunked", radio=True),
        "max_seconds": Number("Max duration (s)", 5, max_seconds, default=min(120, max_seconds), step=5),
        "allow_silence": Flag("allow silence", info="score a silent clip anyway"),
        "readings": Spans(
            "Readings of a repeated passage (s)",
            maximum_s=max_seconds,
            info="optional: where your clip reads the same passage again, e.g. 0.6-15.3, 21.3-35.9; "
            "the demo clip's are known",
        ),  # fmt: skip
    }


COMPARE_SIZES = ("1", "2", "4", "8", "16", "32", "64")  # tokens per update offered for a comparison


def compare_specs(run: dict[str, Spec], names: tp.Sequence[str]) -> dict[str, Spec]:
    """What the Compare event accepts, in order: the Run event's clip, baseline, duration, silence and readings
    specs (the same controls), and the settings to compare.

    Args:
        run: the Run event's specs (`run_specs`).
        names: the checkpoints offered.
    """
    ttt = run["ttt"].default
    return {
        "audio": run["audio"],
        "baseline": run["baseline"],
        "compare_checkpoints": MultiChoice("TTT checkpoints to compare", _offered(names),
                                           default=(ttt,) if ttt else (), maximum=4, dropdown=True),  # fmt: skip
        # Labelled for the chosen models by the layout (update_size.compare_label): mini-batches or In-Place chunks.
        # Sizes within the demo models' 50-token context: with persistence off a larger one is refused
        # (update_size.check_fits_window), and a default press must score.
        "compare_sizes": MultiChoice(COMPARE_LABELS["mixed"], COMPARE_SIZES, default=("4", "16")),
        "compare_persistence": MultiChoice("persistent_states", ("on", "off"), default=("on", "off"),
                                           info="off: the fast weights go back to W_base every attention window"),
        "max_seconds": run["max_seconds"],
        "allow_silence": run["allow_silence"],
        "readings": run["readings"],
    }  # fmt: skip


def _offered(names: tp.Sequence[str]) -> tp.Sequence[str]:
    """The checkpoint names a control offers: the model cache's live view as it is (names added while the app runs,
    `ModelCache.live_names`), any other sequence as a tuple."""
    return names if isinstance(names, CheckpointNames) else tuple(names)


def open_specs(upload_roots: list[str]) -> dict[str, Spec]:
    """What the Open event accepts: one uploaded results.json."""
    return {"results_file": JsonFile("results.json", roots=tuple(upload_roots))}


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
        of `outputs.OUTPUT_NAMES` at each step. Progress goes to the status line above the plot, never over it; a
        refusal is written there too, then raised as Gradio's error.
    """
    known = list(known_clips or [])
    stops = stops or StopRequests()

    @on_gpu(gpu_duration(specs, cache_sizes(cache), refuse))
    def run(request: gr.Request, *values):
        try:
            args = validate(specs, values)
            # A checkpoint that fails to load is a fault of the server (its traceback is logged); one that cannot be
            # paired with the baseline (In-Place lora.safetensors over a base that does not fit) is the user's.
            models = {args["baseline"]: cache.get(args["baseline"]).model,
                      args["ttt"]: cache.get(args["ttt"], base=args["baseline"]).model}  # fmt: skip
            # The chosen size and persistence are the TTT run's; a baseline runs with its own (engine.own_options).
            check_update_size({args["ttt"]: models[args["ttt"]]}, args["mini_batch_size"], args["persistent_states"])
            options = live_options(LIVE_MODES[args["mode"]], args["mini_batch_size"], args["persistent_states"])
        except (InputError, CheckpointMismatch, CheckpointUnavailable) as e:
            yield outputs.refused(str(e)).for_gradio()
            raise refuse(str(e)) from None
        session = session_of(request)
        stop_requested = stops.start(session)
        readings = list(args["readings"]) or headline.readings_of_known_clip(args["audio"], known)
        figure = outputs.LiveFigure(figure_info(cache, args, readings))
        updates = compare_file(cache, args["audio"], args["baseline"], args["ttt"], options, args["max_seconds"],
                               allow_silence=args["allow_silence"], readings=readings, stop_requested=stop_requested,
                               min_interval_s=FIGURE_INTERVAL_S)  # fmt: skip
        yield outputs.starting(options.mode).for_gradio()
        try:
            for update in updates:
                if not update.complete:
                    yield outputs.live(update, figure).for_gradio()
                    continue
                with runs.writing(session) as folder:  # kept while the page is given its files
                    downloads = outputs.write_downloads(folder, update)
                    yield outputs.final(update, downloads, figure).for_gradio()
        except (FileNotFoundError, ValueError) as e:  # the library's one-sentence errors about the audio and the fit
            message = failure_message(e, args["audio"])
            yield outputs.refused(message, started=True).for_gradio()
            raise gr.Error(message, print_exception=False) from None
        finally:
            updates.close()
            release_memory()

    run.__signature__ = event_signature(specs)
    return run


def failure_message(error: Exception, audio: str) -> str:
    """The sentence shown for an error raised once a run has started (never a server path), logged with its
    traceback: mostly the library's one-sentence refusals of the audio or of a pair of checkpoints, but a fault of
    the server can raise ValueError or FileNotFoundError too, and its traceback must reach the log.

    Args:
        error: the error caught.
        audio: the clip's path (validated): a FileNotFoundError speaks of it only when it is gone.
    """
    if isinstance(error, FileNotFoundError):
        if Path(audio).is_file():
            message = "A file of this run went missing on the server; please try again."
        else:
            message = "The audio file is no longer on the server; upload it again."
    else:
        message = str(error)
    logger.error("run failed: %s", message, exc_info=error)
    return message


def figure_info(cache: ModelCache, args: dict, readings: list) -> FigureInfo:
    """What the figures of a run show besides their curves: the clip's name (the PNG download's), its readings, the
    TTT model's attention context and the run's mini-batch size."""
    return FigureInfo(
        clip=report.file_stem({"audio": {"name": Path(args["audio"]).name}}),
        spans=outputs.reading_spans(readings),
        context_tokens=cache.context_tokens(args["ttt"], base=args["baseline"])
        if args.get("ttt")
        else cache.context_tokens(args["baseline"]),
        mini_batch_size=args.get("mini_batch_size"),
    )


def compare_handler(
    cache: ModelCache,
    specs: dict[str, Spec],
    runs: RunFolders,
    known_clips: list[str] | None = None,
    stops: StopRequests | None = None,
) -> Callable[..., Iterator[tuple]]:
    """The Compare button: several settings on the Run controls' clip, one after the other.

    Args:
        cache, runs, known_clips, stops: as for `run_handler` (`runs`: a folder tree of its own).
        specs: the Compare event's inputs (`compare_specs`).
    Returns:
        `compare(request, *values)` yielding (status, figure, table as Markdown, downloads) after each setting.
    """
    known = list(known_clips or [])
    stops = stops or StopRequests()

    @on_gpu(gpu_duration(specs, cache_sizes(cache), refuse, runs=compared_runs, models=compare_models))
    def compare(request: gr.Request, *values):
        try:
            args = validate(specs, values)
            sizes = tuple(int(b) for b in args["compare_sizes"])
            persistence = tuple(p == "on" for p in args["compare_persistence"])
            baseline_note = own_settings_note(cache.get(args["baseline"]).model, args["baseline"])
            chunked = []  # In-Place models: their sizes are chunk sizes (update_size.py), as on the Run tab
            for name in args["compare_checkpoints"]:
                model = cache.get(name, base=args["baseline"]).model
                size = update_size(model)
                chunked += [name] if size.kind == "chunk" else []
                for b in sizes if size.kind != "none" else ():
                    size.check(b, name)
                    for persistent in persistence:
                        check_fits_window(model, name, b, persistent, size.label)
            settings = settings_grid(args["compare_checkpoints"], sizes, persistence, chunked)
        except (InputError, CheckpointMismatch, CheckpointUnavailable) as e:  # a checkpoint that fails to load: as Run
            yield (f"Not compared: {e}", gr.skip(), gr.skip(), gr.skip())
            raise refuse(str(e)) from None
        session = session_of(request)
        readings = list(args["readings"]) or headline.readings_of_known_clip(args["audio"], known)
        info = figure_info(cache, {**args, "ttt": args["compare_checkpoints"][0]}, readings)
        updates = compare_settings(cache, args["audio"], args["baseline"], settings, args["max_seconds"],
                                   allow_silence=args["allow_silence"], readings=readings,
                                   stop_requested=stops.start(session), min_interval_s=FIGURE_INTERVAL_S)  # fmt: skip
        try:
            for update in updates:
                if update.progress is not None:  # inside a setting: the status only
                    yield (update.status, gr.skip(), gr.skip(), gr.skip())
                    continue
                figure = to_json(compare_figure(update.document, update.settings, info), info.clip + "_compare")
                table = view.markdown_table(COMPARE_COLUMNS, compare_rows(update.document, update.settings,
                                                                          update.partial))  # fmt: skip
                if not update.complete:
                    yield (update.status, PlotData(type="plotly", plot=figure) if update.done else None,
                           table, [])  # fmt: skip
                    continue
                prefix = report.file_stem(update.document) + ("_compare_partial_" if update.partial else "_compare_")
                with runs.writing(session) as folder:  # kept while the page is given its files
                    files = report.write_report(folder, update.document, prefix=prefix)
                    status = " ".join([update.status, *baseline_note])
                    yield (status, PlotData(type="plotly", plot=figure), table, [str(p) for p in files.values()])
        except (FileNotFoundError, ValueError) as e:
            message = failure_message(e, args["audio"])
            yield (f"Not compared: {message}", gr.skip(), gr.skip(), gr.skip())
            raise gr.Error(message, print_exception=False) from None
        finally:
            updates.close()
            release_memory()

    compare.__signature__ = event_signature(specs)
    return compare


def compared_runs(raw: dict) -> int:
    """How many settings a Compare event's raw values ask for (for ZeroGPU's estimate; 1 for values it refuses)."""
    values = [raw.get(name) for name in ("compare_checkpoints", "compare_sizes", "compare_persistence")]
    if not all(isinstance(v, (list, tuple)) for v in values):
        return 1
    return max(1, min(len(values[0]) * len(values[1]) * len(values[2]), MAX_SETTINGS))


def open_handler(specs: dict[str, Spec]) -> Callable[..., Iterator[tuple]]:
    """The Open button: a results.json shown as a finished run shows it (`outputs.reopened`), without rescoring.

    Returns:
        `open_results(request, *values)` yielding the outputs of `outputs.OUTPUT_NAMES` once.
    """

    def open_results(request: gr.Request, *values):
        try:
            path = validate(specs, values)["results_file"]
            document = read_results(path)
        except InputError as e:
            yield outputs.refused(str(e)).for_gradio()
            raise refuse(str(e)) from None
        yield outputs.reopened(document, Path(path).name).for_gradio()

    open_results.__signature__ = event_signature(specs)
    return open_results


def hear_specs(run: dict[str, Spec]) -> dict[str, Spec]:
    """What the "What the models hear" button takes, in order: the Run event's clip, baseline (its codec decodes),
    duration and silence specs (the same controls), so that it decodes the codes a run of these settings scores."""
    return {name: run[name] for name in ("audio", "baseline", "max_seconds", "allow_silence")}


def hear_handler(cache: ModelCache, specs: dict[str, Spec], folders: RunFolders) -> Callable[..., Iterator[tuple]]:
    """The "What the models hear" button: the chosen clip's codes decoded by the codec (app/reconstruction.py).

    Args:
        cache: the shared models.
        specs: its inputs (`hear_specs`).
        folders: where each session's wav goes (its previous one is deleted, the last one when the session ends).
    Returns:
        `hear(request, *values)` yielding (audio path or None, note as Markdown): first a cleared player and
        "Decoding…", then the wav and what it is; a refusal is written in the note, then raised as Gradio's error.
    """

    @on_gpu(reconstruction_duration(specs, cache_sizes(cache)))
    def hear(request: gr.Request, *values):
        try:
            args = validate(specs, values)
            cache.get(args["baseline"])
        except (InputError, CheckpointMismatch, CheckpointUnavailable) as e:
            yield gr.skip(), view.reconstruction_refused(str(e))
            raise refuse(str(e)) from None
        yield None, view.RECONSTRUCTION_WORKING
        with folders.writing(session_of(request)) as folder:  # not deleted under this decoding by the session's next
            try:
                result = reconstruct_clip(cache, args["audio"], args["baseline"], args["max_seconds"], folder,
                                          allow_silence=args["allow_silence"])  # fmt: skip
            except (FileNotFoundError, ValueError) as e:  # the library's one-sentence errors about the audio
                message = failure_message(e, args["audio"])
                yield None, view.reconstruction_refused(message)
                raise gr.Error(message, print_exception=False) from None
            finally:
                release_memory()
            yield str(result.path), view.reconstruction_note(result, args["baseline"])

    hear.__signature__ = event_signature(specs)
    return hear


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
        name = cache.add_hub(ref)
        names = cache.names()
        return gr.update(choices=names), gr.update(choices=names), f"Added {ref} as {name}: choose it in the dropdowns."

    return add
