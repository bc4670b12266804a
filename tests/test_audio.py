"""Audio loading (formats, mono, 24 kHz), one-sentence errors for bad input, and Mimi encoding."""

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_mimi import tiny_mimi
from tiny_models import tiny_lm

from moshi_ttt import TTTConfig, apply_ttt, score
from moshi_ttt.data.audio import FRAME_SIZE, SAMPLE_RATE, encode, load_audio
from moshi_ttt.data.stream import encode_streaming

NEEDS_MP3 = pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile has no mp3")


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(0).standard_normal(t.shape)
    return np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)  # [N, C]


@pytest.mark.parametrize(
    "suffix,subtype,rate,channels",
    [
        ("wav", "PCM_16", 24000, 1),
        ("wav", "FLOAT", 44100, 2),
        ("flac", "PCM_16", 16000, 1),
        ("ogg", "VORBIS", 48000, 2),
        pytest.param("mp3", "MPEG_LAYER_III", 22050, 1, marks=NEEDS_MP3),
    ],
    ids=["wav24k", "wav44k_stereo", "flac16k", "ogg48k_stereo", "mp3"],
)  # fmt: skip
def test_any_libsndfile_format_becomes_mono_24k(tmp_path, suffix, subtype, rate, channels):
    path = tmp_path / f"speech.{suffix}"
    data = tone(1.5, rate, channels)
    sf.write(path, data, rate, subtype=subtype)
    audio = load_audio(path)
    assert audio.samples.dtype == torch.float32 and audio.samples.dim() == 1
    assert abs(audio.duration_s - 1.5) < 0.06  # mp3 adds encoder padding
    assert audio.source_sample_rate == rate and audio.source_channels == channels and not audio.silent
    assert audio.num_frames == -(-audio.samples.shape[0] // FRAME_SIZE)
    if suffix == "wav" and rate == SAMPLE_RATE:
        np.testing.assert_allclose(audio.samples.numpy(), data.mean(axis=1), atol=1e-4)  # PCM_16 rounding


def test_bad_files_get_one_clear_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    with pytest.raises(ValueError, match=r"^notes.wav could not be read as audio: it is not a format libsndfile"):
        load_audio(text)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), np.float32), 24000)
    with pytest.raises(ValueError, match=r"^empty.wav contains no audio samples\.$"):
        load_audio(empty)
    silent = tmp_path / "silent.flac"
    sf.write(silent, np.zeros((24000, 1), np.float32), 24000)
    with pytest.raises(ValueError, match=r"^silent.flac is silent .*allow silence to score it anyway\.$"):
        load_audio(silent)
    assert load_audio(silent, allow_silence=True).silent
    long = tmp_path / "long.wav"
    sf.write(long, tone(3.0, 8000), 8000)
    with pytest.raises(ValueError, match=r"^long.wav lasts 3.0 s, longer than the limit of 2.5 s\.$"):
        load_audio(long, max_seconds=2.5)
    assert load_audio(long, max_seconds=None).duration_s == pytest.approx(3.0)
    nan = tmp_path / "nan.wav"
    data = tone(0.5, 24000)
    data[100] = np.nan
    sf.write(nan, data, 24000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"^nan.wav contains NaN or infinite samples\.$"):
        load_audio(nan)


def test_whole_and_streamed_encoding_agree_on_a_short_clip_and_score_in_every_mode(tmp_path):
    path = tmp_path / "speech.wav"
    sf.write(path, tone(3.3, 24000), 24000)  # 3.3 s -> 42 frames, longer than the LM's 16-token window
    audio = load_audio(path)
    mimi = tiny_mimi()
    codes = encode(mimi, audio)
    assert codes.shape == (1, 8, audio.num_frames) == (1, 8, 42)
    assert codes.unique().numel() > 4  # real, varied codes
    torch.testing.assert_close(encode_streaming(mimi, audio), codes, rtol=0, atol=0)
    for model in (tiny_lm(0), apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4))):
        full = score(model, codes, "full").loss
        for mode in ("chunked", "stream"):
            torch.testing.assert_close(score(model, codes, mode).loss, full, rtol=0, atol=1e-4, equal_nan=True)
    with pytest.raises(ValueError, match="non-empty mono waveform"):
        encode(mimi, torch.zeros(2, 100))
