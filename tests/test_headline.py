"""Headline numbers on hand-made loss arrays with known answers: whole clip, past the context, bins, readings,
the short-clip caveat, and the transcript format that names the readings."""

import math

import numpy as np
import pytest

from moshi_ttt.reports import headline as hl
from moshi_ttt.reports.results import past_context_fields, position_bins

CONTEXT = 50  # tokens (4 s at 12.5 Hz), as the demo models


def _record(loss_per_codebook: np.ndarray, context: int | None, readings=None, bin_size: int = 250) -> dict:
    """A results.json run record with the fields the headline reads, from losses [K, T]."""
    per_token = np.nanmean(loss_per_codebook, axis=0)
    starts, means = position_bins(per_token, bin_size)
    finite = loss_per_codebook[np.isfinite(loss_per_codebook)]
    return {
        "checkpoint": "x",
        "tokens": loss_per_codebook.shape[1],
        "loss_per_token": per_token.tolist(),
        "loss_per_codebook": loss_per_codebook.tolist(),
        "mean_loss": float(finite.mean()),
        "loss_per_bin": {"bin_size": bin_size, "start": starts, "loss": means},
        **past_context_fields(loss_per_codebook, context, readings),
    }


def _document(base: np.ndarray, ttt: np.ndarray, context=CONTEXT, readings=None, bin_size=250) -> dict:
    runs = {"baseline": _record(base, context, readings, bin_size), "ttt": _record(ttt, context, readings, bin_size)}
    return {"version": 2, "runs": runs}


def test_improvement_whole_clip_and_past_the_context():
    """TTT equals the baseline inside the first window and is 10% better after it: the whole-clip number dilutes
    that (known fraction), the past-context number is exactly 10%."""
    T = 400
    base = np.full((8, T), 5.0)
    ttt = base.copy()
    ttt[:, CONTEXT:] = 4.5
    h = hl.headline(_document(base, ttt))
    assert h.baseline_loss == pytest.approx(5.0) and h.ttt_loss == pytest.approx((50 * 5.0 + 350 * 4.5) / 400)
    assert h.improvement_pct == pytest.approx(100 * (5.0 - (50 * 5.0 + 350 * 4.5) / 400) / 5.0)
    assert h.baseline_loss_past_context == pytest.approx(5.0) and h.ttt_loss_past_context == pytest.approx(4.5)
    assert h.improvement_past_context_pct == pytest.approx(10.0)
    assert h.caveat is None  # 400 tokens >= 3 windows of 50 and >= 10 s
    text = hl.headline_markdown(h)
    assert "TTT vs baseline, the whole clip: TTT's loss is **" in text
    assert "(4.0 s, where only TTT can still hold earlier audio): **10.00% lower**" in text


def test_a_worse_ttt_reads_worse_in_words():
    """The issue's "-9.58% lower loss": a TTT run 9.58% worse says "higher (worse)", never a negative "lower"."""
    base = np.full((8, 400), 5.0)
    h = hl.headline(_document(base, base * 1.0958))
    text = hl.headline_markdown(h)
    assert "**9.58% higher (worse)**" in text and "lower" not in text and "-9.58" not in text
    assert "9.58% higher (worse) over the whole clip" in hl.headline_text(h)
    assert hl.change_words(0.001) == "no different" and hl.change_words(float("nan")) == "n/a"


def test_invalid_entries_are_left_out_of_every_mean():
    loss = np.array([[1.0, 2.0, np.nan, 4.0], [3.0, np.nan, np.nan, 8.0]])  # [K=2, T=4]
    assert hl.mean_loss(loss) == pytest.approx(18 / 5)
    assert hl.mean_loss(loss, start=2) == pytest.approx(6.0)  # step 2 has no valid entry
    assert hl.mean_loss_past_context(loss, 3) == pytest.approx(6.0)
    assert math.isnan(hl.mean_loss_past_context(loss, 4))  # the clip never gets past its context
    assert math.isnan(hl.mean_loss_past_context(loss, None))
    assert math.isnan(hl.improvement_pct(None, 1.0)) and math.isnan(hl.improvement_pct(float("nan"), 1.0))
    assert hl.improvement_pct(4.0, 3.0) == pytest.approx(25.0) and hl.improvement_pct(4.0, 5.0) == pytest.approx(-25)


@pytest.mark.parametrize(
    ("tokens", "context", "caveat"),
    [(75, 50, True), (149, 50, True), (150, 50, False), (100, None, True), (125, None, False), (124, 10, True)],
    ids=["6s-recording", "just-under-3-windows", "3-windows", "no-context-short", "no-context-10s", "under-10s"],
)
def test_short_clip_caveat(tokens, context, caveat):
    text = hl.short_clip_caveat(tokens, context)
    assert (text is not None) == caveat
    if caveat:
        assert f"{tokens / 12.5:.1f} s long" in text


