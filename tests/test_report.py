"""Summary statistics on constructed inputs, results.json / CSV writers (NaN -> null) and the offline HTML page."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from tiny_models import random_audio_codes, tiny_lm

from moshi_ttt import ScoreResult, TTTConfig, apply_ttt, score
from moshi_ttt.options import RunOptions
from moshi_ttt.reports.figures import bins_figure, inner_loss_figure, moving_average
from moshi_ttt.reports.headline import Reading
from moshi_ttt.reports.results import (
    improvement_per_bin,
    least_squares_slope,
    position_bins,
    results_document,
    run_record,
    summarize,
    to_json_safe,
    write_json,
    write_report,
)
from moshi_ttt.reports.sweeps import sweep_context_length, sweep_mini_batch_size, sweep_persistent_states


def test_slope_of_a_line_with_gaps_is_exact():
    steps = np.arange(3000, dtype=np.float64)
    loss = 5.0 - 0.4 * steps / 1000  # -0.4 nats per 1k tokens
    loss[::7] = np.nan
    assert least_squares_slope(loss) == pytest.approx(-0.4, abs=1e-12)
    assert least_squares_slope(torch.tensor([1.0, math.nan, 3.0])) == pytest.approx(1000.0)  # steps 0 and 2
    assert math.isnan(least_squares_slope([math.nan, 2.0]))


def test_slope_of_noise_around_a_line_is_the_least_squares_fit():
    rng = np.random.default_rng(0)
    steps = np.arange(500)
    loss = 3.0 + 0.002 * steps + rng.normal(0, 0.1, steps.shape)
    expected = np.polyfit(steps, loss, 1)[0] * 1000
    assert least_squares_slope(loss) == pytest.approx(expected, rel=1e-9)


def test_position_bins_and_improvement():
    loss = [1.0, 3.0, math.nan, 5.0, 7.0, math.nan, math.nan]
    starts, means = position_bins(loss, bin_size=3)
    assert starts == [0, 3]  # the last step (under half a bin) joins the bin before it
    assert means == [2.0, 6.0]
    starts, means = position_bins(loss + [math.nan], bin_size=3)
    assert starts == [0, 3, 6] and math.isnan(means[2])
    base = [2.0, 2.0, 2.0, 2.0, math.nan]
    ttt = [1.5, 2.5, 1.0, math.nan, 1.0]
    starts, gain = improvement_per_bin(base, ttt, bin_size=2)
    assert starts == [0, 2, 4]
    assert gain[0] == pytest.approx(0.0) and gain[1] == pytest.approx(1.0) and math.isnan(gain[2])
    with pytest.raises(ValueError, match="same steps"):
        improvement_per_bin([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="bin_size"):
        position_bins(loss, 0)


def test_summarize_means_over_valid_entries():
    loss = np.array([[1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, math.nan]])  # [K=2, T=4]
    summary = summarize(loss, bin_size=2)
    assert summary.mean_loss == pytest.approx(22 / 7)
    assert summary.perplexity == pytest.approx(math.exp(22 / 7))
    assert summary.bin_loss == [2.5, 4.0]  # per-token means 2, 3, 4, 4
    assert summary.slope_per_1k_tokens == pytest.approx(700.0)


def test_moving_average_skips_invalid_steps():
    np.testing.assert_allclose(moving_average([1.0, None, 3.0, math.nan, 5.0], 2), [1.0, 1.0, 3.0, 3.0, 5.0])


def test_json_writer_turns_nan_into_null(tmp_path):
    doc = {"a": [1.0, math.nan, math.inf], "b": {"c": np.float32(math.nan), "d": torch.tensor([2.0, math.nan])}}
    assert to_json_safe(doc) == {"a": [1.0, None, None], "b": {"c": None, "d": [2.0, None]}}
    path = write_json(tmp_path / "r.json", doc)
    assert "NaN" not in path.read_text()
    assert json.loads(path.read_text())["a"] == [1.0, None, None]


def test_results_document_csv_and_html_from_real_runs(tmp_path):
    codes = random_audio_codes(1, 40, seed=0)
    baseline = tiny_lm(0)
    ttt = apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4))
    readings = [Reading(1, 0.0, 0.8), Reading(2, 2.0, 2.8)]
    runs = {
        "baseline": run_record(score(baseline, codes, "chunked"), checkpoint="base", bin_size=10, context_tokens=16),
        "ttt": run_record(score(ttt, codes, "chunked"), checkpoint="ttt", bin_size=10, peak_memory_mb=12.5,
                          context_tokens=16, readings=readings),
    }  # fmt: skip
    doc = results_document({"path": "x.wav", "duration_s": 3.2}, {"mode": "chunked"}, runs, bin_size=10)
    paths = write_report(tmp_path, doc)
    data = json.loads(paths["json"].read_text())
    assert data["version"] == 2 and set(data["runs"]) == {"baseline", "ttt"}
    run = data["runs"]["ttt"]
    for key in ("checkpoint", "tokens", "loss_per_token", "loss_per_codebook", "mean_loss", "perplexity",
                "slope_per_1k_tokens", "drift", "tokens_per_s", "peak_memory_mb",
                "mean_loss_past_context"):  # fmt: skip
        assert key in run
    loss = np.array(run["loss_per_codebook"], dtype=float)  # [K, T], None -> NaN
    assert run["mean_loss_past_context"] == pytest.approx(np.nanmean(loss[:, 16:]), rel=1e-6)
    assert [r["mean_loss"] for r in run["readings"]] == pytest.approx(
        [np.nanmean(loss[:, 0:10]), np.nanmean(loss[:, 25:35])], rel=1e-6
    )
    assert "readings" not in data["runs"]["baseline"] and set(data["versions"]) == {"moshi_ttt", "moshi", "torch"}
    assert run["tokens"] == 40 and len(run["loss_per_token"]) == 40
    assert len(run["loss_per_codebook"]) == 8 and run["loss_per_codebook"][1][-1] is None  # delayed: invalid -> null
    assert set(run["drift"]) == {"1", "2"} and run["drift"]["1"]["t"] == list(range(4, 41, 4))
    assert len(run["drift"]["1"]["W1"]) == 10 and data["runs"]["baseline"]["drift"] == {}
    assert len(data["improvement_over_baseline"]["ttt"]["improvement"]) == 4
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80 and rows[0]["run"] == "baseline" and rows[-1]["loss_cb1"] == ""
    assert float(rows[41]["loss"]) == pytest.approx(run["loss_per_token"][1], rel=1e-5)
    page = paths["html"].read_text()
    assert page.count("<script") >= 2 and "Improvement over the baseline" in page
    for text in ("x.wav", "setting: mode", "checkpoint: ttt", "version: torch", "Per position bin", "12.5"):
        assert text in page
    assert 'src="https://cdn.plot.ly/plotly-' in page and len(page) < 1_000_000  # plotly.js from its CDN
    assert "cdn.plot.ly" in page and "the tables still hold every number" in page


def test_sweeps_return_one_row_per_setting():
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4))
    codes = random_audio_codes(1, 40, seed=1)
    rows = sweep_mini_batch_size(model, codes, sizes=(1, 4, 8))
    assert [r["mini_batch_size"] for r in rows] == [1, 4, 8]
    assert rows[1]["mean_loss"] == pytest.approx(summarize(score(model, codes).loss[0]).mean_loss, rel=1e-6)
    assert len({round(r["mean_loss"], 6) for r in rows}) == 3
    rows = sweep_persistent_states(model, codes, RunOptions(chunk_size=8, reset_every=8))
    assert [r["persistent_states"] for r in rows] == [True, False] and rows[0]["mean_loss"] != rows[1]["mean_loss"]
    assert [r["reset_every"] for r in rows] == [None, 8]
    rows = sweep_persistent_states(model, codes)  # off: every attention context (16 tokens in the tiny models)
    assert [r["reset_every"] for r in rows] == [None, 16]


def test_context_length_sweep_on_constructed_losses():
    T = 600
    loss = torch.full((1, 8, T), 2.0)
    loss[..., 500:] = 1.0  # later tokens are easier
    loss[:, 1:, -1] = math.nan
    result = ScoreResult(loss, ~loss.isnan(), None, T, T, 1.0)
    rows = sweep_context_length(result, window=100)
    assert [r["context_tokens"] for r in rows] == [250, 500, 600]
    assert rows[1]["mean_loss"] == pytest.approx(2.0) and rows[2]["mean_loss_last_window"] == pytest.approx(1.0)
    assert rows[2]["mean_loss"] == pytest.approx((500 * 2 * 8 + 100 * 8 - 7) / (600 * 8 - 7))
    with pytest.raises(ValueError, match="context lengths"):
        sweep_context_length(result, lengths=(0,))


def test_bins_figure_spans_each_bin_from_zero():
    fig = bins_figure({"ttt": ([0, 250, 500], [0.1, 0.2, None])}, "t", "y", bin_size=250)
    assert list(fig.data[0].x) == [0.0, 20.0, 40.0] and list(fig.layout.xaxis.range) == [0, 60.0]
    assert list(fig.data[0].width) == pytest.approx([18.0] * 3)  # 90% of each bin
    # The 60.3 s clip: the last bin ends with the clip, not 20 s after its start.
    fig = bins_figure({"a": ([0, 250, 500], [1, 2, 3]), "b": ([0, 250, 500], [1, 2, 3])}, "t", "y", 250, tokens=754)
    assert list(fig.layout.xaxis.range) == [0, 60.32] and fig.data[0].width[2] == pytest.approx(0.45 * 254 / 12.5)
    assert fig.data[1].offset[0] == pytest.approx(1.0 + 9.0)  # side by side inside the bin


def test_write_html_inlines_plotly_only_when_asked(tmp_path):
    from moshi_ttt.reports.results import write_html

    fig = bins_figure({"a": ([0], [1.0])}, "t", "y", 250, tokens=100)
    small = write_html(tmp_path / "cdn.html", "t", [fig]).stat().st_size
    big = write_html(tmp_path / "inline.html", "t", [fig], plotly_js="inline").stat().st_size
    assert small < 100_000 < 3_000_000 < big
    with pytest.raises(ValueError, match="plotly_js"):
        write_html(tmp_path / "x.html", "t", [fig], plotly_js="none")


def test_inner_loss_figure_draws_the_target_variance_when_the_record_has_it():
    record = {"base": [2.0, 2.0], "start": [1.5, 1.2], "after": [1.0, 0.9], "t": [16, 32]}
    names = {t.name for t in inner_loss_figure({"1": record}).data}
    assert len(names) == 3 and not any("variance" in n for n in names)
    names = {t.name for t in inner_loss_figure({"1": {**record, "target_variance": [3.0, 3.1]}}).data}
    assert len(names) == 4 and "layer 1 target variance ||E[Y] - Y||^2" in names


def test_report_file_names_carry_the_clip_stem(tmp_path):
    from moshi_ttt.reports.results import file_stem

    assert file_stem({"audio": {"name": "my clip (1).wav"}}) == "my_clip_1_"
    assert file_stem({"audio": {}}) == "audio"
