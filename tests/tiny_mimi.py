"""A tiny random Mimi codec built from moshi's own classes (fast on CPU; the same frame rate as the real one)."""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.models.compression import MimiModel  # noqa: E402
from moshi.modules import SEANetDecoder, SEANetEncoder, transformer  # noqa: E402
from moshi.quantization import SplitResidualVectorQuantizer  # noqa: E402


def tiny_mimi(seed: int = 0, *, bins: int = 24, num_codebooks: int = 8) -> MimiModel:
    """Mimi with moshi's strides (24 kHz, 1920-sample frames, 12.5 Hz) and tiny widths; random weights."""
    torch.manual_seed(seed)
    dim = 16
    seanet = {
        "channels": 1,
        "dimension": dim,
        "causal": True,
        "n_filters": 2,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    }
    tr = {
        "d_model": dim,
        "num_heads": 2,
        "num_layers": 1,
        "causal": True,
        "layer_scale": 0.01,
        "context": 250,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 32,
        "input_dimension": dim,
        "output_dimensions": [dim],
    }
    encoder, decoder = SEANetEncoder(**seanet), SEANetDecoder(**seanet)
    quantizer = SplitResidualVectorQuantizer(
        dimension=8, n_q=num_codebooks, bins=bins, input_dimension=dim, output_dimension=dim
    )
    mimi = MimiModel(
        encoder,
        decoder,
        quantizer,
        channels=1,
        sample_rate=24000,
        frame_rate=12.5,
        encoder_frame_rate=24000 / encoder.hop_length,
        causal=True,
        resample_method="conv",
        encoder_transformer=transformer.ProjectedTransformer(**tr),
        decoder_transformer=transformer.ProjectedTransformer(**tr),
    )
    # moshi's codebooks start at zero (filled by k-means in training): give them random centroids instead.
    for name, buffer in mimi.named_buffers():
        if name.endswith("embedding_sum"):
            buffer.normal_(0.0, 0.01)
    mimi.set_num_codebooks(num_codebooks)
    return mimi.eval()
