"""The demo models' training (stage joint of scripts/build_demo_assets.py): the recipe as library configs, its data
and its validation.

The recipe (demo_assets/MANIFEST.md, J1-J8): the demo LM (demo_lm_config.LM_CONFIG) and the same LM plus a TTT block
(reading the layer input beside attention; share_qk convolutions started as a one-token shift; wq = wv = identity),
from one seeded initialisation, trained on the same batches for the same steps (`moshi_ttt.training.paired`): whole
short repeat clips, synthetic copy clips and crops of the demo corpus's training clips
(`moshi_ttt.training.clip_mix`), AdamW with a warm-up, a hold and a cosine decay (`moshi_ttt.training.schedule`).
Validation: the last `val` training repeat and plain clips (never trained on); the held-out clips are scored once at
the end.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from safetensors.torch import load_file

from moshi_ttt import TTTConfig, ttt_blocks
from moshi_ttt.compat.sequence import delayed_input, model_codes
from moshi_ttt.training.clip_mix import ClipMixBatcher, ClipMixConfig
from moshi_ttt.training.paired import PairedTrainer, PairLosses, TTTStart, fair_pair, pair_member, seeded_lm
from moshi_ttt.training.schedule import LrSchedule
from moshi_ttt.training.trainer import TrainConfig, Trainer
from moshi_ttt.ttt.inner_math import head_layer_norm
from moshi_ttt.ttt.ops import ttt_mlp
from scripts.demo_corpus import FRAME
from scripts.demo_lm_config import LM_CONFIG

VARIANTS = {"ttt": "ttt", "fair_baseline": "baseline"}  # asset dir -> member of the pair


@dataclass(frozen=True)
class JointRecipe:
    """One recipe of the joint training (the flags of the same names of research/recipe_joint.py)."""

    # The TTT block of the TTT model.
    layers: str = "0"  # TTTConfig.layers
    read: str = "before"  # TTTConfig.branch_input: the layer input ("before" attention) or the residual "after" it
    heads: int = 1  # TTTConfig.num_heads
    inner: str = "mlp"  # TTTConfig.inner: TTT-MLP or TTT-Linear
    mini_batch_size: int = 16  # TTTConfig.mini_batch_size
    base_lr: float = 4.0  # TTTConfig.base_lr (inner loop)
    alpha: float = 0.1  # TTTConfig.gating_alpha_init
    init_std: float = 0.02  # TTTConfig.init_std
    no_identity: bool = False  # wq and wv keep their random init (else they start as the identity)
    # The outer loop, the same for both models.
    steps: int = 300  # AdamW steps
    batch_size: int = 8  # rows per batch
    seq_len: int = 288  # tokens per row
    short_frac: float = 0.5  # share of rows that are whole short repeat clips
    copy_frac: float = 0.0  # share of rows that are synthetic copy clips; the rest: crops of the training clips
    lr: float = 3e-3  # peak learning rate
    alpha_lr_multiplier: float = 10.0  # times lr for the gate alpha
    warmup: int = 30  # linear warm-up steps
    decay_start: float = 0.0  # share of the steps at the peak lr before the cosine decay (0: cosine over all steps)
    # Validation.
    val: int = 6  # the last `val` training repeat clips and plain clips, held back
    eval_every: int = 50  # steps between validations

    def ttt_config(self) -> TTTConfig:
        """The TTT model's TTT layers."""
        return TTTConfig(
            layers=self.layers, mini_batch_size=self.mini_batch_size, base_lr=self.base_lr,
            gating_alpha_init=self.alpha, share_qk=True, num_heads=self.heads, init_std=self.init_std,
            branch_input=f"{self.read}_attention", inner=self.inner,
        )  # fmt: skip

    def ttt_start(self, seed: int) -> TTTStart:
        """The TTT layers' start: seed + 1 (the LM takes `seed`), one-token shift, identity wq and wv."""
        return TTTStart(seed=seed + 1, qk_shift=True, identity_qv=not self.no_identity)

    def train_config(self) -> TrainConfig:
        """The outer loop: all weights, AdamW (weight decay 0.01, betas 0.9 / 0.95), gradients clipped at 1."""
        return TrainConfig(
            steps=self.steps, lr=self.lr, alpha_lr_multiplier=self.alpha_lr_multiplier, weight_decay=0.01,
            betas=(0.9, 0.95), grad_clip=1.0, train_all=True,
            schedule=LrSchedule(warmup_steps=self.warmup, decay="cosine", decay_start=self.decay_start),
        )  # fmt: skip

    def clip_mix(self, seed: int) -> ClipMixConfig:
        """The batches, drawn from `seed`."""
        return ClipMixConfig(self.batch_size, self.seq_len, self.short_frac, self.copy_frac, seed)


