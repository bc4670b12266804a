"""The view across files: loss by position with 95% intervals over files of different lengths, and its files."""

import json
import math

import numpy as np
import pytest

from moshi_ttt.reports import aggregate
from moshi_ttt.reports.outdir import atomic_write_text, claim, fingerprint


def entry(baseline: list[float], ttt: list[float], tokens: int) -> dict:
    """A per-file entry as the CLI writes it (bins of 10 tokens)."""
    return {
        "tokens": tokens,
        "duration_s": tokens / 12.5,
        "mean_loss": {"baseline": float(np.mean(baseline)), "ttt": float(np.mean(ttt))},
        "bins": {
            "bin_size": 10,
            "start": [10 * i for i in range(len(baseline))],
            "loss": {"baseline": baseline, "ttt": ttt},
            "difference": {"ttt": [t - b for b, t in zip(baseline, ttt, strict=True)]},
        },
    }


def test_t_quantiles_match_the_tables():
    assert aggregate.t_quantile_975(1) == pytest.approx(12.7062)
    assert aggregate.t_quantile_975(30) == pytest.approx(2.0423)
    assert aggregate.t_quantile_975(60) == pytest.approx(2.0003, abs=1e-4)
    assert aggregate.t_quantile_975(10**6) == pytest.approx(1.95996, abs=1e-5)
    with pytest.raises(ValueError, match="degrees of freedom"):
        aggregate.t_quantile_975(0)


def test_files_of_different_lengths_give_bins_with_their_own_counts_and_intervals():
    entries = [
        entry([5.0, 4.0, 3.0], [5.0, 3.5, 2.0], 30),
        entry([6.0, 5.0], [5.5, 4.0], 20),
        entry([4.0], [4.5], 7),
    ]
    doc = aggregate.aggregate(entries, failures=[{"path": "bad.wav", "error": "bad.wav ends early"}])
    assert doc["start"] == [0, 10, 20] and doc["start_s"] == [0.0, 0.8, 1.6]
    base = doc["loss"]["baseline"]
    assert base["files"] == [3, 2, 1]
    assert base["mean"] == pytest.approx([5.0, 4.5, 3.0])
    half = aggregate.t_quantile_975(2) * 1.0 / math.sqrt(3)  # values 5, 6, 4: sd 1
    assert (base["ci95_low"][0], base["ci95_high"][0]) == pytest.approx((5.0 - half, 5.0 + half))
    assert math.isnan(base["ci95_low"][2])  # one file: no interval
    diff = doc["difference"]["ttt"]  # paired per file: ttt - baseline
    assert diff["mean"] == pytest.approx([np.mean([0.0, -0.5, 0.5]), np.mean([-0.5, -1.0]), -1.0])
    assert doc["files"] == {"scored": 3, "failed": 1, "tokens": 57, "shortest_s": 0.56, "longest_s": 2.4,
                            "total_s": pytest.approx(4.56)}  # fmt: skip
    assert doc["whole_file_difference"]["ttt"]["files"] == 3
    rows = aggregate.rows(doc)
    assert len(rows) == 3 * 3 and {r["series"] for r in rows} == {"baseline", "ttt", "ttt - baseline"}
    with pytest.raises(ValueError, match="different bin sizes"):
        aggregate.aggregate([entries[0], {**entries[1], "bins": {**entries[1]["bins"], "bin_size": 20}}])


def test_the_aggregate_files_are_written(tmp_path):
    doc = aggregate.aggregate([entry([5.0, 4.0], [4.0, 3.0], 20), entry([6.0], [5.0], 10)])
    paths = aggregate.write_aggregate(tmp_path, doc)
    written = json.loads(paths["json"].read_text())
    assert written["loss"]["ttt"]["ci95_low"][1] is None  # NaN as null
    assert paths["csv"].read_text().splitlines()[0] == "bin_start,bin_start_s,series,files,mean,ci95_low,ci95_high"
    page = paths["html"].read_text()
    assert "Files per bin" in page and "ttt − baseline" in page


def test_a_fingerprint_of_other_settings_is_refused_with_what_changed(tmp_path):
    first = fingerprint({"options": {"mode": "chunked"}}, {"ttt": {"ref": "a"}})
    claim(tmp_path, first)
    claim(tmp_path, fingerprint({"options": {"mode": "chunked"}}, {"ttt": {"ref": "a"}}))  # the same: fine
    other = fingerprint({"options": {"mode": "stream"}}, {"ttt": {"ref": "b"}})
    with pytest.raises(ValueError, match=r'other settings \(checkpoints.ttt.ref "a" -> "b"; settings.options.mode'):
        claim(tmp_path, other)


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "x.json", "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, 42)  # write() refuses a non-string: nothing is renamed
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
