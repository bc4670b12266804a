"""Scoring: full == chunked == stream past the attention window, == LMModel.forward, and no state leak."""

import time

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CONTEXT, random_audio_codes, tiny_lm
from tolerances import FLOAT32, FLOAT64_STORED

from moshi_ttt import RunOptions, TTTConfig, apply_ttt, iter_score, score, ttt_blocks
from moshi_ttt.compat.sequence import model_codes

T = 45  # longer than the 16-token attention window of the tiny models


def ttt_lm(b: int, seed: int = 0, n_q: int = 8, **cfg):
    cfg = {"layers": "1,2", "base_lr": 1.0, "gating_alpha_init": 0.5, **cfg}
    return apply_ttt(tiny_lm(seed, n_q=n_q), TTTConfig(mini_batch_size=b, **cfg))


MODELS = {
    "baseline": lambda: tiny_lm(0),
    "baseline_16cb": lambda: tiny_lm(0, n_q=16),
    "ttt_b1": lambda: ttt_lm(1),
    "ttt_b4": lambda: ttt_lm(4),
    "ttt_b16": lambda: ttt_lm(16),
    "ttt_b4_16cb": lambda: ttt_lm(4, n_q=16),
}


def forward_loss(model, audio_codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [B, 8, T] straight from a non-streaming LMModel.forward, NaN where moshi's mask is False."""
    with torch.no_grad():
        out = model(model_codes(model, audio_codes))
    loss = F.cross_entropy(out.logits.flatten(0, 2).nan_to_num(), audio_codes.flatten(), reduction="none")
    return torch.where(out.mask, loss.view(audio_codes.shape), torch.nan)


def assert_same(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=atol, equal_nan=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_three_modes_agree_past_the_window_and_match_lm_forward(name):
    model = MODELS[name]()
    codes = random_audio_codes(2, T, seed=1)
    reference = forward_loss(model, codes)
    full = score(model, codes, "full")
    assert full.loss.shape == (2, 8, T) and full.loss.dtype == torch.float32
    assert_same(full.loss, reference)
    assert torch.equal(full.mask, ~reference.isnan())
    assert full.mask[:, 1:, -1].logical_not().all() and full.mask[:, 0].all()  # the delayed codebooks lose a step
    for chunk_size in (7, CONTEXT):
        assert_same(score(model, codes, "chunked", chunk_size).loss, full.loss)
    assert_same(score(model, codes, "stream").loss, full.loss)


@pytest.mark.parametrize("b", [1, 4, 16], ids=lambda b: f"b{b}")
def test_per_run_mini_batch_size_equals_a_model_built_with_it_and_leaves_the_model_alone(b):
    shared = ttt_lm(16)  # same seed: the same weights whatever the mini-batch size
    built = ttt_lm(b)
    codes = random_audio_codes(1, T, seed=2)
    before = score(shared, codes, "chunked", 7).loss
    for mode in ("full", "chunked", "stream"):
        assert_same(score(shared, codes, mode, 7 if mode == "chunked" else None, mini_batch_size=b).loss,
                    score(built, codes, "full").loss)  # fmt: skip
    assert all(block.cfg.mini_batch_size == 16 for block in ttt_blocks(shared).values())
    assert_same(score(shared, codes, "chunked", 7).loss, before, atol=0)


def test_scoring_a_then_b_gives_b_its_solo_losses():
    model = ttt_lm(4)
    a, b = random_audio_codes(1, T, seed=3), random_audio_codes(1, 30, seed=4)
    for mode in ("chunked", "stream", "full"):
        solo = score(model, b, mode, 7 if mode == "chunked" else None).loss
        score(model, a, mode, 7 if mode == "chunked" else None)
        after = score(model, b, mode, 7 if mode == "chunked" else None).loss
        torch.testing.assert_close(after, solo, rtol=0, atol=0, equal_nan=True, msg=lambda m, mode=mode: f"{mode}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rows_of_a_batch_are_scored_independently(dtype):
    f64 = dtype == torch.float64  # moshi's rms_norm_f32 and rope round a float64 model to float32 (tiny_models)
    norm = "rms_norm" if f64 else "rms_norm_f32"
    model = tiny_lm(0, dtype=dtype, norm=norm, positional_embedding="sin" if f64 else "rope")
    model = apply_ttt(model, TTTConfig(layers="1,2", mini_batch_size=4, gating_alpha_init=0.5, norm=norm))
    codes = random_audio_codes(3, T, seed=5)
    batch = score(model, codes, "chunked", 8).loss
    tol = FLOAT64_STORED if f64 else FLOAT32  # a batch of 3 vs 1: other matmul blocking, round-off only
    for row in range(3):
        solo = score(model, codes[row : row + 1], "chunked", 8).loss
        torch.testing.assert_close(solo, batch[row : row + 1], **tol, equal_nan=True)


def test_persistent_states_off_resets_the_fast_weights_every_attention_window():
    model = ttt_lm(4)
    codes = random_audio_codes(1, T, seed=6)
    on = score(model, codes, "chunked", 8).loss
    off = score(model, codes, "chunked", 8, persistent_states=False).loss  # reset every CONTEXT tokens
    assert_same(off[..., : CONTEXT - 1], on[..., : CONTEXT - 1])  # the first window (minus the one-step delay)
    assert not torch.allclose(off.nan_to_num(), on.nan_to_num())
    assert_same(score(model, codes, "full", persistent_states=False).loss, off)  # the same in every mode


def test_iter_score_yields_growing_prefixes_that_end_with_the_score():
    model = ttt_lm(4)
    codes = random_audio_codes(2, T, seed=7)
    results = list(iter_score(model, codes, "stream", record_every=10))
    done = [r.tokens_done for r in results]
    assert done == [10, 20, 30, 40, T]
    final = results[-1]
    assert final.complete and final.loss.shape == (2, 8, T)
    assert_same(final.loss, score(model, codes, "stream").loss, atol=0)
    for partial in results[:-1]:
        assert not partial.complete
        assert_same(partial.loss, final.loss[..., : partial.tokens_done], atol=0)
        assert len(partial.telemetry.layers[1].update_step) <= len(final.telemetry.layers[1].update_step)
    chunked = list(iter_score(model, codes, options=RunOptions(mode="chunked", chunk_size=16, record_every=10)))
    assert [r.tokens_done for r in chunked] == [15, 31, T]  # at chunk ends, minus the one-step delay
    assert_same(chunked[-1].loss, final.loss)
    assert final.loss_per_token.shape == (2, T) and final.tokens_per_s > 0


def test_elapsed_counts_the_scorers_own_work_only():
    """tokens_per_s of a run is its own: the caller's time between partial results (the app plots, or scores the
    other model interleaved) is not counted."""
    model = ttt_lm(4)
    codes = random_audio_codes(1, T, seed=3)
    pause_s = 0.05
    start = time.perf_counter()
    results = []
    for result in iter_score(model, codes, "stream", record_every=5):
        results.append(result)
        time.sleep(pause_s)  # the caller's own work between results
    wall = time.perf_counter() - start
    paused = pause_s * len(results)
    elapsed = [r.elapsed_s for r in results]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert elapsed[-1] <= wall - paused + 1e-3  # the pauses are left out
    assert results[-1].tokens_per_s == pytest.approx(T / elapsed[-1])


def test_bad_requests_are_clear_value_errors():
    model = tiny_lm(0)
    codes = random_audio_codes(1, 10)
    with pytest.raises(ValueError, match="mode must be one of"):
        score(model, codes, "fast")
    with pytest.raises(ValueError, match="exceeds the model's attention context \\(16 tokens\\)"):
        score(model, codes, "chunked", 17)
    with pytest.raises(ValueError, match="no audio codes"):
        score(model, codes[..., :0])
    with pytest.raises(ValueError, match="audio codebooks"):
        score(model, codes[:, :4])
    with pytest.raises(ValueError, match="either a RunOptions or separate options"):
        score(model, codes, "full", options=RunOptions())
    with pytest.raises(ValueError, match="eval mode"):
        score(model.train(), codes)
    model.eval()
    with model.streaming(1), pytest.raises(ValueError, match="already streaming"):
        score(model, codes)
    assert score(model, codes).telemetry is None  # no TTT layers: nothing to record


def test_default_chunks_hold_whole_ttt_mini_batches():
    """Chunked TTT scoring defaults to the largest multiple of the mini-batch that fits the attention window
    (whole inner-loop steps are faster; any chunking gives the same numbers)."""
    from moshi_ttt.scoring.teacher_forcing import _chunk_size

    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=5)).eval()
    assert _chunk_size(model, RunOptions(mode="chunked"), 100) == CONTEXT - CONTEXT % 5
    assert _chunk_size(model, RunOptions(mode="chunked", mini_batch_size=3), 100) == CONTEXT - CONTEXT % 3
    assert _chunk_size(model, RunOptions(mode="chunked", chunk_size=7), 100) == 7  # an explicit size is kept
    assert _chunk_size(tiny_lm(0).eval(), RunOptions(mode="chunked"), 100) == CONTEXT


def test_run_options_and_the_keyword_shortcuts_are_the_same_call():
    from moshi_ttt.options import run_options

    model = ttt_lm(4)
    codes = random_audio_codes(1, 20, seed=8)
    options = RunOptions(mode="chunked", chunk_size=8, reset_every=8)
    by_options = score(model, codes, options=options).loss
    assert_same(score(model, codes, mode="chunked", chunk_size=8, reset_every=8).loss, by_options, atol=0)
    assert_same(score(model, codes, "chunked", 8, persistent_states=False, reset_every=8).loss, by_options, atol=0)
    assert not torch.equal(score(model, codes, "chunked", 8).loss.nan_to_num(), by_options.nan_to_num())
    # One place resolves the defaults: shortcuts left at None are RunOptions' own.
    assert run_options() == RunOptions()
    assert run_options(mode="stream", telemetry=None, chunk_size=None) == RunOptions(mode="stream")
    assert run_options(options) is options
    with pytest.raises(ValueError, match="not both"):
        run_options(options, chunk_size=4)
    with pytest.raises(ValueError, match="unknown run options \\['chunks'\\]"):
        run_options(chunks=4)
    with pytest.raises(TypeError, match="options must be a RunOptions"):
        run_options({"mode": "full"})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": ["full"]}, "mode must be one of"),
        ({"chunk_size": 2.5}, "chunk_size must be a whole number >= 1, got 2.5"),
        ({"chunk_size": float("nan")}, "chunk_size must be a whole number"),
        ({"chunk_size": True}, "chunk_size must be a whole number"),
        ({"mini_batch_size": "4"}, "mini_batch_size must be a whole number"),
        ({"mini_batch_size": 0}, "mini_batch_size must be >= 1"),
        ({"reset_every": -3}, "reset_every must be >= 1"),
        ({"reset_every": 8, "persistent_states": True}, "persistent_states cannot be true"),
        ({"record_every": 0}, "record_every must be >= 1, got 0"),
        ({"persistent_states": "no"}, "persistent_states must be true, false or None"),
        ({"telemetry": 1}, "telemetry must be true or false"),
    ],
    ids=[
        "mode-list",
        "chunk-float",
        "chunk-nan",
        "chunk-bool",
        "b-string",
        "b-zero",
        "reset-negative",
        "reset-and-persistent",
        "record-zero",
        "persist-str",
        "telem-int",
    ],  # fmt: skip
)
def test_run_options_refuse_json_values_of_the_wrong_kind(options, message):
    with pytest.raises(ValueError, match=message):
        RunOptions(**options)
