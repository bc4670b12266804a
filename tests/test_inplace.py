"""In-Place TTT layers (ttt/inplace.py): the three scoring modes and any chunking agree, rows and resets are
independent, telemetry matches a hand computation, updates below float32 resolution are reported as such."""

import json
import math
import types

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from tiny_mimi import tiny_mimi
from tiny_models import CONTEXT, random_audio_codes, tiny_lm, tiny_lm_config
from tolerances import FLOAT32

from moshi_ttt import evaluate, save, score
from moshi_ttt.config import InPlaceConfig, YarnConfig
from moshi_ttt.reports.inplace_report import inplace_messages
from moshi_ttt.reports.results import results_document, run_record
from moshi_ttt.ttt.fork_yarn import ForkYarnRotary, apply_fork_yarn, yarn_frequencies
from moshi_ttt.ttt.inplace import apply_inplace, inplace_blocks, inplace_states

CHUNK = 8


def inplace_model(seed: int = 0, *, lr: float = 0.05, clip: float | None = 3.0, activation: str = "gelu", **cfg):
    """tiny_lm with In-Place layers 1 and 2 and trained-looking target generators."""
    model = apply_inplace(
        tiny_lm(seed),
        InPlaceConfig(layers=(1, 2), chunk_size=CHUNK, lr=lr, clip=clip, activation=activation, **cfg),
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in inplace_blocks(model).values():
            for p in block.target_generator.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_silu_gate_without_update_is_the_base_model_and_gelu_is_not():
    """The In-Place layer is moshi's MLP with w_down for linear_out: SiLU and lr 0 give the base's numbers exactly;
    the fork's GELU gate changes them although nothing is updated."""
    codes = random_audio_codes(2, 30)
    base = score(tiny_lm(0), codes, mode="full").loss
    silu = score(inplace_model(lr=0.0, activation="silu"), codes, mode="full").loss
    torch.testing.assert_close(silu, base, rtol=0, atol=0, equal_nan=True)
    gelu = score(inplace_model(lr=0.0), codes, mode="full").loss
    assert (gelu - base).nan_to_num().abs().max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="persistent"),
        pytest.param({"reset_every": 12}, id="reset-every-12"),  # cuts chunks: resets sit at absolute positions
    ],
)
def test_three_modes_and_any_chunking_give_the_same_numbers(options):
    """Past the attention context (16) and over several chunks (8): full, chunked with chunks that cut the update
    chunks anywhere, and stream agree, also with periodic resets."""
    model = inplace_model()
    codes = random_audio_codes(2, 45, seed=4)
    full = score(model, codes, mode="full", **options)
    assert full.telemetry.inplace[1].update_step.numel() > 0
    for mode, chunk in (("chunked", 5), ("chunked", 16), ("chunked", None), ("stream", None)):
        other = score(model, codes, mode=mode, chunk_size=chunk, **options)
        torch.testing.assert_close(other.loss, full.loss, equal_nan=True, **FLOAT32)
        for layer, tel in full.telemetry.inplace.items():
            assert torch.equal(other.telemetry.inplace[layer].update_step, tel.update_step)
            torch.testing.assert_close(other.telemetry.inplace[layer].drift, tel.drift, **FLOAT32)
    # the update matters and reset_every changes the numbers: the comparison above could fail
    no_update = score(inplace_model(lr=0.0), codes, mode="full", **options)
    assert (no_update.loss - full.loss).nan_to_num().abs().max() > 1e-3
    if options:
        persistent = score(model, codes, mode="full")
        assert (persistent.loss - full.loss).nan_to_num().abs().max() > 1e-4
        steps = full.telemetry.inplace[1].update_step.tolist()
        assert steps == [8, 20, 32, 44]  # a chunk after every reset (0, 12, 24, 36), at the chunk's absolute end


def test_rows_are_independent_and_each_file_starts_fresh():
    """A batch of two rows gives each row's numbers alone; scoring the same file again gives the same numbers (no
    fast weight carries over between calls, unlike the fork's w_down)."""
    model = inplace_model()
    codes = random_audio_codes(2, 40, seed=5)
    both = score(model, codes, mode="stream").loss
    for row in range(2):
        alone = score(model, codes[row : row + 1], mode="stream").loss
        torch.testing.assert_close(alone[0], both[row], equal_nan=True, **FLOAT32)
    torch.testing.assert_close(score(model, codes, mode="stream").loss, both, rtol=0, atol=0, equal_nan=True)


