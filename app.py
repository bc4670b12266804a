"""moshi-ttt app: upload audio, watch per-token loss and TTT fast-weight drift of two models grow side by side.

Run: python app.py [--host 127.0.0.1] [--port 7860] [--share] [--checkpoint-dir DIR]... [--checkpoint hf://...]...
     [--allow-hub]   (adds a field where users may add hf:// checkpoints; off by default)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

if "cuda" not in os.environ.get("MOSHI_TTT_DEVICE", ""):
    os.environ.setdefault("NO_TORCH_COMPILE", "1")  # moshi's lazy torch.compile costs ~40 s per process on CPU

import gradio as gr  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from gradio.components.plot import PlotData  # noqa: E402

from moshi_ttt.app import view as app_view
from moshi_ttt.app.engine import LIVE_MODES, compare_file, live_options, threads_per_run, trim_note  # noqa: E402
from moshi_ttt.app.figure import figure_json  # noqa: E402
from moshi_ttt.app.inputs import AudioFile, Choice, Flag, HubReference, InputError, Number, validate  # noqa: E402
from moshi_ttt.app.models import ModelCache, build_allow_list  # noqa: E402
from moshi_ttt.data.audio import FRAME_RATE  # noqa: E402
from moshi_ttt.reports import headline
from moshi_ttt.reports import results as report  # noqa: E402

logger = logging.getLogger("moshi_ttt.app")

DEMO_DIR = Path(__file__).resolve().parent / "demo_assets"
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}
SUMMARY_COLUMNS = ["run", "checkpoint", "mean loss", "improvement %", "mean loss past context",
                   "improvement % past context", "slope / 1k tokens", "tokens/s", "peak MB"]  # fmt: skip
READING_COLUMNS = ["reading", "span (s)", "baseline loss", "TTT loss", "improvement %"]
MAX_SECONDS = 600.0  # hard server cap on the scored duration (--max-seconds lowers it); the slider's maximum
QUEUE_SIZE = 16  # runs waiting at most (--queue-size); the next user is told the queue is full
MAX_FILE_SIZE = "200mb"  # largest upload (10 min of 48 kHz stereo 16-bit WAV is 115 MB)
KEEP_RUNS = 16  # result folders (4.7 MB each with the demo models) kept for callers without a session
DELETE_CACHE = (900, 3600)  # Gradio deletes its cached uploads and results older than 1 h, every 15 min
# ZeroGPU seconds per scored token for both models together: estimates from bench/gpu_moshi7b.py's targets on one
# H100 (stream <= 25 ms per token and model; chunked far faster), plus a fixed start-up allowance.
GPU_S_PER_TOKEN = {"stream": 0.06, "chunked": 0.015}
GPU_START_S = 30

try:  # ZeroGPU on Hugging Face Spaces: the `spaces` package is there only on Spaces
    import spaces  # type: ignore[import-not-found]

    def on_gpu(duration):
        return spaces.GPU(duration=duration)

except ImportError:

    def on_gpu(duration):
        return lambda fn: fn


def example_clips(directory: Path = DEMO_DIR) -> list[str]:
    clips = directory / "clips"
    folder = clips if clips.is_dir() else directory
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES]


def run_specs(
    names: list[str], upload_roots: list[str], examples: list[str], max_seconds: float = MAX_SECONDS
) -> dict[str, object]:
    """What the Run event accepts, input by input, in the order of its inputs (see moshi_ttt/app_inputs.py).

    The layout builds its controls from these specs, so the UI's bounds are the server's.
    """
    return {
        "audio": AudioFile("Audio", roots=tuple(upload_roots), files=tuple(examples)),
        "baseline": Choice("Baseline checkpoint", tuple(names)),
        "ttt": Choice("TTT checkpoint", tuple(names)),
        "mini_batch_size": Number("TTT mini_batch_size", 1, 64, integer=True),
        "persistent_states": Flag("persistent_states"),
        "mode": Choice("Mode", tuple(LIVE_MODES)),
        "max_seconds": Number("Max duration (s)", 5, max_seconds),
        "allow_silence": Flag("allow silence"),
    }


class RunFolders:
    """Each run's downloads in a folder of their own under `root`, deleted once they are no longer needed.

    A session keeps only its latest run's folder (the previous one goes when the next run writes its results, the
    last one when the session ends); runs without a session, or whose sessions never end (raw API calls), keep
    the `keep` newest folders in all.
    """

    def __init__(self, root: str | Path, keep: int = KEEP_RUNS):
        self.root = Path(root)
        self.keep = keep
        self._by_session: dict[str, Path] = {}
        self._newest: OrderedDict[Path, None] = OrderedDict()
        self._lock = threading.Lock()

    def new(self, session: str | None) -> Path:
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.root))
            if session is not None:
                self._delete(self._by_session.pop(session, None))
                self._by_session[session] = folder
            self._newest[folder] = None
            while len(self._newest) > self.keep:
                self._delete(next(iter(self._newest)))
            return folder

    def end_session(self, request: gr.Request) -> None:
        """demo.unload: the tab was closed or reloaded."""
        with self._lock:
            self._delete(self._by_session.pop(request.session_hash, None))

    def _delete(self, folder: Path | None) -> None:
        if folder is None:
            return
        self._newest.pop(folder, None)
        for session, f in list(self._by_session.items()):
            if f == folder:
                del self._by_session[session]
        shutil.rmtree(folder, ignore_errors=True)


class StopRequests:
    """The Stop button's flags, one per browser session: Stop sets its session's flag, the session's run polls it
    between steps and ends with the results of what it scored so far (Gradio's cancel would end the generator
    before it could write them). Kept per session hash, like RunFolders; a session-less caller has no Stop button."""

    def __init__(self):
        self._stopped: set[str] = set()
        self._lock = threading.Lock()

    def request(self, request: gr.Request) -> None:
        """The Stop button."""
        if request is not None and request.session_hash:
            with self._lock:
                self._stopped.add(request.session_hash)

    def start(self, session: str | None):
        """A new run of `session`: clears its flag and returns the poll for compare_file's stop_requested."""
        with self._lock:
            self._stopped.discard(session)
        return lambda: session is not None and session in self._stopped

    def end_session(self, request: gr.Request) -> None:
        with self._lock:
            self._stopped.discard(request.session_hash)


