"""Mends of a hostile review of the app: a TTT checkpoint as baseline, results.json files with numbers no float
holds or too many of them, a mini-batch larger than the attention window without persistence, Compare's Stop and
progress inside a setting, Hub references the allow-list refuses, the queue Compare shares, folders of one session
or of several, and run names that Plotly would render as markup. Each test fails without its mend."""

import html
import json
import logging
import re
import types
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import soundfile as sf
from conftest import SR, raw_values, speechlike

from moshi_ttt.app import handlers, outputs, reopen
from moshi_ttt.app.compare import Setting, compare_settings, settings_grid
from moshi_ttt.app.compare_view import compare_figure
from moshi_ttt.app.engine import compare_file, live_options
from moshi_ttt.app.inputs import HubReference, InputError
from moshi_ttt.app.layout import build_demo
from moshi_ttt.app.resources import RunFolders
from moshi_ttt.app.update_size import check_update_size

CONTEXT = 16  # the tiny models' attention window (tests/tiny_models.py); their TTT checkpoint's mini-batch is 4


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """6 s of speech-like sound: 75 tokens, several steps of 16 tokens per setting (room for a Stop inside one)."""
    path = tmp_path_factory.mktemp("mends") / "six.wav"
    sf.write(path, speechlike(6.0, 3), SR)
    return path


def _request(session: str = "mends"):
    return types.SimpleNamespace(session_hash=session)


# 1. A TTT checkpoint as baseline runs with its own settings; the chosen ones are the TTT run's.


def test_a_ttt_baseline_runs_with_its_own_settings_and_says_so(cache, clip):
    def baseline(b, persistent):
        *_, last = compare_file(cache, str(clip), "ttt", "baseline", live_options("chunked", b, persistent), 60)
        return last.document

    documents = [baseline(2, True), baseline(8, False), baseline(None, None)]
    losses = [d["runs"]["baseline"]["loss_per_token"] for d in documents]
    assert losses[0] == losses[1] == losses[2]  # b=2 and b=8 would differ (see the TTT run below)
    note = "The baseline 'ttt' has TTT layers of its own: it ran with its checkpoint's mini_batch_size 4 and"
    assert documents[0]["config"]["notes"]["baseline"][0].startswith(note)
    assert documents[1]["config"]["reset_every_by_run"] == {"baseline": None}  # its own persistence: on
    *_, ttt = compare_file(cache, str(clip), "baseline", "ttt", live_options("chunked", 8, True), 60)
    *_, other = compare_file(cache, str(clip), "baseline", "ttt", live_options("chunked", 2, True), 60)
    assert ttt.document["runs"]["ttt"]["loss_per_token"] != other.document["runs"]["ttt"]["loss_per_token"]


def test_compare_with_a_ttt_baseline_scores_every_setting_and_names_its_settings(cache, clip):
    more = handlers.compare_specs(handlers.run_specs(cache.names(), [str(clip.parent)], []), cache.names())
    compare = handlers.compare_handler(cache, more, RunFolders(clip.parent / "compare-ttt-baseline"))
    values = raw_values(more, audio=str(clip), baseline="ttt", compare_checkpoints=["ttt"], compare_sizes=["2", "8"],
                        compare_persistence=["on"], max_seconds=60)  # fmt: skip
    status = list(compare(_request(), *values))[-1][0]
    assert status.startswith("Done: 2 of 2 settings") and "ran with its checkpoint's mini_batch_size 4" in status


