"""The live figure's pure builder, without Gradio: four rows on one shared time axis with a legend each and one hover
readout, the difference row's known values and steady range, distinct colours per curve, the inner loop in units of
the target variance, the readings and the attention window marked, a reason in each empty row."""

import json
import math

import numpy as np
import pytest

from moshi_ttt.app.figure import (
    UIREVISION,
    FigureInfo,
    Span,
    figure_dict,
    figure_json,
    grown_range,
    live_figure,
)

LOSS = {"baseline": [2.0, 1.9, float("nan"), 1.7, 1.8, 1.6], "ttt": [2.0, 1.8, 1.6, 1.5, 1.9, 1.4]}
DRIFT = {"1": {"W1": [0.1, 0.2], "W2": [0.05, 0.1], "t": [2, 4]}, "2": {"W1": [0.3], "W2": [0.2], "t": [2]}}
INNER = {
    "1": {"base": [2.0, 2.1], "start": [1.5, 1.4], "after": [1.0, 0.9], "target_variance": [4.0, 3.0], "t": [2, 4]},
    "2": {"base": [2.0], "start": [1.5], "after": [1.0], "target_variance": [2.0], "t": [2]},
}


def _row(fig: dict, row: int) -> list[dict]:
    axis = "y" if row == 1 else f"y{row}"
    return [t for t in fig["data"] if t["yaxis"] == axis]


def test_four_rows_share_one_time_axis_one_hover_and_a_legend_each():
    fig = figure_dict(LOSS, DRIFT, smooth=2, total_tokens=10, inner_loss=INNER)
    layout = fig["layout"]
    tops = [layout[f"yaxis{s}"]["domain"][1] for s in ("", "2", "3", "4")]
    assert tops == sorted(tops, reverse=True) and tops[0] == 1.0  # rows top to bottom
    assert {t["xaxis"] for t in fig["data"]} == {"x"} and "xaxis2" not in layout  # one x axis for all rows
    assert layout["hovermode"] == "x unified" and layout["hoversubplots"] == "axis"  # one readout across the rows
    assert layout["xaxis"]["range"] == [0, 10 / 12.5] and "time (s)" in layout["xaxis"]["title"]["text"]
    for row, suffix in enumerate(("", "2", "3", "4"), start=1):
        assert {t["legend"] for t in _row(fig, row)} == {f"legend{suffix}"}  # each row's curves in its own legend
        assert layout[f"legend{suffix}"]["y"] == layout[f"yaxis{suffix}"]["domain"][1]  # beside its row
    assert layout["uirevision"] == UIREVISION


def test_both_runs_are_drawn_raw_and_smoothed_with_the_baseline_on_top():
    fig = figure_dict(LOSS, DRIFT, smooth=2)
    loss = _row(fig, 1)
    assert [t["name"] for t in loss] == ["TTT per token", "TTT", "baseline per token", "baseline"]
    assert loss[3]["line"]["dash"] == "dash" and loss[1]["line"]["dash"] == "solid"
    assert loss[0]["opacity"] < 1 and loss[0]["line"]["width"] < loss[1]["line"]["width"]
    assert loss[2]["y"][2] is None and loss[3]["y"] == pytest.approx([2.0, 1.95, 1.9, 1.7, 1.75, 1.7])
    assert loss[0]["x0"] == 0.0 and loss[0]["dx"] == pytest.approx(0.08)


def test_difference_row_has_the_smoothed_difference_its_running_mean_and_a_zero_line():
    fig = figure_dict(LOSS, DRIFT, smooth=2)
    smoothed, cumulative, zero = _row(fig, 2)
    diff = [0.0, -0.1, None, -0.2, 0.1, -0.2]  # TTT - baseline; step 2 invalid in the baseline
    assert smoothed["y"] == pytest.approx([0.0, -0.05, -0.1, -0.2, -0.05, -0.05])
    running = [0.0, -0.05, -0.05, -0.1, -0.05, -0.08]
    assert cumulative["y"] == pytest.approx(running)
    assert zero["y"] == [0.0, 0.0] and zero["x"] == [0.0, 6 / 12.5]
    assert sum(v for v in diff if v is not None) / 5 == pytest.approx(running[-1])
    assert [t["y"] for t in _row(figure_dict({"ttt": LOSS["ttt"]}, {}), 2)] == [[]]  # one run: nothing to compare


