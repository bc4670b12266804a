"""Paired fair-baseline training: a TTT model and its fair baseline, same initialisation, same batches, same steps.

The fair baseline is the same LM without the TTT layers. Both are built by one `make_lm` that gives the same
weights at every call (a seeded init, `seeded_lm`, or a copy of a loaded checkpoint); the TTT layers are added
afterwards from their own seed (`TTTStart.seed`), so they draw nothing from the base LM's random stream and every
base weight starts equal in both models (`fair_pair` checks it). Both then train with one TrainConfig (all weights:
`train_all`) on the same batches for the same steps: whatever the TTT model does better, the TTT layers did (the
demo assets' recipe, demo_assets/MANIFEST.md).

Two ways to run a pair, with bit-identical results on one machine, torch build and thread count:
- `PairedTrainer`: both in one process, in lockstep (each batch is drawn once and both models train on it);
- one member per process (`pair_member`, a `Trainer` each) with the same seeded batch source, which gives the same
  batches in both processes (the demo build trains its two models at once on two cores this way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from moshi.models.lm import LMModel

from moshi_ttt.config import TTTConfig
from moshi_ttt.training.data import BatchSource
from moshi_ttt.training.trainer import TrainConfig, Trainer, batch_source, run_steps
from moshi_ttt.ttt.apply import apply_ttt, ttt_blocks

KINDS = ("ttt", "baseline")


@dataclass(frozen=True)
class TTTStart:
    """How the TTT model's TTT layers start (apply_ttt's random init, then these changes)."""

    seed: int = 0  # torch seed set just before apply_ttt (after the base LM is built)
    qk_shift: bool = False  # share_qk: the convolutions start as a one-token shift (TTTBlock.init_qk_shift)
    identity_qv: bool = False  # wq and wv start as the identity with zero bias (q, k, v read the normed input)


@dataclass
class FairPair:
    """The two models of a pair."""

    ttt: LMModel  # the LM with TTT layers
    baseline: LMModel  # the same LM without them: the fair baseline


@dataclass(frozen=True)
class PairLosses:
    """The losses of one lockstep step, on the same batch."""

    ttt: float
    baseline: float

    def __str__(self) -> str:
        return f"ttt {self.ttt:.4f} / baseline {self.baseline:.4f}"


def seeded_lm(
    lm_config: dict, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Callable[[], LMModel]:
    """A `make_lm` for training from scratch.

    Args:
        lm_config: moshi LMModel keywords.
        seed: torch seed set before each build.
        device, dtype: of the LM's parameters.
    Returns:
        A function that builds the LM, with the same weights at every call.
    """

    def make() -> LMModel:
        torch.manual_seed(seed)
        return LMModel(device=device, dtype=dtype, **lm_config)

    return make


def add_ttt(model: LMModel, cfg: TTTConfig, start: TTTStart) -> LMModel:
    """Applies TTT layers to `model` from `start.seed`, then the start's changes.

    Args:
        model: an LM without TTT layers.
        cfg: the TTT layers.
        start: their seed and initial values.
    Returns:
        The same model.
    """
    if start.qk_shift and not cfg.share_qk:
        raise ValueError("TTTStart.qk_shift needs TTTConfig.share_qk")
    torch.manual_seed(start.seed)
    apply_ttt(model, cfg)
    for block in ttt_blocks(model).values():
        if start.qk_shift:
            block.init_qk_shift()
        if start.identity_qv:
            with torch.no_grad():
                for linear in (block.wq, block.wv):
                    linear.weight.copy_(torch.eye(linear.weight.shape[0]))  # [dim, dim]
                    linear.bias.zero_()
    return model


def pair_member(
    kind: Literal["ttt", "baseline"], make_lm: Callable[[], LMModel], cfg: TTTConfig, start: TTTStart
) -> LMModel:
    """One model of the pair, in train mode (for one member per process).

    Args:
        kind: "ttt" (the LM plus TTT layers) or "baseline" (the LM alone).
        make_lm: builds the LM, with the same weights at every call.
        cfg: the TTT layers of the "ttt" member.
        start: their seed and initial values.
    Returns:
        The model.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model = make_lm()
    if ttt_blocks(model):
        raise ValueError("make_lm gave an LM that already has TTT layers: a fair baseline must have none")
    if kind == "ttt":
        add_ttt(model, cfg, start)
    return model.train()


