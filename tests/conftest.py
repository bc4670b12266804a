"""Shared fixtures of the app tests: tiny codec and checkpoints on disk, a model cache, a launched app."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_codec import tiny_codec_config
from tiny_models import tiny_lm, tiny_lm_config

import app
from moshi_ttt import TTTConfig, apply_ttt, save
from moshi_ttt.app.models import ModelCache, build_allow_list
from moshi_ttt.data.codec import build_codec, save_codec

# Tiny models: one thread beats OpenMP's overhead on their small ops (and on a busy 2-core machine, by far).
torch.set_num_threads(1)

SR = 24_000


def free_port() -> int:
    """A TCP port nobody listens on now (Gradio's own scan from 7860 can meet another process's test server)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    y = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / SR) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (y + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty local Hugging Face Hub cache in offline mode, as HF_HOME=... HF_HUB_OFFLINE=1 give (huggingface_hub
    reads both at each call): the real hf:// code paths, no network, never the user's own cache."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_hub_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def raw_values(specs: dict, **given) -> list:
    """The Run event's raw values in the order of `specs`: those `given` by name, the others the controls' defaults
    (the audio has none: None)."""
    unknown = set(given) - set(specs)
    assert not unknown, f"no such input: {unknown}"
    return [given[name] if name in given else getattr(spec, "default", None) for name, spec in specs.items()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    config = tiny_codec_config(transformer=False)
    torch.manual_seed(0)
    save_codec(root / "codec", build_codec(config), config)
    card = config["quantizer"]["bins"]
    lm_config = tiny_lm_config(card=card)
    save(root / "checkpoints" / "baseline", tiny_lm(0, card=card), lm_config=lm_config, mimi_ref="../../codec")
    ttt = apply_ttt(tiny_lm(0, card=card), TTTConfig(layers="1,2", mini_batch_size=4, gating_alpha_init=0.5))
    save(root / "checkpoints" / "ttt", ttt, lm_config=lm_config, mimi_ref="../../codec")
    other = tiny_lm(0, card=card + 1)
    save(root / "other" / "wide_vocab", other, lm_config=tiny_lm_config(card=card + 1), mimi_ref="../../codec")
    for name, seconds, seed in (("a.wav", 3.0, 1), ("b.wav", 2.2, 2)):
        sf.write(root / name, speechlike(seconds, seed), SR)
    (root / "garbage.wav").write_bytes(b"this is not audio at all" * 10)
    return root


@pytest.fixture(scope="module")
def cache(assets) -> ModelCache:
    return ModelCache(build_allow_list([assets / "checkpoints", assets / "other"], use_env=False))


@pytest.fixture(scope="module")
def server(cache, assets):
    demo = app.build_demo(cache, [str(assets / "a.wav")])
    demo.queue(default_concurrency_limit=2)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    yield url
    demo.close()
