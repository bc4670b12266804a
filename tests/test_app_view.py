"""The app's new controls through its handler (no server): Stop keeps partial results, whole-sequence mode, readings
of a known clip, allow silence, pacing, the per-mode persistence note, and the Hub field's gate."""

import json
import shutil
import types
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import soundfile as sf
from conftest import SR, raw_values

from moshi_ttt.app import handlers, layout
from moshi_ttt.app.engine import compare_file, live_options
from moshi_ttt.app.inputs import HubReference, InputError
from moshi_ttt.app.resources import RunFolders, StopRequests

OUTPUTS = ("figure", "status", "headline", "table", "readings", "files", "notes")


def _run(cache, clip, mode="chunked", known=(), allow_silence=False, stop_after=None):
    """The Run handler called directly (no server), reading `clip` as if it were an upload; the session's Stop
    button is pressed after `stop_after` updates."""
    specs = handlers.run_specs(cache.names(), [str(Path(clip).parent)], [str(k) for k in known])
    stops, request = StopRequests(), types.SimpleNamespace(session_hash="session-1")  # what Gradio passes
    runs = RunFolders(Path(clip).parent / "runs")
    handler = handlers.run_handler(cache, specs, runs, [str(k) for k in known], stops)
    values = raw_values(specs, audio=str(clip), mini_batch_size=4, mode=mode, max_seconds=60,
                        allow_silence=allow_silence)  # fmt: skip
    outputs = []
    for out in handler(request, *values):
        outputs.append(dict(zip(OUTPUTS, out, strict=True)))
        if stop_after is not None and len(outputs) == stop_after:
            stops.request("other-session")  # another user's Stop: no effect
            stops.request("session-1")
    return outputs


def test_stop_leaves_the_partial_figure_a_marked_table_and_partial_downloads(assets, cache, tmp_path):
    long_clip = tmp_path / "long talk.wav"
    sf.write(long_clip, np.random.default_rng(0).uniform(-0.3, 0.3, int(12 * SR)).astype(np.float32), SR)
    outputs = _run(cache, long_clip, mode="live token by token", stop_after=3)
    last = outputs[-1]
    assert len(outputs) < 20 and last["status"].startswith("Stopped after")
    assert all(row[0].endswith("(partial)") for row in last["table"])
    assert "TTT vs baseline, the first" in last["headline"] and "(stopped)" in last["headline"]
    names = sorted(Path(f).name for f in last["files"])
    assert names == ["long_talk_partial_report.html", "long_talk_partial_results.csv", "long_talk_partial_results.json"]
    doc = json.loads(Path(next(f for f in last["files"] if f.endswith(".json"))).read_text())
    scored = doc["audio"]["partial"]["tokens_scored"]
    assert 0 < scored < doc["audio"]["partial"]["total_tokens"] == 150
    assert len(doc["runs"]["ttt"]["loss_per_token"]) == scored
    figure = json.loads(last["figure"].plot)
    assert len([t for t in figure["data"] if t["xaxis"] == "x"][0]["y"]) == scored  # the figure stays


def test_whole_sequence_mode_gives_the_chunked_numbers_in_one_update(assets, cache):
    def losses(mode):
        *_, last = compare_file(cache, str(assets / "a.wav"), "baseline", "ttt", live_options(mode), 60)
        return last, {k: np.array(v["loss_per_token"], dtype=float) for k, v in last.document["runs"].items()}

    whole, a = losses("full")
    _, b = losses("chunked")
    for run in a:
        np.testing.assert_allclose(a[run], b[run], atol=1e-4, rtol=0, equal_nan=True)
    assert len(list(compare_file(cache, str(assets / "a.wav"), "baseline", "ttt", live_options("full"), 60))) == 1
    assert whole.inner_loss and whole.drift


def test_an_uploaded_copy_of_a_known_clip_gets_its_per_reading_table(assets, cache, tmp_path):
    known = tmp_path / "known" / "repeat.wav"
    known.parent.mkdir()
    shutil.copy(assets / "a.wav", known)
    known.with_suffix(".txt").write_text("[reading 1: 0.0-1.2 s] a b\n[filler] c\n[reading 2: 1.6-2.8 s] a b\n")
    upload = tmp_path / "upload" / "a.wav"  # Gradio's renamed copy in its cache
    upload.parent.mkdir()
    shutil.copy(assets / "a.wav", upload)
    last = _run(cache, upload, known=[known])[-1]
    readings = last["readings"]
    assert readings["visible"] is True and [r[0] for r in readings["value"]] == [1, 2]
    assert readings["value"][1][1] == "1.6-2.8"
    assert _run(cache, assets / "b.wav", known=[known])[-1]["readings"]["visible"] is False  # other bytes


def test_allow_silence_scores_a_silent_clip_that_is_refused_otherwise(cache, tmp_path):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(int(2 * SR), dtype=np.float32), SR)
    with pytest.raises(gr.Error, match="is silent"):
        _run(cache, silent)
    assert _run(cache, silent, allow_silence=True)[-1]["status"].startswith("Done")


def test_live_updates_are_paced_without_losing_the_last_one(assets, cache):
    def count(interval):
        options = live_options("stream", mini_batch_size=4).replace(record_every=5)
        updates = list(
            compare_file(cache, str(assets / "a.wav"), "baseline", "ttt", options, 60, min_interval_s=interval)
        )
        assert updates[-1].complete and updates[-1].tokens_done == 38
        return len(updates)

    every = count(0.0)
    assert every == 38 // 5 + 1  # one per 5 tokens recorded, and the final one
    assert count(1e9) == 2  # the first update, then nothing until the final one


def test_the_persistence_note_gives_the_reset_period_of_the_chosen_ttt_checkpoint(cache):
    context = cache.context_tokens("ttt")
    note = layout.persistence_note(cache, "ttt")
    assert f"({context} tokens, {context / 12.5:.1f} s)" in note and "the same in every mode" in note
    assert "reset every attention window" in layout.persistence_note(cache, "no such checkpoint")


def test_hub_references_only_with_allow_hub(cache):
    spec = HubReference("Hub checkpoint")
    assert spec.check(" hf://kyutai/moshiko-pytorch-bf16 ") == "hf://kyutai/moshiko-pytorch-bf16"
    assert spec.check("hf://kyutai/moshiko-pytorch-bf16@main") == "hf://kyutai/moshiko-pytorch-bf16@main"
    for bad in ("/etc/passwd", "hf://../../etc", "hf://a/b/c", "file:///x", 3, None, "hf://kyutai/x; rm", "hf://a/.."):
        with pytest.raises(InputError, match="hf://owner/repo"):
            spec.check(bad)
    closed, opened = layout.build_demo(cache), layout.build_demo(cache, allow_hub=True)

    def labels(demo):
        return {getattr(b, "label", None) for b in demo.blocks.values()}

    assert "Hub checkpoint" not in labels(closed) and "Hub checkpoint" in labels(opened)
    add = handlers.add_hub_checkpoint(cache)
    with pytest.raises(gr.Error, match="hf://owner/repo"):
        add("/srv/models/secret")
    assert "/srv/models/secret" not in cache.names()