def gpu_seconds(audio, baseline, ttt, mini_batch_size, persistent_states, mode, max_seconds, *_, **__) -> int:
    """ZeroGPU's `duration` for one run: computed from the clip's length (its raw inputs, checked here too)."""
    seconds = MAX_SECONDS
    try:
        path = AudioFile("audio", roots=(gr.utils.get_upload_folder(),), files=tuple(example_clips())).check(audio)
        seconds = min(sf.info(path).duration, Number("max", 5, MAX_SECONDS).check(max_seconds))
    except (InputError, RuntimeError, TypeError, sf.LibsndfileError):
        seconds = 5.0  # refused before any model runs
    stream = isinstance(mode, str) and LIVE_MODES.get(mode) == "stream"
    per_token = GPU_S_PER_TOKEN["stream" if stream else "chunked"]
    return int(GPU_START_S + seconds * FRAME_RATE * per_token)


def refuse(message: str) -> gr.Error:
    """A user error: one log line, no traceback, the message shown as it is."""
    logger.warning("run refused: %s", message)
    return gr.Error(message, print_exception=False)


def run_handler(
    cache: ModelCache,
    specs: dict[str, object],
    runs: RunFolders,
    known_clips: list[str] | None = None,
    stops: StopRequests | None = None,
):
    """The Run button: validates its raw inputs, then yields (figure, status, headline, summary, readings,
    downloads, notes) updates. Progress goes to the status line beside the plot, never over it; a Stop (`stops`)
    ends the run with partial results."""
    known = list(known_clips or [])
    stops = stops or StopRequests()

    # Gradio injects the request (for the session) through this annotation.
    @on_gpu(gpu_seconds)
    def run(audio, baseline, ttt, mini_batch_size, persistent_states, mode, max_seconds, allow_silence=False,
            request: gr.Request = None):  # fmt: skip
        values = [audio, baseline, ttt, mini_batch_size, persistent_states, mode, max_seconds, allow_silence]
        try:
            args = validate(specs, values)
        except InputError as e:
            raise refuse(str(e)) from None
        for name in (args["baseline"], args["ttt"]):
            cache.get(name)  # a checkpoint that fails to load is a fault of the server: its traceback is logged
        options = live_options(LIVE_MODES[args["mode"]], args["mini_batch_size"], args["persistent_states"])
        session = request.session_hash if request is not None else None
        stop_requested = stops.start(session)
        readings = headline.readings_of_known_clip(args["audio"], known)
        updates = compare_file(cache, args["audio"], args["baseline"], args["ttt"], options, args["max_seconds"],
                               allow_silence=args["allow_silence"], readings=readings,
                               stop_requested=stop_requested)  # fmt: skip
        skip = gr.skip()
        phase = "reading and encoding the audio, then scoring" + (
            " the whole clip in one call (the figure comes at the end)…" if options.mode == "full" else "…"
        )
        yield skip, app_view.status_text(None, phase), "", skip, skip, skip, skip
        try:
            for update in updates:
                figure = PlotData(type="plotly", plot=figure_json(update.loss_per_token, update.drift,
                                                                  total_tokens=update.total_tokens,
                                                                  inner_loss=update.inner_loss))  # fmt: skip
                status = app_view.status_text(update)
                if not update.complete:
                    yield figure, status, skip, skip, skip, skip, skip
                    continue
                folder = runs.new(session)
                prefix = report.file_stem(update.document) + ("_partial_" if update.stopped else "_")
                files = report.write_report(folder, update.document, prefix=prefix)
                notes = [trim_note(update.document["audio"])]
                notes += [n for run_notes in update.document["config"]["notes"].values() for n in run_notes]
                rows = app_view.table_rows(update.summary, SUMMARY_COLUMNS, update.stopped)
                per_reading = headline.reading_rows(update.document)
                readings_table = gr.update(value=app_view.table_rows(per_reading, READING_COLUMNS, False),
                                           visible=bool(per_reading))  # fmt: skip
                yield (figure, status, app_view.headline_for(update), rows, readings_table,
                       [str(p) for p in files.values()], "\n\n".join(n for n in notes if n))  # fmt: skip
        except FileNotFoundError:
            raise refuse("The audio file is no longer on the server; upload it again.") from None
        except ValueError as e:  # the library's one-sentence errors about the audio and the checkpoints' fit
            raise refuse(str(e)) from None

    return run