def test_a_short_clip_gets_the_caveat_instead_of_a_bold_percentage():
    """A 0.25 s clip where TTT looks 61% better (the issue's example): the number is shown plain, with the caveat."""
    base = np.full((8, 4), 5.0)
    ttt = np.full((8, 4), 5.0 * (1 - 0.6144))
    h = hl.headline(_document(base, ttt))
    assert h.improvement_pct == pytest.approx(61.44)
    text = hl.headline_markdown(h)
    assert "61.44% lower" in text and "**61.44% lower**" not in text and "0.3 s long" in text
    assert "never gets past the first attention window" in text
    assert "caveat" in hl.headline_text(h)


def test_bins_start_at_zero_and_compare_both_runs():
    T = 30
    base = np.tile(np.arange(T, dtype=float) % 10 + 1, (8, 1))  # bins of 10: mean 5.5 each
    ttt = base.copy()
    ttt[:, 10:20] -= 1.1  # the middle bin is 20% better
    rows = hl.bin_rows(_document(base, ttt, context=5, bin_size=10))
    assert [r["bin (s)"] for r in rows] == ["0.0-0.8", "0.8-1.6", "1.6-2.4"]
    assert [r["improvement %"] for r in rows] == [0.0, 20.0, 0.0]
    assert rows[1]["baseline loss"] == pytest.approx(5.5) and rows[1]["TTT loss"] == pytest.approx(4.4)


def test_readings_from_the_transcript_and_their_losses():
    text = (
        "[reading 1: 0.640-2.000 s] The happy captain.\n[filler] Then, Henry sold three cold flowers.\n"
        "[reading 2: 4.000-5.360 s] The happy captain.\n"
    )
    readings = hl.parse_readings(text)
    assert readings == [hl.Reading(1, 0.64, 2.0), hl.Reading(2, 4.0, 5.36)]
    assert hl.span_tokens(0.64, 2.0) == (8, 25) and hl.span_tokens(4.0, 5.36) == (50, 67)
    T = 80
    base = np.full((8, T), 4.0)
    ttt = base.copy()
    ttt[:, 50:67] = 3.0  # TTT remembers the second reading
    ttt[:, 8:25] = 4.4  # and is a little worse on the first
    doc = _document(base, ttt, readings=readings)
    assert doc["runs"]["ttt"]["readings"] == [
        {"start_s": 0.64, "end_s": 2.0, "mean_loss": pytest.approx(4.4)},
        {"start_s": 4.0, "end_s": 5.36, "mean_loss": pytest.approx(3.0)},
    ]
    rows = hl.reading_rows(doc)
    assert [r["improvement %"] for r in rows] == [-10.0, 25.0]
    text = hl.headline_markdown(hl.headline(doc))  # a 6.4 s clip: plain numbers, the readings all the same
    assert "Per reading of the repeated passage" in text
    assert "1st (0.6-2.0 s) 10.00% higher (worse); 2nd (4.0-5.4 s) 25.00% lower." in text
    assert rows[0]["span (s)"] == "0.6-2.0"
    assert hl.reading_rows({"runs": {"baseline": doc["runs"]["baseline"], "ttt": {}}}) == []
    assert "readings" not in _record(base, CONTEXT)  # absent when the clip names no readings


def test_the_demo_transcript_names_three_readings_of_equal_length():
    from pathlib import Path

    clip = Path(__file__).resolve().parent.parent / "demo_assets" / "demo_repeat.wav"
    readings = hl.readings_for(clip)
    assert [r.number for r in readings] == [1, 2, 3]
    assert len({round(r.end_s - r.start_s, 3) for r in readings}) == 1
    assert hl.readings_for(clip.with_name("demo_plain.wav")) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[reading 1] no span", "without its span"),
        ("[reading 1: 3-2 s] x", "empty or overlaps"),
        ("[reading 1: 0-2 s] a\n[reading 2: 1-3 s] b", "empty or overlaps"),
    ],  # fmt: skip
    ids=["no-span", "reversed", "overlapping"],
)
def test_bad_reading_lines_are_an_error(text, message):
    with pytest.raises(ValueError, match=message):
        hl.parse_readings(text)


def test_version_1_records_still_give_a_headline():
    """A version-1 document has no mean_loss_past_context: the headline recomputes it when it knows the context,
    and leaves it out otherwise."""
    base, ttt = np.full((8, 200), 2.0), np.full((8, 200), 1.0)
    doc = _document(base, ttt)
    for run in doc["runs"].values():
        del run["mean_loss_past_context"]
    assert hl.headline(doc).improvement_past_context_pct == pytest.approx(50.0)
    for run in doc["runs"].values():
        del run["context_tokens"]
    h = hl.headline(doc)
    assert math.isnan(h.improvement_past_context_pct) and h.improvement_pct == pytest.approx(50.0)
    assert hl.headline({"runs": {"ttt": doc["runs"]["ttt"]}}) is None


