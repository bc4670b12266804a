"""Does the TTT inner loop remember a repeated passage on the demo model's own features? Next-frame accuracy.

The inner loop alone (no outer training): per-frame features h_t of the demo baseline LM at one reading point, keys
k_t = P(h_{t-1}), values v_t = h_t, queries q_t = P(h_t) (the best a shifted key/query pair can do; P is the
optional centring / L2 normalisation). After token t the fast weights answer a_t = LN(f_{W_t}(q_t)); the probe
decodes it by nearest neighbour (cosine) among the targets y_j = LN(v_j - k_j) stored so far (j <= t) and scores
the *codes* of that frame against the codes of the true next input frame t + 1: next-frame accuracy, the fraction
of the 9 code entries (text + 8 codebooks) that match, averaged over each reading of the passage. A memory shows as
a much higher accuracy on the 2nd and 3rd readings than on the 1st (where the passage is new and only generic
successors can be recalled). `base_lr 0` (no learning) is the control.

Inner models: "mlp" (moshi_ttt.ttt.ops.ttt_mlp, TTT-MLP) and "linear" (TTT-Linear, f(x) = x W + b, dual form
written here: the core has no TTT-Linear yet). Features: the input embeddings (layer 0's input), the residual
stream after layer 0's attention (where the demo's TTT blocks read), layer 1's input, and after layer 1's attention.

It reads training-style clips only (train_repeat_*) unless --split heldout is given: tune on training clips.
Usage (from the repo root, after `python -m scripts.build_demo_assets --stage corpus` and the codes of its clips,
see MANIFEST.md):
    NO_TORCH_COMPILE=1 python -m research.probe_memory --work /tmp/demo_work [--clips 6] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moshi_ttt.compat.sequence import delayed_input, model_codes
from moshi_ttt.data.checkpoints import load
from moshi_ttt.ttt.ops import FastWeights, head_layer_norm, position_factors, ttt_mlp
from scripts.demo_corpus import FRAME
from scripts.demo_recipe import next_frame_accuracy

REPO = Path(__file__).resolve().parent.parent
POINTS = ("embeddings", "after_attention_0", "input_1", "after_attention_1")


def features(model, codes: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features [T, dim] of one clip's audio codes [8, T] at each reading point, and the model input [9, T]."""
    captured: dict[str, torch.Tensor] = {}
    layers = model.transformer.layers
    hooks = []
    for i in (0, 1):
        hooks.append(layers[i].register_forward_pre_hook(lambda _m, a, i=i: captured.__setitem__(f"in{i}", a[0])))
        hooks.append(
            layers[i].self_attn.register_forward_hook(lambda _m, _a, o, i=i: captured.__setitem__(f"attn{i}", o))
        )
    inputs = delayed_input(model, model_codes(model, codes[None]))  # [1, 9, T]
    try:
        with torch.no_grad():
            model.forward_text(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    feats = {
        "embeddings": captured["in0"],
        "after_attention_0": captured["in0"] + layers[0].layer_scale_1(captured["attn0"]),
        "input_1": captured["in1"],
        "after_attention_1": captured["in1"] + layers[1].layer_scale_1(captured["attn1"]),
    }
    return {k: v[0].float() for k, v in feats.items()}, inputs[0]


def ttt_linear(w, b, xq, xk, xv, lr, mini_batch_size: int) -> torch.Tensor:
    """TTT-Linear inner loop, dual form per mini-batch (same rule as TTT-MLP: gradients at W0, causal reads).

    w [H, D, D], b [H, 1, D]; xq, xk, xv [H, T, D]; lr [H, T]. Returns LN(f_{W_i}(q_i)) [H, T, D]."""
    H, T, D = xq.shape
    ones, zeros = torch.ones(H, D), torch.zeros(H, D)
    target = head_layer_norm((xv - xk)[None], ones, zeros)[0]  # [H, T, D]
    outs = []
    for start in range(0, T, mini_batch_size):
        sl = slice(start, min(start + mini_batch_size, T))
        q, k, y, eta_s = xq[:, sl], xk[:, sl], target[:, sl], lr[:, sl]
        n = q.shape[1]
        tau = position_factors(None, mini_batch_size, torch.float32, "cpu")[:n]
        z = k @ w + b  # [H, n, D]
        z_hat = F.layer_norm(z, (D,), eps=1e-6)
        # d/dz 1/2 |LN(z) - y|^2 through the LayerNorm
        g_hat = z_hat - y
        g = (g_hat - g_hat.mean(-1, keepdim=True) - z_hat * (g_hat * z_hat).mean(-1, keepdim=True)) / torch.sqrt(
            z.var(-1, unbiased=False, keepdim=True) + 1e-6
        )
        eta = torch.tril(tau[:, None] * eta_s[:, None, :])  # [H, n, n]
        zq = q @ w + b - (eta * (q @ k.transpose(1, 2) + 1)) @ g
        outs.append(F.layer_norm(zq, (D,), eps=1e-6))
        last = tau[-1] if n == mini_batch_size else 0.0  # a partial mini-batch does not update
        w = w - last * k.transpose(1, 2) @ (eta_s[..., None] * g)
        b = b - last * (eta_s[..., None] * g).sum(1, keepdim=True)
    return torch.cat(outs, dim=1)


def prepare(h: torch.Tensor, mean: torch.Tensor, qk: str) -> torch.Tensor:
    """Keys/queries from features h [T, dim]: LayerNorm-ed ("ln"), centred on the training mean first ("center"),
    or centred and L2-normalised to norm sqrt(dim) ("l2")."""
    if qk == "ln":
        return F.layer_norm(h, h.shape[-1:])
    x = h - mean
    if qk == "center":
        return F.layer_norm(x, x.shape[-1:])
    return F.normalize(x, dim=-1) * x.shape[-1] ** 0.5


def answers(x: torch.Tensor, inner: str, heads: int, b: int, base_lr: float, init_std: float, seed: int = 0):
    """Answers a [T - 1, dim] (heads concatenated) and stored targets y [T - 1, dim]; row s is key x_s, value
    x_{s+1}, query x_{s+1} (token s + 1 of the clip)."""
    T, dim = x.shape
    D = dim // heads
    xk = x[:-1].reshape(T - 1, heads, D).transpose(0, 1)  # [H, T-1, D]
    xv = x[1:].reshape(T - 1, heads, D).transpose(0, 1)
    lr = torch.full((heads, T - 1), base_lr / D)
    g = torch.Generator().manual_seed(seed)
    ones, zeros = torch.ones(heads, D), torch.zeros(heads, D)
    with torch.no_grad():
        if inner == "mlp":
            w = FastWeights(
                torch.randn(1, heads, D, 4 * D, generator=g) * init_std,
                torch.zeros(1, heads, 1, 4 * D),
                torch.randn(1, heads, 4 * D, D, generator=g) * init_std,
                torch.zeros(1, heads, 1, D),
            )
            out, _ = ttt_mlp(w, xv[None], xk[None], xv[None], lr[None], ones, zeros, b)
            a = out[0] - xv  # LN(f(q)) [H, T-1, D]
        else:
            w = torch.randn(heads, D, D, generator=g) * init_std
            a = ttt_linear(w, torch.zeros(heads, 1, D), xv, xk, xv, lr, b)
        y = head_layer_norm((xv - xk)[None], ones, zeros)[0]
    merge = lambda t: t.transpose(0, 1).reshape(T - 1, dim)  # noqa: E731
    return merge(a), merge(y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_work"), help="build_demo_assets.py's --work")
    parser.add_argument("--model", type=Path, default=REPO / "demo_assets" / "fair_baseline")
    parser.add_argument("--split", choices=("train", "heldout"), default="train")
    parser.add_argument("--clips", type=int, default=6, help="repeat clips of the split to read")
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--json", type=Path, help="write every row here")
    for name in ("point", "inner", "qk", "heads", "b", "base_lr", "init_std"):
        parser.add_argument(f"--{name.replace('_', '-')}", nargs="+", help="only these values of the grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    index = json.loads((args.work / "corpus" / "index.json").read_text())
    codes = {n: c.long() for n, c in load_file(str(args.work / "codes.safetensors")).items()}
    names = [n for n, v in index.items() if v["split"] == args.split and v["kind"] == "repeat"][: args.clips]
    plain = [n for n, v in index.items() if v["split"] == "train" and v["kind"] == "plain"][:20]
    model = load(str(args.model)).model.eval()
    clips = {n: features(model, codes[n]) for n in names}
    means = {p: torch.cat([features(model, codes[n])[0][p] for n in plain]).mean(0) for p in POINTS}
    grid = {
        "point": POINTS, "inner": ("mlp", "linear"), "qk": ("ln", "center", "l2"), "heads": (1, 4),
        "b": (1, 4, 16), "base_lr": (0.0, 1.0, 4.0, 16.0, 64.0), "init_std": (0.02, 0.3),
    }  # fmt: skip
    if args.quick:
        grid.update(heads=(1,), b=(4, 16), base_lr=(0.0, 4.0, 16.0), init_std=(0.02,))
    kinds = {"heads": int, "b": int, "base_lr": float, "init_std": float}
    for name in grid:
        if getattr(args, name) is not None:
            grid[name] = tuple(kinds.get(name, str)(v) for v in getattr(args, name))
    rows = []
    print("point              inner  qk     H  b   base_lr init   acc reading 1 / 2 / 3   (2+3) - 1")
    for point, inner, qk, heads, b, base_lr, init_std in itertools.product(*grid.values()):
        if inner == "linear" and init_std != grid["init_std"][0]:
            continue  # TTT-Linear: W starts near zero either way (its answer is LayerNorm-ed)
        per = torch.zeros(3)
        for name, (feats, inputs) in clips.items():
            x = prepare(feats[point], means[point], qk)
            a, y = answers(x, inner, heads, b, base_lr, init_std)
            acc = next_frame_accuracy(a, y, inputs)  # acc[i]: prediction of frame i + 2
            readings = [(s // FRAME, e // FRAME) for s, e in index[name]["readings"]]
            per += torch.stack([acc[max(s - 2, 0) : e - 2].mean() for s, e in readings])
        r = (per / len(clips)).tolist()
        row = dict(zip(grid, (point, inner, qk, heads, b, base_lr, init_std), strict=True))
        row.update(acc=r, gain=(r[1] + r[2]) / 2 - r[0])
        rows.append(row)
        print(f"{point:18s} {inner:6s} {qk:6s} {heads:2d} {b:2d} {base_lr:6.1f} {init_std:5.2f}   "
              f"{r[0]:.3f} / {r[1]:.3f} / {r[2]:.3f}   {row['gain']:+.3f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    best = sorted(rows, key=lambda r: -r["gain"])[:8]
    print("best by (2+3) - 1:")
    for r in best:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
