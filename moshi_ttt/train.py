"""Outer-loop training of TTT layers (optionally all weights) on audio codes, with exact resume.

Each file is read in chunks, in order; the TTT state is carried from chunk to chunk (detached) and restarts from
the *current* W_base at file boundaries (`moshi_ttt.ttt.carry`). Attention sees one chunk at a time, so whatever
the model remembers across chunks, it remembers through the fast weights.

CLI: python -m moshi_ttt.train --init CKPT (--audio FILE... | --manifest JSONL | --codes F...) --out DIR
     [--ttt-layers middle] [--steps N] [--resume]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from moshi_ttt.config import TTTConfig
from moshi_ttt.data.checkpoints import LoadedCheckpoint, load, save
from moshi_ttt.evaluate import UsageError, read_manifest
from moshi_ttt.training.data import CodeBatcher, cached_codes, training_codes
from moshi_ttt.ttt.apply import apply_ttt, ttt_blocks
from moshi_ttt.ttt.carry import TTTCarry, carry_ttt_state
from moshi_ttt.ttt.state import FastWeightState

logger = logging.getLogger(__name__)

FAST_WEIGHT_NAMES = ("W1", "b1", "W2", "b2")
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Outer-loop settings (the learning-rate multipliers follow the older TTT fork's names)."""

    steps: int = 1000  # optimizer steps in all
    batch_size: int = 4  # files read side by side, one TTT state row each
    chunk_size: int = 64  # tokens per forward; a multiple of the TTT mini_batch_size
    lr: float = 1e-3  # AdamW learning rate of the non-TTT-weight parameters (projections, gates, norms)
    weight_lr_multiplier: float = 1.0  # times lr for W_base (W1, b1, W2, b2)
    alpha_lr_multiplier: float = 1.0  # times lr for the gate alpha
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    train_all: bool = False  # also train the base model's weights (at lr)
    seed: int = 0  # file order
    save_every: int = 0  # Trainer.run calls its `save` every N steps (the CLI: checkpoint + state); 0: only at the end

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("steps, batch_size and chunk_size must be >= 1")
        if self.lr <= 0 or self.grad_clip < 0:
            raise ValueError(f"lr must be > 0 and grad_clip >= 0, got {self.lr} and {self.grad_clip}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")


def audio_loss(model: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the audio codebooks over moshi's valid positions (LMModel.forward's mask)."""
    out = model(codes)
    target = codes[:, model.audio_offset : model.audio_offset + model.dep_q]  # [B, 8, T]
    mask = out.mask  # [B, 8, T]
    if not bool(mask.any()):
        raise ValueError("this batch has no valid audio position to train on")
    return F.cross_entropy(out.logits[mask].float(), target[mask])


def param_groups(model: LMModel, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: W_base at lr * weight_lr_multiplier, alpha at lr * alpha_lr_multiplier, the rest at lr."""
    blocks = ttt_blocks(model)
    if not blocks and not cfg.train_all:
        raise ValueError("the model has no TTT layer to train; apply TTT first or set train_all")
    weights, alphas, others = [], [], []
    seen = set()
    for block in blocks.values():
        for name, param in block.named_parameters():
            seen.add(id(param))
            if name in FAST_WEIGHT_NAMES:
                weights.append(param)
            elif name == "gating_alpha":
                alphas.append(param)
            else:
                others.append(param)
    for param in model.parameters():
        if id(param) not in seen:
            param.requires_grad_(cfg.train_all)
            if cfg.train_all:
                others.append(param)
    groups = [
        {"params": weights, "lr": cfg.lr * cfg.weight_lr_multiplier},
        {"params": alphas, "lr": cfg.lr * cfg.alpha_lr_multiplier},
        {"params": others, "lr": cfg.lr},
    ]
    return [g for g in groups if g["params"]]


