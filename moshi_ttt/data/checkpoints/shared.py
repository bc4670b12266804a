"""Load once: every model of this process loaded from the same base holds the same base tensors.

A TTT checkpoint over a base (config.json `"base": "hf://kyutai/moshiko-pytorch-bf16"`) and that base loaded as a
baseline share one copy of the base weights, whatever the loading order: the first load reads the file; a later
load of the same base (same reference and revision, `base` override, device and dtype) builds its LMModel on the
meta device and takes the tensors of a model already loaded with `load_state_dict(assign=True)`, as moshi's own
loader takes a file's tensors. A TTT checkpoint then adds its TTT tensors, nothing more.

The pool holds no tensor: only weak references to the models that hold them, and a fingerprint of each tensor
(its memory address and in-place version counter). The weights go with the last model that holds them. A model
whose base tensors were changed in place (an optimizer step) or replaced (`model.to(...)`) since they were pooled
no longer matches its fingerprints, and the next load reads the file again instead of sharing changed weights.
Shared tensors are read-only by contract: changing them in place changes every model that holds them (load with
`share=False` to get a private copy to train).
"""

from __future__ import annotations

import logging
import threading
import typing as tp
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import constants
from moshi.models.compression import MimiModel

from moshi_ttt.data.checkpoints.common import LoadedCheckpoint, meta_lm, resolve_dtype
from moshi_ttt.data.checkpoints.hub import HF_PREFIX, HubRef, offline_commit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseKey:
    """What makes two loads the same base."""

    ref: str  # the reference, canonical: hf://owner/repo@revision[/path] (revision "main" if none), or an absolute path
    base: str | None  # the `base` override of the load (the weights a LoRA adapter goes on), canonical too
    device: str  # e.g. "cpu", "cuda:0"
    hub_cache: str  # the Hugging Face cache that hf:// references were read from (HF_HUB_CACHE at load time)


@dataclass
class _Entry:
    """One loaded base: what rebuilds a LoadedCheckpoint around its tensors, and who holds them."""

    dtype: torch.dtype  # of the loaded model
    auto: bool  # `resolve_dtype(None, ...)` gives this dtype: a load with dtype=None (auto) may share it
    lm_config: dict
    mimi_ref: str | None
    kind: str
    notes: list[str]
    fingerprints: dict[str, tuple[int, int]]  # state-dict name -> (data_ptr, _version) when pooled
    holders: list[weakref.ref] = field(default_factory=list)  # models holding the tensors (weak)


PLAIN_KINDS = ("moshi", "ours")  # LoadedCheckpoint.kind of loaders whose models without TTT are moshi's own
_LOCK = threading.Lock()
_POOL: dict[BaseKey, list[_Entry]] = {}
_MIMI: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (path, codebooks, device) -> MimiModel


def canonical_ref(ref: str) -> str:
    """One spelling per reference: hf://owner/repo@main for hf://owner/repo, absolute paths for local ones. Offline,
    a revision is its cached commit hash (a Space that pins its baseline at a tag or hash and a TTT checkpoint whose
    base names the repo without one then share one copy)."""
    if ref.startswith(HF_PREFIX):
        hub = HubRef.parse(ref)
        return str(HubRef(hub.repo, offline_commit(hub) or hub.revision or "main", hub.path))
    return str(Path(ref).resolve())


