"""Saved reference outputs: tiny models and inputs fixed once, their outputs stored under tests/data/reference/.

Every mode of the library agreeing with every other (the invariant tests) does not catch a change that moves all of
them equally: a torch or moshi upgrade, a changed epsilon, a reordered sum. These cases do: each file holds its
inputs (`in.*`, model weights included, so the RNG of the day does not matter) and the outputs they gave when the
file was written (`out.*`); `test_reference_outputs.py` recomputes the outputs from the stored inputs.

Regenerate (only when a change of the numbers is intended, and say why in the commit):
    NO_TORCH_COMPILE=1 python tests/reference_outputs.py
"""

from __future__ import annotations

import os
import sys
import typing as tp
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from tiny_models import random_audio_codes, tiny_lm  # noqa: E402

from moshi_ttt import TTTConfig, apply_ttt, exact_streaming, score, ttt_states  # noqa: E402
from moshi_ttt.compat.sequence import delayed_input, model_codes  # noqa: E402
from moshi_ttt.ttt.ops import FastWeights, LinearWeights, ttt_linear, ttt_mlp  # noqa: E402

REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"
WEIGHT_NAMES = FastWeights._fields

# The tiny LM of the model cases: 2 layers of width 16, TTT on layer 1, 16-token attention window.
LM_SHAPE = {"dim": 16, "num_layers": 2, "num_heads": 2}
LM_TTT = {"layers": "1", "mini_batch_size": 4, "base_lr": 1.0, "gating_alpha_init": 0.5}
T_LM = 40  # longer than the attention window
CHUNK = 8


def _ttt_mlp_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    B, H, T, D, b = 2, 2, 19, 8, 4  # T = 4 whole mini-batches and a partial one

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return {
        "W1": randn(B, H, D, 4 * D, scale=0.3),
        "b1": randn(B, H, 1, 4 * D, scale=0.1),
        "W2": randn(B, H, 4 * D, D, scale=0.3),
        "b2": randn(B, H, 1, D, scale=0.1),
        "xq": randn(B, H, T, D),
        "xk": randn(B, H, T, D),
        "xv": randn(B, H, T, D),
        "lr": torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5,
        "ln_weight": 1.0 + randn(H, D, scale=0.2),
        "ln_bias": randn(H, D, scale=0.2),
        "token_idx": randn(b, scale=0.1),
        "probe": randn(B, H, T, D),  # the output is reduced against it for a gradient
    }


