"""The app's UI: `build_demo(...) -> gr.Blocks` places the controls (each built from its spec), the figure, the
tables and the downloads, and wires the events to `moshi_ttt.app.handlers`.

The Run event's inputs list is built from `handlers.run_specs` (their order exists there only), its outputs list
from `outputs.OUTPUT_NAMES`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gradio as gr

from moshi_ttt.app import outputs, view
from moshi_ttt.app.controls import control
from moshi_ttt.app.handlers import HUB_SPECS, MAX_SECONDS, add_hub_checkpoint, run_handler, run_specs, session_of
from moshi_ttt.app.models import ModelCache
from moshi_ttt.app.resources import KEEP_RUNS, RunFolders, StopRequests

DELETE_CACHE = (900, 3600)  # Gradio deletes its cached uploads and results older than 1 h, every 15 min


def persistence_note(cache: ModelCache, ttt_name: str | None) -> str:
    """The note under the persistent_states checkbox for the chosen TTT checkpoint: its attention context is the
    reset period with persistence off (the same in every mode)."""
    context = cache.context_tokens(ttt_name) if ttt_name in cache.names() else None
    if context is None:
        return "persistent_states: on, the fast weights carry through the clip; off, reset every attention window."
    return "persistent_states: " + view.persistence_help(context)


def checkpoint_mini_batch(cache: ModelCache, ttt_name: str | None) -> int:
    """The mini_batch_size slider's start: the chosen TTT checkpoint's own (16 for a model without TTT layers)."""
    size = cache.mini_batch_size(ttt_name) if ttt_name in cache.names() else None
    return size if size is not None else 16


def build_demo(
    cache: ModelCache,
    examples: list[str] | None = None,
    max_seconds: float = MAX_SECONDS,
    keep_runs: int = KEEP_RUNS,
    allow_hub: bool = False,
) -> gr.Blocks:
    """The UI; the Run handler validates every input itself (its event skips Gradio's preprocessing).

    Args:
        cache: the models served (its allow-list fills the checkpoint dropdowns).
        examples: demo clips offered under the audio control (and allowed as inputs).
        max_seconds: the longest duration scored (the duration slider's maximum, checked by the server).
        keep_runs: result folders kept for callers without a session.
        allow_hub: adds a field where users may add hf:// checkpoints.
    Returns:
        The Blocks, not launched.
    """
    examples = examples or []
    demo = gr.Blocks(title="moshi-ttt: what Test-Time Training does inside Moshi", delete_cache=DELETE_CACHE)
    specs = run_specs(cache.names(), [demo.GRADIO_CACHE], examples, max_seconds)
    runs = RunFolders(Path(demo.GRADIO_CACHE) / "moshi-ttt-runs", keep=keep_runs)
    stops = StopRequests()
    with demo:
        gr.Markdown(
            "# moshi-ttt\nUpload or record speech. Both models read it teacher-forced, in lockstep; the figure grows "
            "as they read: their per-token loss, TTT − baseline, the drift of the fast weights and the inner loop. "
            f"A clip longer than the duration limit (at most {max_seconds:g} s) is scored up to the limit."
        )
        with gr.Accordion("What is TTT, mini_batch_size, slope?", open=False):
            gr.Markdown(view.EXPLANATION)
        with gr.Row():
            with gr.Column(scale=1):
                inputs = {"audio": control(specs["audio"])}
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[inputs["audio"]], label="Demo clips")
                for name in ("baseline", "ttt"):
                    inputs[name] = control(specs[name])
                if allow_hub:
                    with gr.Row():
                        hub = control(HUB_SPECS["hub"])
                        add = gr.Button("Add", size="sm")
                    hub_note = gr.Markdown()
                ttt_default = specs["ttt"].default
                start = replace(specs["mini_batch_size"], default=checkpoint_mini_batch(cache, ttt_default))
                inputs["mini_batch_size"] = control(start)  # bounds and checks stay the spec's
                for name in ("mode", "persistent_states"):
                    inputs[name] = control(specs[name])
                note = gr.Markdown(persistence_note(cache, ttt_default))
                for name in ("allow_silence", "max_seconds"):
                    inputs[name] = control(specs[name])
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary")
                    stop_button = gr.Button("Stop")
            with gr.Column(scale=3):
                shown = {"status": gr.Markdown("Choose a clip and press Run.", elem_id="run-status")}
                shown["figure"] = gr.Plot(label="Loss, TTT − baseline, drift, inner loop", show_label=False,
                                          elem_id="live-plot")  # fmt: skip
                shown["headline"] = gr.Markdown(elem_id="headline")
                shown["summary"] = gr.Dataframe(headers=outputs.SUMMARY_COLUMNS, label="Summary", interactive=False)
                shown["readings"] = gr.Dataframe(headers=outputs.READING_COLUMNS, interactive=False, visible=False,
                                                 label="Per reading of the repeated passage",
                                                 elem_id="readings")  # fmt: skip
                shown["downloads"] = gr.File(label="results.json, results.csv, report.html", file_count="multiple")
                shown["notes"] = gr.Markdown()
        inputs["ttt"].change(lambda name: (persistence_note(cache, name), checkpoint_mini_batch(cache, name)),
                             inputs["ttt"], [note, inputs["mini_batch_size"]], queue=False,
                             show_progress="hidden")  # fmt: skip
        handler = run_handler(cache, specs, runs, examples, stops)
        run_button.click(handler, [inputs[name] for name in specs], [shown[name] for name in outputs.OUTPUT_NAMES],
                         api_name="run", preprocess=False, show_progress="hidden")  # fmt: skip

        def stop(request: gr.Request) -> None:
            stops.request(session_of(request))

        def end_session(request: gr.Request) -> None:
            runs.end_session(session_of(request))
            stops.end_session(session_of(request))

        stop_button.click(stop, None, None, queue=False, show_progress="hidden")
        demo.unload(end_session)
        if allow_hub:
            add.click(add_hub_checkpoint(cache), hub, [inputs["baseline"], inputs["ttt"], hub_note], queue=False,
                      preprocess=False)  # fmt: skip
    return demo
