"""The app's UI: `build_demo(...) -> gr.Blocks` places the controls (each built from its spec), the figures, the
tables and the downloads, and wires the events to `moshi_ttt.app.handlers`.

At 1400 x 1000 the page reads top to bottom: what it shows and where to start, then the clip and the Run button
(above the fold), the settings under them, then what the models hear (the codec's reconstruction of the clip, on
demand); on the right the status line (it stays in view while the page scrolls), the headline and the figure, with
the per-codebook view and the settings comparison in tabs beside it.

The Run event's inputs list is built from `handlers.run_specs` (their order exists there only), its outputs list
from `outputs.OUTPUT_NAMES`; the Compare and Open events likewise from their specs.
"""

from __future__ import annotations

import contextlib
import typing as tp
from dataclasses import replace
from pathlib import Path

import gradio as gr
from gradio.components.plot import PlotData

from moshi_ttt.app import outputs, view
from moshi_ttt.app.controls import control
from moshi_ttt.app.demo_assets import demo_assets_dir
from moshi_ttt.app.handlers import (
    HUB_SPECS,
    MAX_SECONDS,
    add_hub_checkpoint,
    compare_handler,
    compare_specs,
    hear_handler,
    hear_specs,
    open_handler,
    open_specs,
    run_handler,
    run_specs,
    session_of,
)
from moshi_ttt.app.models import ModelCache
from moshi_ttt.app.player import PAGE_JS, SCROLL_TO_STATUS
from moshi_ttt.app.resources import KEEP_RUNS, MAX_SESSIONS, RunFolders, StopRequests
from moshi_ttt.app.update_size import DEFAULT as DEFAULT_UPDATE_TOKENS
from moshi_ttt.app.update_size import MAX_MINI_BATCH, MAX_TOKENS, UpdateSize, compare_label, update_size

DELETE_CACHE = (900, 3600)  # Gradio deletes its cached uploads and results older than 1 h, every 15 min
START_CLIP = "demo_repeat"  # the demo clip the introduction points to, when it is offered


def persistence_note(cache: ModelCache, ttt_name: str | None, baseline: str | None = None) -> str:
    """The note under the persistent_states checkbox for the chosen TTT checkpoint: its attention context is the
    reset period with persistence off (the same in every mode)."""
    context = None
    if isinstance(ttt_name, str) and ttt_name in cache.names():
        with contextlib.suppress(ValueError):  # the Run button says why the pair does not fit (CheckpointMismatch)
            context = cache.context_tokens(ttt_name, base=baseline)
    if context is None:
        return "persistent_states: on, the fast weights carry through the clip; off, reset every attention window."
    return "persistent_states: " + view.persistence_help(context)


def update_size_of(cache: ModelCache, ttt_name: str | None, baseline: str | None = None) -> UpdateSize:
    """What the tokens-per-update control means for the chosen TTT checkpoint (app/update_size.py); a model without
    TTT layers' meaning for an unknown name or a pair that does not fit (the Run button says why)."""
    if isinstance(ttt_name, str) and ttt_name in cache.names():
        with contextlib.suppress(ValueError):  # also an unknown or non-string baseline of a raw API call
            return update_size(cache.get(ttt_name, base=baseline).model)
    return UpdateSize("none", "TTT mini_batch_size", None, 1, MAX_TOKENS, "")


def compare_sizes_label(cache: ModelCache, checkpoints: tp.Any, baseline: str | None = None) -> str:
    """The Compare tab's label for its sizes: In-Place chunk sizes, TTT mini_batch_size values, or both, as the
    chosen checkpoints take them (`update_size.compare_label`; any raw value of the API is taken as no choice)."""
    names = checkpoints if isinstance(checkpoints, (list, tuple)) else []
    return compare_label(update_size_of(cache, name, baseline) for name in names)


def update_control(size: UpdateSize) -> dict:
    """The slider's label, bounds, start and help text for a TTT checkpoint (gr.update's arguments)."""
    return {"label": size.label, "minimum": size.minimum, "maximum": size.maximum,
            "value": size.default or DEFAULT_UPDATE_TOKENS, "info": size.info}  # fmt: skip


def serves_demo_models(cache: ModelCache) -> bool:
    """Whether every checkpoint the app serves is one of the demo assets' (the tiny models)."""
    try:
        demo = demo_assets_dir().resolve()
    except FileNotFoundError:
        return False
    refs = [Path(entry.ref) for entry in cache.allow_list.values()]
    return bool(refs) and all(not str(ref).startswith("hf:") and ref.resolve().is_relative_to(demo) for ref in refs)


