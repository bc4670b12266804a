"""The checkpoints a server may load (an allow-list, never a free-form path) and the models it loaded, once each.

Models in the cache are shared by every user and never changed by a run: runs only open streaming sessions, and
`SharedModelRun` gives each run its own streaming state (moshi keeps streaming state on the modules, so a run
installs its state only while it holds the model's lock).

A TTT model is one with TTT blocks of ours (`ttt_blocks`) or In-Place TTT layers of the In-Place fork
(`inplace_blocks`, checkpoint kind "inplace_ttt"). An In-Place checkpoint in the fork's lora.safetensors layout holds
only what it changes: the cache loads it over the run's baseline (`get(name, base=baseline)`), once per pair.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import typing as tp
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from moshi.models.lm import LMModel

from moshi_ttt.app.update_size import update_size
from moshi_ttt.data.checkpoints import LoadedCheckpoint, load
from moshi_ttt.data.checkpoints.hub import HubRef
from moshi_ttt.data.checkpoints.inplace_format import BaseMismatch
from moshi_ttt.data.checkpoints.inplace_layout import find_steps, step_name
from moshi_ttt.data.checkpoints.loader import inplace_over_base
from moshi_ttt.data.codec import is_codec_dir
from moshi_ttt.ttt.apply import ttt_blocks
from moshi_ttt.ttt.inplace import inplace_blocks

logger = logging.getLogger(__name__)

ENV_CHECKPOINTS = "MOSHI_TTT_CHECKPOINTS"  # os.pathsep-separated directories of checkpoints


class CheckpointMismatch(ValueError):
    """A baseline and TTT checkpoint that cannot be paired; its message is one sentence for the user (no paths)."""


class CheckpointUnavailable(ValueError):
    """An hf:// checkpoint that the server can neither download nor find in its Hub cache (no such repo, no network);
    one sentence for the user (no paths). A local checkpoint that fails to load is the server's fault instead."""


def has_ttt_layers(model: LMModel) -> bool:
    """TTT blocks of ours or In-Place TTT layers (the In-Place fork's checkpoints have no TTT blocks of ours)."""
    return bool(ttt_blocks(model) or inplace_blocks(model))


def needs_base(ref: str) -> bool:
    """An In-Place checkpoint in the fork's lora.safetensors layout (no consolidated.safetensors beside it), local or
    hf://: it holds only what it changes, so it loads over a base model (the run's baseline)."""
    return inplace_over_base(ref)


_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\"]+[/\\])*([^\s/\\'\"]+)")


def without_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part ("/srv/hub/snapshots/abc/lora.safetensors" ->
    "lora.safetensors"): messages for users name no server path."""
    return _PATH.sub(r"\1", text)


class CheckpointNames(Sequence):
    """The allow-list's names as they are now: the `--allow-hub` field adds to it while the app runs, and the specs of
    the checkpoint controls hold this view (`ModelCache.live_names`), so that the server accepts what the dropdowns
    offer. Only strings are ever in it."""

    def __init__(self, allow_list: dict[str, tp.Any]):
        self._allow_list = allow_list

    def __getitem__(self, index):
        return list(self._allow_list)[index]

    def __len__(self) -> int:
        return len(self._allow_list)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._allow_list))

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and value in self._allow_list

    def __repr__(self) -> str:
        return f"CheckpointNames({list(self._allow_list)!r})"


@dataclass(frozen=True)
class CheckpointEntry:
    name: str  # shown in the UI
    ref: str  # what checkpoints.load receives


def _is_checkpoint_dir(path: Path) -> bool:
    """A directory with a config.json that is not a codec's (the demo codec sits next to the checkpoints)."""
    return path.is_dir() and (path / "config.json").is_file() and not is_codec_dir(path)