def add_hub_checkpoint(cache: ModelCache):
    """The "Add" button next to the Hub field (only with --allow-hub): puts an hf:// reference on the allow-list."""
    spec = {"hub": HubReference("Hub checkpoint")}

    def add(text):
        try:
            ref = validate(spec, [text])["hub"]
        except InputError as e:
            raise refuse(str(e)) from None
        cache.allow_list.update(build_allow_list([], [ref], use_env=False))
        names = cache.names()
        return gr.update(choices=names), gr.update(choices=names), f"Added {ref}: choose it in the dropdowns."

    return add


def _checkpoint_mini_batch(cache: ModelCache, ttt_name: str | None) -> int:
    """The slider's start: the chosen TTT checkpoint's own mini_batch_size (16 for a model without TTT layers)."""
    size = cache.mini_batch_size(ttt_name) if ttt_name in cache.names() else None
    return size if size is not None else 16


def _persistence_note(cache: ModelCache, ttt_name: str | None) -> str:
    """The note under persistent_states for the chosen TTT checkpoint (its attention context sets the reset period)."""
    context = cache.context_tokens(ttt_name) if ttt_name in cache.names() else None
    if context is None:
        return "persistent_states: on, the fast weights carry through the clip; off, reset every attention window."
    return "persistent_states: " + app_view.persistence_help(context)