def fair_pair(make_lm: Callable[[], LMModel], cfg: TTTConfig, start: TTTStart) -> FairPair:
    """Both models of a pair, checked to share every base weight.

    Args:
        make_lm: builds the LM, with the same weights at every call (`seeded_lm`, or a copy of a loaded model).
        cfg: the TTT layers of the TTT model.
        start: their seed and initial values.
    Returns:
        The pair, in train mode.
    Raises:
        ValueError: if the two LMs do not start from the same weights.
    """
    pair = FairPair(pair_member("ttt", make_lm, cfg, start), pair_member("baseline", make_lm, cfg, start))
    ttt_tensors = pair.ttt.state_dict()
    for name, tensor in pair.baseline.state_dict().items():
        if name not in ttt_tensors or not torch.equal(ttt_tensors[name], tensor):
            raise ValueError(f"make_lm gave different weights at its two calls ({name}): a pair needs one init")
    return pair


class PairedTrainer:
    """A TTT model and its fair baseline trained in lockstep: each batch is drawn once and both train on it."""

    def __init__(self, pair: FairPair, data: list[torch.Tensor] | BatchSource, cfg: TrainConfig):
        """Args:
        pair: the two models (`fair_pair`, or both reloaded from checkpoints to resume).
        data: audio codes [8, T] of the training files, or a `BatchSource`: one stream for both.
        cfg: the outer loop of both (train_all: the baseline has only base weights to train).
        """
        if not cfg.train_all:
            raise ValueError(
                "paired fair-baseline training needs TrainConfig.train_all: without it the baseline has nothing "
                "to train (a frozen fair baseline is the initial checkpoint itself)"
            )
        if ttt_blocks(pair.baseline) or not ttt_blocks(pair.ttt):
            raise ValueError("a pair is a model with TTT layers and a baseline without any")
        self.batcher = batch_source(pair.ttt, data, cfg)
        self.cfg = cfg
        self.ttt = Trainer(pair.ttt, self.batcher, cfg)
        self.baseline = Trainer(pair.baseline, self.batcher, cfg)

    @property
    def step_count(self) -> int:
        """Steps done (by both)."""
        if self.ttt.step_count != self.baseline.step_count:
            raise RuntimeError(f"the pair is out of step: {self.ttt.step_count} != {self.baseline.step_count}")
        return self.ttt.step_count

    def step(self) -> PairLosses:
        """One optimizer step of both models on one batch."""
        audio, new_file = self.batcher.next_batch()  # [B, 8, T], [B] or None
        return PairLosses(self.ttt.train_on(audio, new_file), self.baseline.train_on(audio, new_file))

    def run(
        self,
        on_step: Callable[[int, PairLosses], None] | None = None,
        progress: bool = False,
        save: Callable[[PairedTrainer], None] | None = None,
    ) -> list[PairLosses]:
        """Steps until `cfg.steps`.

        Args:
            on_step: called with (steps done, losses) after every step.
            progress: show a tqdm bar.
            save: called with the paired trainer after every `cfg.save_every`-th step.
        Returns:
            The losses of the steps run.
        """
        return run_steps(self, self.step, on_step, progress, save)

    def save_state(self, ttt_dir: str | Path, baseline_dir: str | Path) -> None:
        """Each trainer's resumable state (`Trainer.save_state`; both hold the shared batch stream's position)."""
        self.ttt.save_state(ttt_dir)
        self.baseline.save_state(baseline_dir)

    def load_state(self, ttt_dir: str | Path, baseline_dir: str | Path) -> None:
        """Continues from `save_state(ttt_dir, baseline_dir)` (the models must hold the saved weights)."""
        self.ttt.load_state(ttt_dir)
        self.baseline.load_state(baseline_dir)
        _ = self.step_count  # both at the same step