def test_drift_and_inner_loop_curves_have_a_colour_each_and_a_dash_per_layer():
    """The issue's "layer 0 W2" and "layer 0 at W_base" were both dotted teal: each curve now has its own colour."""
    fig = figure_dict(LOSS, DRIFT, inner_loss=INNER)
    drift, inner = _row(fig, 3), _row(fig, 4)
    assert [t["name"] for t in drift] == ["layer 1 W1", "layer 1 W2", "layer 2 W1", "layer 2 W2"]
    assert [t["name"] for t in inner[:3]] == ["layer 1 at W_base", "layer 1 at the mini-batch start",
                                              "layer 1 after the update"]  # fmt: skip
    style = {t["name"]: (t["line"]["color"], t["line"]["dash"]) for t in drift + inner}
    assert len(set(style.values())) == len(style)  # no two curves look alike
    layer_1 = {c for name, (c, _) in style.items() if name.startswith("layer 1")}
    assert len(layer_1) == 5  # W1, W2 and the three inner curves
    assert {d for name, (_, d) in style.items() if name.startswith("layer 2")} == {"dash"}


def test_the_inner_loop_is_drawn_in_units_of_the_target_variance():
    fig = figure_dict(LOSS, DRIFT, inner_loss=INNER)
    inner = {t["name"]: t for t in _row(fig, 4)}
    assert inner["layer 1 at W_base"]["y"] == pytest.approx([0.5, 0.7])  # 2.0 / 4.0, 2.1 / 3.0
    assert inner["layer 1 after the update"]["x"] == [0.16, 0.32]
    assert not any("variance" in name for name in inner)  # the variance is the unit, not a curve
    assert fig["layout"]["yaxis4"]["title"]["text"] == "× target var."
    raw = {"1": {k: v for k, v in INNER["1"].items() if k != "target_variance"}}
    fig = figure_dict(LOSS, DRIFT, inner_loss=raw)
    assert _row(fig, 4)[0]["y"] == [2.0, 2.1] and "½" in fig["layout"]["yaxis4"]["title"]["text"]


def test_readings_are_shaded_in_every_row_and_the_attention_window_is_marked():
    info = FigureInfo(clip="demo_repeat", spans=(Span(0.6, 15.3, "reading 1"), Span(21.3, 35.9, "reading 2")),
                      context_tokens=50)  # fmt: skip
    layout = figure_dict(LOSS, DRIFT, total_tokens=755, info=info)["layout"]
    rects = [s for s in layout["shapes"] if s["type"] == "rect"]
    assert len(rects) == 2 * 4 and {s["yref"] for s in rects} == {"y domain", "y2 domain", "y3 domain", "y4 domain"}
    assert {(s["x0"], s["x1"]) for s in rects} == {(0.6, 15.3), (21.3, 35.9)}
    labels = [a["text"] for a in layout["annotations"]]
    assert "reading 1" in labels and "reading 2" in labels and "attention window (4.0 s)" in labels
    line = next(s for s in layout["shapes"] if s["type"] == "line")
    assert line["x0"] == line["x1"] == 4.0
    short = figure_dict(LOSS, DRIFT, total_tokens=30, info=info)["layout"]  # the clip never passes the window
    assert not any(s["type"] == "line" for s in short["shapes"]) and "shapes" not in figure_dict(LOSS, DRIFT)["layout"]