def test_reset_mask_and_exec_mask_act_per_row():
    model = inplace_model()
    codes = random_audio_codes(2, 20, seed=6)
    from moshi_ttt.compat.sequence import delayed_input, model_codes

    inputs = delayed_input(model, model_codes(model, codes))
    with torch.no_grad(), model.streaming(2):
        model.forward_text(inputs[:, :, :10])
        states = inplace_states(model)
        w_before = {i: s.w.clone() for i, s in states.items()}
        assert all(not torch.equal(w[0], inplace_blocks(model)[i].w_down) for i, w in w_before.items())
        model.reset_streaming(torch.tensor([True, False]))  # moshi's per-row reset
        for i, s in states.items():
            torch.testing.assert_close(s.w[0], inplace_blocks(model)[i].w_down, rtol=0, atol=0)
            torch.testing.assert_close(s.w[1], w_before[i][1], rtol=0, atol=0)
            assert s.position.tolist() == [0, 2] and s.offset.tolist() == [0, 10]
        for s in states.values():
            s.set_exec_mask(torch.tensor([False, True]))  # row 0 frozen
        model.forward_text(inputs[:, :, 10:16])
        for s in states.values():
            assert s.position.tolist() == [0, 0] and s.offset.tolist() == [0, 16]


def reference_updates(block, x: torch.Tensor, x0: torch.Tensor) -> dict[str, list[float]]:
    """The fork's update written out token by token in float64 from the block's tensors (x, x0: [1, T, d])."""
    cfg = block.cfg
    w_in = block.linear_in.weight.detach().double()
    conv = block.target_generator.conv1d.conv.weight.detach().double()  # [d, d, K]
    w_target = block.target_generator.W_target.weight.detach().double()
    w0 = block.w_down.detach().double()
    h = x[0].double() @ w_in.T  # [T, 2 hidden]
    gate, up = h.chunk(2, dim=-1)
    act = F.gelu if cfg.activation == "gelu" else F.silu
    z = act(gate) * up  # [T, hidden]
    T, K = z.shape[0], conv.shape[-1]
    found = {name: [] for name in ("raw", "factor", "update", "drift", "drift_relative")}
    total = torch.zeros_like(w0)
    for start in range(0, T - CHUNK + 1, CHUNK):
        delta = torch.zeros_like(w0)
        for t in range(start, start + CHUNK):
            mixed = sum(conv[:, :, k] @ x0[0, t + k].double() for k in range(K) if t + k < start + CHUNK)
            v_hat = w_target @ mixed  # [d]
            delta += torch.outer(v_hat, z[t])
        raw = float(delta.norm())
        factor = 1.0 if cfg.clip is None else min(1.0, cfg.clip / (raw + cfg.clip_epsilon))
        total += factor * delta
        found["raw"].append(raw)
        found["factor"].append(factor)
        found["update"].append(cfg.lr * factor * raw)
        found["drift"].append(float((cfg.lr * total).norm()))
        found["drift_relative"].append(float((cfg.lr * total).norm() / w0.norm()))
    return found


def test_telemetry_matches_a_hand_computation():
    """Raw update norm, clip factor, lr-scaled update and drift (absolute and relative) of every chunk, per layer,
    against the fork's formulas written out in float64 from the layer's inputs."""
    model = inplace_model(clip=2.0)
    codes = random_audio_codes(1, 35, seed=7)
    seen = {}
    hooks = [
        block.register_forward_pre_hook(lambda module, args, i=i: seen.setdefault(i, args))
        for i, block in inplace_blocks(model).items()
    ]
    result = score(model, codes, mode="full")
    for hook in hooks:
        hook.remove()
    record = run_record(result, checkpoint="x")["inplace"]
    for layer, block in inplace_blocks(model).items():
        expected = reference_updates(block, *seen[layer])
        got = record[str(layer)]
        assert got["t"] == [8, 16, 24, 32] and len(expected["raw"]) == 4
        for ours, theirs in (("raw_update_norm", "raw"), ("clip_factor", "factor"), ("update_norm", "update"),
                             ("drift", "drift"), ("drift_relative", "drift_relative")):  # fmt: skip
            np.testing.assert_allclose(got[ours], expected[theirs], rtol=1e-5, err_msg=ours)
        assert all(f < 1 for f in got["clip_factor"])  # the clip acted
        np.testing.assert_allclose(got["drift"], got["drift_intended"], rtol=1e-5)  # float32 kept these updates
        assert max(got["drift_error_relative"]) < 1e-5
        assert got["changed_any"] and min(got["changed_fraction"]) > 0.9
        assert got["entries"] == block.w_down.numel()
        assert got["w0_norm"] == pytest.approx(float(block.w_down.detach().norm()))


