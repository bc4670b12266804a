"""Scoring codes as they arrive (iter_score_blocks / BlockScorer): the numbers of `score` on the whole tensor, for any
cut of the blocks, while holding only a chunk's worth of codes."""

import pytest
import torch
from tiny_models import random_audio_codes, tiny_lm

from moshi_ttt import RunOptions, TTTConfig, apply_ttt, score
from moshi_ttt.scoring.teacher_forcing import BlockScorer, iter_score_blocks

T = 61  # past the tiny models' 16-token window several times, not a multiple of any chunk


def ttt_lm(b: int = 4):
    return apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=b, gating_alpha_init=0.5))


def cut(codes: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """codes [B, K, T] in consecutive blocks of the given sizes (the last takes the rest)."""
    blocks, start = [], 0
    for size in sizes:
        blocks.append(codes[..., start : start + size])
        start += size
    return [*blocks, codes[..., start:]]


CUTS = {"one_block": [], "ones": [1] * 60, "uneven": [3, 17, 1, 25, 2], "empty_blocks": [0, 5, 0, 30]}


@pytest.mark.parametrize("cuts", CUTS.values(), ids=CUTS.keys())
@pytest.mark.parametrize("mode", ["chunked", "stream", "full"])
@pytest.mark.parametrize("model_fn", [lambda: tiny_lm(0), ttt_lm], ids=["baseline", "ttt_b4"])
def test_blocks_score_like_the_whole_tensor(model_fn, mode, cuts):
    model = model_fn()
    codes = random_audio_codes(2, T, seed=3)
    options = RunOptions(mode=mode, chunk_size=8 if mode == "chunked" else None)
    whole = score(model, codes, options=options)
    *partials, final = iter_score_blocks(model, cut(codes, cuts), options=options, expected_tokens=T)
    torch.testing.assert_close(final.loss, whole.loss, rtol=0, atol=1e-5, equal_nan=True)
    assert torch.equal(final.mask, whole.mask) and final.complete and final.total_tokens == T
    if whole.telemetry is not None:
        for layer, tel in whole.telemetry.layers.items():
            got = final.telemetry.layers[layer]
            assert torch.equal(got.update_step, tel.update_step)
            torch.testing.assert_close(got.drift["W1"], tel.drift["W1"], rtol=1e-4, atol=1e-6)
    for partial in partials:  # growing prefixes of the final numbers, never "complete"
        assert not partial.complete and partial.total_tokens == T
        torch.testing.assert_close(partial.loss, final.loss[..., : partial.tokens_done], rtol=0, atol=0, equal_nan=True)
    assert not model.transformer.is_streaming  # the session was left


def test_the_scorer_holds_only_the_codes_a_chunk_still_needs():
    model = ttt_lm()
    codes = random_audio_codes(1, 200, seed=1)
    with BlockScorer(model, RunOptions(mode="chunked", chunk_size=8)) as scorer:
        for block in cut(codes, [5] * 39):
            list(scorer.push(block))
            assert scorer.window.shape[-1] <= 8 + 5 + max(model.delays) + 1  # chunk + block + history
            assert sum(out.shape[1] for out, _ in scorer.pending) <= 256  # DEPTH_GROUP
        result = scorer.finish()
    torch.testing.assert_close(result.loss, score(model, codes, "chunked", 8).loss, rtol=0, atol=1e-5, equal_nan=True)


def test_partial_results_come_every_record_every_tokens_without_knowing_the_length():
    model = tiny_lm(0)
    codes = random_audio_codes(1, 50, seed=2)
    results = list(iter_score_blocks(model, cut(codes, [7] * 7), options=RunOptions(mode="stream", record_every=10)))
    assert [r.tokens_done for r in results] == [10, 20, 30, 40, 50]
    assert all(r.total_tokens > r.tokens_done for r in results[:-1]) and results[-1].complete


def test_blocks_that_do_not_fit_are_refused():
    model = tiny_lm(0)
    with pytest.raises(ValueError, match="no audio codes"):
        list(iter_score_blocks(model, []))
    with pytest.raises(ValueError, match="batch size 1"):
        list(iter_score_blocks(model, [random_audio_codes(1, 4), random_audio_codes(2, 4)]))
    assert not model.transformer.is_streaming  # left cleanly after an error
    with pytest.raises(ValueError, match="announced"):
        with BlockScorer(model, RunOptions(), total_tokens=5) as scorer:
            list(scorer.push(random_audio_codes(1, 6)))