def device_name(device: torch.device | str) -> str:
    """ "cuda" and "cuda:0" are one device (the current one)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def base_key(ref: str, base: str | None, device: torch.device | str) -> BaseKey:
    canonical_base = None if base is None else canonical_ref(base)
    return BaseKey(canonical_ref(ref), canonical_base, device_name(device), str(constants.HF_HUB_CACHE))


def _fingerprint(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.data_ptr(), tensor._version  # _version: torch's in-place counter, shared by every alias


def _live_tensors(entry: _Entry) -> dict[str, torch.Tensor] | None:
    """The pooled tensors, taken from the live holders; None if any is gone or changed since it was pooled."""
    entry.holders = [ref for ref in entry.holders if ref() is not None]
    states = [holder.state_dict() for holder in (ref() for ref in entry.holders) if holder is not None]
    tensors = {}
    for name, fingerprint in entry.fingerprints.items():
        found = next((s[name] for s in states if name in s and _fingerprint(s[name]) == fingerprint), None)
        if found is None:
            return None
        tensors[name] = found
    return tensors


def take(key: BaseKey, dtype: torch.dtype | None, ref: str) -> LoadedCheckpoint | None:
    """A new model over the tensors of the same base loaded before, if a live model holds them unchanged.

    Args:
        key: the load's `base_key`.
        dtype: the load's dtype; None (auto) takes an entry loaded in the dtype that auto gives.
        ref: the reference as the caller wrote it (the result's `ref`).
    Returns:
        A LoadedCheckpoint (eval mode, no codec) whose model holds the pooled tensors, or None.
    """
    with _LOCK:
        entries = _POOL.get(key, [])
        for entry in list(entries):
            if not (entry.dtype == dtype or (dtype is None and entry.auto)):
                continue
            tensors = _live_tensors(entry)
            if tensors is None:  # freed, moved or changed in place: not shared again
                entries.remove(entry)
                continue
            model = meta_lm(entry.lm_config, entry.dtype)
            model.load_state_dict(tensors, strict=True, assign=True)
            model.eval()
            entry.holders.append(weakref.ref(model))
            logger.info("%s: shares the %d base tensors of a model loaded before", ref, len(tensors))
            return LoadedCheckpoint(
                model=model,
                mimi=None,
                mimi_ref=entry.mimi_ref,
                lm_config=dict(entry.lm_config),
                ttt_config=None,
                kind=entry.kind,
                ref=ref,
                notes=list(entry.notes),
            )
        if not entries:
            _POOL.pop(key, None)
        return None


def is_plain(ckpt: LoadedCheckpoint) -> bool:
    """A moshi LMModel as moshi builds it from its lm_config (no TTT, In-Place or legacy layers): what a base is."""
    return ckpt.kind in PLAIN_KINDS and ckpt.ttt_config is None


def offer(key: BaseKey, ckpt: LoadedCheckpoint) -> None:
    """Pools the tensors of a plain model (`is_plain`) just loaded, for later loads of the same base."""
    if not is_plain(ckpt):
        raise ValueError(f"only plain models are bases; this one is a {ckpt.kind} checkpoint with TTT layers")
    state = ckpt.model.state_dict()
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    if dtype is None:  # a model of mixed floating dtypes comes from no single `dtype` argument
        return
    entry = _Entry(
        dtype=dtype,
        auto=resolve_dtype(None, ckpt.lm_config, key.device) == dtype,
        lm_config=dict(ckpt.lm_config),
        mimi_ref=ckpt.mimi_ref,
        kind=ckpt.kind,
        notes=list(ckpt.notes),
        fingerprints={name: _fingerprint(t) for name, t in state.items()},
        holders=[weakref.ref(ckpt.model)],
    )
    with _LOCK:
        entries = _POOL.setdefault(key, [])
        entries[:] = [e for e in entries if e.dtype != dtype] + [entry]


def shared_mimi(path: Path, codebooks: int, device: torch.device | str, build) -> MimiModel:
    """The codec of `path` with `codebooks` on `device`: the one already built, if a checkpoint still holds it,
    else `build()`'s. Encoding does not change it, so the baseline and the TTT model can use one codec."""
    key = (str(path.resolve()), int(codebooks), device_name(device))
    with _LOCK:
        mimi = _MIMI.get(key)
        if mimi is None:
            mimi = build()
            _MIMI[key] = mimi
        return mimi


CODE_FORMAT = ("card", "dep_q", "n_q", "delays")  # what two LMModels must share to read one encoding of the audio


def code_format_differences(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """How the codes two moshi LMModels read differ ("card: 2048 vs 1024, ..."), None when they read the same."""
    differ = [k for k in CODE_FORMAT if getattr(a, k) != getattr(b, k)]
    return ", ".join(f"{k}: {getattr(a, k)} vs {getattr(b, k)}" for k in differ) or None


def same_codec(a: MimiModel, b: MimiModel) -> bool:
    """Whether two loaded codecs encode alike, however their checkpoints name them (an hf:// reference, a snapshot
    path, a local copy): the same object (`shared_mimi` builds one per file), or the same class, rates and weights."""
    if a is b:
        return True
    if type(a) is not type(b) or (a.sample_rate, a.frame_rate) != (b.sample_rate, b.frame_rate):
        return False
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(
        state_a[k].shape == state_b[k].shape and torch.equal(state_a[k], state_b[k].to(state_a[k].device))
        for k in state_a
    )


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct memory that the modules' parameters and buffers hold: a tensor shared by two models,
    or by two names of one model, counts once."""
    storages = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_meta:
                continue
            storage = tensor.untyped_storage()
            storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def move_together(
    modules: tp.Iterable[torch.nn.Module | None],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Moves (or casts) modules that share tensors, in place, keeping one copy of each shared tensor.

    `module.to(device)` on two models that hold the same base tensors (load once) gives each model its own copy:
    twice the memory on the GPU. Here every module goes through `nn.Module._apply` with one conversion that
    remembers what it converted: a tensor already converted for another module (the same storage, offset, shape,
    strides and dtype) is taken from there, so the modules share the converted tensors as they shared the
    originals. TTT fast-weight parameters keep float32 under a dtype cast (the TTT block's own `_apply`).

    The originals stay alive until every module is converted (the memory of both copies at the peak, on the host
    for a cast; what a device move needs anyway). Moved tensors no longer match the load-once pool's fingerprints:
    a later `load` on the old device reads the file again.

    Args:
        modules: the models and codecs to move; None entries (a checkpoint loaded without codec) are skipped, and a
            module given twice is converted once.
        device: where to (None: where each tensor is).
        dtype: floating-point tensors become this dtype (None: they keep theirs); integer and bool buffers keep
            their dtype, as with `module.to(dtype)`.
    """
    converted: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # view key -> (original, converted)

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and (tensor.is_floating_point() or tensor.is_complex()) else None
        if tensor.numel() == 0 or tensor.is_meta:  # no storage to share (and the TTT block's dtype probe)
            return tensor.to(device=device, dtype=cast)
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)  # fmt: skip
        if key not in converted:
            converted[key] = (tensor, tensor.to(device=device, dtype=cast))
        return converted[key][1]

    seen: set[int] = set()
    for module in modules:
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        module._apply(convert)
