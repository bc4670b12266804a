"""Reopening a results.json (moshi_ttt.app.reopen): the app's own download shows again as it was, without
rescoring; a file from a user is read strictly, and each thing wrong with it is one sentence."""

import copy
import json
import types
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from moshi_ttt.app import handlers, outputs
from moshi_ttt.app.engine import compare_file, live_options
from moshi_ttt.app.figure import FigureInfo
from moshi_ttt.app.inputs import InputError, JsonFile
from moshi_ttt.app.reopen import read_results, validate_document
from moshi_ttt.reports.headline import Reading


@pytest.fixture(scope="module")
def download(assets, cache, tmp_path_factory):
    """The app's own results.json of a.wav, with readings, and the last update it came from."""
    readings = [Reading(1, 0.2, 1.2), Reading(2, 1.6, 2.6)]
    *_, last = compare_file(cache, str(assets / "a.wav"), "baseline", "ttt", live_options("chunked", 4), 60,
                            readings=readings)  # fmt: skip
    files = outputs.write_downloads(tmp_path_factory.mktemp("download"), last)
    return Path(next(f for f in files if f.endswith(".json"))), last


def test_the_apps_own_download_shows_again_as_it_was(download):
    path, last = download
    shown = outputs.reopened(read_results(path), path.name)
    done = outputs.final(last, [], outputs.LiveFigure(FigureInfo(clip="a")))
    assert shown.status.startswith("Opened a\\_results.json: a.wav, 38 tokens (3.0 s) of 2 run(s)")  # Markdown
    assert "nothing rescored" in shown.status
    assert shown.headline == done.headline and shown.readings == done.readings and "| 2 | 1.6-2.6 |" in shown.readings
    assert shown.summary == done.summary and shown.codebook_table == done.codebook_table
    mine, theirs = json.loads(shown.figure), json.loads(done.figure)
    assert len(mine["data"]) == len(theirs["data"])  # the same curves (float32 live means vs the file's float64)
    for a, b in zip(mine["data"], theirs["data"], strict=True):
        np.testing.assert_allclose(np.array(a["y"], float), np.array(b["y"], float), atol=2e-5, equal_nan=True)
    assert mine["config"]["toImageButtonOptions"]["filename"] == "a_moshi_ttt"
    assert [s["x0"] for s in mine["layout"]["shapes"] if s["type"] == "rect"][::4] == [0.2, 1.6]