def test_an_error_shown_as_a_sentence_keeps_its_traceback_in_the_log(cache, clip, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ValueError("an internal fault")
        yield  # a generator, as compare_file is

    monkeypatch.setattr(handlers, "compare_file", broken)
    specs = handlers.run_specs(cache.names(), [str(clip.parent)], [])
    run = handlers.run_handler(cache, specs, RunFolders(clip.parent / "runs-fault"))
    with caplog.at_level(logging.WARNING, logger="moshi_ttt.app"), pytest.raises(gr.Error, match="internal fault"):
        list(run(None, *raw_values(specs, audio=str(clip), mini_batch_size=4, max_seconds=60)))
    [record] = [r for r in caplog.records if r.name == "moshi_ttt.app"]
    assert record.levelno == logging.ERROR and record.exc_info and "an internal fault" in record.getMessage()


# 2 and 5. results.json: numbers no float holds, and more values than the app opens at once.


def _results(tmp_path, text: str) -> Path:
    path = tmp_path / "results.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("loss", "mean", "message"),
    [
        ("1" + "0" * 400, "1.0", "a whole number of 401 digits"),
        ("9" * 5000, "1.0", "a whole number of 5000 digits"),  # past Python's 4,300-digit int limit
        ("1.0", "1" + "0" * 400, "a whole number of 401 digits"),
        ("1e400", "1.0", "loss_per_token holds a number too large to be finite"),
        ("-1e400", "1.0", "loss_per_token holds a number too large to be finite"),
        ("1.0", "1e400", "mean_loss holds a number too large to be finite"),
    ],
    ids=["int-400", "int-5000", "mean-int-400", "inf", "minus-inf", "mean-inf"],
)
def test_numbers_no_float_holds_are_one_sentence(tmp_path, loss, mean, message):
    text = f'{{"version": 2, "runs": {{"a": {{"loss_per_token": [{loss}, 1.0], "mean_loss": {mean}}}}}}}'
    with pytest.raises(InputError, match=message):
        reopen.read_results(_results(tmp_path, text))


def test_more_values_than_the_budget_are_refused_before_parsing(tmp_path, monkeypatch):
    def text(tokens):
        return json.dumps({"version": 2, "runs": {"a": {"loss_per_token": [1.0] * tokens}}})

    monkeypatch.setattr(reopen, "MAX_VALUES", 1000)
    assert len(reopen.read_results(_results(tmp_path, text(1000)))["runs"]["a"]["loss_per_token"]) == 1000
    monkeypatch.setattr(reopen, "json", None)  # refused before any parsing
    with pytest.raises(InputError, match="more than 1,000 values"):
        reopen.read_results(_results(tmp_path, text(1001)))


def test_a_60_minute_file_of_four_runs_opens(tmp_path):
    """45,000 tokens (60 min at 12.5 Hz), 4 runs with their 8 codebooks and drift: 1.7 million values."""
    tokens, updates = 45_000, 45_000 // 16
    row = "[" + ",".join(["1.25"] * tokens) + "]"
    drift = json.dumps({"0": {"W1": [0.1] * updates, "W2": [0.1] * updates, "t": list(range(16, tokens + 1, 16))}})
    run = f'{{"loss_per_token": {row}, "loss_per_codebook": [{",".join([row] * 8)}], "drift": {drift}}}'
    names = ("baseline", "ttt", "ttt b=4", "ttt b=64")
    text = '{"version": 2, "runs": {' + ",".join(f'"{n}": {run}' for n in names) + "}}"
    assert 1_600_000 < text.count(",") < reopen.MAX_VALUES
    document = reopen.read_results(_results(tmp_path, text))
    assert list(document["runs"]) == list(names) and document["runs"]["ttt"]["tokens"] == tokens


def test_a_file_without_mean_losses_shows_no_nan(tmp_path):
    runs = {"baseline": {"loss_per_token": [1.0] * 40, "context_tokens": 16},
            "ttt": {"loss_per_token": [0.9] * 40, "context_tokens": 16}}  # fmt: skip
    shown = outputs.reopened(reopen.validate_document({"version": 1, "runs": runs}), "r.json")
    assert "nan" not in shown.headline and "no mean_loss" in shown.headline
    for run, mean in (("baseline", 1.0), ("ttt", 0.9)):
        runs[run]["mean_loss"] = mean
    shown = outputs.reopened(reopen.validate_document({"version": 1, "runs": runs}), "r.json")
    assert "nan" not in shown.headline and "10.00% lower" in shown.headline


# 3. A mini-batch larger than the attention window, with persistence off, never updates: refused.


