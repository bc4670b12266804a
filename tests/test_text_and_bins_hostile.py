"""Transcripts, tokenizers and position bins under hostile inputs: a rerun with another tokenizer or an edited
transcript never reuses old numbers, a transcript is never the text of the wrong channel, bad alignment times are
refused with one sentence, the bins pooled across files hold the same tokens in every file, and the docs say when
the greedy text stream equals moshi's LMGen."""

import json
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from moshi.models.lm import LMGen
from tiny_mimi import tiny_mimi
from tiny_models import random_audio_codes, tiny_lm

from moshi_ttt import TTTConfig, apply_ttt, evaluate, score
from moshi_ttt.compat.sequence import depformer_targets, model_codes
from moshi_ttt.data import alignments, dialogue
from moshi_ttt.data.alignments import Word
from moshi_ttt.reports import aggregate
from moshi_ttt.scoring import text_stream

SR = 24_000
REPO = Path(__file__).resolve().parent.parent


class ShiftTokenizer:
    """One token per letter, shifted by the first byte of its file: two tokenizer files give two text streams."""

    def __init__(self, path):
        self.shift = Path(path).read_bytes()[0] % 8

    def encode(self, text: str) -> list[int]:
        return [4 + (ord(c) - ord("a") + self.shift) % 8 for c in text]


def speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    y = 0.3 * np.sin(2 * np.pi * (110 + 30 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (y + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def write_alignments(path: Path, entries) -> Path:
    path.write_text(json.dumps({"alignments": entries}))
    return path


@pytest.fixture()
def transcribed(tmp_path, monkeypatch):
    """Two mono clips with transcripts, two tokenizer files, tiny checkpoints; returns the CLI's argv (no tokenizer)."""

    def fake_load(ref, device, dtype):
        model = tiny_lm(0) if ref == "base" else apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4))
        return types.SimpleNamespace(model=model, mimi=tiny_mimi())

    monkeypatch.setattr(evaluate, "_load_checkpoint", fake_load)
    monkeypatch.setattr(evaluate, "load_text_tokenizer", ShiftTokenizer)
    for i in range(2):
        sf.write(tmp_path / f"c{i}.wav", speechlike(2.0, i), SR)
        words = [["ab", [0.2, 0.5], "SPEAKER_MAIN"], ["ca", [1.0, 1.3], "SPEAKER_MAIN"]]
        write_alignments(tmp_path / f"c{i}.json", words)
    (tmp_path / "tok_a.model").write_bytes(b"\x01tokenizer a")
    (tmp_path / "tok_b.model").write_bytes(b"\x03tokenizer b")
    return tmp_path, ["--baseline", "base", "--ttt", "ttt", "--out", str(tmp_path / "out"), "--device", "cpu",
                      "--text-stream", "transcript"]  # fmt: skip


def test_a_rerun_with_another_text_tokenizer_is_refused_not_mixed(transcribed, capsys):
    folder, argv = transcribed
    a, b = str(folder / "c0.wav"), str(folder / "c1.wav")
    assert evaluate.main([*argv, "--audio", a, "--text-tokenizer", str(folder / "tok_a.model")]) == 0
    config = json.loads((folder / "out" / "0000_c0" / "results.json").read_text())["config"]
    assert config["text_tokenizer"]["path"] == str(folder / "tok_a.model") and config["text_tokenizer"]["bytes"] == 12
    capsys.readouterr()
    assert evaluate.main([*argv, "--audio", a, b, "--text-tokenizer", str(folder / "tok_b.model")]) == 2
    err = capsys.readouterr().err
    assert "holds results of other settings (settings.text_tokenizer" in err and err.count("\n") == 1
    # The same tokenizer resumes: the first file is reused.
    assert evaluate.main([*argv, "--audio", a, b, "--text-tokenizer", str(folder / "tok_a.model")]) == 0
    assert "c0.wav: " in capsys.readouterr().out
    index = json.loads((folder / "out" / "index.json").read_text())
    assert [entry.get("skipped", False) for entry in index["files"]] == [True, False]


def test_a_file_whose_transcript_changed_is_scored_again(transcribed):
    folder, argv = transcribed
    run = [*argv, "--audio", str(folder / "c0.wav"), "--text-tokenizer", str(folder / "tok_a.model")]
    assert evaluate.main(run) == 0
    before = json.loads((folder / "out" / "0000_c0" / "results.json").read_text())["runs"]["ttt"]
    write_alignments(folder / "c0.json", [["bb", [0.1, 0.5], "SPEAKER_MAIN"], ["cc", [1.2, 1.6], "SPEAKER_MAIN"]])
    assert evaluate.main(run) == 0
    index = json.loads((folder / "out" / "index.json").read_text())
    assert not index["files"][0].get("skipped")
    after = json.loads((folder / "out" / "0000_c0" / "results.json").read_text())["runs"]["ttt"]
    assert after["text_loss_per_token"] != before["text_loss_per_token"]
    assert evaluate.main(run) == 0  # unchanged since: reused
    assert json.loads((folder / "out" / "index.json").read_text())["files"][0]["skipped"] is True


def test_a_transcript_is_never_the_text_of_the_right_channel(tmp_path):
    sf.write(tmp_path / "st.wav", np.stack([speechlike(2.0, 1), speechlike(2.0, 2)], axis=1), SR)
    sf.write(tmp_path / "mono.wav", speechlike(2.0, 1), SR)
    for name in ("st", "mono"):
        write_alignments(tmp_path / f"{name}.json", [["ab", [0.2, 0.5], "SPEAKER_MAIN"]])
    mimi = tiny_mimi()
    with pytest.raises(ValueError, match=r"^a transcript of st.wav holds the left channel's words \(SPEAKER_MAIN\)"):
        dialogue.read_streams(tmp_path / "st.wav", mimi, 8, "moshi-right", transcript=True)
    assert dialogue.read_streams(tmp_path / "st.wav", mimi, 8, "moshi-left", transcript=True).words
    assert dialogue.read_streams(tmp_path / "st.wav", mimi, 8, "moshi-right").user_codes is not None  # no text
    assert dialogue.read_streams(tmp_path / "mono.wav", mimi, 8, "moshi-right", transcript=True).words  # one channel


@pytest.mark.parametrize(
    "times, message",
    [
        pytest.param([0.6, 0.2], r"^word 1 \('yo'\) of t.json ends at 0.2 s before it starts at 0.6 s", id="end<start"),
        pytest.param(["0.2", 0.6], r"^word 1 \('yo'\) of t.json has times \['0.2', 0.6\]: expected two", id="string"),
        pytest.param([0.2, True], r"^word 1 \('yo'\) of t.json has times \[0.2, True\]", id="bool"),
        pytest.param([float("nan"), 0.6], r"^word 1 \('yo'\) of t.json has times \[nan, 0.6\]", id="nan"),
        pytest.param([0.2, None], r"^word 1 \('yo'\) of t.json has times \[0.2, None\]", id="null"),
    ],
)
def test_bad_alignment_times_are_refused_naming_the_word(tmp_path, times, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"alignments": [["hi", [0.1, 0.2], "SPEAKER_MAIN"], ["yo", times, "SPEAKER_MAIN"]]}))
    with pytest.raises(ValueError, match=message):
        alignments.read_alignments(path)


