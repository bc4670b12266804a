"""Older TTT checkpoints (moshi-finetune TTT fork): both layouts load in legacy mode and match a hand-written
float64 implementation of the fork's math; the causal variant; the leak of non-causal mini-batches; bad files."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from safetensors.torch import load_file, save_file
from tiny_models import random_audio_codes, tiny_lm, tiny_lm_config

from moshi_ttt import exact_streaming, load, save, score, ttt_blocks
from moshi_ttt.compat.sequence import delayed_input, model_codes

H, DIM, MINI_BATCH, BASE_LR = 4, 32, 4, 3.0
HD = DIM // H
TTT_LAYERS = (1, 2)
P = "transformer.layers.1.seq_modeling_block."  # the fork's prefix of TTT layer 1


def fork_tensors(depth: int, seed: int) -> dict[str, torch.Tensor]:
    """Random trained-looking tensors of one fork TTT module, by the fork's names (relative to `ttt_layer.ttt.`)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    t = {}
    for proj in ("wq", "wk", "wv", "wo"):
        t[f"{proj}.weight"], t[f"{proj}.bias"] = rnd(DIM, DIM, scale=0.3), rnd(DIM, scale=0.1)
    t["post_norm.weight"], t["post_norm.bias"] = 1 + rnd(DIM, scale=0.1), rnd(DIM, scale=0.1)
    t["learnable_ttt_lr_weight"], t["learnable_ttt_lr_bias"] = rnd(H, 1, DIM, scale=0.3), rnd(H, 1, scale=0.3)
    t["ttt_norm_weight"], t["ttt_norm_bias"] = 1 + rnd(H, HD, scale=0.2), rnd(H, HD, scale=0.1)
    if depth == 2:
        t["W1"], t["b1"] = rnd(H, HD, 4 * HD, scale=0.4), rnd(H, 1, 4 * HD, scale=0.1)
        t["W2"], t["b2"] = rnd(H, 4 * HD, HD, scale=0.4), rnd(H, 1, HD, scale=0.1)
    else:
        widths = [HD, 12, 20, HD] if depth == 3 else [HD] + [16] * (depth - 1) + [HD]
        for i in range(depth):
            t[f"weights.{i}"] = rnd(H, widths[i], widths[i + 1], scale=0.4)
            t[f"biases.{i}"] = rnd(H, 1, widths[i + 1], scale=0.1)
    return t


def write_fork_checkpoint(
    directory, *, layout: str, depth: int, full: bool, use_rope: bool, lm_config: dict | None = None
) -> dict:
    """Writes an older-fork checkpoint with exactly the issue's key names, in bfloat16 (`lm_config`: config.json,
    default tiny_lm_config()).

    Returns the float64 values the reference uses: {"ttt": {layer: {name: tensor}}, "base": base state or None}.
    """
    directory.mkdir(parents=True)
    tensors, ttt_values = {}, {}
    for n in TTT_LAYERS:
        fork = fork_tensors(depth, seed=10 + n)
        gate = torch.randn(DIM, generator=torch.Generator().manual_seed(n)) * 1.5
        gate[0], gate[1] = 5.0, -4.0  # beyond the fork's clamp at +-3
        block = f"transformer.layers.{n}.seq_modeling_block."
        inner = block + ("ttt_layer.ttt." if layout == "ttt_layer" else "")
        tensors.update({inner + k: v.bfloat16() for k, v in fork.items()})
        tensors[block + "forward_ssm_gating.gating_alpha"] = gate.bfloat16()
        tensors[block + "backward_ssm_gating.gating_alpha"] = torch.full((DIM,), 0.1).bfloat16()
        ttt_values[n] = {k: v.bfloat16().double() for k, v in {**fork, "gating_alpha": gate}.items()}
    base = None
    if full:
        base = {k: v.bfloat16() for k, v in tiny_lm(7).state_dict().items()}
        for k, v in base.items():
            m = re.match(r"transformer\.layers\.(\d+)\.(.+)$", k)
            if m and int(m.group(1)) in TTT_LAYERS:
                tensors[f"transformer.layers.{m[1]}.original_layer.{m[2]}"] = v
                tensors[f"transformer.layers.{m[1]}.seq_modeling_block.original_layer.{m[2]}"] = v.clone()
            else:
                tensors[k] = v
        base = {k: v.double() for k, v in base.items()}
    save_file(tensors, str(directory / ("consolidated.safetensors" if full else "lora.safetensors")))
    (directory / "config.json").write_text(json.dumps({**(lm_config or tiny_lm_config()), "lora": False}))
    ttt_args = {
        "enable": True,
        "layers": ",".join(str(n) for n in TTT_LAYERS),
        "base_lr": BASE_LR,
        "mini_batch_size": MINI_BATCH,
        "persistent_states": True,
        "initial_gating_alpha": 0.1,
        "ttt_layer_context": None,
        "non_ttt_layer_context": None,
        "ttt_mlp_layers": depth,
        "ttt_mlp_hidden_dims": None,
        "ttt_mlp_expansion_factor": 4.0,
        "use_rope": use_rope,
        "rope_theta": 10000.0,
    }
    training = {"moshi_paths": {"hf_repo_id": "kyutai/moshiko-pytorch-bf16"}, "ttt": ttt_args}
    (directory / "training_config.json").write_text(json.dumps(training))
    return {"ttt": ttt_values, "base": base}


