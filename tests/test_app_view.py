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

OUTPUTS = ("figure", "status", "headline", "table", "readings", "files", "notes", "codebook_figure", "codebook_table")


def _run(cache, clip, mode="chunked", known=(), allow_silence=False, stop_after=None, **given):
    """The Run handler called directly (no server), reading `clip` as if it were an upload; the session's Stop
    button is pressed after `stop_after` updates."""
    specs = handlers.run_specs(cache.names(), [str(Path(clip).parent)], [str(k) for k in known])
    stops, request = StopRequests(), types.SimpleNamespace(session_hash="session-1")  # what Gradio passes
    runs = RunFolders(Path(clip).parent / "runs")
    handler = handlers.run_handler(cache, specs, runs, [str(k) for k in known], stops)
    values = raw_values(specs, **{"audio": str(clip), "mini_batch_size": 4, "mode": mode, "max_seconds": 60,
                                  "allow_silence": allow_silence, **given})  # fmt: skip
    outputs = []
    for out in handler(request, *values):
        outputs.append(dict(zip(OUTPUTS, out, strict=True)))
        if stop_after is not None and len(outputs) == stop_after:
            stops.request("other-session")  # another user's Stop: no effect
            stops.request("session-1")
    return outputs


def test_stop_leaves_the_partial_figure_a_marked_table_and_partial_downloads(assets, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(handlers, "FIGURE_INTERVAL_S", 0.0)  # an update per chunk, however fast the machine
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
    assert len([t for t in figure["data"] if t["yaxis"] == "y"][0]["y"]) == scored  # the figure stays


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
    assert "| 1 | 0.0-1.2 |" in readings and "| 2 | 1.6-2.8 |" in readings
    assert _run(cache, assets / "b.wav", known=[known])[-1]["readings"] == ""  # other bytes


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


def test_the_per_codebook_view_reads_loss_per_codebook():
    from moshi_ttt.app.codebook_view import COLUMNS, codebook_figure, codebook_table

    T = 100
    runs = {}
    for run, semantic in (("baseline", 5.0), ("ttt", 4.0)):
        loss = [[semantic] * T] + [[3.0] * T for _ in range(7)]
        runs[run] = {"loss_per_token": [3.25] * T, "loss_per_codebook": loss, "context_tokens": 50}
    doc = {"runs": runs}
    figure = codebook_figure(doc)
    rows = {t["yaxis"] for t in figure["data"]}
    assert rows == {"y", "y2", "y3"} and figure["layout"]["xaxis"]["range"] == [0, T / 12.5]
    semantic = [t for t in figure["data"] if t["yaxis"] == "y"]
    assert [t["name"] for t in semantic] == ["TTT", "baseline"] and semantic[0]["y"][-1] == 4.0
    table = codebook_table(doc)
    assert len(table[0]) == len(COLUMNS) and table[0][:4] == ["semantic (codebook 0)", 5.0, 4.0, "20.00% lower"]
    assert table[1][3] == "no different" and codebook_table(doc, partial=True)[0][0].endswith("(partial)")
    assert codebook_figure({"runs": {"ttt": runs["ttt"]}}) is None


def test_readings_typed_for_an_own_upload_give_the_table_and_the_shaded_spans(assets, cache):
    last = _run(cache, assets / "a.wav", readings="0.2-1.2, 1.6-2.6")[-1]
    assert "| 1 | 0.2-1.2 |" in last["readings"] and "| 2 | 1.6-2.6 |" in last["readings"]
    assert "Per reading of the repeated passage" in last["headline"] and "1st (0.2-1.2 s)" in last["headline"]
    rects = [s for s in json.loads(last["figure"].plot)["layout"]["shapes"] if s["type"] == "rect"]
    assert sorted({(s["x0"], s["x1"]) for s in rects}) == [(0.2, 1.2), (1.6, 2.6)]
    with pytest.raises(gr.Error, match="is not a span"):
        _run(cache, assets / "a.wav", readings="the first one")


def test_a_refusal_replaces_the_working_status_with_its_sentence(assets, cache):
    """The issue's status line that kept "Working…" after a refusal: the refusal is written there too."""
    specs = handlers.run_specs(cache.names(), [str(assets)], [])
    run = handlers.run_handler(cache, specs, RunFolders(assets / "runs"))
    updates = run(None, *raw_values(specs, audio=str(assets / "garbage.wav"), mini_batch_size=4, max_seconds=60))
    shown = [dict(zip(OUTPUTS, next(updates), strict=True)) for _ in range(2)]
    assert shown[0]["status"].startswith("Working")
    assert shown[1]["status"].startswith("Not scored: ") and "could not be read as audio" in shown[1]["status"]
    assert "Not scored: " in shown[1]["figure"].plot and "Reading and encoding" not in shown[1]["figure"].plot
    with pytest.raises(gr.Error, match="could not be read as audio"):
        next(updates)
    refused = run(None, *raw_values(specs, audio=str(assets / "a.wav"), mini_batch_size=2.5, max_seconds=60))
    assert next(refused)[1] == "Not scored: TTT mini_batch_size must be a whole number, got 2.5."


def test_a_stereo_44k_upload_says_it_was_mixed_down_and_resampled(cache, tmp_path):
    from conftest import speechlike

    stereo = tmp_path / "stereo.wav"
    left = speechlike(3.0, 4)
    import soxr

    left = soxr.resample(left, SR, 44_100).astype(np.float32)
    sf.write(stereo, np.stack([left, 0.5 * left], axis=1), 44_100)
    notes = _run(cache, stereo)[-1]["notes"]
    assert "mixed its 2 channels down to mono and resampled it from 44.1 kHz to 24 kHz" in notes


def test_a_half_second_clip_says_why_its_rows_are_empty(cache, tmp_path):
    from conftest import speechlike

    short = tmp_path / "short.wav"
    sf.write(short, speechlike(0.5, 5), SR)
    last = _run(cache, short, mini_batch_size=16)[-1]
    notes = [a["text"] for a in json.loads(last["figure"].plot)["layout"]["annotations"]]
    assert sum(n.startswith("No fast-weight update: the clip has 7 tokens, fewer than one mini-batch of 16") for n in
               notes) == 2  # fmt: skip
    assert "0.6 s long, shorter than" in last["headline"] and last["status"].startswith("Done")


def test_a_silent_clip_scored_anyway_gets_no_bold_number(cache, tmp_path):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(int(12 * SR), dtype=np.float32), SR)
    headline = _run(cache, silent, allow_silence=True)[-1]["headline"]
    assert "is silent" in headline and "**" not in headline.split("**Caveat:**")[0]


