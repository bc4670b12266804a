"""moshi-ttt app: upload audio, watch per-token loss and TTT fast-weight drift of two models grow side by side.

Run: python app.py [--host 127.0.0.1] [--port 7860] [--share] [--checkpoint-dir DIR]... [--checkpoint hf://...]...
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

from moshi_ttt import report  # noqa: E402
from moshi_ttt.live import LIVE_MODES, LiveConfig, compare_file, threads_per_run  # noqa: E402
from moshi_ttt.live_plots import figure_json  # noqa: E402
from moshi_ttt.registry import ModelCache, build_allow_list  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parent / "demo_assets"
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}
SUMMARY_COLUMNS = ["run", "checkpoint", "mean loss", "improvement %", "slope / 1k tokens", "tokens/s"]

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


def run_handler(cache: ModelCache):
    """The Run button: a generator of (figure, summary table, downloads, notes) updates."""

    # Gradio injects the progress tracker through this default value.
    @gpu
    def run(audio_path, baseline, ttt, mini_batch_size, persistent, mode, max_seconds, progress=gr.Progress()):  # noqa: B008
        if not audio_path:
            raise gr.Error("Upload or record a clip first.")
        cfg = LiveConfig(mode=LIVE_MODES[mode], mini_batch_size=int(mini_batch_size), persistent_states=persistent)
        try:
            for update in compare_file(cache, audio_path, baseline, ttt, cfg, float(max_seconds)):
                progress(update.tokens_done / max(update.total_tokens, 1), desc="scoring both models")
                figure = PlotData(type="plotly", plot=figure_json(update.loss_per_token, update.drift,
                                                                  total_tokens=update.total_tokens))  # fmt: skip
                if not update.complete:
                    yield figure, gr.skip(), gr.skip(), gr.skip()
                    continue
                files = report.write_report(tempfile.mkdtemp(prefix="moshi-ttt-"), update.document)
                notes = [n for run_notes in update.document["config"]["notes"].values() for n in run_notes]
                rows = [[row[c] for c in SUMMARY_COLUMNS] for row in update.summary]
                yield figure, rows, [str(p) for p in files.values()], "\n\n".join(notes)
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e

    return run


def build_demo(cache: ModelCache, examples: list[str] | None = None) -> gr.Blocks:
    """The UI; every event handler is a thin adapter over moshi_ttt."""
    names = cache.names()
    baseline_default = next((n for n in names if "baseline" in n), names[0] if names else None)
    ttt_default = next((n for n in names if "ttt" in n.lower()), names[-1] if names else None)
    with gr.Blocks(title="moshi-ttt: what Test-Time Training does inside Moshi") as demo:
        gr.Markdown(
            "# moshi-ttt\nUpload or record speech. Both models read it teacher-forced, in lockstep: the per-token "
            "loss (left) and the drift of the TTT fast weights from W_base (right) grow as they read."
        )
        with gr.Row():
            with gr.Column(scale=1):
                audio = gr.Audio(type="filepath", sources=["upload", "microphone"], label="Audio")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[audio], label="Demo clips")
                baseline = gr.Dropdown(names, value=baseline_default, label="Baseline checkpoint")
                ttt = gr.Dropdown(names, value=ttt_default, label="TTT checkpoint")
                mini_batch = gr.Slider(1, 64, value=16, step=1, label="TTT mini_batch_size")
                persistent = gr.Checkbox(value=True, label="persistent_states (keep fast weights between chunks)")
                mode = gr.Radio(list(LIVE_MODES), value="chunked", label="Mode")
                max_seconds = gr.Slider(5, 600, value=120, step=5, label="Max duration (s)")
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary")
                    stop_button = gr.Button("Stop")
            with gr.Column(scale=3):
                plot = gr.Plot(label="Loss and drift")
                table = gr.Dataframe(headers=SUMMARY_COLUMNS, label="Summary", interactive=False)
                downloads = gr.File(label="results.json, results.csv, report.html", file_count="multiple")
                notes = gr.Markdown()
        inputs = [audio, baseline, ttt, mini_batch, persistent, mode, max_seconds]
        event = run_button.click(run_handler(cache), inputs, [plot, table, downloads, notes], api_name="run")
        stop_button.click(None, None, None, cancels=[event])
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
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads or threads_per_run(args.concurrency))
    dirs = args.checkpoint_dir or ([DEMO_DIR] if DEMO_DIR.is_dir() else [])
    cache = ModelCache(build_allow_list(dirs, args.checkpoint), device=device)
    if not cache.names():
        parser.error("no checkpoint to serve: build demo_assets/ or pass --checkpoint-dir / --checkpoint")
    demo = build_demo(cache, example_clips())
    demo.queue(default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