def _ttt_mlp_outputs(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ttt_mlp (the ARCHITECTURE.md contract), float64: outputs, new weights and the gradients of <out, probe>."""
    leaves = {k: inp[k].clone().requires_grad_(True) for k in ("W1", "W2", "xk", "lr", "token_idx")}
    weights = FastWeights(leaves["W1"], inp["b1"], leaves["W2"], inp["b2"])
    out, new = ttt_mlp(
        weights, inp["xq"], leaves["xk"], inp["xv"], leaves["lr"], inp["ln_weight"], inp["ln_bias"], 4,
        leaves["token_idx"],
    )  # fmt: skip
    (out * inp["probe"]).sum().backward()
    result = {"out": out.detach(), **{f"new_{n}": w.detach() for n, w in zip(WEIGHT_NAMES, new, strict=True)}}
    result.update({f"grad_{k}": v.grad for k, v in leaves.items()})
    return result


def _ttt_linear_inputs() -> dict[str, torch.Tensor]:
    inp = _ttt_mlp_inputs()
    g = torch.Generator().manual_seed(13)
    B, H, _, D = inp["xq"].shape
    inp["W1"] = torch.randn(B, H, D, D, generator=g, dtype=torch.float64) * 0.3
    inp["b1"] = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64) * 0.1
    del inp["W2"], inp["b2"]
    return inp


def _ttt_linear_outputs(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ttt_linear (TTT-Linear) in float64: outputs, new weights and the gradients of <out, probe>."""
    leaves = {k: inp[k].clone().requires_grad_(True) for k in ("W1", "xk", "lr", "token_idx")}
    weights = LinearWeights(leaves["W1"], inp["b1"])
    out, new = ttt_linear(
        weights, inp["xq"], leaves["xk"], inp["xv"], leaves["lr"], inp["ln_weight"], inp["ln_bias"], 4,
        leaves["token_idx"],
    )  # fmt: skip
    (out * inp["probe"]).sum().backward()
    result = {"out": out.detach(), **{f"new_{n}": w.detach() for n, w in zip(new._fields, new, strict=True)}}
    result.update({f"grad_{k}": v.grad for k, v in leaves.items()})
    return result


def _lm_skeleton(share_qk: bool) -> tp.Any:
    return apply_ttt(tiny_lm(0, **LM_SHAPE), TTTConfig(share_qk=share_qk, **LM_TTT))


def _lm_inputs(share_qk: bool) -> dict[str, torch.Tensor]:
    model = _lm_skeleton(share_qk)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ttt." in name and "gating_alpha" not in name:  # trained-looking TTT parameters, not the init
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    return {**state, "codes": random_audio_codes(2, T_LM, card=24, seed=7)}


def _lm_outputs(inp: dict[str, torch.Tensor], share_qk: bool) -> dict[str, torch.Tensor]:
    """Chunked scoring of the TTT model and of its baseline (the same weights without TTT), the final fast
    weights of a chunked streaming pass and the telemetry."""
    model = _lm_skeleton(share_qk)
    state = {k.removeprefix("model."): v for k, v in inp.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    baseline = tiny_lm(0, **LM_SHAPE)
    baseline.load_state_dict({k: v for k, v in state.items() if ".ttt." not in k}, strict=True)
    codes = inp["codes"]
    result = {"baseline_loss": score(baseline, codes, "chunked", CHUNK).loss}
    scored = score(model, codes, "chunked", CHUNK)
    result["loss"] = scored.loss
    layer = scored.telemetry.layers[1]
    for name in ("loss_base", "loss_start", "loss_after", "target_variance"):
        result[f"telemetry_{name}"] = getattr(layer, name)
    for name in WEIGHT_NAMES:
        result[f"telemetry_drift_{name}"] = layer.drift[name]
    seq = delayed_input(model, model_codes(model, codes))
    with torch.no_grad(), exact_streaming(model.transformer, codes.shape[0], CHUNK):
        for start in range(0, T_LM, CHUNK):
            model.forward_text(seq[:, :, start : start + CHUNK])
        fast = ttt_states(model)[1].fast_weights
        result.update({f"fast_{n}": w.clone() for n, w in zip(WEIGHT_NAMES, fast, strict=True)})
    return result


class Case(tp.NamedTuple):
    make_inputs: tp.Callable[[], dict[str, torch.Tensor]]
    outputs: tp.Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    float64: bool  # float64 cases are compared tightly


CASES = {
    "ttt_mlp_float64": Case(_ttt_mlp_inputs, _ttt_mlp_outputs, True),
    "ttt_linear_float64": Case(_ttt_linear_inputs, _ttt_linear_outputs, True),
    "tiny_lm_ttt": Case(lambda: _lm_inputs(False), lambda inp: _lm_outputs(inp, False), False),
    "tiny_lm_ttt_share_qk": Case(lambda: _lm_inputs(True), lambda inp: _lm_outputs(inp, True), False),
}


def path_of(name: str) -> Path:
    return REFERENCE_DIR / f"{name}.safetensors"


def load_case(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(inputs, stored outputs) of a saved case."""
    tensors = load_file(str(path_of(name)))
    inputs = {k.removeprefix("in."): v for k, v in tensors.items() if k.startswith("in.")}
    outputs = {k.removeprefix("out."): v for k, v in tensors.items() if k.startswith("out.")}
    return inputs, outputs


def write_all() -> None:
    import moshi

    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "moshi": moshi.__version__, "regenerate": "python tests/reference_outputs.py"}
    for name, case in CASES.items():
        torch.manual_seed(0)
        inputs = case.make_inputs()
        outputs = case.outputs(inputs)
        tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
        tensors.update({f"out.{k}": v.detach().contiguous() for k, v in outputs.items()})
        save_file(tensors, str(path_of(name)), metadata=meta)
        print(f"{path_of(name)}: {len(tensors)} tensors, {path_of(name).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_all()