def test_an_update_larger_than_the_window_without_persistence_is_refused(cache, clip):
    model = cache.get("ttt").model
    assert check_update_size({"ttt": model}, CONTEXT, False) == CONTEXT  # one update per window: allowed
    assert check_update_size({"ttt": model}, 2 * CONTEXT, True) == 2 * CONTEXT  # persistent: allowed
    sentence = "TTT mini_batch_size 32 is more than the attention context of checkpoint 'ttt' (16 tokens)"
    with pytest.raises(InputError, match=re.escape(sentence)):
        check_update_size({"ttt": model}, 2 * CONTEXT, False)
    specs = handlers.run_specs(cache.names(), [str(clip.parent)], [])
    run = handlers.run_handler(cache, specs, RunFolders(clip.parent / "runs-window"))
    values = raw_values(specs, audio=str(clip), mini_batch_size=32, persistent_states=False, max_seconds=60)
    with pytest.raises(gr.Error, match="choose at most 16 or turn persistent_states on"):
        list(run(None, *values))
    more = handlers.compare_specs(specs, cache.names())
    compare = handlers.compare_handler(cache, more, RunFolders(clip.parent / "compare-window"))
    values = raw_values(more, audio=str(clip), compare_checkpoints=["ttt"], compare_sizes=["4", "32"],
                        compare_persistence=["on", "off"], max_seconds=60)  # fmt: skip
    assert next(compare(None, *values))[0].startswith(f"Not compared: {sentence}")


# 4. Compare's Stop acts inside a setting, which shows its progress.


def _compare_until(cache, clip, stop_when):
    """compare_settings over 3 settings, its Stop pressed once `stop_when(update)` holds for an update."""
    pressed = []
    updates = []
    for update in compare_settings(cache, str(clip), "baseline", settings_grid(("ttt",), (2, 4, 8), (True,)), 60,
                                   stop_requested=lambda: bool(pressed), min_interval_s=0.0):  # fmt: skip
        updates.append(update)
        if not pressed and stop_when(update):
            pressed.append(True)
    return updates


def test_a_stop_inside_the_first_setting_keeps_its_scored_tokens(cache, clip):
    updates = _compare_until(cache, clip, lambda u: u.progress is not None)
    last = updates[-1]
    assert last.stopped and last.partial and last.done == 1
    tokens = len(last.document["runs"]["baseline"]["loss_per_token"])
    assert 0 < tokens < 75 == last.document["audio"]["partial"]["total_tokens"]
    assert len(last.document["runs"]["ttt · b=2 · persistent"]["loss_per_token"]) == tokens


def test_a_stop_inside_a_later_setting_leaves_it_out(cache, clip):
    second = "ttt · b=4 · persistent"
    updates = _compare_until(cache, clip, lambda u: u.progress is not None and u.current == second)
    progress = [u.progress for u in updates if u.progress is not None]
    assert progress and all(0 < done < total == 75 for done, total in progress)
    last = updates[-1]
    assert last.stopped and not last.partial and last.done == 1
    assert set(last.document["runs"]) == {"baseline", "ttt · b=2 · persistent"}
    assert len(last.document["runs"]["baseline"]["loss_per_token"]) == 75


def test_compare_has_a_stop_of_its_own_and_shows_tokens_inside_a_setting(cache, clip, monkeypatch):
    monkeypatch.setattr(handlers, "FIGURE_INTERVAL_S", 0.0)
    demo = build_demo(cache, [str(clip)])
    events = {fn.api_name: fn.fn for fn in demo.fns.values()}
    more = handlers.compare_specs(handlers.run_specs(cache.names(), [], [str(clip)]), cache.names())
    values = raw_values(more, audio=str(clip), compare_checkpoints=["ttt"], compare_sizes=["2", "4"],
                        compare_persistence=["on"], max_seconds=60)  # fmt: skip
    request = _request("mends-stops")
    updates = events["compare"](request, *values)
    statuses = [next(updates)[0]]
    events["stop"](request)  # Run's Stop: not the comparison's
    statuses += [update[0] for update in updates]
    assert statuses[-1].startswith("Done: 2 of 2 settings")
    assert any("now ttt · b=2 · persistent (" in s and " of 75 tokens)…" in s for s in statuses), statuses
    updates = events["compare"](request, *values)
    next(updates)
    events["stop_comparing"](request)
    assert [update[0] for update in updates][-1].startswith("Stopped inside the first setting")


# 6. Hub references that look right but that the allow-list's HubRef.parse refuses.


@pytest.mark.parametrize("ref", ["hf://a/b@/", "hf://a/b@.", "hf://a./b", "hf://a/b.git", "hf://a-/b"])
def test_hub_references_the_allow_list_refuses_are_one_sentence(cache, ref):
    with pytest.raises(InputError, match=r"^Hub checkpoint: '"):
        HubReference("Hub checkpoint").check(ref)
    with pytest.raises(gr.Error):
        handlers.add_hub_checkpoint(cache)(ref)
    assert HubReference("Hub checkpoint").check(" hf://kyutai/moshiko-pytorch-bf16@main ") == (
        "hf://kyutai/moshiko-pytorch-bf16@main"
    )


