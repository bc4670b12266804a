"""Reading block by block and streaming encoding: the same samples as a whole read, codes that do not depend on
how the audio was cut, a shared codec used by interleaved runs, one sentence for damaged or cut-off files."""

import threading

import numpy as np
import pytest
import soundfile as sf
import torch
from test_audio import tone
from tiny_mimi import tiny_mimi

from moshi_ttt.data.audio import FRAME_SIZE, check_audio, load_audio, read_blocks
from moshi_ttt.data.stream import ENCODE_FRAMES, StreamEncoder, encode_blocks, encode_file, encode_streaming


@pytest.mark.parametrize("rate,channels", [(24000, 1), (44100, 2), (16000, 1)], ids=["24k", "44k_stereo", "16k"])
def test_blocks_give_the_whole_read_whatever_their_size(tmp_path, rate, channels):
    path = tmp_path / "clip.flac"
    sf.write(path, tone(7.3, rate, channels), rate)
    whole = load_audio(path).samples
    info = check_audio(path)
    for block_s in (0.37, 2.0, 10.0):
        torch.testing.assert_close(torch.cat(list(read_blocks(info, block_s))), whole, rtol=0, atol=0)
    assert info.num_samples == whole.shape[0] and info.num_frames == -(-whole.shape[0] // FRAME_SIZE)


def test_codes_do_not_depend_on_how_the_samples_arrive(tmp_path):
    samples = torch.from_numpy(tone(13.1, 24000)[:, 0])  # past the codec's 250-step (10 s) attention window
    mimi = tiny_mimi()
    reference = encode_streaming(mimi, samples)
    assert reference.shape == (1, 8, -(-samples.shape[0] // FRAME_SIZE))
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(samples.shape[0], size=40, replace=False))
    blocks = np.split(samples.numpy(), cuts)
    streamed = torch.cat(list(encode_blocks(mimi, [torch.from_numpy(b) for b in blocks])), dim=-1)
    assert torch.equal(streamed, reference)
    path = tmp_path / "clip.wav"
    sf.write(path, samples.numpy(), 24000, subtype="FLOAT")
    assert torch.equal(encode_file(mimi, check_audio(path)), reference)


def test_a_shared_codec_serves_interleaved_runs_with_their_own_state():
    mimi, lock = tiny_mimi(), threading.Lock()
    a, b = (torch.from_numpy(tone(6.3, 24000, freq=f)[:, 0]) for f in (220.0, 330.0))
    alone = [encode_streaming(mimi, x) for x in (a, b)]
    call = ENCODE_FRAMES * FRAME_SIZE
    with StreamEncoder(mimi, lock=lock) as first, StreamEncoder(mimi, lock=lock) as second:
        assert not mimi.is_streaming  # no run's state stays installed between calls
        codes = {0: [], 1: []}
        for start in range(0, a.shape[0], call // 2):  # alternate half calls
            codes[0] += list(first.push(a[start : start + call // 2]))
            codes[1] += list(second.push(b[start : start + call // 2]))
        codes[0].append(first.finish())
        codes[1].append(second.finish())
    for i in (0, 1):
        assert torch.equal(torch.cat(codes[i], dim=-1), alone[i])
    assert not mimi.is_streaming


def cut_off(path, fraction: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_damaged_and_cut_off_files_get_one_sentence(tmp_path):
    for suffix in ("wav", "flac"):
        path = tmp_path / f"cut.{suffix}"
        sf.write(path, tone(12.0, 16000), 16000)
        cut_off(path)
        with pytest.raises(ValueError, match=rf"^cut.{suffix} (ends early|could not be decoded after [0-9.]+ s)"):
            check_audio(path)
    damaged = tmp_path / "damaged.flac"
    sf.write(damaged, tone(12.0, 16000), 16000)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4000] = bytes(4000)
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"^damaged.flac could not be decoded after [0-9.]+ s: the audio data is"):
        check_audio(damaged)
    # A file damaged after it was checked fails in the middle of reading, with the same kind of sentence.
    later = tmp_path / "later.flac"
    sf.write(later, tone(12.0, 16000), 16000)
    info = check_audio(later)
    cut_off(later, 0.6)
    with pytest.raises(ValueError, match=r"^later.flac (ends early|could not be decoded after)"):
        list(read_blocks(info, 1.0))
