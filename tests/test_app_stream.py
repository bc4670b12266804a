"""The app's live mode streams: a block is encoded, scored and shown before the rest of the file is read, and the
numbers are those of the reference (streamed) codes."""

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SR, speechlike

from moshi_ttt import score
from moshi_ttt.app.engine import compare_file, live_options
from moshi_ttt.data.audio import load_audio
from moshi_ttt.data.stream import ENCODE_FRAMES, encode_streaming


@pytest.mark.parametrize("mode", ["chunked", "stream"])
def test_the_first_update_comes_before_the_file_is_encoded(cache, tmp_path, monkeypatch, mode):
    clip = tmp_path / "long.wav"
    sf.write(clip, speechlike(12.0, 3), SR)  # 150 tokens: 6 encode calls of 25 frames
    mimi = cache.get("baseline").mimi
    calls = []
    real = mimi.encode
    monkeypatch.setattr(mimi, "encode", lambda x: calls.append(x.shape[-1]) or real(x))
    updates = []
    for update in compare_file(cache, str(clip), "baseline", "ttt", live_options(mode), 60, min_interval_s=0):
        updates.append((update.tokens_done, len(calls)))
        assert update.total_tokens == 150
    first_done, calls_then = updates[0]
    assert 0 < first_done < 150 and calls_then <= 2  # scored and shown after a block or two, not the whole file
    assert len(calls) == 6 and set(calls) == {ENCODE_FRAMES * 1920}  # every call the same shape
    assert not mimi.is_streaming  # the codec's session was left
    monkeypatch.setattr(mimi, "encode", real)
    doc = update.document
    codes = encode_streaming(mimi, load_audio(clip))
    model = cache.get("ttt").model
    expected = score(model, codes, "stream").loss[0].nanmean(dim=0)
    got = torch.tensor([np.nan if v is None else v for v in doc["runs"]["ttt"]["loss_per_token"]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, equal_nan=True)
    assert doc["audio"]["tokens"] == 150


def test_a_stop_in_the_middle_leaves_the_codec_free(cache, tmp_path):
    clip = tmp_path / "long.wav"
    sf.write(clip, speechlike(12.0, 4), SR)
    seen = []
    stop = lambda: len(seen) >= 1  # noqa: E731
    for update in compare_file(cache, str(clip), "baseline", "ttt", live_options("stream"), 60, stop_requested=stop,
                               min_interval_s=0):  # fmt: skip
        seen.append(update)
    assert seen[-1].stopped and seen[-1].tokens_done < 150
    assert not cache.get("baseline").mimi.is_streaming
    *_, again = compare_file(cache, str(clip), "baseline", "ttt", live_options("chunked"), 60)  # the codec works again
    assert again.document["audio"]["tokens"] == 150