class Trainer:
    """Holds the model, optimizer, batcher and carried TTT state; `step()` runs one optimizer step."""

    def __init__(self, model: LMModel, files: list[torch.Tensor], cfg: TrainConfig):
        for block in ttt_blocks(model).values():
            b = block.cfg.mini_batch_size
            if cfg.chunk_size % b:
                raise ValueError(f"chunk_size {cfg.chunk_size} must be a multiple of the TTT mini_batch_size {b}")
        self.model = model.train()
        self.cfg = cfg
        self.batcher = CodeBatcher(files, cfg.batch_size, cfg.chunk_size, cfg.seed)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
        self.carry = TTTCarry()
        self.step_count = 0

    def step(self) -> float:
        audio, new_file = self.batcher.next_batch()
        codes = training_codes(self.model, audio.to(self.model.device))
        self.carry.reset(new_file)
        with carry_ttt_state(self.model, self.carry):
            loss = audio_loss(self.model, codes)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        return loss.item()

    def run(
        self,
        on_step: Callable[[int, float], None] | None = None,
        progress: bool = False,
        save: Callable[[Trainer], None] | None = None,
    ) -> list[float]:
        """Steps until `cfg.steps`; `save(trainer)` runs after every `cfg.save_every`-th step (0: never here; the
        caller saves at the end)."""
        if self.cfg.save_every and save is None:
            raise ValueError("TrainConfig.save_every is set but run() was given no save function")
        losses = []
        bar = tqdm(total=self.cfg.steps, initial=self.step_count, disable=not progress, desc="train", unit="step")
        while self.step_count < self.cfg.steps:
            loss = self.step()
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if on_step is not None:
                on_step(self.step_count, loss)
            if save is not None and self.cfg.save_every and self.step_count % self.cfg.save_every == 0:
                save(self)
        bar.close()
        return losses

    # --- exact resume: optimizer moments, carried fast weights and the batcher position ---
    def save_state(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        opt = self.optimizer.state_dict()
        for idx, slots in opt["state"].items():
            for key, value in slots.items():
                tensors[f"opt.{idx}.{key}"] = value.detach().contiguous()
        for layer, state in self.carry.states.items():
            tensors.update({f"carry.{layer}.{k}": v for k, v in state.state_dict().items()})
        for layer, mask in self.carry.pending_reset.items():
            tensors[f"carry.{layer}.pending_reset"] = mask.to(torch.uint8)
        save_file(tensors, str(directory / STATE_TENSORS))
        meta = {
            "step": self.step_count,
            "config": dataclasses.asdict(self.cfg),
            "batcher": self.batcher.state(),
            "param_groups": opt["param_groups"],
            "carry_layers": sorted(self.carry.states),
        }
        (directory / STATE_JSON).write_text(json.dumps(meta, indent=1))

    def load_state(self, directory: str | Path) -> None:
        directory = Path(directory)
        meta_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
        if not meta_path.is_file() or not tensor_path.is_file():
            raise FileNotFoundError(f"no resumable training state in {directory} ({STATE_JSON} + {STATE_TENSORS})")
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, slot = key.split(".", 2)
                state.setdefault(int(idx), {})[slot] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        device = self.model.device
        self.carry = TTTCarry()
        # "carry_positions": the layout before FastWeightState (one int position, optional grad sums).
        layers = meta["carry_layers"] if "carry_layers" in meta else [int(k) for k in meta["carry_positions"]]
        for layer in layers:
            prefix = f"carry.{layer}."
            part = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            pending = part.pop("pending_reset", None)
            if "carry_positions" in meta:
                part = _older_carry(part, meta["carry_positions"][str(layer)])
            self.carry.states[layer] = FastWeightState.from_state_dict(part, device)
            if pending is not None:
                self.carry.pending_reset[layer] = pending.bool().to(device)
        self.batcher.load_state(meta["batcher"])
        self.step_count = meta["step"]


def _older_carry(part: dict[str, torch.Tensor], position: int) -> dict[str, torch.Tensor]:
    """A carried layer saved before FastWeightState, as `FastWeightState.state_dict()` entries."""
    rows = part["weights.W1"].shape[0]
    part = dict(part)
    for name in FAST_WEIGHT_NAMES:
        part.setdefault(f"grad_sums.{name}", torch.zeros_like(part[f"weights.{name}"]))
    part["position"] = torch.full((rows,), position, dtype=torch.long)
    # The tokens read since the reset were not saved; only "> 0" (the row has started: not W_base) is read.
    part["offset"] = torch.ones(rows, dtype=torch.long)
    if "qk_history" in part:
        part["history"] = part.pop("qk_history")
    return part


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moshi_ttt.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", required=True, help="checkpoint to start from (ours, moshi's or hf://...)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--audio", nargs="+", type=Path, help="audio files (encoded once with the checkpoint's codec)")
    data.add_argument("--manifest", type=Path, help='moshi-finetune JSONL: one {"path": ..., "duration": ...} a line')
    data.add_argument("--codes", nargs="+", help="safetensors files of audio codes [8, T] (key 'codes')")
    parser.add_argument("--out", required=True, type=Path, help="output directory (checkpoint, state, code cache)")
    parser.add_argument("--ttt-layers", help="apply TTT to these layers first (when --init has none), e.g. middle")
    parser.add_argument("--mini-batch-size", type=int, default=TTTConfig.mini_batch_size)
    parser.add_argument("--base-lr", type=float, default=TTTConfig.base_lr)
    parser.add_argument("--gating-alpha-init", type=float, default=TTTConfig.gating_alpha_init)
    parser.add_argument("--share-qk", action="store_true", help="q and k from one projection + causal convolutions")
    parser.add_argument("--conv-kernel", type=int, default=TTTConfig.conv_kernel, help="with --share-qk")
    parser.add_argument("--inner", choices=("mlp", "linear"), default=TTTConfig.inner, help="TTT-MLP or TTT-Linear")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--chunk-size", type=int, default=TrainConfig.chunk_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--weight-lr-multiplier", type=float, default=TrainConfig.weight_lr_multiplier)
    parser.add_argument("--alpha-lr-multiplier", type=float, default=TrainConfig.alpha_lr_multiplier)
    parser.add_argument("--grad-clip", type=float, default=TrainConfig.grad_clip)
    parser.add_argument("--train-all", action="store_true")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--save-every", type=int, default=TrainConfig.save_every, help="steps between saves (0: end)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint and state in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        trainer, loaded = _build(args)

        def save_all(trainer: Trainer) -> None:
            """The resumable pair that --resume reads: checkpoint and training state."""
            save(args.out / "checkpoint", trainer.model, lm_config=loaded.lm_config, mimi_ref=loaded.mimi_ref,
                 overwrite=True)  # fmt: skip
            trainer.save_state(args.out / "state")

        losses = trainer.run(progress=True, save=save_all)
        save_all(trainer)
    except (ValueError, FileNotFoundError, KeyError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"steps": trainer.step_count, "last_loss": losses[-1] if losses else None}))
    return 0


