"""Can the TTT inner loop recall a passage it has read? A probe of the inner loop alone, with hand-set projections.

For a held-out clip whose passage is read three times, it takes per-frame features h_t of a trained LM (the input
embeddings, or the residual stream after a layer's attention or after the whole layer; LayerNorm-ed), and runs the
TTT-MLP inner loop (`moshi_ttt.ttt.ops.ttt_mlp`, one head of the model's width) with keys k_t = h_{t-1}, values
v_t = h_t and queries q_t = h_t: the best a shifted key/query pair can do. After each token it compares what the
fast weights answer, LN(f(q_t)), with the truth LN(h_{t+1} - h_t) (the target the inner loop was trained on) by
cosine similarity, averaged over each reading. A memory shows as a higher cosine on the 2nd and 3rd readings than
on the 1st.

Usage (from the repo root, after `python -m scripts.build_demo_assets` has built --work):
    NO_TORCH_COMPILE=1 python -m research.probe_inner_recall --work /tmp/demo_work [--clip heldout_repeat_00]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moshi_ttt.compat.sequence import delayed_input, model_codes
from moshi_ttt.data.checkpoints import load
from moshi_ttt.ttt.ops import FastWeights, head_layer_norm, ttt_mlp
from scripts.demo_corpus import FRAME

FEATURES = ("embeddings", "after_attention_0", "after_layer_0", "after_layer_1")


def features(model, codes: torch.Tensor, where: str) -> torch.Tensor:
    """Per-frame features [T, dim] of one clip's codes [8, T], LayerNorm-ed."""
    captured = {}
    layer0 = model.transformer.layers[0]
    hooks = [layer0.register_forward_pre_hook(lambda _m, a: captured.__setitem__("in", a[0]))]
    if where == "after_attention_0":
        hooks.append(layer0.self_attn.register_forward_hook(lambda _m, _a, o: captured.__setitem__("attn", o)))
    elif where.startswith("after_layer_"):
        layer = model.transformer.layers[int(where.rsplit("_", 1)[1])]
        hooks.append(layer.register_forward_hook(lambda _m, _a, o: captured.__setitem__("out", o)))
    try:
        with torch.no_grad():
            model.forward_text(delayed_input(model, model_codes(model, codes[None])))
    finally:
        for hook in hooks:
            hook.remove()
    if where == "embeddings":
        x = captured["in"]
    elif where == "after_attention_0":
        x = captured["in"] + layer0.layer_scale_1(captured["attn"])
    else:
        x = captured["out"]
    return F.layer_norm(x[0].float(), (x.shape[-1],))


def recall(x: torch.Tensor, mini_batch_size: int, base_lr: float, seed: int = 0) -> torch.Tensor:
    """Cosine [T - 2] between the fast weights' answer to query h_{t+1} and the truth LN(h_{t+2} - h_{t+1})."""
    T, D = x.shape
    g = torch.Generator().manual_seed(seed)
    weights = FastWeights(
        torch.randn(1, 1, D, 4 * D, generator=g) * 0.02,
        torch.zeros(1, 1, 1, 4 * D),
        torch.randn(1, 1, 4 * D, D, generator=g) * 0.02,
        torch.zeros(1, 1, 1, D),
    )
    xk, xv = x[:-1][None, None], x[1:][None, None]  # token s: key h_{s-1}, value h_s
    lr = torch.full((1, 1, T - 1), base_lr / D)
    ones, zeros = torch.ones(1, D), torch.zeros(1, D)
    with torch.no_grad():
        out, _ = ttt_mlp(weights, xv, xk, xv, lr, ones, zeros, mini_batch_size)  # queries q_s = h_s
    answer = (out - xv)[0, 0, :-1]  # LN(f(q)) for queries h_1 .. h_{T-2}
    truth = head_layer_norm((x[2:] - x[1:-1])[None, None], ones, zeros)[0, 0]
    return F.cosine_similarity(answer, truth, dim=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_work"), help="build_demo_assets.py's --work")
    parser.add_argument("--clip", action="append", help="held-out repeat clip(s); default: all of them")
    parser.add_argument("--mini-batch-size", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--base-lr", type=float, nargs="+", default=[0.1, 1.0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    index = json.loads((args.work / "corpus" / "index.json").read_text())
    codes = load_file(str(args.work / "codes.safetensors"))
    clips = args.clip or [n for n, v in index.items() if v["split"] == "heldout" and v["kind"] == "repeat"]
    model = load(str(args.work / "baseline")).model.eval()
    print("features             b   base_lr   cosine on reading 1 / 2 / 3 (mean over clips)")
    for where in FEATURES:
        feats = {clip: features(model, codes[clip].long(), where) for clip in clips}
        for b in args.mini_batch_size:
            for base_lr in args.base_lr:
                per_reading = torch.zeros(3)
                for clip, x in feats.items():
                    cos = recall(x, b, base_lr)
                    readings = [(s // FRAME, e // FRAME) for s, e in index[clip]["readings"]]
                    # cos[i] answers the query h_{i+1}: reading frames [s, e) are indices [s - 1, e - 1).
                    per_reading += torch.stack([cos[max(s - 1, 0) : e - 1].mean() for s, e in readings])
                r = (per_reading / len(feats)).tolist()
                print(f"{where:20s} {b:2d} {base_lr:8.2f}   {r[0]:+.3f} / {r[1]:+.3f} / {r[2]:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
