"""Hostile values for TTTConfig (a checkpoint's config.json is user input), the mini-batch size cap, and the argument
checks of the ttt_mlp contract: every bad value is refused with an error that names the field, never stored, never
a crash deep inside torch."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from tiny_models import random_audio_codes, tiny_lm, tiny_lm_config
from tolerances import FLOAT32

from moshi_ttt import FastWeights, RunOptions, TTTConfig, apply_ttt, load, save, score, ttt_mlp
from moshi_ttt.config import MAX_MINI_BATCH_SIZE, NORMS, LegacyConfig, parse_layers
from moshi_ttt.ttt.inner_math import position_factors
from moshi_ttt.ttt.ops import LinearWeights, ttt_mlp_chunk, ttt_mlp_token
from moshi_ttt.ttt.params import InnerInputs, InnerParams
from moshi_ttt.ttt.state import FastWeightState

NAN, INF = float("nan"), float("inf")
HOSTILE = {
    "layers": [[1, 2], 3, None, "1,,2", "1,2,", "-1", "+1", "1_0", "one"],
    "mini_batch_size": ["16", True, 2.5, 4.0, NAN, None, [4], 0, MAX_MINI_BATCH_SIZE + 1, 10**30],
    "base_lr": ["1", NAN, INF, -1.0, True, None, [1]],
    "persistent_states": ["false", "true", 0, 1, None, 1.0],
    "gating_alpha_init": ["0.1", NAN, INF, -INF, None, True],
    "num_heads": [1.5, True, "2", 0],
    "norm": ["nonsense", None, 3],
    "target": [None, ["difference"]],
    "init_std": [-1.0, NAN, INF, "x", None, False],
    "share_qk": ["false", 1, None],
    "conv_kernel": [True, 2.5, "4", None, 0, 10**30],
    "inner": [None, "MLP"],
    "branch_input": [None, 1],
    "decay": [NAN, "0.1", True, -0.1],
}


@pytest.mark.parametrize(
    "field, value",
    [(field, value) for field, values in HOSTILE.items() for value in values],
    ids=[f"{field}={value!r}" for field, values in HOSTILE.items() for value in values],
)
def test_a_bad_field_is_refused_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"TTTConfig {field} must be .*got {re.escape(repr(value))}"):
        TTTConfig(**{field: value})
    with pytest.raises(ValueError, match=f"TTTConfig {field} must be"):
        TTTConfig.from_dict({**TTTConfig().to_dict(), field: value})


def test_good_values_are_kept_and_numbers_become_floats():
    cfg = TTTConfig(layers=" 1, 3,2 ", base_lr=3, init_std=0, gating_alpha_init=-1, mini_batch_size=MAX_MINI_BATCH_SIZE)
    assert (cfg.base_lr, cfg.init_std, cfg.gating_alpha_init) == (3.0, 0.0, -1.0)
    assert all(isinstance(v, float) for v in (cfg.base_lr, cfg.init_std, cfg.gating_alpha_init))
    assert parse_layers(cfg.layers, 4) == [1, 2, 3] and cfg.mini_batch_size == MAX_MINI_BATCH_SIZE
    for norm in NORMS:
        assert TTTConfig(norm=norm).norm == norm
    for spec, expected in (("all", [0, 1, 2, 3]), ("middle", [1, 2]), ("none", []), (" 0 ", [0])):
        assert parse_layers(spec, 4) == expected
    with pytest.raises(ValueError, match=r"TTT layers \[4\] are out of range"):
        parse_layers("4", 4)


def test_from_dict_refuses_unknown_keys_and_checks_nested_legacy_options():
    with pytest.raises(ValueError, match=r"unknown TTTConfig fields: \['persistent'\]"):
        TTTConfig.from_dict({"persistent": False})
    with pytest.raises(ValueError, match="LegacyConfig causal must be true or false, got 'false'"):
        TTTConfig.from_dict({"legacy": {"causal": "false"}, "target": "legacy"})
    # Old flat layout: a non-legacy config with a legacy option set (rope_theta was dropped without a word).
    with pytest.raises(ValueError, match=r"\['rope_theta'\] exist only for legacy checkpoints"):
        TTTConfig.from_dict({"legacy": False, "rope_theta": 500.0})
    with pytest.raises(ValueError, match="legacy must be an object, null or"):
        TTTConfig.from_dict({"legacy": 0})
    with pytest.raises(ValueError, match="TTTConfig legacy must be a LegacyConfig or None"):
        TTTConfig(legacy={"causal": True})
    legacy = TTTConfig.from_dict({"legacy": {"mlp_hidden_dims": [8]}, "target": "legacy"})
    assert legacy.legacy == LegacyConfig(mlp_hidden_dims=(8,))


def test_the_shipped_and_fixture_configs_still_load():
    root = Path(__file__).parent.parent
    demo = json.loads((root / "demo_assets" / "ttt" / "config.json").read_text())["ttt"]
    assert TTTConfig.from_dict(demo).to_dict() == demo
    flat = json.loads((Path(__file__).parent / "data" / "flat_ttt_config_v1.json").read_text())
    assert TTTConfig.from_dict(flat) == TTTConfig(layers="1,2,3", mini_batch_size=16, base_lr=4.0, share_qk=True)


@pytest.mark.parametrize("field, value", [("persistent_states", "false"), ("base_lr", NAN), ("layers", [1])])
def test_a_checkpoint_with_a_bad_ttt_field_does_not_load(tmp_path, field, value):
    """config.json "persistent_states": "false" loaded and scored exactly like true; NaN base_lr scored NaN."""
    save(tmp_path / "c", apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4)), lm_config=tiny_lm_config())
    path = tmp_path / "c" / "config.json"
    config = json.loads(path.read_text())
    config["ttt"][field] = value
    path.write_text(json.dumps(config))  # NaN is written as NaN, which Python's json reads back
    with pytest.raises(ValueError, match=field):
        load(tmp_path / "c")


def test_the_mini_batch_cap_is_the_same_for_run_options():
    assert RunOptions(mini_batch_size=MAX_MINI_BATCH_SIZE).mini_batch_size == MAX_MINI_BATCH_SIZE
    with pytest.raises(ValueError, match=f"mini_batch_size must be <= {MAX_MINI_BATCH_SIZE}, got 10000000"):
        RunOptions(mini_batch_size=10**7)


def test_position_factors_of_some_positions_are_those_of_all():
    g = torch.Generator().manual_seed(0)
    for token_idx in (None, torch.randn(5, generator=g, dtype=torch.float64), torch.randn(20, generator=g).double()):
        every = position_factors(token_idx, 16, torch.float64, "cpu")  # [16]
        positions = torch.tensor([[0, 4], [5, 15]])
        some = position_factors(token_idx, 16, torch.float64, "cpu", positions)
        assert some.shape == (2, 2) and torch.equal(some, every[positions])
        assert torch.equal(position_factors(token_idx, 16, torch.float64, "cpu", torch.arange(16)), every)
    expected = 1.0 / torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) + token_idx[:3]  # max(0, 1/i + offset)
    assert torch.equal(every[:3], expected.clamp_min(0.0))


def _problem(T=6, B=1, H=2, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = FastWeights(*(torch.randn(B, H, *s, generator=g) * 0.3 for s in ((D, 4 * D), (1, 4 * D), (4 * D, D), (1, D))))
    xq, xk, xv = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    lr = torch.rand(B, H, T, generator=g)
    return w, xq, xk, xv, lr, 1 + 0.1 * torch.randn(H, D, generator=g), 0.1 * torch.randn(H, D, generator=g)


def test_a_call_costs_nothing_in_b_beyond_its_tokens():
    """tau was built for all b positions at every call (b = 1e7: 123 MB for 12 tokens); a call now builds the
    factors of the positions it reads. 2**40 positions would be 4 TiB: any O(b) work fails at once."""
    huge = 2**40
    w, xq, xk, xv, lr, ln_w, ln_b = _problem()
    token_idx = 0.1 * torch.randn(3)
    out, new_w = ttt_mlp(w, xq, xk, xv, lr, ln_w, ln_b, huge, token_idx)
    ref_out, ref_w = ttt_mlp(w, xq, xk, xv, lr, ln_w, ln_b, 7, token_idx)  # b > T: no update either
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(new_w, w, strict=True))
    # Streaming forms from a state inside its mini-batch: the dual form over a chunk and the primal form.
    state = FastWeightState.fresh(w)._replace(position=torch.tensor([3]))
    inputs = InnerInputs(xq, xk, xv, lr)
    for b in (huge, 10):
        params = InnerParams(ln_w, ln_b, b, token_idx)
        chunk, after = ttt_mlp_chunk(state, inputs, params)
        token, _ = ttt_mlp_token(state, InnerInputs(*(x[:, :, :1] for x in inputs)), params)
        if b == huge:
            huge_chunk, huge_token, huge_position = chunk, token, after.position
    torch.testing.assert_close(huge_chunk, chunk, rtol=0, atol=0)
    torch.testing.assert_close(huge_token, token, rtol=0, atol=0)
    assert huge_position.tolist() == [9]


def test_every_mode_agrees_at_the_largest_mini_batch():
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4, gating_alpha_init=0.5)).eval()
    codes = random_audio_codes(1, 12, seed=1)
    full = score(model, codes, "full", mini_batch_size=MAX_MINI_BATCH_SIZE).loss
    for mode, chunk in (("chunked", 5), ("stream", None)):
        other = score(model, codes, mode, chunk, mini_batch_size=MAX_MINI_BATCH_SIZE).loss
        torch.testing.assert_close(other, full, **FLOAT32, equal_nan=True)


def _call(**changes):
    w, xq, xk, xv, lr, ln_w, ln_b = _problem()
    args = {"weights": w, "xq": xq, "xk": xk, "xv": xv, "lr": lr, "ln_weight": ln_w, "ln_bias": ln_b}
    args |= {"mini_batch_size": 4, **changes}
    return ttt_mlp(**args)


W = _problem()[0]
BAD_ARGUMENTS = [
    ("b-true", {"mini_batch_size": True}, "mini_batch_size must be a whole number >= 1, got True"),
    ("b-float", {"mini_batch_size": 2.5}, "mini_batch_size must be a whole number >= 1, got 2.5"),
    ("b-string", {"mini_batch_size": "4"}, "mini_batch_size must be a whole number >= 1, got '4'"),
    ("b-nan", {"mini_batch_size": NAN}, "mini_batch_size must be a whole number >= 1, got nan"),
    ("b-zero", {"mini_batch_size": 0}, "mini_batch_size must be a whole number >= 1, got 0"),
    ("token_idx-2d", {"token_idx": torch.zeros(4, 1)}, r"token_idx must be a 1-D tensor \[b\] .* got \[4, 1\]"),
    ("token_idx-list", {"token_idx": [0.0] * 4}, "token_idx must be a 1-D tensor"),
    ("weights-tuple", {"weights": tuple(W)}, "weights must be FastWeights.* got tuple"),
    ("weights-of-lists", {"weights": FastWeights(*[[1.0]] * 4)}, "weights must be FastWeights"),
    ("xk-list", {"xk": [[1.0]]}, "xk must be a tensor, got list"),
    ("lr-float", {"lr": 0.1}, "lr must be a tensor, got float"),
    ("ln_weight-none", {"ln_weight": None}, r"ln_weight must be a tensor \[H, D\], got NoneType"),
    ("target", {"target": "bogus"}, "target must be one of"),
    ("decay-true", {"decay": True, "w_base": W}, r"decay must be in \[0, 1\], got True"),
    ("decay-string", {"decay": "0.1"}, r"decay must be in \[0, 1\], got '0.1'"),
    ("w_base-tuple", {"decay": 0.5, "w_base": tuple(W)}, "w_base must be FastWeights or LinearWeights"),
    ("w_base-linear", {"decay": 0.5, "w_base": LinearWeights(torch.zeros(2, 4, 4), torch.zeros(2, 1, 4))}, "w_base"),
    ("w_base-shape", {"decay": 0.5, "w_base": FastWeights(*(w[:, :1] for w in W))}, "w_base must be FastWeights of"),
]


@pytest.mark.parametrize("changes, message", [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
def test_ttt_mlp_names_the_bad_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        _call(**changes)


def test_ttt_mlp_takes_w_base_per_head_or_per_row():
    out_head, _ = _call(decay=0.5, w_base=FastWeights(*(t[0] for t in W)))  # [H, ...]
    out_row, _ = _call(decay=0.5, w_base=W)  # [B, H, ...]
    torch.testing.assert_close(out_head, out_row, rtol=0, atol=0)
    assert math.isfinite(out_head.sum().item())
