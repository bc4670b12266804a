"""The app as a hostile user meets it: hand-made JSON through the network API of a launched app.

The file is uploaded first as a browser does (/gradio_api/upload), then the run goes through the queue
(/gradio_api/call/run and its event stream); gradio_client is the second way in. Every bad value gets one
sentence naming no server path, and the app serves the next good request. The server has its own Gradio cache
folder (GRADIO_TEMP_DIR) so its disk use can be measured.
"""

import json
import math
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import SR, speechlike

import app
from moshi_ttt.app import handlers
from moshi_ttt.app.models import ModelCache, build_allow_list

KEEP_RUNS = 3  # the server's cap on result folders of session-less callers, and on sessions keeping one


@pytest.fixture(scope="module")
def gradio_dir(tmp_path_factory):
    """A private Gradio cache for this module's server (Gradio reads GRADIO_TEMP_DIR at build, launch and call)."""
    folder = tmp_path_factory.mktemp("gradio")
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    yield folder
    if before is None:
        del os.environ["GRADIO_TEMP_DIR"]
    else:
        os.environ["GRADIO_TEMP_DIR"] = before


@pytest.fixture(scope="module")
def api(gradio_dir, assets):
    cache = ModelCache(build_allow_list([assets / "checkpoints", assets / "other"], use_env=False))
    demo = app.build_demo(cache, [str(assets / "a.wav")], max_seconds=60, keep_runs=KEEP_RUNS, max_sessions=KEEP_RUNS)
    demo.queue(default_concurrency_limit=2, max_size=8)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield url.rstrip("/")
    demo.close()


def upload(url: str, clip: Path) -> dict:
    """What the browser does: POST the file, get back its path in the server's cache, send it as FileData."""
    with clip.open("rb") as f:
        response = httpx.post(f"{url}/gradio_api/upload", files={"files": (clip.name, f, "audio/wav")}, timeout=30)
    response.raise_for_status()
    return file_data(response.json()[0], clip.name)


def file_data(path: str, name: str) -> dict:
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def good_values(audio: dict) -> list:
    return [audio, "baseline", "ttt", 4, True, "chunked", 60, False, ""]  # allow silence, readings


def call(url: str, values: list) -> tuple[str, object]:
    """One run through the queue with raw JSON (NaN and Infinity written as Python's json writes them).

    Returns ("complete", outputs) or ("error", message).
    """
    return call_event(url, "run", values)


