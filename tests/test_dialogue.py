"""Dialogue files and transcripts: moshi-finetune's alignments become the text tokens it trains on, a stereo file
fills both audio streams, and bad alignments are refused with one sentence."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_mimi import tiny_mimi
from tiny_models import tiny_lm

from moshi_ttt import score
from moshi_ttt.data import alignments, dialogue
from moshi_ttt.data.alignments import TextIds, Word, text_stream
from moshi_ttt.data.audio import encode, load_audio

SR = 24_000
IDS = TextIds(text_padding_token_id=3, end_of_text_padding_id=0, zero_token_id=-1)  # moshiko's ids


class LetterTokenizer:
    """One token per letter (a=4, b=5, ...): easy to follow by hand; the tiny models' text card is 12."""

    def encode(self, text: str) -> list[int]:
        return [4 + ord(c) - ord("a") for c in text]


P, E = 3, 0  # padding, end of padding


def test_alignments_become_the_text_tokens_moshi_finetune_trains_on():
    """By hand, with moshi-finetune's Interleaver rules (80 ms frames): a word enters at the first frame t with
    start * 12.5 < t + 1, writes one token per frame, and turns a padding frame just before it into end-of-padding."""
    words = [
        Word("ba", 0.10, 0.30, "SPEAKER_MAIN"),  # 1.25 < 2: frame 1 (frame 0 becomes end-of-padding)
        Word("cab", 0.30, 0.70, "SPEAKER_MAIN"),  # 3.75 < 4: frames 3-5, right after "ba" (no end-of-padding)
        Word("dd", 0.35, 0.40, "SPEAKER_OTHER"),  # the user's word: not Moshi's text
        Word("ee", 1.00, 1.00, "SPEAKER_MAIN"),  # no duration: dropped
        Word("ab", 1.20, 1.50, "SPEAKER_MAIN"),  # 15.0 < 16: frame 15, frame 14 becomes end-of-padding
    ]
    a, b, c = 4, 5, 6
    expected = [E, b, a, c, a, b, P, P, P, P, P, P, P, P, E, a, b, P, P, P]
    assert text_stream(words, 20, LetterTokenizer(), IDS).tolist() == expected
    assert text_stream(list(reversed(words)), 20, LetterTokenizer(), IDS).tolist() == expected  # sorted by start
    # A word that starts before the last one is written out replaces its remaining tokens.
    overlapping = [Word("abc", 0.0, 0.2, "SPEAKER_MAIN"), Word("c", 0.08, 0.2, "SPEAKER_MAIN")]
    assert text_stream(overlapping, 4, LetterTokenizer(), IDS).tolist() == [a, c, P, P]
    # A word starting in the frame after the audio still marks the last frame (moshi-finetune crops a longer stream).
    assert text_stream([Word("a", 0.33, 0.4, "SPEAKER_MAIN")], 4, LetterTokenizer(), IDS).tolist() == [P, P, P, E]


def write_alignments(path, entries):
    path.write_text(json.dumps({"alignments": entries}))
    return path


def test_alignment_files_are_read_and_bad_ones_refused_in_one_sentence(tmp_path):
    good = write_alignments(tmp_path / "a.json", [["hello", [0.1, 0.4], "SPEAKER_MAIN"], ["yo", [0.5, 0.6], "B"]])
    assert alignments.read_alignments(good) == [Word("hello", 0.1, 0.4, "SPEAKER_MAIN"), Word("yo", 0.5, 0.6, "B")]
    assert alignments.alignment_path(tmp_path / "a.wav") == good
    alignments.check_against_audio(alignments.read_alignments(good), 2.0, "a.json")
    (tmp_path / "bad.json").write_text(json.dumps({"words": []}))
    with pytest.raises(
        ValueError, match=r"^bad.json is not a moshi-finetune alignment file: expected \{\"alignments\""
    ):
        alignments.read_alignments(tmp_path / "bad.json")
    write_alignments(tmp_path / "flat.json", [["hello", 0.1, "SPEAKER_MAIN"]])
    with pytest.raises(ValueError, match="flat.json is not a moshi-finetune alignment file"):
        alignments.read_alignments(tmp_path / "flat.json")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist: the transcript text stream expects"):
        alignments.read_alignments(tmp_path / "missing.json")
    late = [Word("hello", 0.1, 0.4, "SPEAKER_MAIN"), Word("there", 3.2, 3.5, "SPEAKER_MAIN")]
    with pytest.raises(ValueError, match=r"^a.json has words up to 3.50 s but the audio lasts 2.00 s: the alignment"):
        alignments.check_against_audio(late, 2.0, "a.json")
    with pytest.raises(ValueError, match=r"none of the 1 words of a.json is spoken by SPEAKER_MAIN \(found B\)"):
        alignments.check_against_audio([Word("yo", 0.5, 0.6, "B")], 2.0, "a.json")
    with pytest.raises(ValueError, match="negative timestamps"):
        alignments.check_against_audio([Word("yo", -0.5, 0.6, "SPEAKER_MAIN")], 2.0, "a.json")


def speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    y = 0.3 * np.sin(2 * np.pi * (110 + 30 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (y + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture()
def stereo(tmp_path):
    left, right = speechlike(2.5, 1), speechlike(2.5, 2)
    sf.write(tmp_path / "dialogue.wav", np.stack([left, right], axis=1), SR)
    sf.write(tmp_path / "left.wav", left, SR)
    sf.write(tmp_path / "right.wav", right, SR)
    return tmp_path


def test_a_stereo_file_fills_both_audio_streams(stereo):
    mimi = tiny_mimi()
    left, right = (encode(mimi, load_audio(stereo / f"{side}.wav")) for side in ("left", "right"))
    assert not torch.equal(left, right)
    streams = dialogue.read_streams(stereo / "dialogue.wav", mimi, 8)
    assert torch.equal(streams.moshi_codes, left) and torch.equal(streams.user_codes, right)
    assert streams.audio.channels == "left: Moshi, right: user" and streams.tokens == 32
    swapped = dialogue.read_streams(stereo / "dialogue.wav", mimi, 8, "moshi-right")
    assert torch.equal(swapped.moshi_codes, right) and torch.equal(swapped.user_codes, left)
    mixed = dialogue.read_streams(stereo / "dialogue.wav", mimi, 8, "mix")
    assert mixed.user_codes is None and torch.equal(
        mixed.moshi_codes, encode(mimi, load_audio(stereo / "dialogue.wav"))
    )
    mono = dialogue.read_streams(stereo / "left.wav", mimi, 8)
    assert mono.user_codes is None and mono.audio.channels == "mono" and torch.equal(mono.moshi_codes, left)
    # A model with a user stream reads the right channel there; an audio-only one scores the Moshi channel alone.
    model = tiny_lm(0, n_q=16)
    inputs = streams.score_inputs(model)
    assert torch.equal(inputs["user_codes"], right)
    got = score(model, streams.moshi_codes, **inputs).loss
    torch.testing.assert_close(got, score(model, left, user_codes=right).loss, rtol=0, atol=0, equal_nan=True)
    assert streams.score_inputs(tiny_lm(0)) == {}


def test_a_transcript_beside_a_dialogue_file_becomes_its_text_stream(stereo):
    write_alignments(stereo / "dialogue.json", [["ab", [0.2, 0.5], "SPEAKER_MAIN"], ["hi", [0.3, 0.9], "SPEAKER_B"]])
    streams = dialogue.read_streams(stereo / "dialogue.wav", tiny_mimi(), 8, transcript=True)
    model = tiny_lm(0, n_q=16)
    inputs = streams.score_inputs(model, LetterTokenizer())
    assert inputs["text_tokens"][0, :6].tolist() == [3, 0, 4, 5, 3, 3]  # 0.2 * 12.5 = 2.5 < 3: frame 2
    result = score(model, streams.moshi_codes, text_stream="transcript", **inputs)
    assert result.text_loss.shape == (1, streams.tokens) and result.text_loss.isfinite().all()
    with pytest.raises(ValueError, match="needs the model's text tokenizer"):
        streams.score_inputs(model)
    write_alignments(stereo / "dialogue.json", [["ab", [0.2, 0.5], "SPEAKER_MAIN"], ["cd", [4.0, 4.5], "SPEAKER_MAIN"]])
    with pytest.raises(ValueError, match="dialogue.json has words up to 4.50 s but the audio lasts 2.50 s"):
        dialogue.read_streams(stereo / "dialogue.wav", tiny_mimi(), 8, transcript=True)


def test_bad_channel_requests_are_one_sentence(stereo):
    sf.write(stereo / "surround.wav", np.zeros((SR, 3), dtype=np.float32) + 0.1, SR)
    with pytest.raises(ValueError, match="surround.wav has 3 channels: a dialogue file has two"):
        dialogue.read_dialogue(stereo / "surround.wav")
    assert dialogue.read_dialogue(stereo / "surround.wav", "mix").channels == "mix of 3 channels"
    with pytest.raises(ValueError, match="channels must be one of"):
        dialogue.read_dialogue(stereo / "dialogue.wav", "left")
    quiet = np.stack([np.zeros(SR, dtype=np.float32), speechlike(1.0, 3)], axis=1)
    sf.write(stereo / "quiet.wav", quiet, SR)
    with pytest.raises(ValueError, match=r"the Moshi channel \(left\) of quiet.wav is silent"):
        dialogue.read_dialogue(stereo / "quiet.wav")
    assert dialogue.read_dialogue(stereo / "quiet.wav", "moshi-right").user.silent  # a silent user is fine


def test_the_cli_scores_a_dialogue_file_with_its_transcript(stereo, monkeypatch):
    from moshi_ttt import evaluate

    def fake_load(ref, device, dtype):  # moshiko-shaped tiny models: a user stream beside Moshi's
        import types

        from moshi_ttt import TTTConfig, apply_ttt

        model = tiny_lm(0, n_q=16)
        if ref == "ttt":
            model = apply_ttt(model, TTTConfig(layers="1,2", mini_batch_size=4))
        return types.SimpleNamespace(model=model, mimi=tiny_mimi())

    monkeypatch.setattr(evaluate, "_load_checkpoint", fake_load)
    monkeypatch.setattr(evaluate, "load_text_tokenizer", lambda path: LetterTokenizer())
    write_alignments(stereo / "dialogue.json", [["ab", [0.2, 0.5], "SPEAKER_MAIN"], ["ca", [1.0, 1.3], "SPEAKER_MAIN"]])
    out = stereo / "out"
    argv = ["--audio", str(stereo / "dialogue.wav"), "--baseline", "base", "--ttt", "ttt", "--out", str(out)]
    options = ["--text-stream", "transcript", "--text-tokenizer", "spm.model"]
    assert evaluate.main([*argv, *options, "--first-codebook-weight-multiplier", "100"]) == 0
    doc = json.loads((out / "0000_dialogue" / "results.json").read_text())
    assert doc["audio"]["channels"] == "left: Moshi, right: user" and doc["audio"]["transcript_words"] == 2
    assert doc["config"]["text_stream"] == "transcript" and doc["config"]["first_codebook_weight_multiplier"] == 100
    views = doc["runs"]["ttt"]["loss_views"]
    assert views["text"] is not None and views["first_codebook_weight_multiplier"] == 100
    assert views["mean"] == pytest.approx(doc["runs"]["ttt"]["mean_loss"])
    # The TTT run's numbers are the library's with both streams and the transcript.
    mimi, model = tiny_mimi(), fake_load("ttt", "cpu", None).model
    left = encode(mimi, load_audio(stereo / "left.wav"))
    right = encode(mimi, load_audio(stereo / "right.wav"))
    words = alignments.read_alignments(stereo / "dialogue.json")
    text = text_stream(words, left.shape[-1], LetterTokenizer(), TextIds.of(model))[None]
    expected = score(model, left, text_stream="transcript", text_tokens=text, user_codes=right)
    got = torch.tensor([[np.nan if v is None else v for v in cb] for cb in doc["runs"]["ttt"]["loss_per_codebook"]])
    torch.testing.assert_close(got, expected.loss[0], rtol=0, atol=1e-4, equal_nan=True)
    assert doc["runs"]["ttt"]["text_loss_per_token"] == pytest.approx(expected.text_loss[0].tolist(), abs=1e-4)
    assert evaluate.main([*argv, "--text-stream", "transcript"]) == 2  # no tokenizer: one line, status 2
