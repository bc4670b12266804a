"""The live figure's pure builder, without Gradio: four rows on one time axis, the difference row's known values,
both runs always visible, the inner-loop row with the fourth curve when the record has it."""

import json
import math

import numpy as np
import pytest

from moshi_ttt.app.figure import UIREVISION, figure_dict, figure_json, live_figure

LOSS = {"baseline": [2.0, 1.9, float("nan"), 1.7, 1.8, 1.6], "ttt": [2.0, 1.8, 1.6, 1.5, 1.9, 1.4]}
DRIFT = {"1": {"W1": [0.1, 0.2], "W2": [0.05, 0.1], "t": [2, 4]}, "2": {"W1": [0.3], "W2": [0.2], "t": [2]}}
INNER = {
    "1": {"base": [2.0, 2.1], "start": [1.5, 1.4], "after": [1.0, 0.9], "target_variance": [3.0, 3.2], "t": [2, 4]},
    "2": {"base": [2.0], "start": [1.5], "after": [1.0], "t": [2]},  # no target_variance: skipped, no error
}


def _row(fig: dict, axis: str) -> list[dict]:
    return [t for t in fig["data"] if t["xaxis"] == axis]


def test_four_rows_share_one_time_axis():
    fig = figure_dict(LOSS, DRIFT, smooth=2, total_tokens=10, inner_loss=INNER)
    layout = fig["layout"]
    tops = [layout[f"yaxis{s}"]["domain"][1] for s in ("", "2", "3", "4")]
    assert tops == sorted(tops, reverse=True) and tops[0] == 1.0  # rows top to bottom
    for s in ("2", "3", "4"):
        assert layout[f"xaxis{s}"]["matches"] == "x" and layout[f"xaxis{s}"]["range"] == [0, 10 / 12.5]
    assert layout["uirevision"] == UIREVISION
    assert "title" in layout["xaxis4"] and "title" not in layout["xaxis"]  # one time label, under the last row


def test_both_runs_are_drawn_raw_and_smoothed_with_the_baseline_on_top():
    fig = figure_dict(LOSS, DRIFT, smooth=2)
    loss = _row(fig, "x")
    assert [t["name"] for t in loss] == ["TTT (per token)", "TTT", "baseline (per token)", "baseline"]
    assert loss[3]["line"]["dash"] == "dash" and loss[1]["line"]["dash"] == "solid"
    assert loss[0]["opacity"] < 1 and loss[0]["line"]["width"] < loss[1]["line"]["width"]
    assert loss[2]["y"][2] is None and loss[3]["y"] == pytest.approx([2.0, 1.95, 1.9, 1.7, 1.75, 1.7])
    assert loss[0]["x0"] == 0.0 and loss[0]["dx"] == pytest.approx(0.08)


def test_difference_row_has_the_smoothed_difference_its_running_mean_and_a_zero_line():
    fig = figure_dict(LOSS, DRIFT, smooth=2)
    smoothed, cumulative, zero = _row(fig, "x2")
    diff = [0.0, -0.1, None, -0.2, 0.1, -0.2]  # TTT - baseline; step 2 invalid in the baseline
    assert smoothed["y"] == pytest.approx([0.0, -0.05, -0.1, -0.2, -0.05, -0.05])
    running = [0.0, -0.05, -0.05, -0.1, -0.05, -0.08]
    assert cumulative["y"] == pytest.approx(running)
    assert zero["y"] == [0.0, 0.0] and zero["x"] == [0.0, 6 / 12.5]
    assert sum(v for v in diff if v is not None) / 5 == pytest.approx(running[-1])
    assert _row(figure_dict({"ttt": LOSS["ttt"]}, {}), "x2") == []  # one run: nothing to compare


def test_drift_and_inner_loop_rows_per_layer_with_the_fourth_curve_when_present():
    fig = figure_dict(LOSS, DRIFT, inner_loss=INNER)
    assert {t["name"] for t in _row(fig, "x3")} == {"layer 1 W1", "layer 1 W2", "layer 2 W1", "layer 2 W2"}
    inner = {t["name"]: t for t in _row(fig, "x4")}
    assert set(inner) == {
        "layer 1 at W_base", "layer 1 at start", "layer 1 after update", "layer 1 target var",
        "layer 2 at W_base", "layer 2 at start", "layer 2 after update",
    }  # fmt: skip
    assert inner["layer 1 target var"]["y"] == [3.0, 3.2] and inner["layer 1 target var"]["x"] == [0.16, 0.32]
    empty = figure_dict(LOSS, {})
    assert any("no TTT layer" in a["text"] for a in empty["layout"]["annotations"])


def test_the_json_is_plotlys_own_and_has_no_nan():
    loss = {"baseline": list(np.linspace(3, 2, 400)), "ttt": [math.nan, *np.linspace(3, 1.5, 399)]}
    record = {"W1": list(np.linspace(0, 1, 25)), "W2": list(np.linspace(0, 2, 25)), "t": list(range(16, 401, 16))}
    inner = {"base": [1.0] * 25, "start": [0.9] * 25, "after": [0.8] * 25, "target_variance": [2.0] * 25}
    inner["t"] = record["t"]
    args = (loss, {"1": record}, 25, 500, {"1": inner})
    sent = figure_json(*args)
    assert "NaN" not in sent
    assert json.loads(sent) == json.loads(live_figure(*args).to_json())


def test_difference_row_range_is_not_flattened_by_the_first_tokens():
    base = [5.0] * 200
    ttt = [1.0] * 5 + [4.9] * 195  # a 4-nat difference on the first 5 tokens, then 0.1 nats
    lo, hi = figure_dict({"baseline": base, "ttt": ttt}, {}, smooth=25)["layout"]["yaxis2"]["range"]
    # the smoothed curve settles at -0.1 after 25 tokens; the running mean is -0.295 at token 100 (4 windows)
    assert -0.4 < lo < -0.295 and 0 <= hi < 0.06
