"""The text and user streams of scoring: greedy text == moshi's LMGen with the audio forced, every text stream and a
user stream give the same numbers in the three modes and match LMModel.forward, a given text is scored."""

import pytest
import torch
import torch.nn.functional as F
from moshi.models.lm import LMGen
from tiny_models import random_audio_codes, tiny_lm

from moshi_ttt import RunOptions, TTTConfig, apply_ttt, score
from moshi_ttt.compat.sequence import depformer_targets, model_codes
from moshi_ttt.options import TEXT_STREAMS
from moshi_ttt.scoring.text_stream import greedy_text

T = 45  # past the 16-token attention window of the tiny models


def ttt_lm(n_q: int = 8, persistent: bool = True):
    cfg = TTTConfig(layers="1,2", mini_batch_size=4, base_lr=1.0, gating_alpha_init=0.5, persistent_states=persistent)
    return apply_ttt(tiny_lm(0, n_q=n_q), cfg)


MODELS = {
    "baseline": lambda: tiny_lm(0),
    "ttt": lambda: ttt_lm(),
    "baseline_16cb": lambda: tiny_lm(0, n_q=16),
    "ttt_16cb": lambda: ttt_lm(n_q=16),
}


def user_codes_for(model, batch: int, steps: int):
    return random_audio_codes(batch, steps, seed=11) if model.num_audio_codebooks > model.dep_q else None


def lmgen_text(model, audio_codes: torch.Tensor, user_codes: torch.Tensor | None) -> torch.Tensor:
    """moshi's own LMGen, greedy (use_sampling=False), with the Moshi-stream audio forced through
    `depformer_replace_tokens` (the delayed codes: LMGen's depth transformer emits step t - delay of codebook k at
    step t) and the user stream given as its input: the text tokens of its on_text_hook, [B, T].

    LMGen reads the user frame it is given at step t in the same step, where LMModel.forward (training, and our
    scoring) reads it one step later; the user stream goes in one step late so that both read the same inputs."""
    B, K, steps = audio_codes.shape
    delayed = depformer_targets(model, model_codes(model, audio_codes))[:, 1 : 1 + K]  # [B, K, T]
    if user_codes is None:
        user = torch.zeros(B, 0, steps, dtype=torch.long)
    else:  # [B, K, T]: step t holds user step t - 1 (step 0: never read, LMGen gives the initial token there)
        user = torch.cat([user_codes[:, :, :1], user_codes[:, :, :-1]], dim=2)
    tokens = []
    gen = LMGen(model, use_sampling=False, on_text_hook=lambda token: tokens.append(token.clone()))
    with gen.streaming(B):
        for t in range(steps):
            gen.step(user[:, :, t : t + 1], depformer_replace_tokens=delayed[:, :, t : t + 1])
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_text_equals_lmgen_with_the_audio_forced(name):
    model = MODELS[name]()
    codes = random_audio_codes(2, T, seed=1)
    user = user_codes_for(model, 2, T)
    ours = greedy_text(model, codes, user_codes=user)
    oracle = lmgen_text(model, codes, user)  # LMGen last: it marks the model as detached from outer streaming
    assert ours.shape == (2, T)
    assert torch.equal(ours, oracle)
    assert len(ours.unique()) > 2  # the tiny model's monologue varies: the comparison means something
    # Fed back, not a per-step argmax under padding: the padding stream's argmax differs.
    with torch.no_grad():
        padded = model(model_codes(model, codes, user_codes=user)).text_logits[:, 0].argmax(-1)
    assert not torch.equal(padded, ours)


def forward_losses(model, audio_codes, text_tokens=None, user_codes=None):
    """Audio [B, 8, T] and text [B, T] cross-entropy of a non-streaming LMModel.forward, NaN where moshi masks."""
    codes = model_codes(model, audio_codes, text_tokens, user_codes)
    with torch.no_grad():
        out = model(codes)
    audio = F.cross_entropy(out.logits.flatten(0, 2).nan_to_num(), audio_codes.flatten(), reduction="none")
    audio = torch.where(out.mask, audio.view(audio_codes.shape), torch.nan)
    target = codes[:, 0].flatten().clamp_min(0)  # the zero token (-1) is masked below
    text = F.cross_entropy(out.text_logits.flatten(0, 2).nan_to_num(), target, reduction="none")
    text = torch.where(out.text_mask[:, 0], text.view(codes[:, 0].shape), torch.nan)
    return audio, text


def assert_same(a, b, atol=1e-4):
    torch.testing.assert_close(a, b, rtol=0, atol=atol, equal_nan=True)


