"""Joint training from scratch: a TTT LM and its fair baseline (same init, same batches, same steps), issue 13.

Both models are the demo's LM (demo_lm_config.LM_CONFIG) from the same seeded initialisation; the TTT model adds
a TTT block (TTTConfig.branch_input="before_attention": it reads the layer input beside attention)
with wq and wv started as the identity and the share_qk convolutions as a one-token shift; --inner picks TTT-MLP or
TTT-Linear. Every step both see the
same batch: whole short repeat clips (--short-work, passage read 3 times, > 4 s apart) mixed with random crops of
the demo corpus's training clips. Validation: the last --val training repeat and plain clips (never trained on);
--heldout scores the held-out clips once at the end.
Usage:
    NO_TORCH_COMPILE=1 python scripts/recipe_joint.py --work /tmp/demo_work --short-work /tmp/short --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from demo_corpus import FRAME  # noqa: E402
from demo_lm_config import LM_CONFIG  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402
from probe_memory import next_frame_accuracy  # noqa: E402
from recipe_search import evaluate  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from moshi_ttt import TTTConfig, apply_ttt, ttt_blocks  # noqa: E402
from moshi_ttt.compat.sequence import delayed_input, model_codes  # noqa: E402
from moshi_ttt.data.checkpoints import save  # noqa: E402
from moshi_ttt.train import audio_loss  # noqa: E402
from moshi_ttt.training.data import training_codes  # noqa: E402
from moshi_ttt.ttt.ops import head_layer_norm, ttt_mlp  # noqa: E402


def read(work: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    index = json.loads((work / "corpus" / "index.json").read_text())
    return index, {n: c.long() for n, c in load_file(str(work / "codes.safetensors")).items()}


def build(kind: str, args) -> LMModel:
    torch.manual_seed(args.seed)
    model = LMModel(device="cpu", dtype=torch.float32, **LM_CONFIG)
    if kind == "ttt":
        torch.manual_seed(args.seed + 1)
        cfg = TTTConfig(
            layers=args.layers, mini_batch_size=args.mini_batch_size, base_lr=args.base_lr,
            gating_alpha_init=args.alpha, share_qk=True, num_heads=args.heads, init_std=args.init_std,
            branch_input=f"{args.read}_attention", inner=args.inner,
        )  # fmt: skip
        apply_ttt(model, cfg)
        for block in ttt_blocks(model).values():
            block.init_qk_shift()
            if not args.no_identity:
                with torch.no_grad():
                    for lin in (block.wq, block.wv):
                        lin.weight.copy_(torch.eye(lin.weight.shape[0]))
                        lin.bias.zero_()
    return model.train()


def memory_accuracy(model, clips: dict[str, torch.Tensor], index: dict, layer: int = 0) -> tuple[list[float], float]:
    """The probe's next-frame accuracy (readings 1 / 2 / 3) of a trained TTT block's own answers, and the mean norm
    of its gated branch over the norm of the residual stream it reads (share_qk shift: key t from token t - 1)."""
    block = ttt_blocks(model)[layer]
    captured = {}
    hook = block.register_forward_pre_hook(lambda _m, a: captured.__setitem__("x", a[0]))
    per, ratios = torch.zeros(3), []
    try:
        for name, codes in clips.items():
            inputs = delayed_input(model, model_codes(model, codes[None]))
            with torch.no_grad():
                model.forward_text(inputs)
                x = captured["x"]
                xq, xk, xv, lr, _ = block._project(block.norm(x), None)
                ln = (block.ttt_norm_weight, block.ttt_norm_bias)
                w_base = block.base_weights(1)
                out, _ = ttt_mlp(w_base, xq, xk, xv, lr, *ln, block.cfg.mini_batch_size, block.learnable_token_idx)
                answers = (out - xq)[0].transpose(0, 1).flatten(1)  # [T, dim]
                targets = head_layer_norm(xv - xk, *ln)[0]
                targets = targets.transpose(0, 1).flatten(1)
                branch = torch.tanh(block.gating_alpha) * block.wo(out[0].transpose(0, 1).flatten(1))
                ratios.append(float(branch.norm(dim=-1).mean() / x[0].norm(dim=-1).mean()))
            # Token t holds key t - 1 and value t: the probe's row s is token s + 1.
            acc = next_frame_accuracy(answers[1:], targets[1:], inputs[0])
            readings = [(s // FRAME, e // FRAME) for s, e in index[name]["readings"]]
            per += torch.stack([acc[max(s - 2, 0) : e - 2].mean() for s, e in readings])
    finally:
        hook.remove()
    return (per / len(clips)).tolist(), sum(ratios) / len(ratios)


def copy_clip(rng: random.Random, length: int, card: int = 256, n_q: int = 8) -> torch.Tensor:
    """A synthetic repeat clip [n_q, length] of uniformly random codes: a passage of 57-150 frames (4.6-12 s, longer
    than the 50-token attention window) read three times with fresh random filler of 19-60 frames between, so that
    on the 2nd and 3rd readings nothing but an in-context memory predicts the next frame (the weights cannot)."""
    g = torch.Generator().manual_seed(rng.randrange(2**62))
    passage = torch.randint(0, card, (n_q, rng.randint(57, 150)), generator=g)
    parts = [torch.randint(0, card, (n_q, rng.randint(1, 12)), generator=g), passage]
    for _ in range(2):
        parts += [torch.randint(0, card, (n_q, rng.randint(19, 60)), generator=g), passage]
    return torch.cat(parts, dim=1)[:, :length]


def batches(args, short: list[torch.Tensor], long: list[torch.Tensor]):
    """Yields audio codes [B, 8, L] (-1 = padding): synthetic copy clips (--copy-frac), whole short clips
    (--short-frac) and crops of the long ones (the rest)."""
    rng = random.Random(args.seed)
    L = args.seq_len
    weights = [f.shape[1] for f in long]
    while True:
        rows = []
        for _ in range(args.batch_size):
            u = rng.random()
            if u < args.copy_frac:
                f = copy_clip(rng, L)
            elif u < args.copy_frac + args.short_frac:
                f = rng.choice(short)[:, :L]
            else:
                f = rng.choices(long, weights=weights)[0]
                start = rng.randrange(0, max(1, f.shape[1] - L + 1))
                f = f[:, start : start + L]
            rows.append(torch.nn.functional.pad(f, (0, L - f.shape[1]), value=-1))
        yield torch.stack(rows)


def parser() -> argparse.ArgumentParser:
    """The recipe's options (scripts/build_demo_assets.py's stage joint parses its fixed recipe with it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/demo_work"))
    p.add_argument("--short-work", type=Path, required=True)
    p.add_argument("--kind", choices=("ttt", "baseline"), default="ttt")
    p.add_argument("--layers", default="0")
    p.add_argument("--read", choices=("after", "before"), default="before")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--inner", choices=("mlp", "linear"), default="mlp", help="TTTConfig.inner (linear: W1, b1 only)")
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--base-lr", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--no-identity", action="store_true")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=288)
    p.add_argument("--short-frac", type=float, default=0.5)
    p.add_argument("--copy-frac", type=float, default=0.0, help="rows of random-code repeat clips (copy_clip)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha-lr-multiplier", type=float, default=10.0)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument(
        "--decay-start", type=float, default=0.0,
        help="fraction of the steps at the peak lr before the cosine decay (0: cosine over all steps)",
    )  # fmt: skip
    p.add_argument("--val", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--heldout", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", type=Path)
    p.add_argument("--tag", default="joint")
    return p


