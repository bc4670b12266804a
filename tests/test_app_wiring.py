"""The app's server pieces without a server: controls built from their specs, the Run event's inputs and outputs in
the specs' order, each update mapped to the outputs, run folders and Stop flags per session, where the demo assets
are, and an entry point that does not need app.py."""

import ast
import gc
import inspect
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import gradio as gr
import pytest

from moshi_ttt.app import handlers, outputs, view
from moshi_ttt.app.controls import control
from moshi_ttt.app.demo_assets import ENV_DEMO_ASSETS, demo_assets_dir, example_clips
from moshi_ttt.app.engine import compare_file, live_options
from moshi_ttt.app.figure import FigureInfo
from moshi_ttt.app.inputs import AudioFile, Choice, Flag, HubReference, Number
from moshi_ttt.app.layout import build_demo
from moshi_ttt.app.models import ModelCache
from moshi_ttt.app.resources import RunFolders, StopRequests

ROOT = Path(__file__).resolve().parent.parent


def test_each_control_shows_what_its_spec_checks():
    with gr.Blocks():
        slider = control(Number("Max duration (s)", 5, 60, default=30, step=5, info="scored at most"))
        whole = control(Number("TTT mini_batch_size", 1, 64, integer=True))
        dropdown = control(Choice("Baseline checkpoint", ("a", "b"), default="b"))
        radio = control(Choice("Mode", ("chunked", "whole sequence"), default="chunked", radio=True))
        checkbox = control(Flag("persistent_states", default=True, info="keep the fast weights between calls"))
        audio = control(AudioFile("Audio", roots=("/uploads",)))
        hub = control(HubReference("Hub checkpoint"))
    assert isinstance(slider, gr.Slider)
    assert (slider.minimum, slider.maximum, slider.value, slider.step) == (5, 60, 30, 5)
    assert slider.label == "Max duration (s)" and slider.info == "scored at most"
    assert (whole.minimum, whole.maximum, whole.value, whole.step) == (1, 64, 1, 1)
    assert isinstance(dropdown, gr.Dropdown) and [c[1] for c in dropdown.choices] == ["a", "b"]
    assert dropdown.value == "b"
    assert isinstance(radio, gr.Radio) and [c[1] for c in radio.choices] == ["chunked", "whole sequence"]
    assert isinstance(checkbox, gr.Checkbox) and checkbox.value is True and checkbox.label == "persistent_states"
    assert checkbox.info == "keep the fast weights between calls"
    assert isinstance(audio, gr.Audio) and audio.type == "filepath" and audio.label == "Audio"
    assert isinstance(hub, gr.Textbox) and hub.label == "Hub checkpoint"
    with pytest.raises(TypeError, match="no control for a spec of type str"):
        control("Audio")


def test_the_run_event_takes_the_spec_built_controls_in_the_specs_order():
    """The order exists once (run_specs): the handler's signature, the event's inputs and the API's parameter names
    follow it, and each input shows its spec's label and bounds."""
    demo = build_demo(ModelCache({}), max_seconds=45)
    specs = handlers.run_specs([], [demo.GRADIO_CACHE], [], max_seconds=45)
    run = next(fn for fn in demo.fns.values() if fn.api_name == "run")
    assert [c.label for c in run.inputs] == [spec.label for spec in specs.values()]
    assert list(inspect.signature(run.fn).parameters) == ["request", *specs]  # no gr.Progress: no overlay
    parameters = demo.get_api_info()["named_endpoints"]["/run"]["parameters"]
    assert [p["parameter_name"] for p in parameters] == list(specs)  # the request is Gradio's, not the API's
    duration = run.inputs[list(specs).index("max_seconds")]
    assert (duration.minimum, duration.maximum, duration.value) == (5, 45, 45)
    assert [type(c) for c in run.outputs] == [gr.Plot, gr.Markdown, gr.Markdown, gr.Dataframe, gr.Markdown, gr.File,
                                              gr.Markdown, gr.Plot, gr.Markdown]  # fmt: skip
    assert run.outputs[0].elem_id == "live-plot" and run.outputs[1].elem_id == "run-status"
    assert outputs.OUTPUT_NAMES == ("figure", "status", "headline", "summary", "readings", "downloads", "notes",
                                    "codebook_figure", "codebook_table")  # fmt: skip


