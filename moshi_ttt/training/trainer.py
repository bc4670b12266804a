"""The outer loop: AdamW on the audio loss of batches from a `BatchSource`, the lr schedule, exact resume.

With files (`CodeBatcher`), each file is read in chunks, in order; the TTT state is carried from chunk to chunk
(detached) and restarts from the *current* W_base at file boundaries (`moshi_ttt.ttt.carry`). Attention sees one
chunk at a time, so whatever the model remembers across chunks, it remembers through the fast weights. With
independent clips (`ClipMixBatcher`) nothing is carried: every row starts from W_base.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from moshi_ttt.training.data import BatchSource, CodeBatcher, training_codes
from moshi_ttt.training.schedule import LrSchedule
from moshi_ttt.ttt.apply import ttt_blocks
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
    batch_size: int = 4  # files read side by side, one TTT state row each (a given BatchSource has its own)
    chunk_size: int = 64  # tokens per forward from files; a multiple of the TTT mini_batch_size
    lr: float = 1e-3  # peak AdamW learning rate of the non-TTT-weight parameters (projections, gates, norms)
    weight_lr_multiplier: float = 1.0  # times lr for W_base (W1, b1, W2, b2)
    alpha_lr_multiplier: float = 1.0  # times lr for the gate alpha
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decays (torch's defaults)
    schedule: LrSchedule = LrSchedule()  # warm-up, hold, decay of every group's lr (default: constant)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    train_all: bool = False  # also train the base model's weights (at lr)
    seed: int = 0  # file order
    save_every: int = 0  # Trainer.run calls its `save` every N steps (the CLI: checkpoint + state); 0: only at the end

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("steps, batch_size and chunk_size must be >= 1")
        for name in ("lr", "weight_lr_multiplier", "alpha_lr_multiplier"):  # NaN compares False: test finiteness
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be a finite number >= 0 (0: no clipping), got {self.grad_clip}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")


def audio_loss(model: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the audio codebooks over moshi's valid positions (LMModel.forward's mask).

    Args:
        model: the LM, in train or eval mode.
        codes: model input codes [B, 1 + n_q, T] (`training_codes`).
    Returns:
        The scalar loss (float32).
    """
    out = model(codes)
    target = codes[:, model.audio_offset : model.audio_offset + model.dep_q]  # [B, 8, T]
    mask = out.mask  # [B, 8, T]
    if not bool(mask.any()):
        raise ValueError("this batch has no valid audio position to train on")
    return F.cross_entropy(out.logits[mask].float(), target[mask])


def param_groups(model: LMModel, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: W_base at lr * weight_lr_multiplier, alpha at lr * alpha_lr_multiplier, the rest at lr.

    Args:
        model: the LM; its parameters outside TTT blocks get requires_grad = cfg.train_all.
        cfg: the learning rates.
    Returns:
        The non-empty groups, in that order.
    """
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


def batch_source(model: LMModel, data: list[torch.Tensor] | BatchSource, cfg: TrainConfig) -> BatchSource:
    """`data` itself when it is a BatchSource; for a list of files' audio codes [8, T], their `CodeBatcher`
    (cfg.batch_size rows, cfg.chunk_size tokens, cfg.seed order), checked against the TTT mini-batch size."""
    if not isinstance(data, list):
        return data
    for block in ttt_blocks(model).values():
        b = block.cfg.mini_batch_size
        if cfg.chunk_size % b:
            raise ValueError(f"chunk_size {cfg.chunk_size} must be a multiple of the TTT mini_batch_size {b}")
    return CodeBatcher(data, cfg.batch_size, cfg.chunk_size, cfg.seed)


class Trainer:
    """Holds the model, optimizer, batch source and carried TTT state; `step()` runs one optimizer step."""

    def __init__(self, model: LMModel, data: list[torch.Tensor] | BatchSource, cfg: TrainConfig):
        """Args:
        model: the LM to train (with TTT layers, or any LM with cfg.train_all).
        data: audio codes [8, T] of the training files (read in order by a `CodeBatcher`), or a `BatchSource`.
        cfg: the outer loop's settings.
        """
        self.batcher = batch_source(model, data, cfg)
        self.model = model.train()
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay, betas=cfg.betas)
        self.peak_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # Clipped in the model's parameter order (the global norm is a float sum: the order is part of the result).
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.carry = TTTCarry()
        self.step_count = 0

    def step(self) -> float:
        """One optimizer step on the source's next batch; returns its loss."""
        return self.train_on(*self.batcher.next_batch())

    def train_on(self, audio: torch.Tensor, new_file: torch.Tensor | None) -> float:
        """One optimizer step on a given batch (`PairedTrainer` gives one batch to two trainers).

        Args:
            audio: audio codes [B, 8, T] (-1 where padded).
            new_file: [B] bool, rows whose carried TTT state restarts from W_base; None: nothing is carried (every
                row starts from W_base, as outside `carry_ttt_state`).
        Returns:
            The batch's loss before the step.
        """
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs, strict=True):
            group["lr"] = self.cfg.schedule.lr(peak, self.step_count, self.cfg.steps)
        codes = training_codes(self.model, audio.to(self.model.device))  # [B, 1 + 8, T]
        if new_file is None:
            loss = audio_loss(self.model, codes)
        else:
            self.carry.reset(new_file)
            with carry_ttt_state(self.model, self.carry):
                loss = audio_loss(self.model, codes)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trained, self.cfg.grad_clip)
        else:  # the norm alone, nothing to scale: a finite loss can still give infinite gradients
            grads = [
                torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
                for p in self.trained
                if p.grad is not None
            ]
            norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else loss.detach().new_zeros(())
        # One host sync for both checks, before the optimizer steps on either.
        loss_value, norm_value = torch.stack([loss.detach().float(), norm.detach().float().to(loss.device)]).tolist()
        if not math.isfinite(loss_value):
            raise ValueError(f"the loss is {loss_value} at step {self.step_count + 1}: training diverged; stopped "
                             "before stepping on it (lower --lr or clip gradients)")  # fmt: skip
        if not math.isfinite(norm_value):
            raise ValueError(f"the gradient norm is {norm_value} at step {self.step_count + 1}: training "
                             "diverged; stopped before stepping on it")  # fmt: skip
        self.optimizer.step()
        self.step_count += 1
        return loss_value

    def run(
        self,
        on_step: Callable[[int, float], None] | None = None,
        progress: bool = False,
        save: Callable[[Trainer], None] | None = None,
    ) -> list[float]:
        """Steps until `cfg.steps`.

        Args:
            on_step: called with (steps done, loss) after every step.
            progress: show a tqdm bar.
            save: called with the trainer after every `cfg.save_every`-th step (0: never here; the caller saves at
                the end).
        Returns:
            The losses of the steps run.
        """
        return run_steps(self, self.step, on_step, progress, save)

    # --- exact resume: optimizer moments, carried fast weights and the batcher position ---
    def save_state(self, directory: str | Path) -> None:
        """Writes what `load_state` needs to continue bit-identically (the model goes in a checkpoint beside it)."""
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
        # The step in both files: a save cut between them is refused by load_state instead of mixing two steps.
        save_file(tensors, str(directory / STATE_TENSORS), metadata={"step": str(self.step_count)})
        meta = {
            "step": self.step_count,
            "config": dataclasses.asdict(self.cfg),
            "batcher": self.batcher.state(),
            "param_groups": opt["param_groups"],
            "carry_layers": sorted(self.carry.states),
        }
        partial = directory / f"{STATE_JSON}.partial"
        partial.write_text(json.dumps(meta, indent=1))
        partial.replace(directory / STATE_JSON)  # atomic: the json is the old one or the new one, never half

    def load_state(self, directory: str | Path) -> None:
        """Continues from `save_state(directory)` (the model's weights must already be the saved checkpoint's)."""
        directory = Path(directory)
        meta_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
        if not meta_path.is_file() or not tensor_path.is_file():
            raise FileNotFoundError(f"no resumable training state in {directory} ({STATE_JSON} + {STATE_TENSORS})")
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
        with safe_open(str(tensor_path), framework="pt") as f:
            tensor_step = (f.metadata() or {}).get("step")  # absent in states saved before it was written
        if tensor_step is not None and int(tensor_step) != meta["step"]:
            raise ValueError(f"the training state in {directory} is torn: {STATE_TENSORS} is from step {tensor_step}, "
                             f"{STATE_JSON} from step {meta['step']} (a save was interrupted)")  # fmt: skip
        check_resume_config(meta["config"], self.cfg, meta["step"])
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