def _broken(download, change) -> dict:
    doc = json.loads(download[0].read_text())
    change(doc)
    return doc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=3), "versions 1 and 2"),
        (lambda d: d.update(runs=[]), "'runs' must be an object of 1 to 16 runs"),
        (lambda d: d["runs"]["ttt"].update(loss_per_token="x"), "loss_per_token must be a list of 1 to 200000"),
        (lambda d: d["runs"]["ttt"]["loss_per_token"].__setitem__(3, "1.0"), "holds '1.0' where numbers"),
        (lambda d: d["runs"]["ttt"]["loss_per_token"].__setitem__(3, True), "holds True where numbers"),
        (lambda d: [d["runs"]["ttt"].pop(k) for k in ("tokens", "loss_per_codebook")] and d["runs"]["ttt"][
            "loss_per_token"].pop(), "different numbers of tokens"),
        (lambda d: d["runs"]["ttt"].update(tokens=5), "'tokens' says 5"),
        (lambda d: d["runs"]["ttt"]["loss_per_codebook"].__setitem__(0, [1.0]), "loss_per_codebook[0] must be a list"),
        (lambda d: d["runs"]["ttt"]["drift"]["1"]["t"].reverse(), "must increase"),
        (lambda d: d["runs"]["ttt"]["drift"].update({"../x": {}}), "layers are named by their index"),
        (lambda d: d["runs"]["ttt"].update(checkpoint="x\ny"), "checkpoint must be a single line"),
        (lambda d: d["runs"]["ttt"].update(checkpoint="x" * 301), "at most 300 printable characters"),
        (lambda d: d["runs"]["ttt"]["readings"].reverse(), "out of order or past the clip"),
        (lambda d: d["runs"]["ttt"].update(mean_loss="low"), "mean_loss must be a number"),
        (lambda d: d["audio"].update(partial={"total_tokens": 2}), "total_tokens must be a whole number of at least"),
        (lambda d: d["runs"].update({"x" * 65: d["runs"]["ttt"]}), "a run name must be a single line"),
    ],
    ids=["version", "runs-list", "loss-string", "loss-string-item", "loss-bool", "lengths", "tokens", "codebook",
         "drift-order", "layer-name", "newline", "long-name", "readings-order", "mean-string", "partial", "run-name"],
)  # fmt: skip
def test_a_file_from_a_user_is_read_strictly(download, change, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")) as e:
        validate_document(_broken(download, change))
    text = str(e.value)
    assert "\n" not in text and len(text) < 200 and "/tmp" not in text


@pytest.mark.parametrize(
    ("text", "message"),
    [('{"version": 2, "runs": {"a": {"loss_per_token": [NaN]}}}', "holds NaN, which strict JSON does not allow"),
     ('{"version": 2, "version": 1}', "repeats the key 'version'"), ("{'version': 2}", "is not valid JSON"),
     ("[" * 100_000 + "]" * 100_000, "nests too deeply"), ('"just a string"', "holds one JSON object")],
    ids=["nan", "repeated-key", "python-dict", "deep", "string"],
)  # fmt: skip
def test_strict_json_only(tmp_path, text, message):
    path = tmp_path / "results.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_results(path)
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(InputError, match="not UTF-8"):
        read_results(path)


def test_only_what_the_app_shows_is_kept_and_text_shows_as_text(download):
    doc = _broken(download, lambda d: d["runs"]["ttt"].update(secret={"path": "/etc/passwd"}, tokens_per_s=None))
    doc["config"]["notes"] = {"ttt": ["<img src=x onerror=alert(1)> **bold** [link](http://x)"], "nobody": ["x"]}
    doc["audio"]["name"] = "/home/someone/<b>clip.wav"
    clean = validate_document(doc)
    assert "secret" not in clean["runs"]["ttt"] and set(clean["config"]["notes"]) == {"ttt"}
    assert clean["audio"]["name"] == "<b>clip.wav"  # the file name only
    shown = outputs.reopened(clean, "r.json")
    assert "\\<b\\>clip.wav" in shown.status and "<b>" not in shown.status.replace("\\<b\\>", "")
    assert "\\<img src=x onerror=alert(1)\\> \\*\\*bold\\*\\* \\[link\\](http://x)" in shown.notes
    version_1 = _broken(download, lambda d: d.update(version=1))
    for run in version_1["runs"].values():
        for key in ("mean_loss_past_context", "context_tokens", "readings"):
            run.pop(key, None)
    assert outputs.reopened(validate_document(version_1), "v1.json").headline.startswith("TTT vs baseline")


def test_the_open_handler_refuses_in_one_sentence_and_shows_a_good_file(download, tmp_path):
    path, _ = download
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    good, bad = uploads / "good.json", uploads / "bad.json"
    good.write_text(path.read_text())
    bad.write_text('{"version": 7}')
    opened = handlers.open_handler(handlers.open_specs([str(uploads)]))
    request = types.SimpleNamespace(session_hash="s")
    shown = list(opened(request, {"path": str(good)}))
    assert len(shown) == 1 and shown[0][1].startswith("Opened good.json")
    refused = opened(request, {"path": str(bad)})
    assert next(refused)[1] == "Not scored: Only results.json versions 1 and 2 can be opened; this file says 7."
    with pytest.raises(gr.Error, match="versions 1 and 2"):
        next(refused)
    outside = opened(request, {"path": str(path)})  # a file nobody uploaded
    assert "must be a file uploaded to this app" in next(outside)[1]
    spec = JsonFile("results.json", roots=(str(uploads),), max_bytes=10)
    with pytest.raises(InputError, match="larger than 0 MB"):
        spec.check(str(good))
    (uploads / "clip.wav").write_text("{}")
    with pytest.raises(InputError, match="must be a .json file"):
        spec.check(str(uploads / "clip.wav"))


def test_a_stopped_runs_download_reopens_as_partial(download):
    path, _ = download
    doc = json.loads(path.read_text())
    doc["audio"]["partial"] = {"tokens_scored": 38, "total_tokens": 60}
    shown = outputs.reopened(validate_document(copy.deepcopy(doc)), "p.json")
    assert "the first 3.0 s of 4.8 s (stopped)" in shown.headline and shown.summary[0][0] == "baseline (partial)"
    assert json.loads(shown.figure)["layout"]["xaxis"]["range"] == [0, 60 / 12.5]
