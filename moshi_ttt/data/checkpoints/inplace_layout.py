"""Where the In-Place fork's trainer puts its checkpoints, and finding them in a run's folder tree.

The fork's trainer (moshi-finetune's `finetune/checkpointing.py` ~113-161) writes one folder per saved step:
`<run>/checkpoints/checkpoint_{step:06d}/consolidated/` with `config.json` and `lora.safetensors` or
`consolidated.safetensors` (`inplace_format.py` reads that folder). Users point at any level of it: the run, its
`checkpoints/`, one `checkpoint_000500/`, or the `consolidated/` folder itself. Plain moshi-finetune runs use the
same tree; what the folder holds is for the loader to tell.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STEP = re.compile(r"^checkpoint_(\d+)$")  # checkpoint_{step:06d}
CONSOLIDATED = "consolidated"
CHECKPOINTS = "checkpoints"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class StepCheckpoint:
    """One saved step of a fork run."""

    name: str  # "<run>/checkpoint_000500": the run's folder name and the step's
    path: Path  # its consolidated/ folder, resolved
    step: int


def consolidated_of(path: Path) -> Path | None:
    """The `consolidated/` folder (with a config.json) of a step folder `checkpoint_N/`, else None."""
    folder = path / CONSOLIDATED
    return folder if STEP.match(path.name) and (folder / CONFIG_NAME).is_file() else None


def step_name(consolidated: Path) -> str | None:
    """The name of a step's `consolidated/` folder: "<run>/checkpoint_000500" for
    `.../<run>/checkpoints/checkpoint_000500/consolidated` (a step folder outside a checkpoints/ folder: its parent's
    name, then the step's); None for a folder outside the fork's tree."""
    step = consolidated.parent
    if consolidated.name != CONSOLIDATED or not STEP.match(step.name):
        return None
    run = step.parent.parent if step.parent.name == CHECKPOINTS else step.parent
    return f"{run.name or step.parent.name}/{step.name}"


def find_steps(directory: Path, root: Path | None = None) -> list[StepCheckpoint]:
    """The saved steps at `directory`: itself (a step folder), the steps in it (a run's checkpoints/), in its
    checkpoints/ (a run), or in its runs' checkpoints/ (a folder of runs).

    Args:
        root: no step may resolve outside it (symlinks included); default `directory`.
    Returns:
        The steps by run, then step number (deterministic); [] when there is none.
    """
    root = (root or directory).resolve()
    candidates = [directory]
    if consolidated_of(directory) is None:
        holders = [directory, directory / CHECKPOINTS]
        holders += [child / CHECKPOINTS for child in _children(directory) if child.name != CHECKPOINTS]
        candidates = [step for holder in holders for step in _children(holder)]
    found = {}
    for step in candidates:
        consolidated = consolidated_of(step)
        if consolidated is None:
            continue
        resolved = consolidated.resolve()
        if resolved in found:  # linked inside the folder: listed once, under the first name
            continue
        if not resolved.is_relative_to(root):
            logger.warning("skipping %s: it resolves to %s, outside %s", consolidated, resolved, root)
            continue
        name = step_name(consolidated) or step.name
        found[resolved] = StepCheckpoint(name, resolved, int(STEP.match(step.name).group(1)))
    return sorted(found.values(), key=lambda s: (s.name.rsplit("/", 1)[0], s.step, s.name))


def _children(directory: Path) -> list[Path]:
    """The sub-folders of `directory`, sorted by name ([] when it is not a folder or cannot be read)."""
    try:
        return sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
    except PermissionError as e:  # a run's folder of another user: its steps are not listed, the others are
        logger.warning("skipping %s: %s", directory, e)
        return []