RESUMABLE_CHANGES = ("steps", "save_every")  # the settings a resume may change (steps: see check_resume_config)


def check_resume_config(saved: dict, cfg: TrainConfig, step: int) -> None:
    """Refuses to resume a run saved with `saved` (its `TrainConfig` as a dict) under other settings.

    Only `save_every` and a `steps` that the schedule does not depend on (a constant decay) may change, and steps
    not below the saved step: the rest (learning rates, optimizer, data order, schedule) would make the run a mix
    of two.

    Raises:
        ValueError: naming every setting that differs.
    """
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as saved
    differ = [k for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if differ:
        changes = "; ".join(f"{k}: {saved.get(k)} then, {now.get(k)} now" for k in differ)
        raise ValueError(f"resume with the saved run's settings; these differ: {changes}")
    if saved.get("steps") != cfg.steps:
        if cfg.schedule.decay != "constant":
            raise ValueError(f"steps: {saved.get('steps')} then, {cfg.steps} now: the {cfg.schedule.decay} decay "
                             "spans the run's steps, so a resume keeps them")  # fmt: skip
        if cfg.steps < step:
            raise ValueError(f"steps {cfg.steps} is below the saved run's step {step}")


_Loss = TypeVar("_Loss")


class Stepped(Protocol):
    """What `run_steps` reads of a trainer (`Trainer` or `PairedTrainer`)."""

    step_count: int
    cfg: TrainConfig


def run_steps(
    trainer: Stepped,
    step: Callable[[], _Loss],
    on_step: Callable[[int, _Loss], None] | None,
    progress: bool,
    save: Callable | None,
) -> list[_Loss]:
    """The loop of `Trainer.run` and `PairedTrainer.run`.

    Args:
        trainer: its step_count (advanced by `step`) and cfg (steps, save_every).
        step: one optimizer step; returns its loss (a float, or `PairLosses`).
        on_step: called with (steps done, loss) after every step.
        progress: show a tqdm bar.
        save: called with `trainer` after every cfg.save_every-th step.
    Returns:
        The losses of the steps run.
    """
    cfg = trainer.cfg
    if cfg.save_every and save is None:
        raise ValueError("TrainConfig.save_every is set but run() was given no save function")
    losses = []
    bar = tqdm(total=cfg.steps, initial=trainer.step_count, disable=not progress, desc="train", unit="step")
    while trainer.step_count < cfg.steps:
        loss = step()
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}" if isinstance(loss, float) else str(loss))
        if on_step is not None:
            on_step(trainer.step_count, loss)
        if save is not None and cfg.save_every and trainer.step_count % cfg.save_every == 0:
            save(trainer)
    bar.close()
    return losses


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