@dataclass
class JointData:
    """A work dir's clips, split as the recipe reads them."""

    index: dict  # the corpus index (clip name -> kind, split, readings in samples, ...)
    codes: dict[str, torch.Tensor]  # audio codes [8, T] of every clip of the corpus
    val: dict[str, torch.Tensor]  # the validation clips
    long: list[torch.Tensor]  # the training clips (random crops)
    short: list[torch.Tensor]  # the short repeat clips (read whole)


def read_work(work: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A work dir's corpus index and audio codes [8, T] (int64) by clip name."""
    index = json.loads((work / "corpus" / "index.json").read_text())
    return index, {n: c.long() for n, c in load_file(str(work / "codes.safetensors")).items()}


def joint_data(work: Path, short_work: Path, val: int) -> JointData:
    """The recipe's data: the corpus of `work` (stages corpus and codes) and the short clips of `short_work`."""
    index, codes = read_work(work)
    _, short = read_work(short_work)
    rep = [n for n, v in index.items() if v["split"] == "train" and v["kind"] == "repeat"]
    pla = [n for n, v in index.items() if v["split"] == "train" and v["kind"] == "plain"]
    return JointData(
        index=index, codes=codes, val={n: codes[n] for n in rep[-val:] + pla[-val:]},
        long=[codes[n] for n in rep[:-val] + pla[:-val]], short=list(short.values()),
    )  # fmt: skip


# ---------------------------------------------------------------- validation
def clip_losses(model: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """Per-entry loss [8, T] of one clip's audio codes [8, T] (NaN where moshi's mask is False), as
    moshi_ttt.score(mode="full")."""
    with torch.no_grad():
        out = model(model_codes(model, codes[None]))
        target = codes[None]  # [1, 8, T]
        ce = F.cross_entropy(out.logits.float().flatten(0, 2), target.flatten(), reduction="none")
        ce = ce.view(target.shape).masked_fill(~out.mask, float("nan"))
    return ce[0]


def reading_losses(model: LMModel, clips: dict[str, torch.Tensor], index: dict) -> dict[str, float]:
    """Mean losses of the clips: the 1st reading and the 2nd+3rd of the repeat clips, all of the plain ones.

    Args:
        model: the LM (left in train mode).
        clips: audio codes [8, T] by clip name.
        index: the corpus index (readings in samples).
    Returns:
        {"reading1", "readings23", "plain"}: means over clips (NaN when there is none).
    """
    model.eval()
    rep1, rep23, plain = [], [], []
    for name, codes in clips.items():
        loss = clip_losses(model, codes)  # [8, T]
        readings = [(s // FRAME, e // FRAME) for s, e in index[name]["readings"]]
        if readings:
            rep1.append(float(loss[:, readings[0][0] : readings[0][1]].nanmean()))
            rep23.append(float(torch.cat([loss[:, s:e] for s, e in readings[1:]], dim=1).nanmean()))
        else:
            plain.append(float(loss.nanmean()))
    model.train()
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {"reading1": mean(rep1), "readings23": mean(rep23), "plain": mean(plain)}


def next_frame_accuracy(a: torch.Tensor, y: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The memory probe's score (research/probe_memory.py): acc [T - 2].

    The answer a_s (query = frame s + 1) is decoded as the nearest stored target y_j (j <= s; y_j was stored under
    key frame j with value frame j + 1), which predicts frame j + 1 for frame s + 2; acc is the fraction of the 8
    audio code entries of frame j + 1 equal to frame s + 2's.

    Args:
        a: answers [T - 1, dim]; y: stored targets [T - 1, dim]; inputs: the model input [9, T].
    Returns:
        acc [T - 2].
    """
    sim = F.normalize(a, dim=-1) @ F.normalize(y, dim=-1).T  # [T-1, dim] @ [dim, T-1] -> [T-1, T-1]
    n = a.shape[0] - 1
    sim = sim[:n, :n].masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), -2.0)
    j = sim.argmax(-1)  # [n]
    predicted = inputs[:, j + 1]  # [9, n]
    truth = inputs[:, torch.arange(n) + 2]
    return (predicted[1:] == truth[1:]).float().mean(0)  # the 8 audio entries (text is always padding)


def memory_accuracy(model: LMModel, clips: dict[str, torch.Tensor], index: dict, layer: int = 0):
    """The probe's next-frame accuracy of a trained TTT block's own answers, and how strong its branch is.

    Args:
        model: the TTT LM (eval mode).
        clips: audio codes [8, T] of repeat clips (three readings each).
        index: the corpus index.
        layer: the TTT block's layer.
    Returns:
        (accuracy on readings 1 / 2 / 3, the mean norm of the gated branch over the mean norm of the residual
        stream it reads); with share_qk's shift, key t comes from token t - 1.
    """
    per, ratios = torch.zeros(3), []
    for name, codes in clips.items():
        inputs, answers, targets, ratio = block_answers(model, codes, layer)
        ratios.append(ratio)
        # Token t holds key t - 1 and value t: the probe's row s is token s + 1.
        acc = next_frame_accuracy(answers[1:], targets[1:], inputs[0])
        readings = [(s // FRAME, e // FRAME) for s, e in index[name]["readings"]]
        per += torch.stack([acc[max(s - 2, 0) : e - 2].mean() for s, e in readings])
    return (per / len(clips)).tolist(), sum(ratios) / len(ratios)


def block_answers(model: LMModel, codes: torch.Tensor, layer: int = 0):
    """A TTT-MLP block's inner loop run alone on one clip: its q, k, v from the layer's input, fast weights from
    W_base (no decay).

    Args:
        model: the TTT LM (eval mode).
        codes: audio codes [8, T].
        layer: the TTT block's layer.
    Returns:
        (the model input [1, 9, T], answers f(q_t) - q_t [T, dim], stored targets LN(v_t - k_t) [T, dim], the mean
        norm of the gated branch over the mean norm of the residual stream it reads).
    """
    block = ttt_blocks(model)[layer]
    captured = {}
    hook = block.register_forward_pre_hook(lambda _m, a: captured.__setitem__("x", a[0]))
    try:
        inputs = delayed_input(model, model_codes(model, codes[None]))  # [1, 9, T]
        with torch.no_grad():
            model.forward_text(inputs)
    finally:
        hook.remove()
    x = captured["x"]  # [1, T, dim]
    with torch.no_grad():
        xq, xk, xv, lr, _ = block._project(block.norm(x), None)  # [1, H, T, D] each, lr [1, H, T]
        ln = (block.ttt_norm_weight, block.ttt_norm_bias)
        out, _ = ttt_mlp(block.base_weights(1), xq, xk, xv, lr, *ln, block.cfg.mini_batch_size,
                         block.learnable_token_idx)  # fmt: skip
        answers = (out - xq)[0].transpose(0, 1).flatten(1)  # [T, dim]
        targets = head_layer_norm(xv - xk, *ln)[0].transpose(0, 1).flatten(1)  # [T, dim]
        branch = torch.tanh(block.gating_alpha) * block.wo(out[0].transpose(0, 1).flatten(1))  # [T, dim]
    return inputs, answers, targets, float(branch.norm(dim=-1).mean() / x[0].norm(dim=-1).mean())


# ---------------------------------------------------------------- training
def train_joint(
    recipe: JointRecipe,
    variants: tuple[str, ...],
    work: Path,
    short_work: Path,
    seed: int = 0,
    threads: int = 1,
    heldout: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, tuple[LMModel, dict]]:
    """Trains the pair's models named in `variants` ("ttt", "fair_baseline"): both in lockstep
    (`PairedTrainer`) when both are named, else the one (`Trainer`; the other process trains the other on the
    same batches). The two ways give the same weights, bit for bit.

    Args:
        recipe: the recipe.
        variants: which models.
        work: the build's work dir (stages corpus and codes).
        short_work: the short repeat clips (stage short).
        seed: the LM's init (the TTT layers take seed + 1) and the batches.
        threads: torch threads (float sums, hence the weights, depend on it).
        heldout: score the held-out clips at the end.
        log: gets a progress line every recipe.eval_every steps.
    Returns:
        By variant: the model (eval mode) and its record (recipe, validation history, training losses, the TTT
        block's recall, held-out scores).
    """
    if not variants or not set(variants) <= set(VARIANTS):
        raise ValueError(f"variants must name some of {tuple(VARIANTS)}, got {variants}")
    torch.set_num_threads(threads)
    data = joint_data(work, short_work, recipe.val)
    make_lm, cfg = seeded_lm(LM_CONFIG, seed), recipe.train_config()
    source = ClipMixBatcher(data.short, data.long, recipe.clip_mix(seed))
    if len(set(variants)) == 2:
        paired = PairedTrainer(fair_pair(make_lm, recipe.ttt_config(), recipe.ttt_start(seed)), source, cfg)
        trainers, run = {"ttt": paired.ttt, "fair_baseline": paired.baseline}, paired.run
    else:
        (name,) = variants
        member = pair_member(VARIANTS[name], make_lm, recipe.ttt_config(), recipe.ttt_start(seed))
        single = Trainer(member, source, cfg)
        trainers, run = {name: single}, single.run
    history: dict[str, dict[int, dict]] = {name: {} for name in trainers}
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    start = time.time()

    def on_step(step: int, loss: float | PairLosses) -> None:
        if isinstance(loss, PairLosses):
            by_name = {"ttt": loss.ttt, "fair_baseline": loss.baseline}
        else:
            by_name = {variants[0]: loss}
        for name, trainer in trainers.items():
            losses[name].append(by_name[name])
            if step % recipe.eval_every == 0 or step == recipe.steps:
                model = trainer.model
                history[name][step] = reading_losses(model, data.val, data.index)
                gates = {i: round(float(torch.tanh(b.gating_alpha.detach()).abs().mean()), 3)
                         for i, b in ttt_blocks(model).items()}  # fmt: skip
                recent = losses[name][-20:]
                log(f"[{name}] step {step} train {sum(recent) / len(recent):.4f} val "
                    f"{json.dumps({k: round(v, 4) for k, v in history[name][step].items()})} gate {gates} "
                    f"({time.time() - start:.0f} s)")  # fmt: skip

    run(on_step=on_step)
    out = {}
    for name in variants:
        model = trainers[name].model
        args = {k: str(v) for k, v in dataclasses.asdict(recipe).items()}
        args.update(kind=VARIANTS[name], seed=str(seed), threads=str(threads), heldout=str(heldout), tag=name)
        args.update(work=str(work), short_work=str(short_work))
        result = {"args": args, "val": history[name], "train_losses": losses[name]}
        if name == "ttt":
            repeats = {n: c for n, c in data.val.items() if data.index[n]["readings"]}
            result["memory_accuracy"], result["branch_norm_ratio"] = memory_accuracy(model.eval(), repeats, data.index)
            log(f"[{name}] in-model next-frame accuracy {result['memory_accuracy']}, branch / residual norm "
                f"{result['branch_norm_ratio']:.3f}")  # fmt: skip
        if heldout:
            held = {n: data.codes[n] for n, v in data.index.items() if v["split"] == "heldout"}
            result["heldout"] = reading_losses(model, held, data.index)
            log(f"[{name}] held out {json.dumps(result['heldout'])}")
        out[name] = (model.eval(), result)
    return out