def test_the_headline_names_the_reading_gains_bold_on_a_long_clip():
    readings = [hl.Reading(1, 0.0, 10.0), hl.Reading(2, 12.0, 22.0), hl.Reading(3, 24.0, 34.0)]
    base = np.full((8, 450), 4.0)
    ttt = base.copy()
    ttt[:, 150:275] = 3.6  # 10% better on the 2nd reading
    ttt[:, 300:425] = 3.4  # 15% better on the 3rd
    text = hl.headline_markdown(hl.headline(_document(base, ttt, readings=readings)))
    assert "1st (0.0-10.0 s) no different; 2nd (12.0-22.0 s) **10.00% lower**; 3rd (24.0-34.0 s) **15.00% lower**." in (
        text
    )


def test_a_stop_inside_a_reading_keeps_its_scored_part_marked_partial():
    """Stopped after 2.4 s (30 tokens): reading 2 (1.6-3.2 s) is cut at 2.4 s, reading 3 never started; the headline
    says what it covers."""
    readings = [hl.Reading(1, 0.0, 1.2), hl.Reading(2, 1.6, 3.2), hl.Reading(3, 3.6, 4.8)]
    base, ttt = np.full((8, 30), 4.0), np.full((8, 30), 3.0)
    ttt[:, 20:] = 2.0
    doc = _document(base, ttt, readings=readings)
    doc["audio"] = {"partial": {"tokens_scored": 30, "total_tokens": 60}}
    run = doc["runs"]["ttt"]
    assert len(run["readings"]) == 2 and "partial" not in run["readings"][0]
    assert run["readings"][1] == {"start_s": 1.6, "end_s": 2.4, "span_end_s": 3.2, "partial": True,
                                  "mean_loss": pytest.approx(2.0)}  # fmt: skip
    rows = hl.reading_rows(doc)
    assert [r["span (s)"] for r in rows] == ["0.0-1.2", "1.6-2.4 (partial)"]
    h = hl.headline(doc)
    assert h.scope == "the first 2.4 s of 4.8 s (stopped)" and h.readings[1].partial
    text = hl.headline_markdown(h)
    assert "TTT vs baseline, the first 2.4 s of 4.8 s (stopped):" in text and "whole clip" not in text
    assert "2nd (1.6-2.4 s, partial)" in text


def test_a_silent_clip_gets_a_caveat_and_no_bold_number():
    base, ttt = np.full((8, 400), 4.0), np.full((8, 400), 3.0)
    doc = _document(base, ttt)
    doc["audio"] = {"silent": True}
    text = hl.headline_markdown(hl.headline(doc))
    assert "25.00% lower" in text and "**25.00% lower**" not in text and "is silent" in text


def test_a_short_tail_joins_the_bin_before_it():
    """755 tokens in bins of 250: the last 5 tokens (0.4 s) join the third bin, which ends with the clip."""
    starts, means = position_bins(np.arange(755.0), 250)
    assert starts == [0, 250, 500] and means[2] == pytest.approx(np.arange(500, 755).mean())
    assert position_bins(np.arange(880.0), 250)[0] == [0, 250, 500, 750]  # 130 tokens: a bin of its own
    assert position_bins(np.arange(100.0), 250)[0] == [0]
    base, ttt = np.full((8, 755), 4.0), np.full((8, 755), 3.0)
    rows = hl.bin_rows(_document(base, ttt))
    assert [r["bin (s)"] for r in rows] == ["0.0-20.0", "20.0-40.0", "40.0-60.4"]


def test_codebook_rows_split_semantic_from_acoustic():
    """TTT is 20% better on codebook 0 only, and only after the context: the semantic row says so, the acoustic one
    says no difference, the per-codebook rows follow."""
    from moshi_ttt.reports.codebooks import codebook_rows, group_losses

    base = np.full((8, 200), 5.0)
    ttt = base.copy()
    ttt[0, CONTEXT:] = 4.0
    ttt[3, 7] = np.nan  # an invalid entry is left out of its group's mean
    doc = _document(base, ttt)
    rows = {r["codebooks"]: r for r in codebook_rows(doc)}
    assert list(rows)[:2] == ["semantic (codebook 0)", "acoustic (codebooks 1-7)"] and len(rows) == 2 + 8
    semantic = rows["semantic (codebook 0)"]
    assert semantic["TTT loss"] == pytest.approx((50 * 5 + 150 * 4) / 200)
    assert semantic["improvement % past context"] == pytest.approx(20.0)
    assert rows["acoustic (codebooks 1-7)"]["improvement %"] == pytest.approx(0.0)
    assert rows["codebook 0"]["improvement %"] == semantic["improvement %"]
    groups = group_losses(doc["runs"]["ttt"]["loss_per_codebook"])
    assert groups["acoustic (codebooks 1-7)"][7] == pytest.approx(5.0) and groups["semantic (codebook 0)"][-1] == 4.0
    assert codebook_rows({"runs": {"ttt": doc["runs"]["ttt"]}}) == []
