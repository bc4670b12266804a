"""The output folder of a training run (`python -m moshi_ttt.train --out DIR`): what a save writes, what a resume
checks before it reads.

A member (the TTT model in DIR, its fair baseline in DIR/fair_baseline) is a checkpoint (`checkpoint/`) and a
training state (`state/`), written one after the other. The step goes into both (`checkpoint/train_step.json`,
written last, and the state's files), so that a save cut between them is refused at resume instead of continuing
from one step's weights with another step's optimizer and data position.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import SafetensorError, safe_open

from moshi_ttt.data.checkpoints import LoadedCheckpoint, save
from moshi_ttt.training.trainer import STATE_JSON, STATE_TENSORS, Trainer

logger = logging.getLogger(__name__)

FAIR_BASELINE = "fair_baseline"  # --out subdirectory of the fair baseline's checkpoint and state
STEP_STAMP = "train_step.json"  # in a member's checkpoint/: the training step whose weights it holds
RUN_PARTS = ("checkpoint", "state", FAIR_BASELINE)  # what makes --out a run (codes_cache/ alone does not)


def save_member(directory: Path, trainer: Trainer, loaded: LoadedCheckpoint) -> None:
    """Writes a member's checkpoint, its step stamp, then its training state.

    Args:
        directory: the member's folder (--out, or --out/fair_baseline).
        trainer: the member's trainer.
        loaded: the --init checkpoint (its LM config and codec reference).
    """
    stamp = directory / "checkpoint" / STEP_STAMP
    stamp.unlink(missing_ok=True)  # a save cut inside the weights leaves no stamp: refused at resume
    save(directory / "checkpoint", trainer.model, lm_config=loaded.lm_config, mimi_ref=loaded.mimi_ref, overwrite=True)
    partial = stamp.with_suffix(".partial")
    partial.write_text(json.dumps({"step": trainer.step_count}))
    partial.replace(stamp)
    trainer.save_state(directory / "state")


def check_new_run(out: Path) -> None:
    """Refuses a new run into a folder that holds one (it would overwrite it)."""
    found = [part for part in RUN_PARTS if (out / part).exists()]
    if found:
        raise ValueError(f"{out} already holds a training run ({', '.join(found)}): pass --resume to continue it, or "
                         "another --out")  # fmt: skip


def check_resumable(out: Path, fair_baseline: bool) -> None:
    """Refuses a resume whose members are missing, torn or out of step.

    Args:
        out: the run's folder.
        fair_baseline: whether this resume trains a fair baseline beside (--fair-baseline).
    Raises:
        FileNotFoundError: no run in `out`.
        ValueError: --fair-baseline not as the run was started, or a save that was cut off.
    """
    if not (out / "checkpoint").is_dir():
        raise FileNotFoundError(f"{out} holds no training run to resume (no checkpoint/)")
    paired = (out / FAIR_BASELINE).exists()
    if paired != fair_baseline:
        said = "trains a fair baseline beside: pass --fair-baseline" if paired else "has no fair baseline: drop it"
        raise ValueError(f"the run in {out} {said} (a resume continues the run as it was started)")
    steps = {str(member): _saved_step(member) for member in ([out / FAIR_BASELINE] if paired else []) + [out]}
    if len(set(steps.values())) > 1:
        raise ValueError(f"the pair in {out} is out of step ({steps}): its last save was interrupted")


def _saved_step(member: Path) -> int:
    """The step of a member's checkpoint, checked against its training state's."""
    stamp, meta = member / "checkpoint" / STEP_STAMP, member / "state" / STATE_JSON
    if not meta.is_file():
        raise FileNotFoundError(f"no training state in {member / 'state'} to resume from")
    state_step = json.loads(meta.read_text())["step"]
    if not stamp.is_file():
        if _state_is_stamped(member / "state"):
            raise ValueError(f"{member / 'checkpoint'} has no {STEP_STAMP}: its save was interrupted; it cannot be "
                             "resumed")  # fmt: skip
        # A run saved before the stamps existed (its state has no step either): resumable as before, unchecked.
        logger.warning("%s predates the step stamps: resuming it without checking that its checkpoint and training "
                       "state are from the same step (%d)", member, state_step)  # fmt: skip
        return state_step
    checkpoint_step = json.loads(stamp.read_text())["step"]
    if checkpoint_step != state_step:
        raise ValueError(f"in {member}, the checkpoint is from step {checkpoint_step} and the training state from step "
                         f"{state_step}: the last save was interrupted; it cannot be resumed")  # fmt: skip
    return checkpoint_step


def _state_is_stamped(state: Path) -> bool:
    """Whether a training state was written with its step in the tensors' metadata (every save since the stamps)."""
    tensors = state / STATE_TENSORS
    if not tensors.is_file():
        return True  # torn: not an older run
    try:
        with safe_open(str(tensors), framework="pt", device="cpu") as f:
            return "step" in (f.metadata() or {})
    except SafetensorError:
        return True  # damaged: not an older run (the state's own load names it)