@pytest.mark.parametrize("stream", TEXT_STREAMS)
@pytest.mark.parametrize("name", ["ttt", "ttt_16cb"])
def test_three_modes_agree_and_match_lm_forward_with_every_text_stream(name, stream):
    model = MODELS[name]()
    codes = random_audio_codes(2, T, seed=2)
    user = user_codes_for(model, 2, T)
    text = torch.randint(0, model.text_card, (2, T), generator=torch.Generator().manual_seed(3))
    text[0, 5:9] = model.zero_token_id  # a gap in the transcript: not scored
    given = text if stream == "transcript" else None
    full = score(model, codes, "full", text_stream=stream, text_tokens=given, user_codes=user)
    for result in (
        score(model, codes, "chunked", 7, text_stream=stream, text_tokens=given, user_codes=user),
        score(model, codes, "stream", text_stream=stream, text_tokens=given, user_codes=user),
    ):
        assert_same(result.loss, full.loss)
        assert torch.equal(result.text_tokens, full.text_tokens)
        if stream == "transcript":
            assert_same(result.text_loss, full.text_loss)
        else:
            assert result.text_loss is None
    expected_text = {
        "padding": torch.full((2, T), model.text_padding_token_id),
        "zero": torch.full((2, T), model.zero_token_id),
        "greedy": greedy_text(model, codes, user_codes=user),
        "transcript": text,
    }[stream]
    assert torch.equal(full.text_tokens, expected_text)
    audio_ref, text_ref = forward_losses(model, codes, expected_text, user)
    assert_same(full.loss, audio_ref)
    if stream == "transcript":
        assert_same(full.text_loss, text_ref)
        assert full.text_loss[0, 5:9].isnan().all() and full.text_loss[1].isfinite().all()


def test_the_text_stream_changes_the_audio_losses():
    model = ttt_lm()
    codes = random_audio_codes(1, T, seed=4)
    means = {s: score(model, codes, text_stream=s).loss.nanmean().item() for s in ("padding", "zero", "greedy")}
    assert len({round(v, 6) for v in means.values()}) == 3, means


def test_a_user_stream_is_read_and_changes_the_moshi_stream_losses():
    model = ttt_lm(n_q=16)
    codes, user = random_audio_codes(1, T, seed=5), random_audio_codes(1, T, seed=6)
    with_user = score(model, codes, "chunked", 8, user_codes=user).loss
    assert_same(with_user, forward_losses(model, codes, user_codes=user)[0])
    assert not torch.allclose(with_user.nan_to_num(), score(model, codes, "chunked", 8).loss.nan_to_num())
    with pytest.raises(ValueError, match="no second \\(user\\) audio stream"):
        score(tiny_lm(0), codes, user_codes=user)


def test_text_requests_are_checked():
    model = tiny_lm(0)
    codes = random_audio_codes(1, 10)
    with pytest.raises(ValueError, match="needs the transcript's text tokens"):
        score(model, codes, text_stream="transcript")
    with pytest.raises(ValueError, match="text_stream is 'padding'; use text_stream='transcript'"):
        score(model, codes, text_tokens=torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="text tokens must be \\[B, T\\] = \\[1, 10\\]"):
        score(model, codes, text_stream="transcript", text_tokens=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="text tokens must lie in \\[0, 12\\), got \\[3, 12\\]"):
        score(model, codes, text_stream="transcript", text_tokens=torch.arange(10)[None] + 3)
    with pytest.raises(ValueError, match="text_stream must be one of"):
        RunOptions(text_stream="monologue")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"text_stream": None}, "text_stream must be one of"),
        ({"text_stream": ["greedy"]}, "text_stream must be one of"),
        ({"first_codebook_weight_multiplier": True}, "first_codebook_weight_multiplier must be a finite number >= 0"),
        ({"first_codebook_weight_multiplier": "100"}, "first_codebook_weight_multiplier must be a finite number"),
        ({"first_codebook_weight_multiplier": float("inf")}, "first_codebook_weight_multiplier must be a finite"),
        ({"text_padding_weight": -0.5}, "text_padding_weight must be a finite number >= 0, got -0.5"),
        ({"text_padding_weight": float("nan")}, "text_padding_weight must be a finite number"),
    ],
    ids=["stream-none", "stream-list", "multiplier-bool", "multiplier-str", "multiplier-inf", "pad-neg", "pad-nan"],
)
def test_text_and_weight_options_refuse_json_values_of_the_wrong_kind(options, message):
    with pytest.raises(ValueError, match=message):
        RunOptions(**options)
    assert RunOptions(first_codebook_weight_multiplier=100, text_padding_weight=0).text_padding_weight == 0