def test_updates_below_float32_resolution_never_change_the_weight_and_say_so():
    """With w_down entries of size 1 (half an ulp: 6e-8) and the fork's tau = 1e-5, lr = 1e-3, each update is about
    3e-10 per entry: float32 rounds W0 + update back to W0. The telemetry says so and so does results.json."""
    model = inplace_model(lr=1e-3, clip=1e-5)
    with torch.no_grad():
        for block in inplace_blocks(model).values():
            block.w_down.copy_(torch.where(block.w_down >= 0, 1.0, -1.0))
    codes = random_audio_codes(1, 40, seed=8)
    result = score(model, codes, mode="stream")
    run = run_record(result, checkpoint="fork settings")
    for rec in run["inplace"].values():
        assert rec["updates"] == 5 and not rec["changed_any"]
        assert set(rec["drift"]) == {0.0} and set(rec["step_norm"]) == {0.0}
        np.testing.assert_allclose(rec["update_norm"], 1e-8, rtol=1e-5)  # lr * tau: the clip always acts
        assert 1e-8 < rec["drift_intended"][-1] <= 5e-8  # what exact arithmetic would give: up to 5 updates of 1e-8
        assert rec["drift_error_relative"] == pytest.approx([1.0] * 5)  # the stored drift (0) misses all of it
    messages = inplace_messages("ttt", run)
    assert messages == [
        f"Run 'ttt', layer {layer}: update 3e-10 per entry, below float32 resolution (6e-08): the fast weight never "
        "changed (5 chunk updates, lr = 0.001, clip tau = 1e-05)."
        for layer in (1, 2)
    ]
    document = results_document({"name": "x"}, {"mode": "stream"}, {"ttt": run})
    assert document["config"]["notes"]["ttt"] == messages


def test_partly_rounded_updates_are_reported_with_what_float32_kept():
    """tiny_lm's w_down entries (about 0.15) with tau = 1e-5: only the entries near 0 take the updates."""
    model = inplace_model(lr=1e-3, clip=1e-5)
    run = run_record(score(model, random_audio_codes(1, 40, seed=8), mode="full"), checkpoint="x")
    messages = inplace_messages("ttt", run)
    rounded = [layer for layer, rec in run["inplace"].items() if rec["drift_error_relative"][-1] > 0.5]
    assert rounded and len(messages) == len(rounded)
    for layer, message in zip(rounded, messages, strict=True):
        rec = run["inplace"][layer]
        assert message.startswith(f"Run 'ttt', layer {layer}: update 3e-10 per entry, below float32 resolution")
        assert "of its entries (those near 0): the stored drift" in message and 0 < rec["drift"][-1]
        assert 0 < max(rec["changed_fraction"]) < 0.5
    working = run_record(score(inplace_model(), random_audio_codes(1, 40, seed=8), mode="full"), checkpoint="x")
    assert inplace_messages("ttt", working) == []


