"""Does the long-file penalty of the demo TTT model go away when it is trained on long input (issue 21)?

The demo TTT model was trained on 416-token windows, each from W_base; on a 26-minute file it falls behind its fair
baseline as soon as the file passes that length, with or without a decay applied at inference (research/
long_drift.py). Here its TTT block alone (W_base, projections, gate, lr gate: everything of `ttt_blocks`; the LM
stays as trained, so the fair baseline stays fair up to this extra training of the branch) is fine-tuned on a long
file of the demo corpus's kind (another seed than the evaluation file), in consecutive 208-token chunks whose fast
weights carry from chunk to chunk (`moshi_ttt.ttt.carry`), with TTTConfig.decay set or not.

Usage (NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1):
    python -m research.long_drift make-demo --work T --minutes 40 --seed 5151
    python -m research.long_drift encode --work T
    python -m research.decay_finetune --train T --out O --decay 0.01 --minutes 12
    python -m research.long_drift score --work W --checkpoint O/model --name finetuned_decay_0.01
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

from moshi_ttt import load, save  # noqa: E402
from moshi_ttt.train import audio_loss  # noqa: E402
from moshi_ttt.training.data import training_codes  # noqa: E402
from moshi_ttt.ttt.apply import ttt_blocks  # noqa: E402
from moshi_ttt.ttt.carry import TTTCarry, carry_ttt_state  # noqa: E402
from research.long_drift import decayed_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="a work dir with long_codes.pt (training file)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--decay", type=float, default=0.0)
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--streams", type=int, default=4, help="rows: the file cut in this many contiguous parts")
    parser.add_argument("--chunk", type=int, default=208, help="tokens per forward (a multiple of b = 16)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="control: the fair baseline's layer 0 instead")
    parser.add_argument("--no-carry", action="store_true", help="control: no state carried between chunks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.baseline:  # the control: the fair baseline's layer 0 (where the TTT block sits) on the same data
        ckpt = load(REPO / "demo_assets" / "fair_baseline")
        model = ckpt.model.train()
        params = list(model.transformer.layers[0].parameters())
    else:
        ckpt = load(decayed_checkpoint(args.out, args.decay))
        model = ckpt.model.train()
        params = [p for block in ttt_blocks(model).values() for p in block.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    codes = torch.load(args.train / "long_codes.pt")  # [1, 8, T]
    part = codes.shape[-1] // args.streams // args.chunk * args.chunk
    streams = codes[0, :, : part * args.streams].reshape(8, args.streams, part).transpose(0, 1)  # [S, 8, part]
    rng = random.Random(args.seed)
    offsets = [rng.randrange(0, part // args.chunk) * args.chunk for _ in range(args.streams)]
    carry, log, start, step = TTTCarry(), [], time.perf_counter(), 0
    with carry_ttt_state(model, carry) if ttt_blocks(model) else contextlib.nullcontext():
        while time.perf_counter() - start < args.minutes * 60:
            wrapped = torch.tensor([o + args.chunk > part for o in offsets])
            offsets = [0 if w else o for o, w in zip(offsets, wrapped.tolist(), strict=True)]
            if args.no_carry:
                carry.reset(torch.ones(args.streams, dtype=torch.bool))  # every chunk from W_base
            elif bool(wrapped.any()):
                carry.reset(wrapped)  # a stream back at its start: fresh fast weights
            batch = torch.stack([streams[i, :, o : o + args.chunk] for i, o in enumerate(offsets)])  # [S, 8, C]
            loss = audio_loss(model, training_codes(model, batch))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            offsets = [o + args.chunk for o in offsets]
            step += 1
            log.append(loss.item())
            if step % 50 == 0:
                print(f"step {step} ({time.perf_counter() - start:.0f} s): loss {sum(log[-50:]) / 50:.4f}", flush=True)
    model.eval()
    save(args.out / "model", model, lm_config=ckpt.lm_config, ttt_config=ckpt.ttt_config, mimi_ref=ckpt.mimi_ref)
    (args.out / "train_log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "losses": log, "steps": step}))  # fmt: skip
    print(f"{step} steps, {args.out / 'model'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