def test_the_hear_button_reads_the_run_controls_and_fills_its_own_player():
    """The "What the models hear" button takes the Run event's own clip, baseline, duration and silence controls (so
    that it decodes the codes a run of these settings scores) and fills a player of its own; it queues with the
    runs."""
    demo = build_demo(ModelCache({}), max_seconds=45)
    run_names = list(handlers.run_specs([], [demo.GRADIO_CACHE], [], max_seconds=45))
    specs = handlers.hear_specs(handlers.run_specs([], [demo.GRADIO_CACHE], [], max_seconds=45))
    events = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name in ("run", "hear")}
    hear, run = events["hear"], events["run"]
    assert list(specs) == ["audio", "baseline", "max_seconds", "allow_silence"]
    assert [id(c) for c in hear.inputs] == [id(run.inputs[run_names.index(name)]) for name in specs]
    assert list(inspect.signature(hear.fn).parameters) == ["request", *specs] and not hear.preprocess
    assert [p["parameter_name"] for p in demo.get_api_info()["named_endpoints"]["/hear"]["parameters"]] == list(specs)
    assert [type(c) for c in hear.outputs] == [gr.Audio, gr.Markdown]
    player = hear.outputs[0]
    assert player.label == view.RECONSTRUCTION_TITLE and player.elem_id == "heard-audio" and not player.interactive
    assert hear.concurrency_id == run.concurrency_id == "score"


@pytest.fixture(scope="module")
def last_updates(cache, assets):
    """The last update of a whole run and of a run stopped after its first update (tiny models, 3 s clip)."""
    cfg = live_options("stream", mini_batch_size=4).replace(record_every=5)
    whole = list(compare_file(cache, str(assets / "a.wav"), "baseline", "ttt", cfg, 60, min_interval_s=0))
    polls = iter([False, True])
    stopped = list(compare_file(cache, str(assets / "a.wav"), "baseline", "ttt", cfg, 60, min_interval_s=0,
                                stop_requested=lambda: next(polls, True)))  # fmt: skip
    return whole, stopped[-1]


def test_each_update_maps_to_the_outputs(last_updates, tmp_path):
    whole, stopped = last_updates
    first = outputs.starting("full")
    assert first.status.startswith("Working") and "whole clip in one call" in first.status and first.headline == ""
    # The previous run's figure, tables, downloads and notes go at once (the figure: an empty frame saying what comes).
    assert (first.summary, first.readings, first.downloads, first.notes) == ([], "", [], "")
    assert "Reading and encoding the audio" in first.figure and '"y": []' in first.figure
    assert (first.codebook_figure, first.codebook_table) == ("", "")
    assert "in one call" not in outputs.starting("chunked").status
    figure = outputs.LiveFigure(FigureInfo(clip="a"))
    progress = outputs.live(whole[0], figure)
    assert progress.status.startswith("Scoring both models") and progress.summary is None
    assert len([t for t in json.loads(progress.figure)["data"] if t["yaxis"] == "y"]) == 4
    with pytest.raises(ValueError, match="last update"):
        outputs.final(whole[0], [], figure)
    files = outputs.write_downloads(tmp_path / "whole", whole[-1])
    done = outputs.final(whole[-1], files, figure)
    assert sorted(Path(f).name for f in done.downloads) == ["a_report.html", "a_results.csv", "a_results.json"]
    assert [row[0] for row in done.summary] == ["baseline", "ttt"] and len(done.summary[0]) == 8
    assert done.readings == "" and done.status.startswith("Done") and "TTT vs baseline" in done.headline
    assert json.loads(done.figure)["layout"]["uirevision"] == json.loads(progress.figure)["layout"]["uirevision"]
    assert json.loads(done.codebook_figure)["data"] and done.codebook_table.count("\n| ") == 2 + 8
    partial = outputs.final(stopped, outputs.write_downloads(tmp_path / "stopped", stopped), figure)
    assert [row[0] for row in partial.summary] == ["baseline (partial)", "ttt (partial)"]
    assert partial.status.startswith("Stopped") and "s (stopped):" in partial.headline
    assert all(Path(f).name.startswith("a_partial_") for f in partial.downloads)