# 7. Compare queues with Run and Hear.


def test_compare_shares_the_scoring_queue(cache):
    demo = build_demo(cache)
    ids = {fn.api_name: fn.concurrency_id for fn in demo.fns.values() if fn.api_name in ("run", "hear", "compare")}
    assert ids == {"run": "score", "hear": "score", "compare": "score"}


# 8 and 9. Run folders: one session's runs never delete another's; a folder in use outlives its replacement.


def test_sessions_keep_their_latest_folders_whatever_others_do(tmp_path):
    folders = RunFolders(tmp_path, keep=3, max_sessions=8)
    alice = folders.new("alice")
    others = [folders.new(f"user{i}") for i in range(6)] + [folders.new(None) for _ in range(5)]
    assert alice.is_dir() and all(f.is_dir() for f in others[:6])
    assert [f.is_dir() for f in others[6:]] == [False, False, True, True, True]  # session-less: the 3 newest
    more = [folders.new(f"late{i}") for i in range(2)]  # 9 sessions: the one with the oldest folder loses it
    assert not alice.is_dir() and all(f.is_dir() for f in others[:6] + more)


def test_a_folder_in_use_outlives_the_sessions_next_one(tmp_path):
    folders = RunFolders(tmp_path)
    with folders.writing("s") as first:
        second = folders.new("s")
        folders.end_session("s")
        assert first.is_dir() and not second.is_dir()
    assert not first.is_dir()
    with folders.writing("s") as third:
        pass
    assert third.is_dir()  # the session's latest, until it ends or is replaced


def test_a_second_hear_of_a_session_does_not_break_the_first(cache, clip, monkeypatch, caplog):
    specs = handlers.hear_specs(handlers.run_specs(cache.names(), [str(clip.parent)], []))
    hear = handlers.hear_handler(cache, specs, RunFolders(clip.parent / "heard"))
    values = raw_values(specs, audio=str(clip), max_seconds=60)
    decode = handlers.reconstruct_clip
    second = []

    def meanwhile(*args, **kwargs):  # the session's second call runs while the first decodes
        if not second:
            second.append(None)
            second[0] = list(hear(_request(), *values))
        return decode(*args, **kwargs)

    monkeypatch.setattr(handlers, "reconstruct_clip", meanwhile)
    first = hear(_request(), *values)
    next(first)
    path, note = next(first)
    assert Path(path).is_file() and note.startswith("Decoded")
    assert Path(second[0][-1][0]).is_file()
    first.close()
    assert not Path(path).exists() and Path(second[0][-1][0]).is_file()
    with caplog.at_level(logging.ERROR, logger="moshi_ttt.app"):
        message = handlers.failure_message(FileNotFoundError("/srv/x/run-1/a.wav"), str(clip))
    assert message == "A file of this run went missing on the server; please try again." and caplog.records
    assert handlers.failure_message(FileNotFoundError("x"), str(clip) + ".gone").startswith("The audio file is no")


# 10. Run names from a user's file are text in the figures, never markup.


def test_run_names_are_text_in_the_legend(tmp_path):
    name = '<a href="https://evil.example">ttt</a> & <b>b</b>'
    document = reopen.validate_document({"version": 2, "runs": {"baseline": {"loss_per_token": [1.0] * 40},
                                                          name: {"loss_per_token": [1.1] * 40}}})  # fmt: skip
    traces = json.loads(outputs.reopened(document, "r.json").figure)["data"]
    shown = [t["name"] for t in traces if "evil" in t.get("name", "")]
    assert shown and not any("<" in s for s in shown)
    assert html.unescape(shown[0]).startswith(name)  # Plotly shows the entities as the characters
    setting = Setting("<b>x</b>", 4, True)
    figure = compare_figure({"runs": {setting.name: {"loss_per_token": [1.0] * 40}}}, [setting])
    assert [t["name"] for t in figure["data"]] == ["&lt;b&gt;x&lt;/b&gt; · b=4 · persistent"]
    assert np.isfinite(figure["data"][0]["y"][-1])