def test_check_against_audio_refuses_words_that_end_before_they_start():
    backwards = [Word("hi", 0.5, 0.2, "SPEAKER_MAIN"), Word("yo", 0.9, 0.7, "SPEAKER_MAIN")]
    with pytest.raises(ValueError, match=r"^word 0 \('hi'\) of a.json ends at 0.2 s before it starts at 0.5 s"):
        alignments.check_against_audio(backwards, 2.0, "a.json")
    with pytest.raises(ValueError, match=r"^word 0 \('hi'\) of a.json has times \['0.1', 0.2\]"):
        alignments.check_against_audio([Word("hi", "0.1", 0.2, "SPEAKER_MAIN")], 2.0, "a.json")
    zero_length = [Word("hi", 0.5, 0.5, "SPEAKER_MAIN"), Word("yo", 0.7, 0.9, "SPEAKER_MAIN")]
    alignments.check_against_audio(zero_length, 2.0, "a.json")  # kept: text_stream drops it, as moshi-finetune


def test_bins_across_files_hold_the_same_tokens_in_every_file():
    """bins.py of the review: with 10-token bins, a 14-token file's tokens 10-13 are its bin 1, not part of bin 0."""

    def entry(tokens: int) -> dict:
        losses = [float(t) for t in range(tokens)]
        runs = {"baseline": {"loss_per_token": losses}, "ttt": {"loss_per_token": [v - 1 for v in losses]}}
        return {"bins": aggregate.file_bins(runs, 10), "tokens": tokens, "duration_s": tokens / 12.5,
                "mean_loss": {"baseline": (tokens - 1) / 2, "ttt": (tokens - 3) / 2}}  # fmt: skip

    short, long = entry(14), entry(30)
    assert short["bins"]["start"] == [0, 10] and short["bins"]["loss"]["baseline"] == [4.5, 11.5]
    assert short["bins"]["difference"]["ttt"] == [-1.0, -1.0]
    doc = aggregate.aggregate([short, long])
    assert doc["start"] == [0, 10, 20] and doc["loss"]["baseline"]["files"] == [2, 2, 1]
    assert doc["loss"]["baseline"]["mean"] == pytest.approx([4.5, (11.5 + 14.5) / 2, 24.5])


def test_greedy_equals_lmgen_only_when_the_ttt_state_persists_and_the_docs_say_so():
    """lmgen.py of the review: LMGen calls the model once per token, so persistent_states=False resets TTT at every
    token there; the greedy text stream resets every reset_every tokens instead."""
    T = 45
    for persistent in (True, False):
        model = apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4, base_lr=1.0, gating_alpha_init=0.5,
                                                persistent_states=persistent))  # fmt: skip
        codes = random_audio_codes(1, T, seed=1)
        delayed = depformer_targets(model, model_codes(model, codes))[:, 1:9]  # [1, K, T]
        tokens = []
        generator = LMGen(model, use_sampling=False, on_text_hook=lambda t, found=tokens: found.append(t.clone()))
        no_user = torch.zeros(1, 0, 1, dtype=torch.long)  # a model without a user stream
        with generator.streaming(1):
            for t in range(T):
                generator.step(no_user, depformer_replace_tokens=delayed[:, :, t : t + 1])
        greedy = score(model, codes, "stream", text_stream="greedy").text_tokens  # [1, T]
        assert torch.equal(greedy, torch.stack(tokens, 1)) == persistent
    module_doc = " ".join(text_stream.__doc__.split())
    assert "with `persistent_states=False`, LMGen resets the fast weights at each of its one-token calls" in module_doc
    assert "`TTTConfig.persistent_states=True`" in " ".join(text_stream.greedy_text.__doc__.split())
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "LMGen calls once per token: every token starts from W_base" in readme
    assert "with `persistent_states=False` LMGen resets the fast weights at each one-token call" in readme
    architecture = " ".join((REPO / "docs" / "ARCHITECTURE.md").read_text().split())
    assert "not with `persistent_states=False`, where LMGen resets TTT at every one-token call" in architecture
