"""Small Mimi-architecture codecs: built from moshi's own classes, saved as `config.json` + `model.safetensors`.

moshi's `loaders.get_mimi` rebuilds only Kyutai's full-size Mimi (its config has no place for other sizes we
save). These helpers rebuild any `MimiModel` with a SEANet encoder/decoder, optional projected transformers and a
`SplitResidualVectorQuantizer`, from a JSON config of the same shape as moshi's `_mimi_config`:

    {"format": "moshi-ttt-codec", "version": 1, "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
     "num_codebooks": 8, "seanet": {...SEANet kwargs}, "quantizer": {...SplitResidualVectorQuantizer kwargs},
     "transformer": {...ProjectedTransformer kwargs} or null}

The demo codec (scripts/build_demo_assets.py) is one of these: since v2 its encoder is distilled from fixed features
and its decoder trained (research/codec_distill.py; v3's encoder also on the LM's own training audio, for codes that
survive sub-frame shifts); v1's had a random encoder and k-means/EMA codebooks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from moshi.models.compression import MimiModel
from moshi.modules import SEANetDecoder, SEANetEncoder, transformer
from moshi.quantization import SplitResidualVectorQuantizer
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CODEC_FORMAT = "moshi-ttt-codec"
CODEC_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_REQUIRED = ("sample_rate", "channels", "frame_rate", "num_codebooks", "seanet", "quantizer")
_KNOWN = {"format", "version", "transformer", *_REQUIRED}


def _check_config(config: dict) -> None:
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"codec config lacks {missing}; expected the fields {sorted(_KNOWN)}")
    unknown = sorted(set(config) - _KNOWN)
    if unknown:
        raise ValueError(f"codec config has unknown fields {unknown}")
    if config.get("format", CODEC_FORMAT) != CODEC_FORMAT:
        raise ValueError(f"codec config format must be {CODEC_FORMAT!r}, got {config['format']!r}")
    if config.get("version", CODEC_VERSION) != CODEC_VERSION:
        raise ValueError(f"unsupported codec config version {config['version']!r}, expected {CODEC_VERSION}")
    n_q = config["quantizer"].get("n_q", 8)
    if not 1 <= config["num_codebooks"] <= n_q:
        raise ValueError(f"num_codebooks must be in [1, {n_q}] (the quantizer's n_q), got {config['num_codebooks']}")


def build_codec(config: dict, device: torch.device | str = "cpu") -> MimiModel:
    """A randomly initialised MimiModel (eval mode) for `config`, built like moshi's `loaders.get_mimi`.

    Args:
        config: the codec config described in the module docstring.
        device: where to build it.
    Returns:
        The codec, with `config["num_codebooks"]` codebooks active.
    Raises:
        ValueError: for a config with missing or unknown fields, or an impossible number of codebooks.
    """
    _check_config(config)
    encoder = SEANetEncoder(**config["seanet"])
    decoder = SEANetDecoder(**config["seanet"])
    encoder_transformer = decoder_transformer = None
    if config.get("transformer") is not None:
        encoder_transformer = transformer.ProjectedTransformer(device=device, **config["transformer"])
        decoder_transformer = transformer.ProjectedTransformer(device=device, **config["transformer"])
    quantizer = SplitResidualVectorQuantizer(**config["quantizer"])
    model = MimiModel(
        encoder,
        decoder,
        quantizer,
        channels=config["channels"],
        sample_rate=config["sample_rate"],
        frame_rate=config["frame_rate"],
        encoder_frame_rate=config["sample_rate"] / encoder.hop_length,
        causal=True,
        resample_method="conv",
        encoder_transformer=encoder_transformer,
        decoder_transformer=decoder_transformer,
    ).to(device=device)
    model.set_num_codebooks(config["num_codebooks"])
    return model.eval()


def save_codec(directory: str | Path, mimi: MimiModel, config: dict) -> Path:
    """Writes `config.json` and `model.safetensors` (all weights and codebook buffers, float32) to `directory`.

    Returns:
        The directory.
    """
    _check_config(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = {"format": CODEC_FORMAT, "version": CODEC_VERSION, **config}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in mimi.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": CODEC_FORMAT})
    (directory / CONFIG_NAME).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    logger.info("saved codec (%d tensors) to %s", len(tensors), directory)
    return directory


def is_codec_dir(path: str | Path) -> bool:
    """True for a directory written by `save_codec`."""
    path = Path(path)
    config = path / CONFIG_NAME
    if not path.is_dir() or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == CODEC_FORMAT
    except json.JSONDecodeError:
        return False


def load_codec(directory: str | Path, device: torch.device | str = "cpu") -> MimiModel:
    """Rebuilds a codec saved by `save_codec` (eval mode); every tensor must match by name and shape.

    Raises:
        FileNotFoundError: if the directory lacks config.json or model.safetensors.
        ValueError: for a config that is not ours, or weights that do not match it.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; a codec directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if config.get("format") != CODEC_FORMAT:
        raise ValueError(f"{config_path} is not a {CODEC_FORMAT} config (format={config.get('format')!r})")
    model = build_codec(config, device=device)
    state = load_file(str(weights_path), device=str(device))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights_path} does not match the codec config in {config_path}: {e}") from e
    return model.eval()
