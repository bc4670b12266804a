"""Streaming decoding (moshi_ttt.data.decode): the same audio as one whole-clip `mimi.decode` past the decoder's
attention window, however the codes arrive; a wav file of the right length and rate, written only when complete; a
codec shared with an encoder; one sentence for bad codes."""

import threading

import numpy as np
import pytest
import soundfile as sf
import torch
from test_audio import tone
from tiny_mimi import tiny_mimi
from tolerances import FLOAT32

from moshi_ttt.data.audio import FRAME_SIZE, SAMPLE_RATE
from moshi_ttt.data.decode import DECODE_FRAMES, StreamDecoder, decode_blocks, decode_to_wav
from moshi_ttt.data.stream import encode_blocks, encode_streaming

FRAMES = 330  # 26.4 s: past the decoder transformer's 250-step (10 s) window, not a whole number of calls
PCM16_STEP = 1 / 32767  # one step of 16-bit PCM, as libsndfile scales floats


@pytest.fixture(scope="module")
def mimi():
    """A tiny codec whose decoder transformer counts: moshi's layer scale 0.01 hides a dropped key below 1e-5."""
    codec = tiny_mimi()
    for name, parameter in codec.named_parameters():
        if name.endswith("layer_scale_1.scale") or name.endswith("layer_scale_2.scale"):
            parameter.data.fill_(1.0)
    return codec