def call_event(url: str, event: str, values: list) -> tuple[str, object]:
    """One call of an event ("run", "compare", "open_results") through the queue with raw JSON: see `call`."""
    body = json.dumps({"data": values})
    headers = {"Content-Type": "application/json"}
    response = httpx.post(f"{url}/gradio_api/call/{event}", content=body, headers=headers, timeout=30)
    response.raise_for_status()
    event_id = response.json()["event_id"]
    kind, data = None, None
    with httpx.stream("GET", f"{url}/gradio_api/call/{event}/{event_id}", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                data = json.loads(line.split(":", 1)[1])
                if kind == "error" and isinstance(data, dict):  # Gradio's error event: {"error": message, ...}
                    data = data.get("error")
                break
    return kind, data


def assert_one_sentence(message: str, match: str) -> None:
    assert isinstance(message, str) and match in message, message
    assert "\n" not in message and message.count(". ") == 0 and len(message) < 200, message
    assert "/tmp" not in message and "pytest" not in message, message  # no server path


def assert_good_run(kind, data) -> None:
    assert kind == "complete", data
    rows = data[3]["data"] if isinstance(data[3], dict) else data[3]
    assert [r[0] for r in rows] == ["baseline", "ttt"]


BAD_VALUES = [
    ("max_seconds", math.nan, "Max duration (s) must be a finite number"),
    ("max_seconds", math.inf, "Max duration (s) must be a finite number"),
    ("max_seconds", -1, "Max duration (s) must be between 5 and 60"),
    ("max_seconds", 10_000, "Max duration (s) must be between 5 and 60"),
    ("max_seconds", 10**400, "Max duration (s) must be between 5 and 60"),
    ("mini_batch_size", 2.5, "TTT mini_batch_size must be a whole number"),
    ("mini_batch_size", 0, "TTT mini_batch_size must be between 1 and 1024"),  # the bound over every kind of model
    ("mini_batch_size", 65, "TTT mini_batch_size of checkpoint 'ttt' must be between 1 and 64, got 65."),  # its own
    ("mini_batch_size", "abc", "TTT mini_batch_size must be a number"),
    ("mini_batch_size", True, "TTT mini_batch_size must be a number"),
    ("baseline", ["baseline"], "Baseline checkpoint must be one of: baseline, ttt, wide_vocab"),
    ("baseline", "no_such_model", "Baseline checkpoint must be one of"),
    ("ttt", "/etc/passwd", "TTT checkpoint must be one of"),
    ("persistent_states", "false", "persistent_states must be true or false"),
    ("mode", "whole", "Mode must be one of"),
    ("allow_silence", "yes", "allow silence must be true or false"),
]
# The public API's order (gradio_client callers pass values by position): the server takes it from run_specs.
INDEX = {name: i for i, name in enumerate(["audio", "baseline", "ttt", "mini_batch_size", "persistent_states",
                                           "mode", "max_seconds", "allow_silence", "readings"])}  # fmt: skip


def test_raw_json_refusals_are_one_sentence_each_and_the_app_serves_on(api, assets):
    audio = upload(api, assets / "a.wav")
    for name, value, message in BAD_VALUES:
        values = good_values(audio)
        values[INDEX[name]] = value
        kind, data = call(api, values)
        assert kind == "error", (name, value, data)
        assert_one_sentence(data, message)
    assert_good_run(*call(api, good_values(audio)))


def test_the_api_names_its_parameters_after_the_run_specs(api, assets):
    """Callers see each input by name and label (the specs' keys and labels) and may pass them by name (the handler
    takes `(request, *values)`; its session's use is tested by the disk test below)."""
    from gradio_client import Client, handle_file

    parameters = httpx.get(f"{api}/gradio_api/info", timeout=30).json()["named_endpoints"]["/run"]["parameters"]
    assert [p["parameter_name"] for p in parameters] == list(INDEX)
    assert parameters[INDEX["persistent_states"]]["label"] == "persistent_states"
    client = Client(api, verbose=False, download_files=False)
    result = client.predict(allow_silence=False, max_seconds=60, mode="chunked", persistent_states=True,
                            mini_batch_size=4, ttt="ttt", baseline="baseline", audio=handle_file(str(assets / "a.wav")),
                            api_name="/run")  # fmt: skip
    assert [r[0] for r in result[3]["data"]] == ["baseline", "ttt"]


def test_a_server_path_as_audio_is_refused(api, assets):
    kind, data = call(api, good_values(file_data(str(assets / "a.wav"), "a.wav")))  # never uploaded
    assert kind == "error"  # Gradio refuses it first (a path nobody uploaded)
    kind, data = call(api, good_values(file_data("/etc/passwd", "passwd")))
    assert kind == "error"
    assert_good_run(*call(api, good_values(upload(api, assets / "b.wav"))))


def test_our_own_check_refuses_a_server_path_that_gradio_lets_through(api, assets, monkeypatch):
    """A Gradio upgrade or setting that opened paths nobody uploaded (here: its check switched off) opens nothing:
    the app's own check refuses everything but uploads and the offered demo clips."""
    from gradio import blocks

    async def hand_over(data, *args, **kwargs):  # Gradio's check and its copy into the cache, both gone
        return data

    monkeypatch.setattr(blocks.processing_utils, "async_move_files_to_cache", hand_over)
    for path in (assets / "b.wav", assets / "checkpoints" / "ttt" / "config.json", Path("/etc/passwd")):
        kind, data = call(api, good_values(file_data(str(path), path.name)))
        assert kind == "error"
        assert_one_sentence(data, "Audio must be a file uploaded to this app or one of its demo clips")
    sneaky = Path(os.environ["GRADIO_TEMP_DIR"]) / ".." / "assets0" / "b.wav"  # .. out of the upload folder
    kind, data = call(api, good_values(file_data(str(sneaky), "b.wav")))
    assert kind == "error" and "uploaded to this app" in data
    kind, data = call(api, good_values(file_data(str(assets / "a.wav"), "a.wav")))  # the offered demo clip
    assert_good_run(kind, data)


def test_gradio_client_gets_the_same_sentences(api, assets):
    from gradio_client import Client, handle_file

    client = Client(api, verbose=False, download_files=False)
    clip = handle_file(str(assets / "a.wav"))
    cases = [
        ((clip, "baseline", "ttt", 2.5, True, "chunked", 60), "must be a whole number"),
        ((clip, ["baseline", "ttt"], "ttt", 4, True, "chunked", 60), "must be one of"),
        ((clip, "baseline", "ttt", 4, True, "chunked", -5), "must be between 5 and 60"),  # (it sends no NaN)
    ]
    for values, message in cases:
        with pytest.raises(Exception, match=message):
            client.predict(*values, api_name="/run")
    result = client.predict(clip, "baseline", "ttt", 4, True, "chunked", 60, api_name="/run")
    assert [r[0] for r in result[3]["data"]] == ["baseline", "ttt"]


def test_a_long_clip_is_scored_up_to_the_limit_with_a_note(api, assets, tmp_path):
    from gradio_client import Client, handle_file

    long_clip = tmp_path / "long.wav"
    sf.write(long_clip, speechlike(8.0, 5), SR)
    client = Client(api, verbose=False)
    result = client.predict(handle_file(str(long_clip)), "baseline", "ttt", 4, True, "chunked", 5, api_name="/run")
    assert "Scored the first 5.0 s of 8.0 s" in result[6]
    doc = json.loads(Path(next(f for f in result[5] if f.endswith("results.json"))).read_text())
    assert doc["audio"]["trimmed_from_s"] == pytest.approx(8.0)
    assert doc["runs"]["ttt"]["tokens"] == math.ceil(5 * 12.5)


def test_the_codecs_reconstruction_is_served_as_a_wav_of_the_scored_length(api, tmp_path, gradio_dir):
    """The "What the models hear" button through the network: the first Max duration of the clip, decoded, served
    from the session's own folder in the server's Gradio cache."""
    from gradio_client import Client, handle_file

    clip = tmp_path / "long.wav"
    sf.write(clip, speechlike(8.0, 6), SR)
    client = Client(api, verbose=False, download_files=False)
    player, note = client.predict(handle_file(str(clip)), "baseline", 5, False, api_name="/hear")
    served = Path(player["path"])
    assert served.name == "long_codec_reconstruction.wav" and served.parent.parent == gradio_dir / "moshi-ttt-heard"
    info = sf.info(str(served))
    assert (info.samplerate, info.channels, info.frames) == (24_000, 1, math.ceil(5 * 12.5) * 1920)
    assert note.startswith("Decoded 5.0 s of codes with the codec of 'baseline'")
    with pytest.raises(Exception, match="must be between 5 and 60"):
        client.predict(handle_file(str(clip)), "baseline", 600, False, api_name="/hear")


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def test_disk_returns_to_where_it_started_after_many_runs(api, assets, gradio_dir):
    """A session keeps only its latest run's downloads, and none once it ends (12 runs: the server's folder is back
    to where it started); raw API calls (each a session that never ends) keep at most the server's max_sessions
    (here KEEP_RUNS) folders in all."""
    from gradio_client import Client, handle_file

    runs = gradio_dir / "moshi-ttt-runs"
    upload(api, assets / "b.wav")  # Gradio keeps one copy of a file uploaded again (a folder per content hash)
    start_mb, start_folders = folder_mb(gradio_dir), set(runs.iterdir()) if runs.is_dir() else set()
    client = Client(api, verbose=False, download_files=False)
    with httpx.stream("GET", f"{api}/gradio_api/heartbeat/{client.session_hash}", timeout=30):
        folders = []
        for _ in range(12):  # one session (open while its heartbeat stream is): only its latest run's folder stays
            result = client.predict(handle_file(str(assets / "b.wav")), "baseline", "ttt", 4, True, "chunked", 60,
                                    api_name="/run")  # fmt: skip
            folders.append(Path(result[5][0]["path"]).parent)
            assert [f.is_dir() for f in folders] == [False] * (len(folders) - 1) + [True]
        one_run_mb = folder_mb(folders[-1])
    deadline = time.monotonic() + 20  # the stream closed: Gradio runs demo.unload, which deletes the last folder
    while time.monotonic() < deadline and folders[-1].is_dir():
        time.sleep(0.2)
    grown_mb = folder_mb(gradio_dir) - start_mb
    # Nothing new stays (older folders of session-less callers may have gone: their cap counts their folders).
    assert not folders[-1].is_dir() and set(runs.iterdir()) <= start_folders
    assert grown_mb < 0.1, grown_mb
    assert 0.01 < one_run_mb < 10
    audio = upload(api, assets / "b.wav")
    for _ in range(8):  # raw calls, each its own session: bounded by max_sessions
        assert_good_run(*call(api, good_values(audio)))
    assert len(list(runs.iterdir())) <= KEEP_RUNS
    print(f"one run's downloads {one_run_mb:.2f} MB; 12 runs of one session: {grown_mb:+.3f} MB once it ended")


def test_a_user_error_is_one_log_line_and_a_fault_keeps_its_traceback(api, assets, caplog, capfd, monkeypatch):
    audio = upload(api, assets / "a.wav")
    values = good_values(audio)
    values[INDEX["mini_batch_size"]] = 2.5
    with caplog.at_level("WARNING", logger="moshi_ttt.app"):
        assert call(api, values)[0] == "error"
    time.sleep(0.2)
    refused = [r for r in caplog.records if r.name == "moshi_ttt.app"]
    assert len(refused) == 1 and "must be a whole number" in refused[0].getMessage()
    assert "Traceback" not in capfd.readouterr().err

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not the user's fault")
        yield  # a generator, as compare_file is

    monkeypatch.setattr(handlers, "compare_file", broken)
    kind, _ = call(api, good_values(audio))
    assert kind == "error"
    time.sleep(0.2)
    err = capfd.readouterr().err
    assert "Traceback" in err and "a bug, not the user's fault" in err


def test_two_raw_sessions_get_their_solo_results(api, assets):
    audio = {clip: upload(api, assets / clip) for clip in ("a.wav", "b.wav")}

    def losses(outputs):
        path = next(f["path"] for f in outputs[5] if f["path"].endswith("results.json"))
        return {r: np.array(v["loss_per_token"], float) for r, v in json.loads(Path(path).read_text())["runs"].items()}

    solo = {}
    for clip in audio:
        kind, data = call(api, good_values(audio[clip]))
        assert kind == "complete"
        solo[clip] = losses(data)
    results = {}
    threads = [threading.Thread(target=lambda c=c: results.update({c: call(api, good_values(audio[c]))}))
               for c in audio]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for clip, (kind, data) in results.items():
        assert kind == "complete"
        for run, loss in losses(data).items():
            np.testing.assert_array_equal(loss, solo[clip][run])


def test_compare_and_open_take_raw_json_too(api, assets, tmp_path):
    """The Compare and Open events skip Gradio's preprocessing as Run does: their refusals are one sentence each,
    a good comparison and a good results.json come back."""
    audio = upload(api, assets / "a.wav")
    kind, data = call_event(api, "compare", [audio, "baseline", ["ttt"], ["3"], ["on"], 60, False, ""])
    assert kind == "error"
    assert_one_sentence(data, "mini_batch_size or In-Place chunk sizes: '3' is not one of")
    kind, data = call_event(api, "compare", [audio, "baseline", ["ttt"], ["4", "16"], ["on"], 60, False, ""])
    assert kind == "complete" and data[0].startswith("Done: 2 of 2 settings"), data
    results = next(f["path"] for f in data[3] if f["path"].endswith("_compare_results.json"))
    with open(results, "rb") as f:
        response = httpx.post(f"{api}/gradio_api/upload", files={"files": ("r.json", f, "application/json")})
    uploaded = file_data(response.json()[0], "r.json")
    kind, data = call_event(api, "open_results", [uploaded])
    assert kind == "complete" and data[1].startswith("Opened r.json: a.wav, 38 tokens"), data
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 2, "runs": {"x": {"loss_per_token": [NaN]}}}')
    with bad.open("rb") as f:
        response = httpx.post(f"{api}/gradio_api/upload", files={"files": ("bad.json", f, "application/json")})
    kind, data = call_event(api, "open_results", [file_data(response.json()[0], "bad.json")])
    assert kind == "error"
    assert_one_sentence(data, "The file holds NaN, which strict JSON does not allow (results.json writes null)")
    kind, data = call_event(api, "open_results", [file_data("/etc/passwd", "passwd")])
    assert kind == "error"