def _hear(cache, clip, folders, session="session-1", **given):
    """The "What the models hear" button called directly (no server), reading `clip` as if it were an upload."""
    specs = handlers.hear_specs(handlers.run_specs(cache.names(), [str(Path(clip).parent)], []))
    handler = handlers.hear_handler(cache, specs, folders)
    values = raw_values(specs, **{"audio": str(clip), "max_seconds": 60, **given})
    return list(handler(types.SimpleNamespace(session_hash=session), *values))


def test_the_codecs_reconstruction_is_the_decoded_codes_a_run_scores(assets, cache, tmp_path):
    import torch

    from moshi_ttt.data.audio import check_audio
    from moshi_ttt.data.stream import encode_file

    clip = tmp_path / "long talk.wav"
    sf.write(clip, np.random.default_rng(1).uniform(-0.3, 0.3, int(7 * SR)).astype(np.float32), SR)
    folders = RunFolders(tmp_path / "heard")
    shown = _hear(cache, clip, folders, max_seconds=5)
    assert shown[0] == (None, "Working: encoding the clip and decoding its codes…")  # the previous wav goes
    path, note = shown[-1]
    assert Path(path).name == "long_talk_codec_reconstruction.wav" and Path(path).parent.parent == tmp_path / "heard"
    assert note.startswith("Decoded 5.0 s of codes with the codec of 'baseline' in ")
    loaded = cache.get("baseline")
    codes = encode_file(loaded.mimi, check_audio(clip, max_seconds=5, trim=True))[:, : loaded.model.dep_q]
    assert codes.shape[-1] == 63  # the tokens a run of Max duration 5 s scores: ceil(5 s x 12.5)
    with torch.no_grad():
        expected = loaded.mimi.decode(codes)[0, 0].clamp(-1, 1)
    written, rate = sf.read(path, dtype="float32")
    assert rate == 24_000 and written.shape == (63 * 1920,)
    torch.testing.assert_close(torch.from_numpy(written), expected, rtol=0, atol=1 / 32767 + 1e-4)


def test_each_session_keeps_its_latest_reconstruction_until_it_ends(assets, cache, tmp_path):
    folders = RunFolders(tmp_path / "heard")
    first = _hear(cache, assets / "a.wav", folders)[-1][0]
    mine, theirs = _hear(cache, assets / "a.wav", folders)[-1][0], _hear(cache, assets / "b.wav", folders, "s2")[-1][0]
    assert not Path(first).exists() and Path(mine).is_file() and Path(theirs).is_file() and mine != first
    folders.end_session("session-1")
    assert not Path(mine).exists() and Path(theirs).is_file()


def test_a_clip_that_cannot_be_decoded_says_why_in_the_note_and_the_toast(assets, cache, tmp_path):
    folders = RunFolders(tmp_path / "heard")
    specs = handlers.hear_specs(handlers.run_specs(cache.names(), [str(assets)], []))
    hear = handlers.hear_handler(cache, specs, folders)
    updates = hear(None, *raw_values(specs, audio=str(assets / "garbage.wav"), max_seconds=60))
    assert next(updates)[1].startswith("Working")
    player, note = next(updates)
    assert player is None and note.startswith("Not decoded: garbage.wav could not be read as audio")
    with pytest.raises(gr.Error, match="could not be read as audio"):
        next(updates)
    refused = hear(None, *raw_values(specs, audio=str(assets / "a.wav"), baseline="nope", max_seconds=60))
    assert next(refused) == (gr.skip(), "Not decoded: Baseline checkpoint must be one of: baseline, ttt, wide_vocab; "
                                         "got 'nope'.")  # fmt: skip
    with pytest.raises(gr.Error, match="must be one of"):
        next(refused)