@pytest.fixture(scope="module")
def codes(mimi):
    return torch.randint(0, mimi.cardinality, (1, 8, FRAMES), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def whole(mimi, codes):
    with torch.no_grad():
        return mimi.decode(codes)[0, 0]  # [1, 8, T] -> [1, 1, T * 1920] -> [T * 1920]


@pytest.mark.parametrize("frames_per_call", [1, 7, DECODE_FRAMES], ids=["one_frame", "7_frames", "default"])
def test_streaming_decode_equals_the_whole_clip_decode(mimi, codes, whole, frames_per_call):
    streamed = torch.cat(list(decode_blocks(mimi, [codes], frames_per_call=frames_per_call)))
    assert streamed.shape == (FRAMES * FRAME_SIZE,)
    torch.testing.assert_close(streamed, whole, **FLOAT32)
    assert not mimi.is_streaming


def test_moshis_ring_alone_drifts_past_the_window(mimi, codes, whole):
    """Why the decoder widens the ring (module docstring): without it the test above would fail."""
    streamed = torch.cat(list(decode_blocks(mimi, [codes], exact_window=False)))
    assert (streamed - whole).abs().max() > 10 * FLOAT32["atol"]


def test_the_audio_does_not_depend_on_how_the_codes_arrive(mimi, codes, whole):
    cuts = np.sort(np.random.default_rng(0).choice(FRAMES, size=30, replace=False))
    blocks = list(torch.tensor_split(codes, cuts.tolist(), dim=-1))
    blocks.insert(3, codes[..., :0])  # an empty block changes nothing
    streamed = torch.cat(list(decode_blocks(mimi, blocks)))
    torch.testing.assert_close(streamed, whole, **FLOAT32)


def test_the_wav_holds_the_decoded_audio_at_24k_in_16_bit(mimi, codes, whole, tmp_path):
    path = tmp_path / "heard.wav"
    result = decode_to_wav(mimi, codes, path)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (SAMPLE_RATE, 1, "PCM_16", FRAMES * 1920)
    assert result.path == path and result.num_samples == FRAMES * FRAME_SIZE and result.duration_s == 26.4
    assert result.peak == pytest.approx(float(whole.abs().max()), rel=1e-4) and result.clipped_samples == 0
    written = torch.from_numpy(sf.read(str(path), dtype="float32")[0])
    torch.testing.assert_close(written, whole, rtol=0, atol=PCM16_STEP + FLOAT32["atol"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heard.wav"]  # no temporary file left


def test_samples_past_full_scale_are_clipped_and_counted(mimi, codes, tmp_path):
    loud = tiny_mimi()
    loud.load_state_dict(mimi.state_dict())
    with torch.no_grad():
        loud.decoder.model[-1].conv.conv.weight.mul_(50.0)  # the decoder's last convolution: 50x louder
        expected = loud.decode(codes)[0, 0]
    result = decode_to_wav(loud, codes, tmp_path / "loud.wav")
    assert result.clipped_samples == int((expected.abs() > 1).sum()) > 0
    assert result.peak == pytest.approx(float(expected.abs().max()), rel=1e-4)
    written = sf.read(str(tmp_path / "loud.wav"), dtype="float32")[0]
    assert np.abs(written).max() <= 1.0


def test_decoding_codes_as_an_encoder_of_the_same_codec_gives_them(mimi, tmp_path):
    """The app's way: one codec, shared through its lock, encodes the clip and decodes its codes call by call."""
    samples = torch.from_numpy(tone(5.3, SAMPLE_RATE)[:, 0])
    codes = encode_streaming(mimi, samples)
    with torch.no_grad():
        expected = mimi.decode(codes)[0, 0]
    lock = threading.Lock()
    blocks = encode_blocks(mimi, [samples[i : i + 7000] for i in range(0, samples.shape[0], 7000)], lock=lock)
    result = decode_to_wav(mimi, blocks, tmp_path / "pipeline.wav", lock=lock)
    assert result.num_samples == codes.shape[-1] * FRAME_SIZE and not mimi.is_streaming
    written = torch.from_numpy(sf.read(str(tmp_path / "pipeline.wav"), dtype="float32")[0])
    torch.testing.assert_close(written, expected, rtol=0, atol=PCM16_STEP + FLOAT32["atol"])


def test_interleaved_decoders_of_a_shared_codec_keep_their_own_state(mimi, codes, whole):
    lock = threading.Lock()
    other = codes.flip(-1)
    with torch.no_grad():
        other_whole = mimi.decode(other)[0, 0]
    with StreamDecoder(mimi, lock=lock) as first, StreamDecoder(mimi, lock=lock) as second:
        assert not mimi.is_streaming  # no decoder's state stays installed between calls
        out = {0: [], 1: []}
        for start in range(0, FRAMES, 10):
            out[0] += list(first.push(codes[..., start : start + 10]))
            out[1] += list(second.push(other[..., start : start + 10]))
        out[0].append(first.finish())
        out[1].append(second.finish())
    torch.testing.assert_close(torch.cat(out[0]), whole, **FLOAT32)
    torch.testing.assert_close(torch.cat(out[1]), other_whole, **FLOAT32)


BAD_CODES = [
    (torch.zeros(1, 8, 5), r"^expected integer codes, got torch.float32$"),
    (torch.zeros(8, 5, dtype=torch.long), r"^expected codes \[1, K, T\] \(one clip\), got shape \[8, 5\]$"),
    (torch.zeros(2, 8, 5, dtype=torch.long), r"^expected codes \[1, K, T\] \(one clip\), got shape \[2, 8, 5\]$"),
    (torch.zeros(1, 9, 5, dtype=torch.long), r"^the codec decodes 1 to 8 codebooks, got codes of 9$"),
    (torch.zeros(1, 8, 0, dtype=torch.long), r"^expected codes of at least one frame, got none$"),
    (torch.full((1, 8, 5), 24), r"^codes must lie in \[0, 24\) for this codec, got values from 24 to 24$"),
    (torch.full((1, 8, 5), -1), r"^codes must lie in \[0, 24\) for this codec, got values from -1 to -1$"),
    ([[0] * 5] * 8, r"^expected codes as a tensor \[1, K, T\], got list$"),
]


@pytest.mark.parametrize(
    "bad,message",
    BAD_CODES,
    ids=["float", "no_batch", "two_clips", "too_many_codebooks", "no_frames", "past_cardinality", "negative", "list"],
)
def test_bad_codes_get_one_sentence_and_no_file(mimi, tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):  # a list is read as blocks: its first is not a tensor
        decode_to_wav(mimi, bad, tmp_path / "x.wav")
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_codebooks_changing_and_a_broken_decoder_leave_no_file(mimi, codes, tmp_path):
    with pytest.raises(ValueError, match=r"^the reconstruction is written as a .wav file, got 'x.flac'$"):
        decode_to_wav(mimi, codes, tmp_path / "x.flac")
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        decode_to_wav(mimi, codes, tmp_path / "missing" / "x.wav")
    with pytest.raises(ValueError, match=r"^expected codes of 8 codebooks as before, got 4$"):
        decode_to_wav(mimi, [codes[..., :30], codes[:, :4, 30:]], tmp_path / "x.wav")
    with pytest.raises(ValueError, match=r"^expected codes of at least one frame, got none$"):
        decode_to_wav(mimi, [], tmp_path / "x.wav")
    broken = tiny_mimi()
    broken.load_state_dict(mimi.state_dict())
    with torch.no_grad():
        broken.decoder.model[-1].conv.conv.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"^the codec's decoder gave NaN or infinite samples after 0.0 s of audio$"):
        decode_to_wav(broken, codes, tmp_path / "x.wav")
    assert list(tmp_path.iterdir()) == [] and not broken.is_streaming
    (tmp_path / "x.wav").write_bytes(b"an older file")
    with pytest.raises(ValueError, match="NaN"):
        decode_to_wav(broken, codes, tmp_path / "x.wav")
    assert (tmp_path / "x.wav").read_bytes() == b"an older file"  # replaced only by a complete file


def test_fewer_codebooks_decode_as_moshi_decodes_them(mimi, codes, tmp_path):
    """The models may read fewer codebooks than the codec gives (dep_q): those are decoded, as mimi.decode does."""
    with torch.no_grad():
        expected = mimi.decode(codes[:, :4])[0, 0]
    streamed = torch.cat(list(decode_blocks(mimi, [codes[:, :4]])))
    torch.testing.assert_close(streamed, expected, **FLOAT32)