def _build(args) -> tuple[Trainer, LoadedCheckpoint]:
    """The trainer of the CLI: model from --init (or the saved checkpoint on --resume), data, config."""
    resume_ckpt = args.out / "checkpoint"
    loaded = load(resume_ckpt if args.resume else args.init, load_mimi=args.codes is None)
    if args.ttt_layers and not ttt_blocks(loaded.model) and not args.resume:
        cfg = TTTConfig(layers=args.ttt_layers, mini_batch_size=args.mini_batch_size, base_lr=args.base_lr,
                        gating_alpha_init=args.gating_alpha_init, share_qk=args.share_qk,
                        conv_kernel=args.conv_kernel, inner=args.inner)  # fmt: skip
        apply_ttt(loaded.model, cfg)
    if args.codes is not None:
        files = [load_file(path)["codes"].long() for path in args.codes]
    else:
        if loaded.mimi is None:
            raise ValueError(f"{args.init} names no codec to encode audio with; pass --codes instead")
        paths = args.audio if args.audio is not None else read_manifest(args.manifest)
        files = cached_codes(paths, loaded.mimi, str(loaded.mimi_ref), args.out / "codes_cache")
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, chunk_size=args.chunk_size, lr=args.lr,
        weight_lr_multiplier=args.weight_lr_multiplier, alpha_lr_multiplier=args.alpha_lr_multiplier,
        grad_clip=args.grad_clip, train_all=args.train_all, seed=args.seed, save_every=args.save_every,
    )  # fmt: skip
    trainer = Trainer(loaded.model, files, cfg)
    if args.resume:
        trainer.load_state(args.out / "state")
    return trainer, loaded


if __name__ == "__main__":
    sys.exit(main())
