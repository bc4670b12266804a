"""The core invariant on a tiny moshi LM: one whole call == token by token == any chunk pattern."""

import pytest
import torch
from tiny_models import CONTEXT, random_audio_codes, tiny_lm
from tolerances import FLOAT32, FLOAT64

from moshi_ttt import TTTConfig, apply_ttt, exact_streaming, ttt_states
from moshi_ttt.compat.sequence import delayed_input, model_codes

T = 45  # longer than the 16-token attention window


def ttt_model(b: int, seed: int = 0, layers: str = "1,2", dtype=torch.float32, **cfg):
    # moshi's rms_norm_f32 and rope round a float64 model's activations to float32.
    f64 = dtype == torch.float64
    norm = "rms_norm" if f64 else "rms_norm_f32"
    cfg.setdefault("norm", norm)
    model = tiny_lm(seed, dtype=dtype, norm=norm, positional_embedding="sin" if f64 else "rope")
    return apply_ttt(model, TTTConfig(layers=layers, mini_batch_size=b, base_lr=1.0, gating_alpha_init=0.5, **cfg))


def stream(model, seq: torch.Tensor, chunks: list[int]):
    """Runs forward_text over `seq` [B, K, T] in streaming, chunk by chunk; returns outputs and final W0s."""
    assert sum(chunks) == seq.shape[-1]
    outs = []
    with exact_streaming(model, seq.shape[0], max(chunks)):
        start = 0
        for n in chunks:
            out, _ = model.forward_text(seq[:, :, start : start + n])
            outs.append(out)
            start += n
        final = {i: [w.clone() for w in s.fast_weights] for i, s in ttt_states(model).items()}
    return torch.cat(outs, dim=1), final


def patterns(total: int) -> dict[str, list[int]]:
    def repeat(n):
        return [n] * (total // n) + ([total % n] if total % n else [])

    return {
        "whole": [total],
        "token_by_token": [1] * total,
        "13-1-1-1-16-rest": [13, 1, 1, 1, 16, total - 32],
        "16-5-11-rest": [16, 5, 11, total - 32],
        "fours": repeat(4),
        "sevens": repeat(7),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
@pytest.mark.parametrize("b", [1, 4, 16], ids=lambda b: f"b{b}")
def test_whole_token_by_token_and_uneven_chunks_agree(b, share_qk, dtype):
    tol = FLOAT64 if dtype == torch.float64 else FLOAT32  # the invariant in float64; round-off bounded in float32
    model = ttt_model(b, share_qk=share_qk, dtype=dtype)
    codes = model_codes(model, random_audio_codes(2, T, seed=1))
    seq = delayed_input(model, codes)
    with torch.no_grad():
        reference, _ = model.forward_text(seq)  # plain non-streaming forward
        results = {name: stream(model, seq, chunks) for name, chunks in patterns(T).items()}
    whole_out, whole_w = results["whole"]
    torch.testing.assert_close(whole_out, reference, **tol)
    for name, (out, weights) in results.items():
        torch.testing.assert_close(out, whole_out, **tol, msg=lambda m, n=name: f"{n}: {m}")
        for layer, ws in weights.items():
            for w, w_ref in zip(ws, whole_w[layer], strict=True):
                torch.testing.assert_close(w, w_ref, **tol, msg=lambda m, n=name: f"{n}: {m}")
    # The fast weights really moved, and the rows (different audio) moved differently.
    w1 = whole_w[1][0]
    assert not torch.allclose(w1[0], w1[1])


def test_float64_agreement_is_tight():
    model = ttt_model(4, dtype=torch.float64)
    seq = delayed_input(model, model_codes(model, random_audio_codes(2, T, seed=2)))
    with torch.no_grad():
        ref, ref_w = stream(model, seq, [T])
        out, w = stream(model, seq, [13, 1, 1, 1, 16, T - 32])
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(w[2][2], ref_w[2][2], rtol=1e-11, atol=1e-11)


def test_plain_moshi_ring_cache_is_not_exact_for_chunks_past_the_window():
    """Why exact_streaming exists: moshi's ring cache alone drops keys a chunk still needs (ARCHITECTURE.md)."""
    model = tiny_lm(0)
    seq = delayed_input(model, model_codes(model, random_audio_codes(1, T, seed=3)))
    with torch.no_grad():
        ref, _ = model.forward_text(seq)
        with model.streaming(1):
            plain = torch.cat([model.forward_text(seq[:, :, s : s + 7])[0] for s in range(0, T, 7)], 1)
    # Exact while the chunks fit in the ring (the first two chunks of 7 fill 14 <= 16 slots), wrong past it.
    fits = 2 * 7
    assert fits <= CONTEXT
    torch.testing.assert_close(plain[:, :fits], ref[:, :fits], rtol=1e-5, atol=1e-5)
    assert (plain[:, fits:] - ref[:, fits:]).abs().max() > 1e-3