def build_demo(
    cache: ModelCache,
    examples: list[str] | None = None,
    max_seconds: float = MAX_SECONDS,
    keep_runs: int = KEEP_RUNS,
    allow_hub: bool = False,
) -> gr.Blocks:
    """The UI; the Run handler validates every input itself (its event skips Gradio's preprocessing)."""
    names = cache.names()
    examples = examples or []
    baseline_default = next((n for n in names if "baseline" in n), names[0] if names else None)
    ttt_default = next((n for n in names if "ttt" in n.lower()), names[-1] if names else None)
    demo = gr.Blocks(title="moshi-ttt: what Test-Time Training does inside Moshi", delete_cache=DELETE_CACHE)
    specs = run_specs(names, [demo.GRADIO_CACHE], examples, max_seconds)
    runs = RunFolders(Path(demo.GRADIO_CACHE) / "moshi-ttt-runs", keep=keep_runs)
    stops = StopRequests()
    with demo:
        gr.Markdown(
            "# moshi-ttt\nUpload or record speech. Both models read it teacher-forced, in lockstep; the figure grows "
            "as they read: their per-token loss, TTT − baseline, the drift of the fast weights and the inner loop. "
            f"A clip longer than the duration limit (at most {max_seconds:g} s) is scored up to the limit."
        )
        with gr.Accordion("What is TTT, mini_batch_size, slope?", open=False):
            gr.Markdown(app_view.EXPLANATION)
        with gr.Row():
            with gr.Column(scale=1):
                audio = gr.Audio(type="filepath", sources=["upload", "microphone"], label=specs["audio"].label)
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[audio], label="Demo clips")
                baseline = _dropdown(specs["baseline"], baseline_default)
                ttt = _dropdown(specs["ttt"], ttt_default)
                if allow_hub:
                    with gr.Row():
                        hub = gr.Textbox(label="Add a checkpoint from the Hub", placeholder="hf://owner/repo")
                        add = gr.Button("Add", size="sm")
                    hub_note = gr.Markdown()
                mini_batch = _slider(specs["mini_batch_size"], _checkpoint_mini_batch(cache, ttt_default), step=1)
                mode = gr.Radio(list(specs["mode"].choices), value="chunked", label=specs["mode"].label)
                persistent = gr.Checkbox(value=True, label="persistent_states (keep the fast weights between calls)")
                persistent_note = gr.Markdown(_persistence_note(cache, ttt_default))
                allow_silence = gr.Checkbox(value=False, label="allow silence (score a silent clip anyway)")
                duration = _slider(specs["max_seconds"], min(120, max_seconds), step=5)
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
        ttt.change(lambda name: (_persistence_note(cache, name), _checkpoint_mini_batch(cache, name)), ttt,
                   [persistent_note, mini_batch], queue=False, show_progress="hidden")  # fmt: skip
        inputs = [audio, baseline, ttt, mini_batch, persistent, mode, duration, allow_silence]
        outputs = [plot, status, headline_md, table, readings, downloads, notes]
        handler = run_handler(cache, specs, runs, examples, stops)
        run_button.click(handler, inputs, outputs, api_name="run", preprocess=False, show_progress="hidden")
        stop_button.click(stops.request, None, None, queue=False, show_progress="hidden")
        demo.unload(stops.end_session)
        if allow_hub:
            add.click(add_hub_checkpoint(cache), hub, [baseline, ttt, hub_note], queue=False, preprocess=False)
        demo.unload(runs.end_session)
    return demo


def _dropdown(spec: Choice, value: str | None) -> gr.Dropdown:
    return gr.Dropdown(list(spec.choices), value=value, label=spec.label)


def _slider(spec: Number, value: float, step: float) -> gr.Slider:
    return gr.Slider(spec.minimum, spec.maximum, value=value, step=step, label=spec.label)


def server_address(host: str | None, port: int | None, env=os.environ) -> tuple[str, int]:
    """--host/--port when given, else GRADIO_SERVER_NAME/GRADIO_SERVER_PORT (Spaces, Docker), else 127.0.0.1:7860."""
    host = host or env.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    if port is None:
        text = env.get("GRADIO_SERVER_PORT") or "7860"
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ValueError(f"GRADIO_SERVER_PORT must be a port number, got {text!r}")
        port = int(text)
    return host, port


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--checkpoint-dir", action="append", default=[], help="directory of checkpoints (repeatable)")
    parser.add_argument("--checkpoint", action="append", default=[], help="hf://owner/repo checkpoint (repeatable)")
    parser.add_argument("--device", default=os.environ.get("MOSHI_TTT_DEVICE"), help="cpu or cuda (default: auto)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="model weights (default: bfloat16 on GPU, "
                        "float32 on CPU); TTT fast weights stay float32")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=2, help="runs at once per process")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="runs waiting at most")
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="longest duration scored (s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the cores shared by the runs)")
    parser.add_argument("--allow-hub", action="store_true", help="let users add hf:// checkpoints (downloads them)")
    args = parser.parse_args(argv)
    if not 5 <= args.max_seconds <= MAX_SECONDS:
        parser.error(f"--max-seconds must be between 5 and {MAX_SECONDS:g}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    if device == "cpu":
        torch.set_num_threads(args.threads or threads_per_run(args.concurrency))
    dirs = args.checkpoint_dir or ([DEMO_DIR] if DEMO_DIR.is_dir() else [])
    cache = ModelCache(build_allow_list(dirs, args.checkpoint), device=device, dtype=dtype)
    if not cache.names():
        parser.error("no checkpoint to serve: build demo_assets/ or pass --checkpoint-dir / --checkpoint")
    host, port = server_address(args.host, args.port)
    demo = build_demo(cache, example_clips(), max_seconds=args.max_seconds, allow_hub=args.allow_hub)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    demo.launch(server_name=host, server_port=port, share=args.share, max_file_size=MAX_FILE_SIZE)


if __name__ == "__main__":
    main()
