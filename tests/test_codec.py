"""Small Mimi-architecture codecs: build, k-means codebooks, save/load round trip, encode shapes."""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moshi_ttt.data.codec import build_codec, is_codec_dir, load_codec, save_codec  # noqa: E402

FRAME = 1920  # samples per frame at 24 kHz and 12.5 Hz


def tiny_codec_config(transformer: bool = True) -> dict:
    """A Mimi-shaped codec config (SEANet ratios of Mimi: 960 samples per encoder frame, conv downsample x2)."""
    dim = 16
    config = {
        "sample_rate": 24000,
        "channels": 1,
        "frame_rate": 12.5,
        "num_codebooks": 8,
        "seanet": {
            "channels": 1, "dimension": dim, "causal": True, "n_filters": 2, "n_residual_layers": 1,
            "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
            "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
            "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True,
        },
        "quantizer": {"dimension": 8, "n_q": 8, "bins": 16, "input_dimension": dim, "output_dimension": dim},
        "transformer": None,
    }  # fmt: skip
    if transformer:
        config["transformer"] = {
            "d_model": dim, "num_heads": 2, "num_layers": 1, "causal": True, "layer_scale": 0.01, "context": 25,
            "conv_layout": True, "max_period": 10000, "gating": "none", "norm": "layer_norm",
            "positional_embedding": "rope", "dim_feedforward": 32, "input_dimension": dim,
            "output_dimensions": [dim],
        }  # fmt: skip
    return config


def fit_codebooks(mimi, audio: torch.Tensor, passes: int = 10) -> None:
    """moshi's own k-means init + EMA: each training-mode pass initialises one more residual level."""
    with torch.no_grad():
        emb = mimi._encode_to_unquantized_latent(audio)  # [B, D, frames]
        mimi.quantizer.train()
        for _ in range(passes):
            mimi.quantizer(emb, mimi.frame_rate)
        mimi.quantizer.eval()


@pytest.mark.parametrize("transformer", [True, False], ids=["with-transformer", "seanet-only"])
def test_codec_round_trip(tmp_path, transformer):
    torch.manual_seed(0)
    config = tiny_codec_config(transformer)
    mimi = build_codec(config)
    audio = torch.randn(2, 1, 6 * FRAME) * 0.1
    fit_codebooks(mimi, audio)
    with torch.no_grad():
        codes = mimi.encode(audio)
    assert codes.shape == (2, 8, 6)
    assert int(codes.min()) >= 0 and int(codes.max()) < 16

    save_codec(tmp_path / "codec", mimi, config)
    assert is_codec_dir(tmp_path / "codec")
    assert json.loads((tmp_path / "codec" / "config.json").read_text())["format"] == "moshi-ttt-codec"
    loaded = load_codec(tmp_path / "codec")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(audio), codes, rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(codes), mimi.decode(codes))
    assert loaded.decode(codes).shape == (2, 1, 6 * FRAME)


def test_load_codec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_codec(tmp_path)
    config = tiny_codec_config(False)
    save_codec(tmp_path / "codec", build_codec(config), config)
    bad = dict(config, quantizer={**config["quantizer"], "bins": 32})
    (tmp_path / "codec" / "config.json").write_text(json.dumps({"format": "moshi-ttt-codec", **bad}))
    with pytest.raises(ValueError, match="does not match"):
        load_codec(tmp_path / "codec")
    with pytest.raises(ValueError, match="unknown fields"):
        build_codec({**config, "colour": "red"})
