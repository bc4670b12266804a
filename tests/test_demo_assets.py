"""The shipped demo assets: they load offline, and the three scoring modes agree on their codes of real speech."""

from pathlib import Path

import pytest
import torch

from moshi_ttt import load, score
from moshi_ttt.data.audio import encode, load_audio

DEMO = Path(__file__).resolve().parent.parent / "demo_assets"


@pytest.fixture(scope="module")
def demo():
    models = {name: load(DEMO / name, load_mimi=True) for name in ("fair_baseline", "ttt")}
    audio = load_audio(DEMO / "demo_repeat.wav")
    codes = encode(models["ttt"].mimi, audio)[..., :120]  # 9.6 s of espeak speech, past the 50-token window
    return models, codes


def test_demo_checkpoints_share_one_codec_and_the_ttt_one_has_ttt(demo):
    models, codes = demo
    assert models["ttt"].mimi_ref == models["fair_baseline"].mimi_ref
    assert models["ttt"].ttt_config is not None and models["fair_baseline"].ttt_config is None
    assert codes.shape == (1, 8, 120) and models["ttt"].model.context < 120


@pytest.mark.parametrize("name", ["fair_baseline", "ttt"])
def test_three_modes_agree_on_codes_of_speech(demo, name):
    models, codes = demo
    model = models[name].model
    full = score(model, codes, "full").loss
    for mode in ("chunked", "stream"):
        torch.testing.assert_close(score(model, codes, mode).loss, full, rtol=0, atol=1e-4, equal_nan=True)
