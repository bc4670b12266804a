"""moshi-ttt app: upload audio, watch per-token loss and TTT fast-weight drift of two models grow side by side.

Run: python app.py [--host 127.0.0.1] [--port 7860] [--share] [--checkpoint-dir DIR]... [--checkpoint hf://...]...
     [--allow-hub]   (adds a field where users may add hf:// checkpoints; off by default)
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

if "cuda" not in os.environ.get("MOSHI_TTT_DEVICE", ""):
    os.environ.setdefault("NO_TORCH_COMPILE", "1")  # moshi's lazy torch.compile costs ~40 s per process on CPU

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from gradio.components.plot import PlotData  # noqa: E402

from moshi_ttt import app_view, headline, report  # noqa: E402
from moshi_ttt.live import LIVE_MODES, LiveConfig, compare_file, threads_per_run  # noqa: E402
from moshi_ttt.live_plots import figure_json  # noqa: E402
from moshi_ttt.registry import ModelCache, build_allow_list  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parent / "demo_assets"
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}
SUMMARY_COLUMNS = ["run", "checkpoint", "mean loss", "improvement %", "mean loss past context",
                   "improvement % past context", "slope / 1k tokens", "tokens/s", "peak MB"]  # fmt: skip
READING_COLUMNS = ["reading", "span (s)", "baseline loss", "TTT loss", "improvement %"]

try:  # ZeroGPU on Hugging Face Spaces: the `spaces` package is there only on Spaces
    import spaces  # type: ignore[import-not-found]

    gpu = spaces.GPU
except ImportError:

    def gpu(fn):
        return fn


def example_clips(directory: Path = DEMO_DIR) -> list[str]:
    clips = directory / "clips"
    folder = clips if clips.is_dir() else directory
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES]


def run_handler(cache: ModelCache, known_clips: list[str] | None = None):
    """The Run button: a generator of (figure, status, headline, summary, readings, downloads, notes) updates.

    `control` is the session's gr.State dict: the Stop button sets control["stop"], and the run then ends with the
    results of what it scored so far (a cancel would end the generator before it could write them).
    """
    known = list(known_clips or [])

    @gpu
    def run(audio_path, baseline, ttt, mini_batch_size, persistent, mode, max_seconds, allow_silence=False,
            control=None):  # fmt: skip
        if not audio_path:
            raise gr.Error("Upload or record a clip first.")
        if mode not in LIVE_MODES:
            raise gr.Error(f"Mode must be one of: {', '.join(LIVE_MODES)}.")
        control = control if isinstance(control, dict) else {}
        control["stop"] = False
        cfg = LiveConfig(mode=LIVE_MODES[mode], mini_batch_size=int(mini_batch_size), persistent_states=persistent)
        readings = headline.readings_of_known_clip(audio_path, known)
        skip = gr.skip()
        yield skip, app_view.status_text(None, "reading and encoding the audio…"), "", skip, skip, skip, skip
        try:
            updates = compare_file(cache, audio_path, baseline, ttt, cfg, float(max_seconds),
                                   allow_silence=bool(allow_silence), readings=readings,
                                   stop_requested=lambda: control.get("stop", False))  # fmt: skip
            for update in updates:
                figure = PlotData(type="plotly", plot=figure_json(update.loss_per_token, update.drift,
                                                                  total_tokens=update.total_tokens,
                                                                  inner_loss=update.inner_loss))  # fmt: skip
                status = app_view.status_text(update)
                if not update.complete:
                    yield figure, status, skip, skip, skip, skip, skip
                    continue
                prefix = report.file_stem(update.document) + ("_partial_" if update.stopped else "_")
                files = report.write_report(tempfile.mkdtemp(prefix="moshi-ttt-"), update.document, prefix=prefix)
                notes = [n for run_notes in update.document["config"]["notes"].values() for n in run_notes]
                rows = app_view.table_rows(update.summary, SUMMARY_COLUMNS, update.stopped)
                per_reading = headline.reading_rows(update.document)
                readings_table = gr.update(value=app_view.table_rows(per_reading, READING_COLUMNS, False),
                                           visible=bool(per_reading))  # fmt: skip
                yield (figure, status, app_view.headline_for(update), rows, readings_table,
                       [str(p) for p in files.values()], "\n\n".join(notes))  # fmt: skip
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e

    return run


def add_hub_checkpoint(cache: ModelCache):
    """The "Add" button next to the Hub field (only with --allow-hub): puts an hf:// reference on the allow-list."""

    def add(text):
        try:
            ref = app_view.check_hub_ref(text)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        cache.allow_list.update(build_allow_list([], [ref], use_env=False))
        names = cache.names()
        return gr.update(choices=names), gr.update(choices=names), f"Added {ref}: choose it in the dropdowns."

    return add


