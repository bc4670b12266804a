"""Several settings on one clip (moshi_ttt.app.compare): each setting's numbers are exactly those it gets alone,
whatever was scored before it; the figure overlays them, the table lists them, the Compare handler refuses what it
cannot do in one sentence."""

import json
import types
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from conftest import raw_values

from moshi_ttt.app import handlers
from moshi_ttt.app.compare import MAX_SETTINGS, Setting, compare_settings, settings_grid
from moshi_ttt.app.compare_view import COLUMNS, compare_figure, compare_rows
from moshi_ttt.app.engine import compare_file, live_options
from moshi_ttt.app.resources import RunFolders, StopRequests


def test_the_grid_is_every_combination_in_order_and_bounded():
    grid = settings_grid(("ttt", "other"), (4, 16), (False, True))
    assert [s.name for s in grid[:3]] == ["ttt · b=4 · persistent", "ttt · b=4 · reset every window",
                                         "ttt · b=16 · persistent"]  # fmt: skip
    assert len(grid) == 8 and grid[-1] == Setting("other", 16, False)
    with pytest.raises(ValueError, match="more than 12 at once"):
        settings_grid(("a", "b"), (1, 2, 4, 8, 16, 32, 64), (True,))
    with pytest.raises(ValueError, match="at least one"):
        settings_grid(("a",), (), (True,))
    assert MAX_SETTINGS == 12


def _solo(cache, clip, setting):
    options = live_options("chunked", setting.mini_batch_size, setting.persistent_states)
    *_, last = compare_file(cache, str(clip), "baseline", setting.checkpoint, options, 60)
    return last.document["runs"]


def test_each_setting_gets_exactly_the_numbers_it_gets_alone(assets, cache):
    """Scored together (in one order) and alone (in the reverse order, each in its own call): bit for bit the same
    losses, per codebook, and drift; and the settings do differ from each other, so the check can fail."""
    settings = settings_grid(("ttt",), (2, 4), (True, False))
    *_, together = compare_settings(cache, str(assets / "a.wav"), "baseline", settings, 60)
    assert together.complete and together.done == 4 and set(together.document["runs"]) == {
        "baseline", *(s.name for s in settings)}  # fmt: skip
    for setting in reversed(settings):
        alone = _solo(cache, assets / "a.wav", setting)
        run = together.document["runs"][setting.name]
        for key in ("loss_per_token", "loss_per_codebook", "mean_loss", "drift"):
            got, want = json.dumps(run[key]), json.dumps(alone["ttt"][key])
            assert got == want, (setting.name, key)
        assert together.document["runs"]["baseline"]["loss_per_token"] == alone["baseline"]["loss_per_token"]
    means = {together.document["runs"][s.name]["mean_loss"] for s in settings}
    assert len(means) == 4  # four settings, four different results


def test_a_stop_ends_the_comparison_with_the_settings_already_scored(assets, cache):
    """Stop pressed between the second and the third setting (the poll is also read inside each setting now, so it
    follows the updates rather than counting polls; Stops inside a setting: tests/test_app_hostile_mends.py)."""
    settings = settings_grid(("ttt",), (2, 4, 8), (True,))
    updates = []
    for update in compare_settings(cache, str(assets / "a.wav"), "baseline", settings, 60,
                                   stop_requested=lambda: updates[-1].done == 2):  # fmt: skip
        updates.append(update)
    last = updates[-1]
    assert last.stopped and last.complete and last.done == 2 and len(last.document["runs"]) == 3
    assert [u.done for u in updates] == [0, 1, 2, 2] and updates[1].current == settings[1].name


def test_the_figure_overlays_every_setting_and_the_table_lists_them(assets, cache):
    settings = settings_grid(("ttt",), (2, 4), (True,))
    *_, last = compare_settings(cache, str(assets / "a.wav"), "baseline", settings, 60)
    figure = compare_figure(last.document, last.settings)
    loss = [t["name"] for t in figure["data"] if t["yaxis"] == "y"]
    assert loss == [s.name for s in settings] + ["baseline"]
    assert len([t for t in figure["data"] if t["yaxis"] == "y2"]) == 2 + 1  # one Δ per setting and the zero line
    assert len([t for t in figure["data"] if t["yaxis"] == "y3"]) == 2  # W1 drift of each setting
    assert figure["layout"]["hovermode"] == "x unified"
    rows = compare_rows(last.document, last.settings)
    assert len(rows) == 2 and len(rows[0]) == len(COLUMNS)
    assert rows[0][:4] == [settings[0].name, "ttt", "b=2", "on"]  # "chunk=2" for an In-Place model
    base = last.document["runs"]["baseline"]["mean_loss"]
    mine = last.document["runs"][settings[0].name]["mean_loss"]
    assert rows[0][4] == round(mine, 4) and rows[0][5].endswith(("lower", "higher (worse)", "no different"))
    assert (mine < base) == rows[0][5].endswith("lower")


def _compare(cache, assets, **given):
    specs = handlers.run_specs(cache.names(), [str(assets)], [])
    more = handlers.compare_specs(specs, cache.names())
    compare = handlers.compare_handler(cache, more, RunFolders(assets / "compare-runs"), [], StopRequests())
    values = raw_values(more, audio=str(assets / "a.wav"), max_seconds=60, **given)
    return compare(types.SimpleNamespace(session_hash="s"), *values)


def test_the_compare_handler_scores_the_grid_and_refuses_too_many_settings(assets, cache):
    outputs = list(_compare(cache, assets, compare_checkpoints=["ttt"], compare_sizes=["2", "4"],
                            compare_persistence=["on"]))  # fmt: skip
    status, figure, table, files = outputs[-1]
    assert status.startswith("Done: 2 of 2 settings") and figure.type == "plotly"
    assert table.count("\n| ttt · b=") == 2 and table.startswith("| setting | checkpoint |")
    assert sorted(Path(f).name for f in files) == ["a_compare_report.html", "a_compare_results.csv",
                                                   "a_compare_results.json"]  # fmt: skip
    assert outputs[0][0].startswith("Comparing: 0 of 2") and outputs[0][1] is None
    many = _compare(cache, assets, compare_checkpoints=["ttt", "baseline"], compare_sizes=list(handlers.COMPARE_SIZES),
                    compare_persistence=["on"])  # fmt: skip
    first = next(many)
    assert first[0] == "Not compared: 14 settings is more than 12 at once; choose fewer combinations."
    with pytest.raises(gr.Error, match="more than 12"):
        next(many)
    bad = _compare(cache, assets, compare_checkpoints=["ttt"], compare_sizes=["3"], compare_persistence=["on"])
    assert "is not one of" in next(bad)[0]
    assert np.isfinite(json.loads(Path(files[0]).read_text())["runs"]["baseline"]["mean_loss"])