@pytest.mark.parametrize(
    ("tokens", "mini_batch", "reason"),
    [(6, 16, "No fast-weight update: the clip has 6 tokens, fewer than one mini-batch of 16 tokens (1.28 s)."),
     (100, 16, "No update yet: the fast weights update after every mini-batch of 16 tokens (1.28 s)."),
     (100, None, "No TTT layer has reported an update")],
    ids=["clip-shorter-than-a-mini-batch", "not-yet", "no-ttt-layer"],
)  # fmt: skip
def test_empty_rows_say_why(tokens, mini_batch, reason):
    layout = figure_dict(LOSS, {}, total_tokens=tokens, info=FigureInfo(mini_batch_size=mini_batch))["layout"]
    notes = [a["text"] for a in layout["annotations"] if a["text"].startswith(reason)]
    assert len(notes) == 2  # rows 3 and 4
    empty = figure_dict({"baseline": [None] * 3, "ttt": [None] * 3}, {}, total_tokens=3)["layout"]
    assert any(a["text"].startswith("No valid token yet") for a in empty["annotations"])


def test_the_json_is_plotlys_own_and_names_the_download_after_the_clip():
    loss = {"baseline": list(np.linspace(3, 2, 400)), "ttt": [math.nan, *np.linspace(3, 1.5, 399)]}
    record = {"W1": list(np.linspace(0, 1, 25)), "W2": list(np.linspace(0, 2, 25)), "t": list(range(16, 401, 16))}
    inner = {"base": [1.0] * 25, "start": [0.9] * 25, "after": [0.8] * 25, "target_variance": [2.0] * 25}
    inner["t"] = record["t"]
    info = FigureInfo(clip="my_clip", spans=(Span(1.0, 9.0, "reading 1"),), context_tokens=50, mini_batch_size=16)
    args = (loss, {"1": record}, 25, 500, {"1": inner}, info)
    sent = json.loads(figure_json(*args))
    assert "NaN" not in figure_json(*args)
    assert sent.pop("config")["toImageButtonOptions"]["filename"] == "my_clip_moshi_ttt"
    assert sent == json.loads(live_figure(*args).to_json())  # plotly accepts every attribute


def test_difference_row_range_is_not_flattened_by_the_first_tokens():
    base = [5.0] * 200
    ttt = [1.0] * 5 + [4.9] * 195  # a 4-nat difference on the first 5 tokens, then 0.1 nats
    lo, hi = figure_dict({"baseline": base, "ttt": ttt}, {}, smooth=25)["layout"]["yaxis2"]["range"]
    # the smoothed curve settles at -0.1 after 25 tokens; the running mean is -0.295 at token 100 (4 windows)
    assert -0.4 < lo < -0.295 and 0 <= hi < 0.06


def test_the_difference_range_of_a_live_run_only_grows_in_coarse_steps():
    """The issue's jumping Δ row: the range never shrinks, grows a quarter beyond what is asked and in quarter steps
    of its order of magnitude, so most updates keep it."""
    rng = np.random.default_rng(0)
    shown, changes = None, 0
    for _ in range(30):
        lo, hi = -0.6 + 0.1 * rng.standard_normal(), 0.1 + 0.05 * rng.standard_normal()
        new = grown_range(shown, [lo, hi])
        changes += new != shown
        assert shown is None or (new[0] <= shown[0] and new[1] >= shown[1])
        shown = new
    assert changes <= 4 and abs(round(shown[0] / 0.025) * 0.025 - shown[0]) < 1e-9
    assert grown_range(None, [-0.012, 0.004]) == [-0.0125, 0.005]


def test_a_clip_shorter_than_a_window_keeps_all_four_rows_and_a_range_that_shows_its_difference():
    fig = figure_dict(
        {"baseline": [7.0] * 7, "ttt": [5.0] * 7}, {}, total_tokens=7, info=FigureInfo(mini_batch_size=16)
    )
    assert {t["yaxis"] for t in fig["data"]} == {"y", "y2", "y3", "y4"}  # empty rows keep an (empty) trace
    lo, hi = fig["layout"]["yaxis2"]["range"]
    assert lo < -2.0 < 0 <= hi  # the -2 nats difference is inside the row, not clipped at -0.1
