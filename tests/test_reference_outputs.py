"""Saved reference outputs (tests/data/reference/, see reference_outputs.py): catch drift that moves every mode."""

import pytest
import torch
from reference_outputs import CASES, load_case


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_match_the_saved_reference(name):
    inputs, expected = load_case(name)
    case = CASES[name]
    got = case.outputs(inputs)
    assert sorted(got) == sorted(expected)
    # float64: round-off only; float32: what another CPU or BLAS may change, far below any real change of the math.
    tol = {"rtol": 1e-10, "atol": 1e-12} if case.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, equal_nan=True, msg=lambda m, k=key: f"{name}/{k}: {m}", **tol)


def test_references_hold_a_real_signal():
    """The stored cases exercise what they claim: fast weights that moved, TTT that changed the losses."""
    _, lm = load_case("tiny_lm_ttt")
    assert lm["telemetry_drift_W1"].min() > 1e-3
    assert (lm["loss"] - lm["baseline_loss"]).abs().nan_to_num().max() > 1e-2
    assert lm["telemetry_loss_after"].mean() < lm["telemetry_loss_start"].mean()
    inputs, ops = load_case("ttt_mlp_float64")
    assert (ops["new_W1"] - inputs["W1"]).abs().max() > 1e-2
