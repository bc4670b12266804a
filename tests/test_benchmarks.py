"""Minimal-pair benchmarks: the public layouts (on synthetic sets made by scripts/make_minimal_pair_sets.py), clip
likelihoods from fresh state, accuracies with intervals, the CLI, and bad layouts refused in one sentence."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from tiny_mimi import tiny_mimi
from tiny_models import random_audio_codes, tiny_lm

from moshi_ttt import RunOptions, TTTConfig, apply_ttt, evaluate, score
from moshi_ttt.benchmarks import layouts, minimal_pairs
from moshi_ttt.benchmarks.report import run_benchmarks

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/make_minimal_pair_sets.py speaks with it)")
    out = tmp_path_factory.mktemp("minimal_pairs")
    script = ROOT / "scripts" / "make_minimal_pair_sets.py"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--pairs", "2"], check=True, capture_output=True)
    return out


SPECS = {"swuggy": "zr2021", "sblimp": "zr2021", "sstorycloze": "sStoryCloze", "tstorycloze": "tStoryCloze"}


def test_the_synthetic_sets_read_as_the_public_layouts(sets):
    swuggy = layouts.read_benchmark("swuggy", sets / "zr2021")
    assert swuggy.layout == "ZeroSpeech 2021 lexical" and len(swuggy.pairs) == 2  # one word, two voices
    assert {p.key.split()[1] for p in swuggy.pairs} == {"voice=en-us", "voice=en-gb"}
    assert layouts.read_benchmark("swuggy", sets / "zr2021" / "lexical" / "dev").pairs == swuggy.pairs
    sblimp = layouts.read_benchmark("sblimp", sets / "zr2021")
    assert len(sblimp.pairs) == 2 and {p.group for p in sblimp.pairs} == {"word_order"}
    for name in ("sstorycloze", "tstorycloze"):
        story = layouts.read_benchmark(name, sets / SPECS[name])
        assert len(story.pairs) == 2 and story.pairs[0].key.startswith("0_")
        assert story.pairs[0].good.name.endswith("_correct.wav") and story.pairs[0].bad.name.endswith("_incorrect.wav")
    assert layouts.parse_spec("sWUGGY=/data/zr") == ("swuggy", Path("/data/zr"))


def test_bad_layouts_are_one_sentence_naming_what_was_expected(sets, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"swuggy: no gold.csv in .* \(expected the ZeroSpeech 2021 layout "):
        layouts.read_benchmark("swuggy", sets / "sStoryCloze")
    lexical = tmp_path / "lexical" / "dev"
    shutil.copytree(sets / "zr2021" / "lexical" / "dev", lexical)
    (lexical / "gold.csv").rename(tmp_path / "gold.saved")
    with pytest.raises(FileNotFoundError, match=r"swuggy: .*dev has .wav files but no gold.csv \(expected the Zero"):
        layouts.read_benchmark("swuggy", tmp_path)
    (lexical / "gold.csv").write_text("name,label\na,1\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['filename', 'correct', 'id', 'voice'\]"):
        layouts.read_benchmark("swuggy", tmp_path)
    gold = (tmp_path / "gold.saved").read_text().splitlines()
    (lexical / "gold.csv").write_text("\n".join(gold[:2]) + "\n")  # a word without its non-word
    with pytest.raises(ValueError, match="has 1 correct and 0 incorrect clip\\(s\\) for id=0 voice=en-us; expected"):
        layouts.read_benchmark("swuggy", tmp_path)
    (lexical / "gold.csv").write_text("\n".join(gold) + "\n")
    next(lexical.glob("*.wav")).unlink()
    with pytest.raises(FileNotFoundError, match=r"swuggy: 1 of the 4 clips the gold file names are not in"):
        layouts.read_benchmark("swuggy", tmp_path)
    with pytest.raises(ValueError, match="sstorycloze: .* has no clips named in the spoken StoryCloze layout"):
        layouts.read_benchmark("sstorycloze", sets / "zr2021")
    stories = tmp_path / "stories"
    shutil.copytree(sets / "sStoryCloze", stories)
    next(stories.glob("1_*_incorrect.wav")).unlink()
    with pytest.raises(ValueError, match=r"story 1_\S+ in .* lacks its _incorrect clip"):
        layouts.read_benchmark("sstorycloze", stories)
    with pytest.raises(ValueError, match="unknown benchmark 'blimp'"):
        layouts.parse_spec("blimp=/x")
    with pytest.raises(ValueError, match="given as NAME=PATH"):
        layouts.parse_spec("swuggy")


def test_a_clip_score_is_its_summed_and_mean_weighted_loss_from_fresh_state():
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4, gating_alpha_init=0.5))
    codes = random_audio_codes(1, 20, seed=1)
    other = random_audio_codes(1, 30, seed=2)
    options = RunOptions(mode="full", first_codebook_weight_multiplier=100.0, text_stream="zero")
    minimal_pairs.clip_score(model, other, options)  # a clip before must not change the next one's score
    got = minimal_pairs.clip_score(model, codes, options)
    loss = score(model, codes, "full", text_stream="zero").loss[0].double()  # [8, T], NaN where invalid
    cb0, rest = loss[0][loss[0].isfinite()], loss[1:][loss[1:].isfinite()]
    assert got.nll_sum == pytest.approx(100 * cb0.sum().item() + rest.sum().item())
    assert got.nll_mean == pytest.approx(got.nll_sum / (100 * cb0.numel() + rest.numel()))
    assert got.tokens == 20
    plain = minimal_pairs.clip_score(model, codes, RunOptions(mode="stream"))
    assert plain.nll_sum == pytest.approx(score(model, codes, "full").loss.nansum().item(), abs=1e-3)


def test_accuracy_counts_ties_half_with_a_wilson_interval():
    acc = minimal_pairs.accuracy([1.0, 2.0, 3.0, 5.0], [2.0, 1.0, 3.0, 6.0])  # right, wrong, tie, right
    assert acc.correct == 2.5 and acc.pairs == 4 and acc.accuracy == 0.625
    lo, hi = minimal_pairs.wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the textbook Wilson interval of 8 / 10
    assert minimal_pairs.wilson_interval(0, 5)[0] == 0.0


def fake_load(ref, device, dtype):
    model = tiny_lm(0) if ref == "base" else apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4))
    return types.SimpleNamespace(model=model, mimi=tiny_mimi())


def test_the_cli_scores_every_benchmark_for_both_models_side_by_side(sets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "_load_checkpoint", fake_load)
    argv = ["--baseline", "base", "--ttt", "ttt", "--out", str(tmp_path / "out"), "--mode", "full"]
    for name, folder in SPECS.items():
        argv += ["--benchmark", f"{name}={sets / folder}"]
    assert evaluate.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "benchmarks" / "results.json").read_text())
    assert set(doc["benchmarks"]) == set(SPECS)
    for bench in doc["benchmarks"].values():
        assert set(bench["runs"]) == {"baseline", "ttt"} and bench["pairs"] == 2
        for result in bench["runs"].values():
            assert 0 <= result["summed"]["accuracy"] <= 1 and len(result["length_normalised"]["ci95"]) == 2
            assert result["s_per_1000_pairs"] > 0 and result["cpu_s_per_1000_pairs"] > 0
    # The file's numbers are the library's.
    pair = layouts.read_benchmark("swuggy", sets / "zr2021").pairs[0]
    row = doc["benchmarks"]["swuggy"]["per_pair"][0]
    codes = minimal_pairs.encode_clips(layouts.Benchmark("swuggy", sets, "", [pair]), tiny_mimi(), 8)
    expected = minimal_pairs.clip_score(fake_load("ttt", "cpu", None).model, codes[pair.good], RunOptions(mode="full"))
    assert row["ttt"]["good"]["nll_sum"] == pytest.approx(expected.nll_sum, rel=1e-6)
    assert "sblimp: accuracy per type" in (tmp_path / "out" / "benchmarks" / "report.html").read_text()
    assert (tmp_path / "out" / "benchmarks" / "results.csv").read_text().count("\n") == 1 + 4 * 2 * 2
    printed = capsys.readouterr().out
    assert "swuggy (2 pairs) ttt: accuracy" in printed and "s per 1,000 pairs" in printed
    assert evaluate.main(["--benchmark", "swuggy=/nowhere", "--out", str(tmp_path / "x"), "--baseline", "base"]) == 2
    assert "swuggy: /nowhere is not a folder" in capsys.readouterr().err


def test_benchmarks_refuse_a_transcript_text_stream_and_a_benchmark_given_twice(sets, tmp_path):
    models, mimi = {"baseline": tiny_lm(0)}, tiny_mimi()
    transcript = RunOptions(text_stream="transcript")
    with pytest.raises(ValueError, match="have no transcripts"):
        run_benchmarks([f"swuggy={sets / 'zr2021'}"], models, mimi, transcript, tmp_path)
    with pytest.raises(ValueError, match="given more than once"):
        run_benchmarks([f"swuggy={sets}", f"swuggy={sets}"], models, mimi, RunOptions(), tmp_path)
