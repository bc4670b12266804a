"""A TTT-Linear model (fast weights W1, b1: no W2) through everything that shows drift: the evaluate CLI's report,
the app's reopening of its results.json and the app's figure."""

import json
import types

import numpy as np
import pytest
import soundfile as sf
from tiny_mimi import tiny_mimi
from tiny_models import tiny_lm

from moshi_ttt import TTTConfig, apply_ttt, evaluate
from moshi_ttt.app import outputs
from moshi_ttt.app.figure import figure_dict
from moshi_ttt.app.reopen import read_results


def linear_load(ref, device, dtype):
    """A tiny baseline ("base") or the same LM with TTT-Linear layers ("ttt")."""
    ttt = TTTConfig(layers="1,2", mini_batch_size=4, inner="linear")
    return types.SimpleNamespace(model=tiny_lm(0) if ref == "base" else apply_ttt(tiny_lm(0), ttt), mimi=tiny_mimi())


@pytest.fixture()
def linear_results(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "_load_checkpoint", linear_load)
    audio = tmp_path / "clip.wav"
    sf.write(audio, (0.2 * np.random.default_rng(1).standard_normal(60_000)).astype(np.float32), 24000)
    out = tmp_path / "out"
    assert evaluate.main(["--audio", str(audio), "--baseline", "base", "--ttt", "ttt", "--out", str(out)]) == 0
    return out / "0000_clip"


def test_the_report_of_a_ttt_linear_model_shows_the_drift_of_w1(linear_results):
    doc = json.loads((linear_results / "results.json").read_text())
    for layer in ("1", "2"):
        drift = doc["runs"]["ttt"]["drift"][layer]
        assert "W2" not in drift and len(drift["W1"]) == len(drift["t"]) > 0
    html = (linear_results / "report.html").read_text()
    assert "fast-weight drift" in html and "layer 1 W1" in html and "layer 1 W2" not in html


def test_the_app_reopens_a_ttt_linear_results_json_and_draws_its_drift(linear_results):
    path = linear_results / "results.json"
    doc = read_results(path)
    assert "W2" not in doc["runs"]["ttt"]["drift"]["1"]
    assert outputs.reopened(doc, path.name).status.startswith("Opened results.json")
    ttt = doc["runs"]["ttt"]
    fig = figure_dict({name: run["loss_per_token"] for name, run in doc["runs"].items()}, ttt["drift"])
    names = [trace.get("name") for trace in fig["data"]]
    assert "layer 1 W1" in names and "layer 2 W1" in names and not any("W2" in str(n) for n in names)