def test_outputs_for_gradio_skip_what_is_not_given(last_updates):
    whole, _ = last_updates
    shown = outputs.starting("chunked").for_gradio()
    assert len(shown) == 9 and shown[1].startswith("Working") and shown[2] == ""
    assert shown[0].type == "plotly" and shown[3] == [] and shown[7] == gr.update(value=None)  # cleared
    assert [i for i, value in enumerate(outputs.live(whole[0], outputs.LiveFigure(FigureInfo())).for_gradio())
            if value == gr.skip()] == [2, 3, 4, 5, 6, 7, 8]  # fmt: skip
    done = outputs.final(whole[-1], ["x.json"], outputs.LiveFigure(FigureInfo())).for_gradio()
    assert done[0].type == "plotly" and json.loads(done[0].plot)["data"]
    assert done[4] == "" and done[5] == ["x.json"] and done[7].type == "plotly"


def test_a_session_keeps_its_latest_run_folder_until_it_ends(tmp_path):
    runs = RunFolders(tmp_path / "runs", keep=3)
    first, second = runs.new("s1"), runs.new("s1")
    other = runs.new("s2")
    assert not first.is_dir() and second.is_dir() and other.is_dir()
    runs.end_session("s1")
    runs.end_session(None)  # a session-less caller's end: nothing to do
    assert not second.is_dir() and other.is_dir()
    # Session-less runs keep their 3 newest folders; they no longer evict a session's latest folder (one user's runs
    # deleted another session's downloads: tests/test_app_hostile_mends.py).
    anonymous = [runs.new(None) for _ in range(4)]
    assert [f.is_dir() for f in [other, *anonymous]] == [True, False, True, True, True]


def test_stop_flags_are_per_session():
    stops = StopRequests()
    poll_1, poll_2, poll_none = stops.start("s1"), stops.start("s2"), stops.start(None)
    stops.request("s1")
    stops.request(None)
    stops.request("")
    assert (poll_1(), poll_2(), poll_none()) == (True, False, False)
    assert stops.start("s1")() is False  # a new run of the session starts unstopped
    stops.request("s2")
    stops.end_session("s2")
    assert poll_2() is False


SESSIONS = ["x" * 100_000, "../../etc/passwd", "a/b", "/", ".", "..", "\x00", "\U0001f3a7 \u00e9", "\ud800", " ", "s1"]


