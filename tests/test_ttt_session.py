"""Session options and observers (ttt/session.py): one value per TTT block's state, written in one place, private to
its streaming session."""

import dataclasses

import pytest
import torch
from tiny_models import random_audio_codes, tiny_lm

from moshi_ttt import RunOptions, TTTConfig, apply_ttt, score, set_streaming_options, ttt_states
from moshi_ttt.compat.sequence import delayed_input, model_codes
from moshi_ttt.config import LegacyConfig
from moshi_ttt.scoring.telemetry import record
from moshi_ttt.ttt.session import SessionOptions, configure


class Counting:
    """An observer that counts what it is told."""

    def __init__(self):
        self.tokens, self.updates = 0, 0

    def inputs(self, xk, xv):
        assert xk.shape == xv.shape
        self.tokens += xk.shape[2]

    def update(self, w_start, w_end):
        self.updates += 1


def test_configure_is_the_one_writer_and_refuses_what_the_state_cannot_take():
    """Values come validated (RunOptions); configure checks what depends on the state."""
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4))
    seq = delayed_input(model, model_codes(model, random_audio_codes(1, 6)))
    with torch.no_grad(), model.streaming(1):
        state = ttt_states(model)[1]
        configure(state, mini_batch_size=2)
        model.forward_text(seq[:, :, :3])
        before = state.session
        with pytest.raises(ValueError, match="before its first forward"):
            configure(state, mini_batch_size=4)
        assert state.session is before  # a refused change changes nothing
        configure(state, mini_batch_size=2, persistent=False, reset_every=8)  # the same size, other fields: allowed
        assert state.session == SessionOptions(2, False, reset_every=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SessionOptions(4, True).persistent = False  # frozen: only replaced whole


def test_an_observer_sees_its_own_session_only():
    """Two sessions of one shared model, interleaved (the app swaps streaming states): the observer of one never
    hears the other, and it leaves with its `record` block."""
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4))
    seq = delayed_input(model, model_codes(model, random_audio_codes(1, 12)))
    transformer = model.transformer
    observers = {1: Counting(), 2: Counting()}
    with torch.no_grad(), transformer.streaming(1):
        for layer, state in ttt_states(model).items():
            configure(state, observer=observers[layer])
        observed = transformer.get_streaming_state()
        transformer.set_streaming_state(dict.fromkeys(observed))  # another user's session, no observer
        with transformer.streaming(1):
            model.forward_text(seq)
            assert all(s.session.observer is None for s in ttt_states(model).values())
        transformer.set_streaming_state(observed)
        model.forward_text(seq[:, :, :8])
    assert [(o.tokens, o.updates) for o in observers.values()] == [(8, 2), (8, 2)]

    with torch.no_grad(), model.streaming(1):
        with record(model):
            assert all(s.session.observer is not None for s in ttt_states(model).values())
        assert all(s.session.observer is None for s in ttt_states(model).values())


def test_scoring_options_stay_in_the_session():
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4))
    codes = random_audio_codes(1, 20)
    score(model, codes, "chunked", mini_batch_size=2, reset_every=6)
    with model.streaming(1):
        assert ttt_states(model)[1].session == SessionOptions(4, True)  # the layer's own again


def test_legacy_state_has_the_same_session_and_keeps_its_mini_batch_size():
    legacy = LegacyConfig(causal=True)
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4, legacy=legacy))
    with model.streaming(1):
        state = ttt_states(model)[1]
        assert state.session == SessionOptions(4, True)
        assert not any(callable(v) for v in vars(state).values())
        set_streaming_options(model, RunOptions(mini_batch_size=4, reset_every=8))
        assert state.session == SessionOptions(4, True, reset_every=8)
        with pytest.raises(ValueError, match="layer 1: .*legacy TTT layer"):
            set_streaming_options(model, RunOptions(mini_batch_size=2))
        with pytest.raises(ValueError, match="layer 1: .*reset_every \\(6\\) must be a multiple of 4"):
            set_streaming_options(model, RunOptions(reset_every=6))
        with pytest.raises(ValueError, match="legacy TTT layer"):
            configure(state, mini_batch_size=2)  # the rule is the state's, whoever configures it
        assert state.session == SessionOptions(4, True, reset_every=8)