def test_fork_yarn_frequencies_follow_its_formula_and_keep_their_dtype():
    cfg = YarnConfig(scale=4.0, original_max_seq_len=8, mscale=1.5)
    inv_freq, factor = yarn_frequencies(8, 10000.0, cfg)
    j = torch.arange(4, dtype=torch.float64)
    base = 1.0 / 10000.0 ** (j / 4)
    ramp = ((2 * math.pi / base - 8.0) / (32 * 8 - 8)).clamp(0, 1)  # its bounds: wavelengths beta * L
    torch.testing.assert_close(inv_freq.double(), (1 - ramp) * base + ramp * base / 4, rtol=1e-6, atol=0)
    assert factor == pytest.approx(0.1 * 1.5 * math.log(4) + 1)
    rope = ForkYarnRotary(8, 10000.0, YarnConfig(scale=4.0, frequencies="bfloat16"))
    assert rope.to(torch.float64).inv_freq.dtype == torch.bfloat16
    assert ForkYarnRotary(8, 10000.0, cfg).to(torch.bfloat16).inv_freq.dtype == torch.float32
    model = apply_fork_yarn(tiny_lm(0), YarnConfig(scale=2.5))
    assert model.context == int(CONTEXT * 2.5) and model.transformer.layers[2].self_attn.rope is model.transformer.rope


def test_fork_yarn_model_streams_exactly():
    """With the fork's YaRN (query factor included) the three modes still agree, past the extended context."""
    model = apply_fork_yarn(tiny_lm(0), YarnConfig(scale=2.0, original_max_seq_len=8, mscale=2.0))
    apply_inplace(model, InPlaceConfig(layers=(1,), chunk_size=CHUNK, lr=0.05, clip=3.0))
    codes = random_audio_codes(1, 40, seed=9)
    full = score(model, codes, mode="full").loss
    for mode in ("chunked", "stream"):
        torch.testing.assert_close(score(model, codes, mode=mode).loss, full, equal_nan=True, **FLOAT32)


def test_apply_inplace_refuses_what_it_cannot_do():
    model = inplace_model()
    with pytest.raises(ValueError, match="already applied"):
        apply_inplace(model, InPlaceConfig(layers=(0,)))
    with pytest.raises(ValueError, match=r"layers \[5\] are out of range"):
        apply_inplace(tiny_lm(0), InPlaceConfig(layers=(5,)))
    streaming = tiny_lm(0)
    with streaming.streaming(1), pytest.raises(ValueError, match="while it is streaming"):
        apply_inplace(streaming, InPlaceConfig(layers=(1,)))
    with pytest.raises(ValueError, match="activation must be one of"):
        InPlaceConfig(layers=(1,), activation="relu")
    with pytest.raises(ValueError, match="clip must be > 0 or None"):
        InPlaceConfig(layers=(1,), clip=0.0)


def test_evaluate_cli_writes_the_inplace_record_and_says_when_updates_round_away(tmp_path, monkeypatch, capsys):
    """--baseline an In-Place model at the fork's settings (updates round away), --ttt one with a working clip."""

    def fake_load(ref, device, dtype):
        model = inplace_model(lr=1e-3, clip=1e-5) if ref == "fork" else inplace_model()
        if ref == "fork":
            with torch.no_grad():
                for block in inplace_blocks(model).values():
                    block.w_down.copy_(torch.where(block.w_down >= 0, 1.0, -1.0))
        return types.SimpleNamespace(model=model, mimi=tiny_mimi(), notes=[f"loaded {ref}"])

    monkeypatch.setattr(evaluate, "_load_checkpoint", fake_load)
    audio = tmp_path / "clip.wav"
    sf.write(audio, (0.2 * np.random.default_rng(0).standard_normal(48000)).astype(np.float32), 24000)
    out = tmp_path / "out"
    assert evaluate.main(["--audio", str(audio), "--baseline", "fork", "--ttt", "working", "--out", str(out)]) == 0
    doc = json.loads((out / "0000_clip" / "results.json").read_text())
    notes = doc["config"]["notes"]
    assert notes["ttt"] == ["loaded working"]
    assert notes["baseline"][0] == "loaded fork" and "the fast weight never changed" in notes["baseline"][1]
    assert not doc["runs"]["baseline"]["inplace"]["1"]["changed_any"]
    assert doc["runs"]["ttt"]["inplace"]["1"]["drift"][-1] > 0.01
    assert "note:" in capsys.readouterr().err
    assert "In-Place fast weight per chunk" in (out / "0000_clip" / "report.html").read_text()


def test_our_format_refuses_an_inplace_model(tmp_path):
    with pytest.raises(ValueError, match="In-Place TTT layers, which our format does not hold"):
        save(tmp_path / "x", inplace_model(), lm_config=tiny_lm_config())