def discover(directory: str | Path) -> list[CheckpointEntry]:
    """A checkpoint directory itself, the checkpoint directories directly inside it, and the In-Place fork's saved
    steps at any level of a run's tree (`<run>/checkpoints/checkpoint_000500/consolidated/`, named
    "<run>/checkpoint_000500"; data/checkpoints/inplace_layout.py), in that order, each sorted.

    Nothing that resolves outside `directory` (a symlink out of it) is listed.

    Raises:
        FileNotFoundError: `directory` is not a directory, or it holds no checkpoint.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    root = directory.resolve()
    if _is_checkpoint_dir(directory):
        return [CheckpointEntry(step_name(root) or directory.name, str(root))]
    found = []
    for child in sorted(directory.iterdir()):
        resolved = child.resolve()
        if not _is_checkpoint_dir(child) or step_name(child) is not None:  # a step's consolidated/: find_steps's
            continue
        if not resolved.is_relative_to(root):
            logger.warning("skipping checkpoint %s: it resolves to %s, outside %s", child, resolved, root)
            continue
        found.append(CheckpointEntry(child.name, str(resolved)))
    listed = {entry.ref for entry in found}
    found += [CheckpointEntry(s.name, str(s.path)) for s in find_steps(directory, root) if str(s.path) not in listed]
    if not found:
        raise FileNotFoundError(
            f"no checkpoint in {directory}: expected directories with a config.json, or the In-Place fork's "
            "<run>/checkpoints/checkpoint_NNNNNN/consolidated/ folders"
        )
    return found


def build_allow_list(
    directories: tp.Sequence[str | Path] = (), hub_refs: tp.Sequence[str] = (), use_env: bool = True
) -> dict[str, CheckpointEntry]:
    """Name -> entry, from directories (flag and MOSHI_TTT_CHECKPOINTS) and hf:// references (in their canonical
    spelling, `HubRef`); names are unique.

    Raises:
        ValueError: a reference that is not an hf:// one.
    """
    dirs = [Path(d) for d in directories]
    if use_env and os.environ.get(ENV_CHECKPOINTS):
        dirs += [Path(d) for d in os.environ[ENV_CHECKPOINTS].split(os.pathsep) if d]
    entries: dict[str, CheckpointEntry] = {}

    def add(entry: CheckpointEntry) -> None:
        name, n = entry.name, 2
        while name in entries and entries[name].ref != entry.ref:
            name, n = f"{entry.name} ({n})", n + 1
        entries[name] = CheckpointEntry(name, entry.ref)

    for d in dirs:
        for entry in discover(d):
            add(entry)
    for ref in hub_refs:
        if not ref.startswith("hf://"):
            raise ValueError(f"--checkpoint takes hf://owner/repo references, got {ref!r}")
        ref = str(HubRef.parse(ref))  # one spelling per reference: hf://a/b and hf://a/b/ are one entry
        add(CheckpointEntry(ref.removeprefix("hf://"), ref))
    return entries


class ModelCache:
    """Loads each allowed checkpoint once per process; thread-safe; hands out shared, read-only models.

    A TTT checkpoint that names a base and that base (say the baseline) hold one copy of the base weights, whichever
    is loaded first: `moshi_ttt.load` shares them as it loads (data/checkpoints/shared.py), so the peak is one base
    plus the TTT tensors. Standalone checkpoints whose weights are equal are deduplicated after loading
    (`share_base_weights`). `dtype` None: float32 for small models and bfloat16 for large ones
    (`moshi_ttt.data.checkpoints.common.resolve_dtype`).
    """

    def __init__(
        self, allow_list: dict[str, CheckpointEntry], device: str = "cpu", dtype: torch.dtype | None = torch.float32
    ):
        self.allow_list = allow_list
        self.device = device
        self.dtype = dtype
        self._loaded: dict[str, LoadedCheckpoint] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()
        self._needs_base: dict[str, bool] = {}  # reference -> an In-Place lora.safetensors checkpoint

    def names(self) -> list[str]:
        return list(self.allow_list)

    def live_names(self) -> CheckpointNames:
        """The names, also those added later (`add_hub`): for the specs of the checkpoint controls."""
        return CheckpointNames(self.allow_list)

    def _entry(self, name: str) -> CheckpointEntry:
        entry = self.allow_list.get(name) if isinstance(name, str) else None
        if entry is None:
            shown = repr(name) if len(repr(name)) <= 40 else repr(name)[:37] + "..."
            raise ValueError(f"unknown checkpoint {shown}; choose one of: {', '.join(self.allow_list) or 'none'}")
        return entry

    def add_hub(self, ref: str) -> str:
        """Allows an hf:// reference (already checked: `inputs.HubReference`) and returns its name: "owner/repo", or
        "owner/repo (2)" where that name is taken by another checkpoint (never replaced: users share the list)."""
        entry = next(iter(build_allow_list([], [ref], use_env=False).values()))
        with self._lock:
            name, n = entry.name, 2
            while name in self.allow_list and self.allow_list[name].ref != ref:
                name, n = f"{entry.name} ({n})", n + 1
            self.allow_list.setdefault(name, CheckpointEntry(name, ref))
        return name

    def _over_base(self, entry: CheckpointEntry) -> bool:
        """`needs_base`, asked once per reference (an hf:// one asks the Hub or its cache)."""
        if entry.ref not in self._needs_base:
            self._needs_base[entry.ref] = needs_base(entry.ref)
        return self._needs_base[entry.ref]

    def get(self, name: str, base: str | None = None) -> LoadedCheckpoint:
        """The loaded checkpoint of an allowed name; ValueError for any other name.

        Args:
            base: the allowed name of the model an In-Place lora.safetensors checkpoint loads over (the run's
                baseline); ignored for every other checkpoint.
        Raises:
            CheckpointMismatch: such a checkpoint without a base, or over a base it does not fit (one sentence).
            CheckpointUnavailable: an hf:// checkpoint (or base) the server cannot download nor find in its cache.
        """
        entry = self._entry(name)
        with _hub_errors(name, entry.ref):
            base_ref = self._base_ref(name, entry, base)
        key = name if base_ref is None else f"{name}\0{base}"
        if base_ref is not None:
            self.get(base)  # the base first, so that the checkpoint shares its tensors (data/checkpoints/shared.py)
        with self._lock:
            if key not in self._loaded:
                logger.info("loading checkpoint %s from %s%s", name, entry.ref, f" over {base_ref}" if base_ref else "")
                with _hub_errors(name, entry.ref):
                    loaded = self._load(name, entry, base, base_ref)
                for param in loaded.model.parameters():
                    param.requires_grad_(False)
                self._share_with_loaded(loaded)
                self._loaded[key] = loaded
                self._locks[id(loaded.model)] = threading.Lock()
            return self._loaded[key]

    def _base_ref(self, name: str, entry: CheckpointEntry, base: str | None) -> str | None:
        """The reference `name` loads over: None for a checkpoint that holds its whole model."""
        if not self._over_base(entry):
            return None
        if base is None:
            raise CheckpointMismatch(
                f"checkpoint {name!r} is an In-Place TTT checkpoint in the fork's lora.safetensors layout: it holds "
                "only what it changes and loads over its base model; choose that base as the baseline."
            )
        if has_ttt_layers(self.get(base).model):
            raise CheckpointMismatch(
                f"checkpoint {name!r} (In-Place TTT, lora.safetensors layout) loads over a plain model, but the "
                f"baseline {base!r} has TTT layers; choose the plain model it was trained from as the baseline."
            )
        return self._entry(base).ref

    def _load(self, name: str, entry: CheckpointEntry, base: str | None, base_ref: str | None) -> LoadedCheckpoint:
        if base_ref is None:
            return load(entry.ref, device=self.device, dtype=self.dtype, load_mimi=True)
        try:
            return load(entry.ref, base=base_ref, device=self.device, dtype=self.dtype, load_mimi=True)
        except BaseMismatch as e:  # the names the user chose, not the paths the library names
            logger.warning("checkpoint %s does not load over %s: %s", name, base_ref, e)
            raise CheckpointMismatch(
                f"checkpoint {name!r} does not load over the baseline {base!r}: {name} and the base {base} disagree "
                f"on {e.detail}."
            ) from e
        except ValueError as e:  # another misfit: the library names the files, the user sees their names only
            logger.warning("checkpoint %s does not load over %s: %s", name, base_ref, e)
            detail = without_paths(str(e).replace(str(Path(entry.ref) / "config.json"), name).replace(base_ref, base))
            raise CheckpointMismatch(
                f"checkpoint {name!r} does not load over the baseline {base!r}: {detail.rstrip('.')}."
            ) from e

    def loaded(self, name: str) -> LoadedCheckpoint | None:
        """The checkpoint of `name` if it is loaded already (an In-Place lora checkpoint: over any base), else None
        (loads nothing, and never waits for a load in progress)."""
        over_a_base = (ckpt for key, ckpt in list(self._loaded.items()) if key.startswith(f"{name}\0"))
        return self._loaded.get(name) or next(over_a_base, None)

    def _share_with_loaded(self, new: LoadedCheckpoint) -> None:
        """A TTT checkpoint that only adds TTT weights to a loaded baseline (or the reverse) shares its base tensors."""
        for other in self._loaded.values():
            if other.lm_config != new.lm_config or has_ttt_layers(other.model) == has_ttt_layers(new.model):
                continue
            ttt, base = (new, other) if has_ttt_layers(new.model) else (other, new)
            shared = share_base_weights(ttt.model, base.model)
            logger.info("%s shares %d base tensors with %s", ttt.ref, shared, base.ref)

    def lock(self, model: LMModel) -> threading.Lock:
        return self._locks[id(model)]

    def context_tokens(self, name: str, base: str | None = None) -> int | None:
        """The attention context of an allowed checkpoint's model, in tokens (loads it once; `base` as for `get`).
        An In-Place checkpoint with the fork's YaRN attends over its context times the YaRN scale."""
        return self.get(name, base).model.context

    def mini_batch_size(self, name: str, base: str | None = None) -> int | None:
        """The checkpoint's own tokens per fast-weight update: its first TTT layer's mini-batch size, or its first
        In-Place layer's chunk size; None without either (loads it once; `base` as for `get`). The app's control
        starts there."""
        return update_size(self.get(name, base).model).default


@contextlib.contextmanager
def _hub_errors(name: str, ref: str) -> Iterator[None]:
    """An hf:// checkpoint that cannot be had (FileNotFoundError of data/checkpoints/hub.py) or that the loader
    refuses (ValueError: its files, which any user may choose with --allow-hub) as CheckpointUnavailable, in the
    loader's words without the server's paths."""
    try:
        yield
    except (CheckpointMismatch, CheckpointUnavailable):
        raise
    except (FileNotFoundError, ValueError) as e:
        if not ref.startswith("hf://"):
            raise
        logger.warning("checkpoint %s (%s) is not available: %s", name, ref, e)
        reason = without_paths(str(e))
        reason = reason.split(" (", 1)[0] if isinstance(e, FileNotFoundError) else reason  # not the cache's advice
        raise CheckpointUnavailable(f"checkpoint {name!r} cannot be loaded: {reason.rstrip('.')}.") from e


def share_base_weights(ttt_model: LMModel, base_model: LMModel) -> int:
    """Makes the non-TTT tensors of `ttt_model` the very tensors of `base_model` where they are equal (standalone
    checkpoints saved with their whole base; a checkpoint that names its base shares it as it loads).

    Returns the number of tensors shared (already shared ones included). Safe because cached models are never
    written to.
    """
    ttt_names = {f"transformer.layers.{i}.ttt." for i in ttt_blocks(ttt_model)}
    ttt_names |= {f"transformer.layers.{i}.gating.w_down" for i in inplace_blocks(ttt_model)}
    base = dict(base_model.named_parameters())
    shared = 0
    for name, param in ttt_model.named_parameters():
        if any(name.startswith(prefix) for prefix in ttt_names):
            continue
        other = base.get(name)
        if other is not None and other.data_ptr() == param.data_ptr():  # loaded over the same base: nothing to do
            shared += 1
            continue
        same = other is not None and other.shape == param.shape and other.dtype == param.dtype
        if same and torch.equal(other, param):
            param.data = other.data
            shared += 1
    return shared


class SharedModelRun:
    """Runs one user's generator over a shared model with that user's own streaming state.

    moshi keeps streaming state on the modules. Each `next()` takes the model's lock, installs this run's state,
    advances the generator, then saves and removes the state, so concurrent runs interleave chunk by chunk
    without seeing each other's KV caches or fast weights.
    """

    def __init__(self, model: LMModel, lock: threading.Lock, generator: Iterator):
        self.model = model
        self.lock = lock
        self.generator = generator
        self.state: dict[str, tp.Any] | None = None

    def _swap_in(self) -> None:
        if self.state is not None:
            self.model.transformer.set_streaming_state(self.state)

    def _swap_out(self) -> None:
        transformer = self.model.transformer
        state = transformer.get_streaming_state()
        self.state = state if any(v is not None for v in state.values()) else None
        transformer.set_streaming_state(dict.fromkeys(state))

    def __iter__(self) -> SharedModelRun:
        return self

    def __next__(self):
        with self.lock:
            self._swap_in()
            try:
                return next(self.generator)
            finally:
                self._swap_out()

    def close(self) -> None:
        with self.lock:
            self._swap_in()
            try:
                self.generator.close()
            finally:
                self._swap_out()