# ---- Slow reference written from the older fork's code as it runs (AlufRon/claude-web,
# moshi_ttt_try/moshi-finetune/moshi_ttt/: hybrid_layer.py, models/ssm/ttt_layer.py, models/ssm/ops/ttt_mlp.py and
# models/ssm/ops/utils.py), not from moshi_ttt.ttt.legacy: per token, per head, inner gradients by autograd,
# float64. Checked against logits of the real fork in test_reference_matches_the_real_fork_outputs. ----


def ref_ln(z, w, b):
    """The fork's ln_fwd: biased variance, eps 1e-8 inside the square root."""
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return w * (z - mu) / torch.sqrt(var + 1e-8) + b


def ref_target(v, k, w, b):
    """The fork's ln_reconstruction_target, less the k it adds and its inner loss subtracts: v - k normalised
    with the unbiased std, eps added to the std."""
    d = v - k
    mu = d.mean(-1, keepdim=True)
    std = torch.sqrt(((d - mu) ** 2).sum(-1, keepdim=True) / (d.shape[-1] - 1))
    return w * (d - mu) / (std + 1e-5) + b


class ForkGelu(torch.autograd.Function):
    """gelu_tanh whose derivative is the fork's `gelu_bwd` (ops/utils.py), with its rounded constants 0.79788456
    and 0.1070322243 (they move float64 logits by ~3e-8, far below float32 round-off)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        return grad * (0.5 * x * (1 - t * t) * (0.79788456 + 0.1070322243 * x * x) + 0.5 * (1 + t))


def ref_mlp(x, weights, biases):
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        x = x @ w + b
        if i < len(weights) - 1:
            x = ForkGelu.apply(x)
    return x


def ref_rope(x, positions, theta):
    """The fork's audio RoPE: frequency j is theta^(-2j/D) * (0.5 + 1.5 exp(-2j / 2D)), pairs (2j, 2j+1)."""
    out = x.clone()
    D = x.shape[-1]
    for j in range(D // 2):
        freq = theta ** (-2 * j / D) * (0.5 + 1.5 * math.exp(-2 * j / (2 * D)))
        angle = positions.double() * freq
        a, b = x[:, 2 * j], x[:, 2 * j + 1]
        out[:, 2 * j], out[:, 2 * j + 1] = (
            a * torch.cos(angle) - b * torch.sin(angle),
            a * torch.sin(angle) + b * torch.cos(angle),
        )
    return out


def reference_ttt_branch(x, p, *, causal: bool, use_rope: bool):
    """x + tanh(clamp(alpha, -3, 3)) * TTT(x) of the fork, one row, head and token at a time. x: [B, T, DIM].

    As the fork: zero hidden states pad T to a multiple of the mini-batch; every token of a mini-batch reads with
    the weights after the whole mini-batch's step (its eta matrix has no causal mask); with 3+ MLP layers it reads
    with those end weights and subtracts the step again (twice the step). The weights carried to the next
    mini-batch take it once. `causal` keeps only the tokens <= i in token i's read.
    """
    if "W1" in p:
        weights, biases = [p["W1"], p["W2"]], [p["b1"], p["b2"]]
    else:
        n = sum(1 for k in p if k.startswith("weights."))
        weights, biases = [p[f"weights.{i}"] for i in range(n)], [p[f"biases.{i}"] for i in range(n)]
    L = len(weights)
    read_steps = 1 if L == 2 else 2
    B, T, _ = x.shape
    padded = -(-T // MINI_BATCH) * MINI_BATCH
    y = torch.zeros_like(x)
    x = x.detach()
    with torch.enable_grad():
        for r in range(B):
            h_all = torch.cat([x[r], x.new_zeros(padded - T, DIM)])  # [padded, DIM]
            for h in range(H):
                cols = slice(h * HD, (h + 1) * HD)
                q, k, v = ((h_all @ p[f"{n}.weight"].T + p[f"{n}.bias"])[:, cols] for n in ("wq", "wk", "wv"))
                q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                if use_rope:
                    positions = torch.arange(padded) % MINI_BATCH
                    q, k = ref_rope(q, positions, 10000.0), ref_rope(k, positions, 10000.0)
                gamma, beta = p["ttt_norm_weight"][h], p["ttt_norm_bias"][h]
                target = ref_target(v, k, gamma, beta)
                gate = h_all @ p["learnable_ttt_lr_weight"][h, 0] + p["learnable_ttt_lr_bias"][h, 0]
                lr = BASE_LR * torch.sigmoid(gate) / (HD * MINI_BATCH)  # [padded]
                state = [w[h].clone() for w in weights] + [b[h].clone() for b in biases]
                for start in range(0, padded, MINI_BATCH):
                    tokens = list(range(start, start + MINI_BATCH))
                    grads = {}
                    for s in tokens:
                        params = [t.clone().requires_grad_(True) for t in state]
                        pred = ref_ln(ref_mlp(k[s : s + 1], params[:L], params[L:]), gamma, beta)
                        loss = 0.5 * ((pred - target[s : s + 1]) ** 2).sum()
                        grads[s] = torch.autograd.grad(loss, params)
                    for i in tokens:
                        if i >= T:
                            break
                        used = [s for s in tokens if s <= i] if causal else tokens
                        w_i = [w0 - read_steps * sum(lr[s] * grads[s][j] for s in used) for j, w0 in enumerate(state)]
                        out = q[i : i + 1] + ref_ln(ref_mlp(q[i : i + 1], w_i[:L], w_i[L:]), gamma, beta)
                        y[r, i, cols] = out[0]
                    state = [w0 - sum(lr[s] * grads[s][j] for s in tokens) for j, w0 in enumerate(state)]
    return x + torch.tanh(p["gating_alpha"].clamp(-3, 3)) * y


# moshi's rms_norm_f32 and rope round activations to float32: float64 comparisons use a model that stays float64.
F64_CONFIG = tiny_lm_config(norm="rms_norm", positional_embedding="sin")


def reference_model(values: dict, *, causal: bool, use_rope: bool, lm_config: dict | None = None) -> LMModel:
    """moshi's own float64 LMModel whose TTT layers run `reference_ttt_branch` after self-attention."""
    model = LMModel(**(lm_config or tiny_lm_config()), dtype=torch.float64).eval()
    base = values["base"] or {k: v.double() for k, v in tiny_lm(0).state_dict().items()}
    model.load_state_dict(base, strict=True)
    for n in TTT_LAYERS:
        layer = model.transformer.layers[n]
        sa_block = layer._sa_block

        def patched(x, sa_block=sa_block, p=values["ttt"][n]):
            return reference_ttt_branch(sa_block(x), p, causal=causal, use_rope=use_rope)

        layer._sa_block = patched  # instance attribute: moshi's forward calls self._sa_block(x)
    return model


def valid_logits(model: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """The audio logits of `model` on codes [B, K, T] at the positions moshi marks valid, as float64."""
    with torch.no_grad():
        out = model(codes)
    return out.logits[out.mask].double()  # [n_valid, card]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A moshi-format base (model.safetensors + config.json) of tiny_lm(0), for TTT-only checkpoints."""
    directory = tmp_path_factory.mktemp("base")
    save_file(tiny_lm(0).state_dict(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(tiny_lm_config()))
    return directory


@pytest.fixture(scope="module")
def base_dir64(tmp_path_factory):
    """The same base weights with the all-float64 config F64_CONFIG (norm and positional embedding have no weights)."""
    directory = tmp_path_factory.mktemp("base64")
    save_file(tiny_lm(0).state_dict(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(F64_CONFIG))
    return directory


CASES = [
    pytest.param("ttt_layer", 2, False, True, id="ttt_layer-2layer-lora-rope"),
    pytest.param("ttt_layer", 3, True, False, id="ttt_layer-3layer-full"),
    pytest.param("flat", 2, True, True, id="flat-2layer-full-rope"),
    pytest.param("flat", 3, False, False, id="flat-3layer-lora"),
]


def text_outputs(model: LMModel, steps: int = 11, seed: int = 2) -> torch.Tensor:
    seq = delayed_input(model, model_codes(model, random_audio_codes(1, steps, seed=seed)))
    with torch.no_grad():
        return model.forward_text(seq)[0]  # transformer output [B, T, dim]


@pytest.mark.parametrize("T", [22, 24], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("layout, depth, full, use_rope", CASES)
def test_legacy_checkpoint_matches_the_fork_reference(tmp_path, base_dir64, layout, depth, full, use_rope, causal, T):
    """float64 throughout: our legacy mode and the slow reference agree to 1e-9 (T = 22 pads the last mini-batch;
    measured: ~2e-15)."""
    values = write_fork_checkpoint(
        tmp_path / "consolidated", layout=layout, depth=depth, full=full, use_rope=use_rope, lm_config=F64_CONFIG
    )
    loaded = load(
        tmp_path / "consolidated", base=None if full else str(base_dir64), dtype=torch.float64, legacy_causal=causal
    )
    cfg = loaded.ttt_config
    assert loaded.kind == "legacy_ttt" and cfg.legacy is not None and cfg.target == "legacy"
    assert cfg.legacy.causal == causal and cfg.legacy.mlp_layers == depth and cfg.legacy.use_rope == use_rope
    assert cfg.layers == "1,2" and cfg.num_heads == H
    assert any(note.startswith("WARNING") and "leak" in note for note in loaded.notes) != causal
    codes = model_codes(loaded.model, random_audio_codes(1, T, seed=T))
    expected = valid_logits(reference_model(values, causal=causal, use_rope=use_rope, lm_config=F64_CONFIG), codes)
    torch.testing.assert_close(valid_logits(loaded.model, codes), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("T", [22, 24], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("layout, depth, full, use_rope", CASES)
def test_legacy_checkpoint_matches_the_fork_reference_in_float32(tmp_path, base_dir, layout, depth, full, use_rope, T):
    """float32 model against the float64 reference: within 1e-5 (abs and rel) on logits of size ~1-10.

    The float32 forward rounds every op at ~6e-8 relative; across the ~30 ops between codes and logits (attention,
    TTT inner step, LayerNorms, depth transformer) that accumulates to a few 1e-6 whatever the CPU's summation
    order, which 1e-5 bounds with margin (measured here: at most 2.3e-6).
    """
    values = write_fork_checkpoint(tmp_path / "c", layout=layout, depth=depth, full=full, use_rope=use_rope)
    model = load(tmp_path / "c", base=None if full else str(base_dir)).model
    codes = model_codes(model, random_audio_codes(1, T, seed=T))
    expected = valid_logits(reference_model(values, causal=False, use_rope=use_rope), codes)
    torch.testing.assert_close(valid_logits(model, codes), expected, rtol=1e-5, atol=1e-5)


# ---- Outputs of the real fork, produced outside the repo (tests/data/legacy_fork/README.md says how). ----

FORK_DATA = Path(__file__).parent / "data" / "legacy_fork"
FORK_CASES = ["mlp3_full", "mlp2_lora", "mlp2_rope_lora"]


@pytest.fixture(scope="module")
def fork_base(tmp_path_factory):
    """The base model the fork cases share, as a moshi-format directory, taken from the fork's full checkpoint
    (its plain layers and the `original_layer.` copies of its TTT layers)."""
    tensors = load_file(str(FORK_DATA / "mlp3_full" / "consolidated.safetensors"))
    base = {}
    for name, value in tensors.items():
        m = re.match(r"transformer\.layers\.(\d+)\.original_layer\.(.+)$", name)
        if m:
            base[f"transformer.layers.{m[1]}.{m[2]}"] = value.float()
        elif ".seq_modeling_block." not in name:
            base[name] = value.float()
    directory = tmp_path_factory.mktemp("fork_base")
    save_file(base, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(tiny_lm_config()))
    return directory, {k: v.double() for k, v in base.items()}


def fork_case(name: str, fork_base) -> tuple[dict, dict, bool]:
    """(reference values, the fork's outputs, use_rope) of one stored case."""
    directory = FORK_DATA / name
    weights = directory / ("consolidated.safetensors" if name.endswith("full") else "lora.safetensors")
    tensors = load_file(str(weights))
    ttt = {}
    for n in TTT_LAYERS:
        block = f"transformer.layers.{n}.seq_modeling_block."
        inner = block + "ttt_layer.ttt."
        ttt[n] = {k.removeprefix(inner): v.double() for k, v in tensors.items() if k.startswith(inner)}
        ttt[n]["gating_alpha"] = tensors[block + "forward_ssm_gating.gating_alpha"].double()
    use_rope = json.loads((directory / "training_config.json").read_text())["ttt"]["use_rope"]
    return {"ttt": ttt, "base": fork_base[1]}, load_file(str(directory / "fork_outputs.safetensors")), use_rope


@pytest.mark.parametrize("name", FORK_CASES)
def test_loaded_fork_checkpoints_give_the_fork_logits(name, fork_base):
    """The fork's own files, loaded in float32, give its logits for T = 22 and 24 within 1e-5 (float32 round-off
    of two implementations of the same math in different op orders; measured: at most 1.2e-6)."""
    _, outputs, _ = fork_case(name, fork_base)
    directory = FORK_DATA / name
    model = load(directory, base=None if name.endswith("full") else str(fork_base[0])).model
    for T in (22, 24):
        codes = outputs["codes"][:, :, :T]
        with torch.no_grad():
            out = model(codes)
        mask = out.mask
        torch.testing.assert_close(out.logits[mask], outputs[f"logits_T{T}"][mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FORK_CASES)
def test_reference_matches_the_real_fork_outputs(name, fork_base):
    """The slow float64 reference above, on the fork's own weights, gives the fork's float32 logits within 1e-5:
    the reference is the fork's behaviour, not our reading of it (measured: at most 2.2e-6)."""
    values, outputs, use_rope = fork_case(name, fork_base)
    reference = reference_model(values, causal=False, use_rope=use_rope)
    for T in (22, 24):
        codes = outputs["codes"][:, :, :T]
        with torch.no_grad():
            out = reference(codes)
        mask = out.mask
        torch.testing.assert_close(out.logits[mask], outputs[f"logits_T{T}"][mask].double(), rtol=1e-5, atol=1e-5)


def test_causal_variant_differs_and_only_non_causal_leaks(tmp_path, base_dir):
    write_fork_checkpoint(tmp_path / "c", layout="ttt_layer", depth=2, full=False, use_rope=False)
    leaky = load(tmp_path / "c", base=str(base_dir)).model
    causal = load(tmp_path / "c", base=str(base_dir), legacy_causal=True).model
    codes = model_codes(leaky, random_audio_codes(1, 12, seed=4))
    t0 = 6  # input step t0 + 1 = 7 is the last token of the mini-batch 4..7
    changed = codes.clone()
    changed[:, 1:, t0:] = (changed[:, 1:, t0:] + 5) % leaky.card
    with torch.no_grad():
        outs = {
            name: [m.forward_text(delayed_input(m, c))[0] for c in (codes, changed)]
            for name, m in (("leaky", leaky), ("causal", causal))
        }
    assert not torch.allclose(outs["leaky"][0], outs["causal"][0])
    # Inputs before step 7 are identical; steps 4..6 share the mini-batch of step 7.
    torch.testing.assert_close(outs["causal"][1][:, :7], outs["causal"][0][:, :7], rtol=0, atol=0)
    assert not torch.equal(outs["leaky"][1][:, 4:7], outs["leaky"][0][:, 4:7])
    torch.testing.assert_close(outs["leaky"][1][:, :4], outs["leaky"][0][:, :4], rtol=0, atol=0)
    # The leak reaches the loss: per-token cross-entropy of step 4 changes although its codes did not.
    losses = {}
    for name, m in (("leaky", leaky), ("causal", causal)):
        with torch.no_grad():
            logits = [m(c).logits[:, :, 4].float() for c in (codes, changed)]  # [B, 8, card] at step 4
        losses[name] = [F.cross_entropy(lg[0], codes[0, 1:9, 4]) for lg in logits]
    assert losses["causal"][0] == losses["causal"][1]
    assert losses["leaky"][0] != losses["leaky"][1]


def test_causal_legacy_streams_exactly_and_one_token_calls_never_leak(tmp_path, base_dir):
    """Causal: any chunks give the full numbers. Non-causal: whole mini-batches per call give the full numbers
    also when the last one is partial (padded as the fork's forward); one-token calls see no later token."""
    write_fork_checkpoint(tmp_path / "c", layout="flat", depth=3, full=False, use_rope=True)
    causal = load(tmp_path / "c", base=str(base_dir), legacy_causal=True).model
    leaky = load(tmp_path / "c", base=str(base_dir)).model
    seq = delayed_input(causal, model_codes(causal, random_audio_codes(2, 14, seed=8)))
    changed = seq.clone()
    changed[:, 1:, 9:] = (changed[:, 1:, 9:] + 5) % causal.card
    with torch.no_grad():
        full = causal.forward_text(seq)[0]
        with exact_streaming(causal, 2, 5):
            start, chunks = 0, []
            for n in (3, 5, 1, 5):
                chunks.append(causal.forward_text(seq[:, :, start : start + n])[0])
                start += n
        leaky_full = leaky.forward_text(seq)[0]
        with exact_streaming(leaky, 2, 4):
            whole = [leaky.forward_text(seq[:, :, i : i + 4])[0] for i in range(0, 14, 4)]
        steps = {}
        for name, s in (("seq", seq), ("changed", changed)):
            with exact_streaming(leaky, 2, 1):
                steps[name] = torch.cat([leaky.forward_text(s[:, :, i : i + 1])[0] for i in range(14)], 1)
    # float32 round-off of other chunkings (tests/tolerances.py); the fork's math is checked in float64 above.
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(whole, 1), leaky_full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps["changed"][:, :9], steps["seq"][:, :9], rtol=0, atol=0)
    assert not torch.allclose(steps["changed"][:, 9:], steps["seq"][:, 9:])


def test_legacy_model_saved_in_our_format_keeps_legacy_mode(tmp_path, base_dir):
    write_fork_checkpoint(tmp_path / "c", layout="ttt_layer", depth=3, full=False, use_rope=True)
    loaded = load(tmp_path / "c", base=str(base_dir), dtype=torch.bfloat16)
    assert loaded.model.transformer.layers[1].ttt.weights[0].dtype == torch.float32
    save(tmp_path / "ours", loaded.model, lm_config=loaded.lm_config, ttt_config=loaded.ttt_config)
    again = load(tmp_path / "ours", dtype=torch.bfloat16)
    assert again.ttt_config == loaded.ttt_config and any("leak" in note for note in again.notes)
    torch.testing.assert_close(text_outputs(again.model), text_outputs(loaded.model), rtol=0, atol=0)
    assert load(tmp_path / "ours", legacy_causal=True).ttt_config.legacy.causal


def test_our_checkpoint_with_the_old_flat_legacy_config_loads_the_same(tmp_path, base_dir):
    """Checkpoints saved before LegacyConfig have `"legacy": true, "causal": false, "mlp_layers": 3, ...` at the top
    of config.json's "ttt": they load to the same nested config and the same outputs."""
    write_fork_checkpoint(tmp_path / "c", layout="ttt_layer", depth=3, full=False, use_rope=True)
    loaded = load(tmp_path / "c", base=str(base_dir))
    save(tmp_path / "ours", loaded.model, lm_config=loaded.lm_config, ttt_config=loaded.ttt_config)
    path = tmp_path / "ours" / "config.json"
    config = json.loads(path.read_text())
    nested = config["ttt"]
    assert nested["legacy"]["causal"] is False and nested["legacy"]["mlp_layers"] == 3
    config["ttt"] = {**{k: v for k, v in nested.items() if k != "legacy"}, "legacy": True, **nested["legacy"]}
    path.write_text(json.dumps(config))
    again = load(tmp_path / "ours")
    assert again.ttt_config == loaded.ttt_config and again.ttt_config.legacy.use_rope
    assert any("leak" in note for note in again.notes)
    torch.testing.assert_close(text_outputs(again.model), text_outputs(loaded.model), rtol=0, atol=0)
    assert load(tmp_path / "ours", legacy_causal=True).ttt_config.legacy.causal


def _edit(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_disagreeing_duplicate_copies_are_an_error(tmp_path):
    write_fork_checkpoint(tmp_path / "c", layout="ttt_layer", depth=2, full=True, use_rope=False)
    key = "transformer.layers.1.seq_modeling_block.original_layer.self_attn.out_projs.0.weight"
    _edit(tmp_path / "c" / "consolidated.safetensors", lambda t: t[key].add_(1))
    with pytest.raises(ValueError, match=re.escape(key)):
        load(tmp_path / "c")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop(f"{P}ttt_layer.ttt.ttt_norm_bias"),
            r"missing keys: transformer\.layers\.1\.ttt\.ttt_norm_bias",
        ),
        (lambda t: t.update({f"{P}ttt_layer.ttt.W3": torch.zeros(1)}), r"unknown keys .*ttt_layer\.ttt\.W3"),
        (lambda t: t.update({f"{P}ttt_layer.ttt.b2": torch.zeros(H, 1, 3)}), r"wrong shapes: .*biases\.1"),
        (lambda t: t.update({"transformer.layers.0.mystery.weight": torch.zeros(1)}), r"unknown keys: .*mystery"),
    ],
    ids=["missing", "unknown-ttt", "shape", "unknown-base"],
)
def test_bad_legacy_files_are_named(tmp_path, base_dir, edit, message):
    write_fork_checkpoint(tmp_path / "c", layout="ttt_layer", depth=2, full=False, use_rope=False)
    _edit(tmp_path / "c" / "lora.safetensors", edit)
    with pytest.raises(ValueError, match=message):
        load(tmp_path / "c", base=str(base_dir))


def test_per_layer_contexts_of_the_fork_are_applied(tmp_path, base_dir):
    write_fork_checkpoint(tmp_path / "c", layout="ttt_layer", depth=2, full=False, use_rope=False)
    path = tmp_path / "c" / "training_config.json"
    training = json.loads(path.read_text())
    training["ttt"].update(ttt_layer_context=6, non_ttt_layer_context=9)
    path.write_text(json.dumps(training))
    model = load(tmp_path / "c", base=str(base_dir)).model
    assert [layer.self_attn.context for layer in model.transformer.layers] == [9, 6, 6]


def test_ttt_only_checkpoint_without_base_names_the_hub_base(tmp_path, offline_hub_cache):
    write_fork_checkpoint(tmp_path / "c", layout="flat", depth=2, full=False, use_rope=False)
    with pytest.raises(FileNotFoundError, match="hf download kyutai/moshiko-pytorch-bf16"):
        load(tmp_path / "c")


def test_legacy_models_score_and_refuse_another_mini_batch_size(tmp_path, base_dir):
    """Scoring runs on legacy layers (no telemetry for them). Non-causal mini-batches see their whole mini-batch,
    so chunks made of whole mini-batches reproduce "full"; token-by-token reading cannot and is refused.
    """
    write_fork_checkpoint(tmp_path / "c", layout="ttt_layer", depth=2, full=False, use_rope=False)
    leaky = load(tmp_path / "c", base=str(base_dir)).model
    causal = load(tmp_path / "c", base=str(base_dir), legacy_causal=True).model
    codes = random_audio_codes(1, 12, seed=5)
    b = next(iter(ttt_blocks(leaky).values())).cfg.mini_batch_size
    full = score(leaky, codes, "full").loss
    f32 = {"rtol": 1e-4, "atol": 1e-4, "equal_nan": True}  # float32 round-off of other chunkings (tests/tolerances.py)
    torch.testing.assert_close(score(leaky, codes, "chunked", chunk_size=b).loss, full, **f32)
    with pytest.raises(ValueError, match="non-causal"):
        score(leaky, codes, "stream")
    with pytest.raises(ValueError, match="cuts the non-causal"):
        score(leaky, codes, "chunked", chunk_size=b + 1)
    torch.testing.assert_close(score(leaky, codes, "chunked").loss, full, **f32)  # default chunk: whole
    causal_full = score(causal, codes, "full").loss
    torch.testing.assert_close(score(causal, codes, "stream").loss, causal_full, **f32)
    with pytest.raises(ValueError, match="legacy TTT layer"):
        score(leaky, codes, "full", mini_batch_size=b + 1)