def test_stop_flags_take_any_session_string_each_its_own_file_in_the_folder(tmp_path):
    """Session hashes come from the page: any string is one flag file inside the flags' folder, and sessions stay
    independent."""
    stops = StopRequests(tmp_path / "stops")
    polls = {session: stops.start(session) for session in SESSIONS}
    for i, session in enumerate(SESSIONS):
        stops.request(session)
        assert [poll() for poll in polls.values()] == [j <= i for j in range(len(SESSIONS))], repr(session[:20])
    files = list((tmp_path / "stops").iterdir())
    assert len(files) == len(SESSIONS) and all(f.parent == tmp_path / "stops" for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stops"]  # nothing written outside the folder
    for session in SESSIONS:
        stops.end_session(session)
    assert list((tmp_path / "stops").iterdir()) == []


def test_the_flags_folder_goes_with_the_server_and_only_with_it():
    """A default folder is a temporary one, removed when the server's StopRequests goes (at exit at the latest),
    never by a forked worker's copy; a Stop after a /tmp cleaner removed it still works."""
    stops = StopRequests()
    folder = stops.folder
    assert folder.is_dir() and folder.name.startswith("moshi-ttt-stop-")
    shutil.rmtree(folder)
    stops.request("s1")
    assert stops.start("s2")() is False and folder.is_dir()
    del stops
    gc.collect()
    assert not folder.exists()


def test_stop_reaches_a_run_in_a_forked_worker_as_on_zerogpu():
    """ZeroGPU runs the Run handler in a process forked from the server (spaces' GPU decorator, multiprocessing
    "fork"), with a copy of the flags made at the fork; the Stop button's handler runs in the server. The run must
    still see its Stop, and another session's run must not."""
    stops = StopRequests()
    context = multiprocessing.get_context("fork")
    started, results = context.Event(), context.Queue()

    def worker() -> None:  # the run's side: start, then poll between steps as compare_file does
        polls = {session: stops.start(session) for session in ("s1", "s2")}
        started.set()
        deadline = time.monotonic() + 20
        while not polls["s1"]() and time.monotonic() < deadline:
            time.sleep(0.01)
        results.put((polls["s1"](), polls["s2"]()))

    process = context.Process(target=worker)
    process.start()
    assert started.wait(20)
    stops.request("s1")  # the server's side: the Stop button of session s1
    assert results.get(timeout=30) == (True, False)
    process.join(20)
    assert stops.folder.is_dir()  # the worker's copy of the flags left the server's folder alone


def test_the_demo_assets_are_found_by_env_then_checkout_then_working_directory(tmp_path):
    env_dir, checkout, cwd = tmp_path / "env", tmp_path / "checkout", tmp_path / "cwd"
    for folder in (env_dir, checkout / "demo_assets", cwd / "demo_assets"):
        folder.mkdir(parents=True)
    assert demo_assets_dir({ENV_DEMO_ASSETS: str(env_dir)}, checkout, cwd) == env_dir
    assert demo_assets_dir({}, checkout, cwd) == checkout / "demo_assets"
    assert demo_assets_dir({ENV_DEMO_ASSETS: ""}, tmp_path / "site-packages", cwd) == cwd / "demo_assets"
    assert not demo_assets_dir({}, tmp_path / "site-packages", tmp_path).is_dir()  # none: callers check is_dir()
    with pytest.raises(FileNotFoundError, match=f"{ENV_DEMO_ASSETS}=.*missing is not a directory"):
        demo_assets_dir({ENV_DEMO_ASSETS: str(tmp_path / "missing")}, checkout, cwd)
    assert demo_assets_dir({}) == ROOT / "demo_assets"  # this checkout's, whatever the working directory


def test_example_clips_are_the_audio_files_of_clips_or_of_the_folder(tmp_path):
    for name in ("b.wav", "a.FLAC", "notes.txt", "clips_readme.md"):
        (tmp_path / name).write_bytes(b"x")
    assert [Path(p).name for p in example_clips(tmp_path)] == ["a.FLAC", "b.wav"]
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "c.ogg").write_bytes(b"x")
    assert [Path(p).name for p in example_clips(tmp_path)] == ["c.ogg"]
    assert example_clips(tmp_path / "missing") == []


def test_the_package_never_imports_the_top_level_app_and_app_py_delegates_to_it():
    """The console script (moshi_ttt.app.server:main) runs from an installed package, where app.py is not."""
    for path in (ROOT / "moshi_ttt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(n == "app" or n.startswith("app.") for n in names if n), path
    import app
    from moshi_ttt.app import layout, server

    assert app.build_demo is layout.build_demo and app.main is server.main
    with pytest.raises(SystemExit) as e:
        server.main(["--help"])
    assert e.value.code == 0


def test_the_introduction_says_which_models_are_served(cache):
    from moshi_ttt.app import layout, view
    from moshi_ttt.app.models import build_allow_list

    demo_cache = ModelCache(build_allow_list([ROOT / "demo_assets"], use_env=False))
    assert layout.serves_demo_models(demo_cache) and not layout.serves_demo_models(cache)
    demo = view.intro_markdown(True, "demo_repeat.wav", 50, 16)
    assert "tiny demo models" in demo and "not Moshi 7B" in demo and "Start here" in demo
    assert "every 1.28 s of audio" in demo and "(4 s here)" in demo
    other = view.intro_markdown(False, None, None, None)
    assert "tiny" not in other and "Start here" not in other and "checkpoints this server was started with" in other
