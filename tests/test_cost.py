"""Scoring-time estimates (moshi_ttt.scoring.cost) and the CLI's defaults at real size."""

import pytest
import torch

from moshi_ttt import evaluate
from moshi_ttt.data.checkpoints.common import resolve_dtype
from moshi_ttt.scoring.cost import MEASURED, scoring_seconds, seconds_per_token


def test_measured_points_come_back_and_sizes_between_them_interpolate():
    for point in MEASURED:
        assert seconds_per_token(point.params, "cpu", point.dtype, point.threads) == pytest.approx(
            point.seconds_per_token
        )
    bf16 = sorted((m for m in MEASURED if m.dtype == torch.bfloat16), key=lambda m: m.params)
    small, large = bf16[0], bf16[-1]
    # Moshi 7B costs more than the largest measured model, in proportion; twice the threads, half the time.
    assert seconds_per_token(2 * large.params, "cpu", torch.bfloat16, large.threads) == pytest.approx(
        2 * large.seconds_per_token
    )
    assert seconds_per_token(small.params, "cpu", torch.bfloat16, 2 * small.threads) == pytest.approx(
        small.seconds_per_token / 2
    )
    assert seconds_per_token(1_000, "cuda", torch.bfloat16) is None  # never measured: no made-up figure


def test_dtype_auto_is_float32_below_4e9_parameters_and_bfloat16_above_on_every_device():
    moshi_7b = {"dim": 4096, "num_layers": 32, "n_q": 16, "card": 2048}
    demo = {"dim": 128, "num_layers": 3, "n_q": 8, "card": 256}
    assert resolve_dtype(None, moshi_7b, "cpu") == torch.bfloat16
    assert resolve_dtype(None, demo, "cpu") == torch.float32
    assert resolve_dtype(None, demo, "cuda") == torch.float32  # the demo models stay float32 on a GPU too
    assert resolve_dtype(None, moshi_7b, "cuda") == torch.bfloat16
    assert resolve_dtype(torch.float32, moshi_7b, "cuda") == torch.float32  # an explicit dtype always wins


def test_cli_defaults_and_the_cpu_time_note(tmp_path):
    args = evaluate.build_parser().parse_args(["--audio", "a.wav", "--out", str(tmp_path)])
    assert args.dtype == "auto" and evaluate.DTYPES["auto"] is None
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    small = torch.nn.Linear(8, 8)
    assert evaluate._cpu_time_note([small], None, "cpu") is None  # demo-sized: nothing to warn about
    big = torch.nn.Linear(100_000, 50_000, device="meta", dtype=torch.bfloat16)  # 5e9 parameters, no memory
    note = evaluate._cpu_time_note([big, big], [tmp_path / "missing.wav"], "cpu")
    expected = scoring_seconds([big, big], 1, "cpu") * 12.5  # 12.5 tokens per second of audio
    assert note is not None and f"about {expected:.0f} s per second of audio" in note and "(0 s)" in note
    assert scoring_seconds([big], 100, "cpu") == pytest.approx(
        100 * seconds_per_token(5_000_050_000, "cpu", torch.bfloat16)
    )


def test_an_explicit_bfloat16_loads_a_small_model_in_bfloat16_with_float32_fast_weights(assets):
    """dtype auto would give float32 to the demo-sized models; asking for bfloat16 still gives it, and the TTT
    fast weights stay float32 (the inner loop's numerics), and the model scores."""
    from moshi_ttt import load, score
    from moshi_ttt.ttt.apply import ttt_blocks
    from moshi_ttt.ttt.layer import FLOAT32_PARAMS

    ckpt = load(assets / "checkpoints" / "ttt", dtype=torch.bfloat16, share=False)
    assert resolve_dtype(None, ckpt.lm_config, "cpu") == torch.float32  # what auto would have chosen
    blocks = ttt_blocks(ckpt.model)
    assert blocks
    for block in blocks.values():
        for name, param in block.named_parameters(recurse=False):
            assert param.dtype == (torch.float32 if name in FLOAT32_PARAMS else torch.bfloat16), name
    assert ckpt.model.text_emb.weight.dtype == torch.bfloat16  # the rest of the model is bfloat16
    codes = torch.randint(0, ckpt.lm_config["card"], (1, ckpt.model.dep_q, 20))  # [B, K, T] audio codes
    result = score(ckpt.model, codes, mode="chunked")
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss[result.mask]).all()