def _persistence_note(mode: str) -> str:
    return "persistent_states: " + app_view.persistence_help(LIVE_MODES.get(mode, "chunked"), LiveConfig.update_every)


def build_demo(cache: ModelCache, examples: list[str] | None = None, allow_hub: bool = False) -> gr.Blocks:
    """The UI; every event handler is a thin adapter over moshi_ttt."""
    names = cache.names()
    baseline_default = next((n for n in names if "baseline" in n), names[0] if names else None)
    ttt_default = next((n for n in names if "ttt" in n.lower()), names[-1] if names else None)
    with gr.Blocks(title="moshi-ttt: what Test-Time Training does inside Moshi") as demo:
        gr.Markdown(
            "# moshi-ttt\nUpload or record speech. Both models read it teacher-forced, in lockstep; the figure grows "
            "as they read: their per-token loss, TTT − baseline, the drift of the fast weights and the inner loop."
        )
        with gr.Accordion("What is TTT, mini_batch_size, slope?", open=False):
            gr.Markdown(app_view.EXPLANATION)
        control = gr.State({})
        with gr.Row():
            with gr.Column(scale=1):
                audio = gr.Audio(type="filepath", sources=["upload", "microphone"], label="Audio")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[audio], label="Demo clips")
                baseline = gr.Dropdown(names, value=baseline_default, label="Baseline checkpoint")
                ttt = gr.Dropdown(names, value=ttt_default, label="TTT checkpoint")
                if allow_hub:
                    with gr.Row():
                        hub = gr.Textbox(label="Add a checkpoint from the Hub", placeholder="hf://owner/repo")
                        add = gr.Button("Add", size="sm")
                    hub_note = gr.Markdown()
                mini_batch = gr.Slider(1, 64, value=16, step=1, label="TTT mini_batch_size",
                                       info="tokens per inner-loop step of the fast weights")  # fmt: skip
                mode = gr.Radio(list(LIVE_MODES), value="chunked", label="Mode")
                persistent = gr.Checkbox(value=True, label="persistent_states (keep the fast weights between calls)")
                persistent_note = gr.Markdown(_persistence_note("chunked"))
                allow_silence = gr.Checkbox(value=False, label="allow silence (score a silent clip anyway)")
                max_seconds = gr.Slider(5, 600, value=120, step=5, label="Max duration (s)")
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary")
                    stop_button = gr.Button("Stop")
            with gr.Column(scale=3):
                status = gr.Markdown("Choose a clip and press Run.", elem_id="run-status")
                plot = gr.Plot(label="Loss, TTT − baseline, drift, inner loop", show_label=False, elem_id="live-plot")
                headline_md = gr.Markdown(elem_id="headline")
                table = gr.Dataframe(headers=SUMMARY_COLUMNS, label="Summary", interactive=False)
                readings = gr.Dataframe(headers=READING_COLUMNS, label="Per reading of the repeated passage",
                                        interactive=False, visible=False, elem_id="readings")  # fmt: skip
                downloads = gr.File(label="results.json, results.csv, report.html", file_count="multiple")
                notes = gr.Markdown()
        mode.change(_persistence_note, mode, persistent_note, queue=False, show_progress="hidden")
        inputs = [audio, baseline, ttt, mini_batch, persistent, mode, max_seconds, allow_silence, control]
        outputs = [plot, status, headline_md, table, readings, downloads, notes]
        run_button.click(run_handler(cache, examples), inputs, outputs, api_name="run", show_progress="hidden")
        stop_button.click(lambda c: c.update(stop=True), control, None, queue=False, show_progress="hidden")
        if allow_hub:
            add.click(add_hub_checkpoint(cache), hub, [baseline, ttt, hub_note], queue=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--checkpoint-dir", action="append", default=[], help="directory of checkpoints (repeatable)")
    parser.add_argument("--checkpoint", action="append", default=[], help="hf://owner/repo checkpoint (repeatable)")
    parser.add_argument("--device", default=os.environ.get("MOSHI_TTT_DEVICE"), help="cpu or cuda (default: auto)")
    parser.add_argument("--concurrency", type=int, default=2, help="runs at once per process")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the cores shared by the runs)")
    parser.add_argument("--allow-hub", action="store_true", help="let users add hf:// checkpoints (downloads them)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads or threads_per_run(args.concurrency))
    dirs = args.checkpoint_dir or ([DEMO_DIR] if DEMO_DIR.is_dir() else [])
    cache = ModelCache(build_allow_list(dirs, args.checkpoint), device=device)
    if not cache.names():
        parser.error("no checkpoint to serve: build demo_assets/ or pass --checkpoint-dir / --checkpoint")
    demo = build_demo(cache, example_clips(), allow_hub=args.allow_hub)
    demo.queue(default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
