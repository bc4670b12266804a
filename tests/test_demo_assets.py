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


def test_the_demo_readings_start_off_the_codec_frame_grid():
    """demo_repeat.wav is made the way users make audio: each reading starts at an arbitrary sample (issue 21), not
    on a boundary of the codec's 80 ms frames, where the codes would repeat exactly."""
    from moshi_ttt.reports.headline import readings_for

    starts = [round(r.start_s * 24000) for r in readings_for(DEMO / "demo_repeat.wav")]
    assert len(starts) == 3 and all(s % 1920 for s in starts), starts


def test_sha256sums_lists_every_asset_and_the_assets_stay_small():
    import hashlib

    listed = dict(line.split("  ")[::-1] for line in (DEMO / "SHA256SUMS").read_text().splitlines())
    files = {str(p.relative_to(DEMO)): p for p in DEMO.rglob("*") if p.is_file()}
    assert set(listed) == set(files) - {"MANIFEST.md", "SHA256SUMS"}
    for name, digest in listed.items():
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == digest, name
    assert sum(p.stat().st_size for p in files.values()) <= 25e6