def cosine_factor(step: int, steps: int, decay_start: float = 0.0) -> float:
    """The lr's multiplier at `step`: 1 for the first decay_start * steps steps, then a cosine from 1 to 0 (with
    decay_start 0 exactly the plain cosine over all steps that J1-J7 used)."""
    if not 0.0 <= decay_start < 1.0:
        raise ValueError(f"decay_start must lie in [0, 1), got {decay_start}")
    flat = decay_start * steps  # 0.0 gives step / steps exactly: the same floats as the plain cosine
    return 1.0 if step < flat else 0.5 * (1 + math.cos(math.pi * (step - flat) / (steps - flat)))


def train(args: argparse.Namespace, log=print) -> tuple[LMModel, dict]:
    """Trains one model of the recipe (args.kind) and returns it (in eval mode) with its validation history,
    training losses and (args.heldout) held-out scores; `log` gets a progress line every args.eval_every steps."""
    torch.set_num_threads(args.threads)
    index, codes = read(args.work)
    _, scodes = read(args.short_work)
    rep = [n for n, v in index.items() if v["split"] == "train" and v["kind"] == "repeat"]
    pla = [n for n, v in index.items() if v["split"] == "train" and v["kind"] == "plain"]
    val = {n: codes[n] for n in rep[-args.val :] + pla[-args.val :]}
    long = [codes[n] for n in rep[: -args.val] + pla[: -args.val]]
    model = build(args.kind, args)
    alphas = [b.gating_alpha for b in ttt_blocks(model).values()]
    ids = {id(a) for a in alphas}
    groups = [{"params": [q for q in model.parameters() if id(q) not in ids], "lr": args.lr}]
    if alphas:
        groups.append({"params": alphas, "lr": args.lr * args.alpha_lr_multiplier})
    for g in groups:
        g["base"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.01, betas=(0.9, 0.95))
    stream = batches(args, list(scodes.values()), long)
    history, losses, start = {}, [], time.time()
    for step in range(args.steps):
        warm = min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = g["base"] * warm * cosine_factor(step, args.steps, args.decay_start)
        loss = audio_loss(model, training_codes(model, next(stream)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        s = step + 1
        if s % args.eval_every == 0 or s == args.steps:
            history[s] = evaluate(model, val, index)
            gates = {i: round(float(torch.tanh(b.gating_alpha.detach()).abs().mean()), 3)
                     for i, b in ttt_blocks(model).items()}  # fmt: skip
            log(f"[{args.tag}] step {s} train {sum(losses[-20:]) / len(losses[-20:]):.4f} val "
                f"{json.dumps({k: round(v, 4) for k, v in history[s].items()})} gate {gates} "
                f"({time.time() - start:.0f} s)")  # fmt: skip
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "val": history, "train_losses": losses}
    if args.kind == "ttt":
        repeats = {n: c for n, c in val.items() if index[n]["readings"]}
        result["memory_accuracy"], result["branch_norm_ratio"] = memory_accuracy(model.eval(), repeats, index)
        log(f"[{args.tag}] in-model next-frame accuracy {result['memory_accuracy']}, branch / residual norm "
            f"{result['branch_norm_ratio']:.3f}")  # fmt: skip
    if args.heldout:
        held = {n: codes[n] for n, v in index.items() if v["split"] == "heldout"}
        result["heldout"] = evaluate(model, held, index)
        log(f"[{args.tag}] held out {json.dumps(result['heldout'])}")
    return model.eval(), result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    model, result = train(args, log=lambda line: print(line, flush=True))
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
        save(args.save / args.tag, model, lm_config=LM_CONFIG, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