def build_demo(
    cache: ModelCache,
    examples: list[str] | None = None,
    max_seconds: float = MAX_SECONDS,
    keep_runs: int = KEEP_RUNS,
    allow_hub: bool = False,
    max_sessions: int = MAX_SESSIONS,
) -> gr.Blocks:
    """The UI; every handler validates its inputs itself (their events skip Gradio's preprocessing).

    Args:
        cache: the models served (its allow-list fills the checkpoint dropdowns).
        examples: demo clips offered under the audio control (and allowed as inputs).
        max_seconds: the longest duration scored (the duration slider's maximum, checked by the server).
        keep_runs: result folders kept for callers without a session.
        allow_hub: adds a field where users may add hf:// checkpoints.
        max_sessions: sessions whose latest result folder is kept (raw API calls each open a session that never
            ends: beyond this, the session whose folder is oldest loses it).
    Returns:
        The Blocks, not launched.
    """
    examples = examples or []
    demo = gr.Blocks(title="moshi-ttt: what Test-Time Training does inside Moshi", delete_cache=DELETE_CACHE)
    specs = run_specs(cache.live_names(), [demo.GRADIO_CACHE], examples, max_seconds)  # with --allow-hub's later
    more = compare_specs(specs, cache.live_names())
    opening = open_specs([demo.GRADIO_CACHE])
    hearing = hear_specs(specs)
    kept = {"keep": keep_runs, "max_sessions": max_sessions}
    runs = RunFolders(Path(demo.GRADIO_CACHE) / "moshi-ttt-runs", **kept)
    compared = RunFolders(Path(demo.GRADIO_CACHE) / "moshi-ttt-compare", **kept)
    heard = RunFolders(Path(demo.GRADIO_CACHE) / "moshi-ttt-heard", **kept)  # each session's latest wav
    stops, compare_stops = StopRequests(), StopRequests()  # Run's and Compare's Stop: each stops its own event
    ttt_default, baseline_default = specs["ttt"].default, specs["baseline"].default
    start_clip = next((Path(e).name for e in examples if Path(e).stem == START_CLIP), None)
    size = update_size_of(cache, ttt_default, baseline_default)
    context = None
    if ttt_default:
        with contextlib.suppress(ValueError):  # CheckpointMismatch, CheckpointUnavailable: the Run button says why
            context = cache.context_tokens(ttt_default, base=baseline_default)
    with demo:
        gr.Markdown(view.intro_markdown(serves_demo_models(cache), start_clip, context, size.default),
                    elem_id="intro")  # fmt: skip
        with gr.Accordion("What is TTT, mini_batch_size, drift, the inner loop, codebooks?", open=False):
            gr.Markdown(view.EXPLANATION)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                inputs = {"audio": control(specs["audio"], elem_id="clip-audio")}
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[inputs["audio"]], label="Demo clips")
                inputs["mode"] = control(specs["mode"])  # the one choice most runs make: above Run, above the fold
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary", elem_id="run-button")
                    stop_button = gr.Button("Stop", elem_id="stop-button")
                with gr.Accordion("Settings", open=True):
                    for name in ("baseline", "ttt"):
                        inputs[name] = control(specs[name])
                    if allow_hub:
                        with gr.Row():
                            hub = control(HUB_SPECS["hub"])
                            add = gr.Button("Add", size="sm")
                        hub_note = gr.Markdown()
                    # The slider shows the chosen TTT model's own range and start (app/update_size.py); the
                    # server checks the spec's bounds, then the model's.
                    maximum = size.maximum if size.kind != "none" else MAX_MINI_BATCH
                    start = replace(specs["mini_batch_size"], label=size.label, maximum=maximum, info=size.info,
                                    default=size.default or DEFAULT_UPDATE_TOKENS)  # fmt: skip
                    inputs["mini_batch_size"] = control(start)
                    inputs["persistent_states"] = control(specs["persistent_states"])
                    note = gr.Markdown(persistence_note(cache, ttt_default, baseline_default))
                    for name in ("readings", "allow_silence", "max_seconds"):
                        inputs[name] = control(specs[name])
                with gr.Accordion(view.RECONSTRUCTION_TITLE, open=False):
                    gr.Markdown(view.RECONSTRUCTION_HELP)
                    hear_button = gr.Button(view.RECONSTRUCTION_BUTTON, elem_id="hear-button")
                    heard_audio = gr.Audio(label=view.RECONSTRUCTION_TITLE, type="filepath", interactive=False,
                                           elem_id="heard-audio")  # fmt: skip
                    heard_note = gr.Markdown(elem_id="heard-note")
                with gr.Accordion("Open a results.json (no rescoring)", open=False):
                    gr.Markdown("A results.json of this app or of the command line (e.g. Moshi 7B scored on a "
                                "cluster): its figure, headline and tables, as when it was scored.")  # fmt: skip
                    results_file = control(opening["results_file"])
                    open_button = gr.Button("Open", elem_id="open-button")
            with gr.Column(scale=3):
                shown = {"status": gr.Markdown("Choose a clip and press Run.", elem_id="run-status")}
                with gr.Tabs():
                    with gr.Tab("Figure", id="figure"):
                        shown["headline"] = gr.Markdown(elem_id="headline")
                        shown["figure"] = gr.Plot(PlotData(type="plotly", plot=outputs.WAITING_FIGURE),
                                                  show_label=False, elem_id="live-plot")  # fmt: skip
                        shown["summary"] = gr.Dataframe(headers=list(outputs.SUMMARY_COLUMNS), label="Summary",
                                                        interactive=False, wrap=True, elem_id="summary")  # fmt: skip
                        shown["readings"] = gr.Markdown(elem_id="readings")
                        shown["downloads"] = gr.File(label="results.json, results.csv, report.html",
                                                     file_count="multiple", elem_id="downloads")  # fmt: skip
                        shown["notes"] = gr.Markdown(elem_id="notes")
                    with gr.Tab("Per codebook", id="codebooks"):
                        gr.Markdown("Mimi's codebook 0 is *semantic* (distilled from a speech model: what is said), "
                                    "codebooks 1-7 *acoustic* (how it sounds). Shown when a run ends or is "
                                    "stopped, and for an opened results.json.")  # fmt: skip
                        shown["codebook_figure"] = gr.Plot(show_label=False, elem_id="codebook-plot")
                        shown["codebook_table"] = gr.Markdown(elem_id="codebook-table")
                    with gr.Tab("Compare settings", id="compare"):
                        gr.Markdown("Several settings on the clip chosen on the left, against its baseline, in one "
                                    "figure. Each is scored exactly as Run scores it alone (chunked).")  # fmt: skip
                        with gr.Row():
                            label = compare_sizes_label(cache, more["compare_checkpoints"].default, baseline_default)
                            compare_inputs = {"compare_checkpoints": control(more["compare_checkpoints"]),
                                              "compare_sizes": control(replace(more["compare_sizes"], label=label)),
                                              "compare_persistence": control(more["compare_persistence"])}  # fmt: skip
                        with gr.Row():
                            compare_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
                            compare_stop_button = gr.Button("Stop comparing", elem_id="compare-stop-button")
                        compare_status = gr.Markdown(elem_id="compare-status")
                        compare_plot = gr.Plot(show_label=False, elem_id="compare-plot")
                        compare_table = gr.Markdown(elem_id="compare-table")
                        compare_files = gr.File(label="results.json, results.csv, report.html of the comparison",
                                                file_count="multiple", elem_id="compare-downloads")  # fmt: skip

        def checkpoint_chosen(ttt_name, baseline):
            control_update = update_control(update_size_of(cache, ttt_name, baseline))
            return persistence_note(cache, ttt_name, baseline), gr.update(**control_update)

        for chooser in (inputs["ttt"], inputs["baseline"]):  # an In-Place lora checkpoint loads over the baseline
            chooser.change(checkpoint_chosen, [inputs["ttt"], inputs["baseline"]], [note, inputs["mini_batch_size"]],
                           queue=False, show_progress="hidden")  # fmt: skip

        def compared_chosen(checkpoints, baseline):
            return gr.update(label=compare_sizes_label(cache, checkpoints, baseline))

        for chooser in (compare_inputs["compare_checkpoints"], inputs["baseline"]):  # chunks for In-Place models
            chooser.change(compared_chosen, [compare_inputs["compare_checkpoints"], inputs["baseline"]],
                           [compare_inputs["compare_sizes"]], queue=False, show_progress="hidden")  # fmt: skip
        handler = run_handler(cache, specs, runs, examples, stops)
        run_outputs = [shown[name] for name in outputs.OUTPUT_NAMES]
        # Runs, comparisons and decodings share the queue's slots (the CPU threads per run are the cores shared
        # by them).
        run_button.click(handler, [inputs[name] for name in specs], run_outputs, api_name="run", preprocess=False,
                         show_progress="hidden", js=SCROLL_TO_STATUS, concurrency_id="score")  # fmt: skip
        hear_button.click(hear_handler(cache, hearing, heard), [inputs[name] for name in hearing],
                          [heard_audio, heard_note], api_name="hear", preprocess=False, show_progress="hidden",
                          concurrency_id="score")  # fmt: skip
        compare_controls = {**inputs, **compare_inputs}
        compare_button.click(compare_handler(cache, more, compared, examples, compare_stops),
                             [compare_controls[name] for name in more],
                             [compare_status, compare_plot, compare_table, compare_files], api_name="compare",
                             preprocess=False, show_progress="hidden", concurrency_id="score")  # fmt: skip
        open_button.click(open_handler(opening), [results_file], run_outputs, api_name="open_results",
                          preprocess=False, show_progress="hidden")  # fmt: skip

        def stop(request: gr.Request) -> None:
            stops.request(session_of(request))

        def stop_comparing(request: gr.Request) -> None:
            compare_stops.request(session_of(request))

        def end_session(request: gr.Request) -> None:
            for folders in (runs, compared, heard):
                folders.end_session(session_of(request))
            for flags in (stops, compare_stops):
                flags.end_session(session_of(request))

        stop_button.click(stop, None, None, queue=False, show_progress="hidden")
        compare_stop_button.click(stop_comparing, None, None, queue=False, show_progress="hidden")
        demo.unload(end_session)
        demo.load(None, js=PAGE_JS)  # the player's position on the figures, a click plays from there
        if allow_hub:
            add.click(add_hub_checkpoint(cache), hub, [inputs["baseline"], inputs["ttt"], hub_note], queue=False,
                      preprocess=False)  # fmt: skip
    return demo
