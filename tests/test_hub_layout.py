"""Moshi at real width from an offline Hub cache: the path of bench/hub_7b.py on a 7B-width, 2-layer model.

kyutai's Hub layout (model.safetensors in bfloat16 with moshi's LM kwargs, the Mimi file, the text tokenizer,
config.json) with random weights, in an offline local Hugging Face cache; a TTT checkpoint of ours whose config names
hf://kyutai/moshiko-pytorch-bf16 as its base. The CLI (baseline loaded first) and the app's scoring path (TTT
checkpoint first) run offline and hold one copy of the base; the three scoring modes agree in bfloat16 at width 4096.
Moshi 7B's kwargs except 2 temporal layers and 1 depth layer: 0.9e9 parameters, 1.8 GB on disk.
"""

import json

import pytest
import soundfile as sf
import torch

from bench.hub_7b import SPEECH, drive_run_handler
from bench.hub_cache import write_moshi_repo, write_ttt_checkpoint
from moshi_ttt import evaluate, load, score
from moshi_ttt.app.engine import compare_file, live_options
from moshi_ttt.app.models import ModelCache, build_allow_list
from moshi_ttt.compat.moshi import default_lm_kwargs
from moshi_ttt.data.checkpoints import weight_bytes
from moshi_ttt.ttt.apply import ttt_blocks

BASE = "hf://kyutai/moshiko-pytorch-bf16"
CONFIG = {**default_lm_kwargs(), "num_layers": 2, "depformer_num_layers": 1}
SECONDS = 1.0  # of speech: 13 tokens
# bfloat16 scoring, full vs chunked vs stream: the chunkings change the matmul shapes, so the order of the sums, and
# each bfloat16 activation carries 2^-8 relative rounding through 2 layers and the depth transformer. Measured on
# these random weights: 0.015 at most, on per-token losses of 6.1 to 9.7 (mean 7.9). What a bug would move is larger:
# the TTT branch itself (gate 0.1) moves them by 0.16, other audio 5 tokens earlier by 2.2.
BF16_ATOL = 0.05


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_layout")
    write_moshi_repo(root / "hf_cache", CONFIG, dtype=torch.bfloat16)
    write_ttt_checkpoint(root / "ttt", BASE, CONFIG, layers="1", dtype=torch.bfloat16, mini_batch_size=4)
    samples, rate = sf.read(SPEECH, dtype="float32", frames=int(SECONDS * 24_000))
    sf.write(root / "speech.wav", samples, rate)
    return root


@pytest.fixture
def offline(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_cli_scores_the_hub_layout_offline_holding_one_base(offline, monkeypatch):
    loaded = {}
    load_checkpoint = evaluate._load_checkpoint

    def keep(ref, device, dtype):
        loaded[ref] = load_checkpoint(ref, device, dtype)
        return loaded[ref]

    monkeypatch.setattr(evaluate, "_load_checkpoint", keep)
    ttt_ref = str(offline / "ttt")
    argv = ["--audio", str(offline / "speech.wav"), "--baseline", BASE, "--ttt", ttt_ref, "--dtype", "bfloat16"]
    assert evaluate.main([*argv, "--device", "cpu", "--mode", "full", "--out", str(offline / "out")]) == 0
    baseline, ttt = loaded[BASE].model, loaded[ttt_ref].model
    assert not ttt_blocks(baseline) and list(ttt_blocks(ttt)) == [1]
    ttt_bytes = sum(t.numel() * t.element_size() for n, t in ttt.state_dict().items() if ".ttt." in n)
    assert weight_bytes(baseline, ttt) == weight_bytes(baseline) + ttt_bytes <= 1.10 * weight_bytes(baseline)
    results = json.loads(next((offline / "out").glob("*/results.json")).read_text())
    assert results["config"]["dtype"] == "bfloat16"
    for run in results["runs"].values():
        assert run["tokens"] == 13 and 0 < run["mean_loss"] < 20


def test_app_path_loads_the_ttt_checkpoint_first_and_holds_one_base(offline):
    allow = build_allow_list([offline / "ttt"], [BASE], use_env=False)
    cache = ModelCache(allow, device="cpu", dtype=torch.bfloat16)
    ttt = cache.get("ttt")  # loads the base from the cache, then its TTT tensors
    baseline = cache.get("kyutai/moshiko-pytorch-bf16")  # takes the base's tensors: nothing read
    assert weight_bytes(baseline.model, ttt.model) <= 1.10 * weight_bytes(baseline.model)
    assert baseline.mimi is ttt.mimi  # one codec for both
    updates = list(
        compare_file(
            cache, str(offline / "speech.wav"), "kyutai/moshiko-pytorch-bf16", "ttt", live_options("chunked"), 60
        )
    )
    runs = updates[-1].document["runs"]
    assert set(runs) == {"baseline", "ttt"} and all(r["tokens"] == 13 for r in runs.values())


def test_three_modes_agree_at_7b_width_in_bfloat16(offline):
    model = load(str(offline / "ttt"), dtype=torch.bfloat16).model
    codes = torch.randint(0, model.card, (1, 8, 10), generator=torch.Generator().manual_seed(0))
    full = score(model, codes, "full", telemetry=False).loss
    chunked = score(model, codes, "chunked", chunk_size=3, telemetry=False).loss  # chunks across mini-batches of 4
    stream = score(model, codes, "stream", telemetry=False).loss
    assert full.isfinite().sum() == 8 * 10 - 7  # the 7 delayed codebooks lose their last step
    for other in (chunked, stream):
        torch.testing.assert_close(other, full, rtol=0, atol=BF16_ATOL, equal_nan=True)


def test_the_run_handler_serves_the_hub_layout_as_a_space_would(offline, monkeypatch, tmp_path):
    """bench/hub_7b.py's handler step: the baseline named by MOSHI_TTT_HUB_CHECKPOINTS, both models loaded at
    start-up, the Run button's handler called as the page calls it; one copy of the base."""
    monkeypatch.setenv("MOSHI_TTT_HUB_CHECKPOINTS", BASE)
    report = drive_run_handler(offline / "ttt", offline / "speech.wav", tmp_path / "runs", torch.bfloat16)
    assert [x["ref"] for x in report["loads"]] == [str((offline / "ttt").resolve()), BASE]
    assert report["ratio_to_one_model"] <= 1.10
    assert set(report["runs"]) == {"baseline", "ttt"}
    assert all(r["tokens"] == 13 and r["tokens_per_s"] > 0 for r in report["runs"].values())
