"""Shared pieces of checkpoint loading: the result dataclass, safetensors reading, key checks, model building."""

from __future__ import annotations

import contextlib
import json
import logging
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from safetensors import SafetensorError, safe_open
from torch.overrides import TorchFunctionMode

from moshi_ttt.config import TTTConfig
from moshi_ttt.ttt.apply import ttt_blocks

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft", ".sfts")
# Keys of a moshi config.json that are not LMModel kwargs (CheckpointInfo.from_hf_repo pops the same ones; the
# LoRA flags are read by moshi's get_moshi_lm).
NON_LM_KEYS = (
    "moshi_name",
    "mimi_name",
    "mimi_config_name",
    "tokenizer_name",
    "lora_name",
    "model_type",
    "lm_gen_config",
    "tts_config",
    "stt_config",
    "model_id",
    "lora",
    "lora_rank",
    "lora_scaling",
)
_MAX_NAMED = 8  # key names quoted per category in an error message


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `moshi_ttt.data.checkpoints.load` returns."""

    model: LMModel  # in eval mode, TTT applied when the checkpoint has it
    mimi: MimiModel | None  # the codec, when loaded (load(..., load_mimi=True)), else None
    mimi_ref: str | None  # where the codec comes from (local path or hf://owner/repo/file), None if unknown
    lm_config: dict  # moshi LMModel kwargs
    ttt_config: TTTConfig | None  # None for a model without TTT
    kind: str  # "ours", "moshi" or "legacy_ttt"
    ref: str  # the reference it was loaded from
    notes: list[str] = field(default_factory=list)  # plain-language remarks for reports (e.g. leakage warnings)


def lm_kwargs(raw_config: dict) -> dict:
    """The LMModel kwargs of a moshi config.json (file names, LoRA flags and generation settings removed)."""
    return {k: v for k, v in raw_config.items() if k not in NON_LM_KEYS}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def check_weights_file(path: Path) -> None:
    """Refuses anything but a safetensors file (pickled checkpoints can run code when loaded).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: for a pickle/torch.save file, whatever its name.
    """
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} is a pickle/torch.save checkpoint ({path.suffix}); only safetensors files are accepted "
            "(convert it with safetensors.torch.save_file on a trusted machine)"
        )
    with path.open("rb") as f:
        head = f.read(9)
    # A safetensors file starts with an 8-byte little-endian header length followed by the JSON header.
    if len(head) < 9 or head[8:9] != b"{":
        raise ValueError(f"{path} is not a safetensors file (maybe a renamed pickle); only safetensors are accepted")


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of a safetensors file, without reading the data."""
    check_weights_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e


def read_tensors(path: Path, names: tp.Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (all, or `names`), on CPU in their stored dtype."""
    check_weights_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys()) if names is None else list(names)
            return {k: f.get_tensor(k) for k in keys}
    except SafetensorError as e:  # truncated or damaged: say which file
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e


def _named(keys: tp.Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_NAMED])
    return shown + (f" and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else "")


def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """Unknown, missing or mis-shaped keys are an error that names them (never silently ignored).

    Raises:
        ValueError: listing each kind of problem with the key names.
    """
    missing = set(expected) - set(found)
    unknown = set(found) - set(expected)
    wrong = {k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k])}
    problems = []
    if missing:
        problems.append(f"missing keys: {_named(missing)}")
    if unknown:
        problems.append(f"unknown keys: {_named(unknown)}")
    if wrong:
        details = [f"{k} (expected {list(expected[k])}, found {list(found[k])})" for k in sorted(wrong)]
        problems.append(f"wrong shapes: {_named(details)}")
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def model_shapes(model: torch.nn.Module, prefixes: tp.Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's state (only keys starting with one of `prefixes`, if given)."""
    state = model.state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if prefixes is None or k.startswith(tuple(prefixes))}


def ttt_prefixes(model: LMModel) -> list[str]:
    """State-dict prefixes of the TTT parameters, one per TTT layer."""
    return [f"transformer.layers.{i}.ttt." for i in ttt_blocks(model)]


# Below this many parameters (about; see `approx_params`), a model loaded onto the CPU is built there directly.
SMALL_MODEL_PARAMS = 50_000_000
# From this many parameters on, dtype=None ("auto") loads a model in bfloat16, the dtype kyutai stores and runs its
# checkpoints in: Moshi 7B (7.7e9 parameters) takes 14.3 GiB in bfloat16 and 28.6 GiB in float32. Below, float32 on
# every device: exact, the dtype the demo and test models are stored in, faster on CPUs without native bfloat16
# (2.4x per token on an AVX2 AMD EPYC, scoring/cost.py), and at most 16 GB.
LARGE_MODEL_PARAMS = 4_000_000_000


def approx_params(lm_config: dict) -> int:
    """About how many parameters the LMModel of `lm_config` has (temporal transformer and embeddings/heads)."""
    dim, layers = int(lm_config["dim"]), int(lm_config["num_layers"])
    return 12 * dim * dim * layers + 2 * (int(lm_config.get("n_q", 8)) + 1) * int(lm_config.get("card", 2048)) * dim


def resolve_dtype(dtype: torch.dtype | None, lm_config: dict, device: torch.device | str) -> torch.dtype:
    """`dtype`, or what None ("auto") stands for: float32 for models under LARGE_MODEL_PARAMS (exact numerics; the
    demo models, stored in float32) and bfloat16 from there on (Moshi 7B, stored in bfloat16: 14.3 GiB instead of
    28.6), on every device: a model loaded on the CPU and then moved to a GPU (ZeroGPU's start-up) has the dtype it
    would have had loaded there. TTT fast weights are float32 in every case.

    `device` is kept for callers; the rule no longer depends on it."""
    del device  # the same rule on every device (see above)
    if dtype is not None:
        return dtype
    return torch.bfloat16 if approx_params(lm_config) >= LARGE_MODEL_PARAMS else torch.float32


class SkipInitOnMeta(TorchFunctionMode):
    """Inside: the random initialisation of meta tensors is skipped. It computes nothing (a meta tensor has no
    values), yet torch runs it through its Python reference kernels. Only in-place initialisations of meta tensors
    are skipped; they leave shapes and dtypes as they are."""

    SKIPPED = frozenset(
        {
            *("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_"),
            *("xavier_normal_", "orthogonal_", "constant_", "ones_", "zeros_", "fill_", "zero_", "clamp_", "erfinv_"),
            *("mul_", "add_"),
        }
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
        if getattr(func, "__name__", None) in self.SKIPPED and isinstance(first, torch.Tensor) and first.is_meta:
            return first
        return func(*args, **kwargs)


def meta_lm(lm_config: dict, dtype: torch.dtype) -> LMModel:
    """The LMModel of `lm_config` on the meta device (no memory), built without running its random
    initialisation, to be filled with load_state_dict(assign=True).

    The default device is meta too: moshi builds a few modules without its `device` argument (LMModel.text_linear,
    131M parameters at 7B), which would otherwise be initialised on the CPU and then moved."""
    with torch.device("meta"), SkipInitOnMeta(), _lm_config_errors():
        return LMModel(device="meta", dtype=dtype, **lm_config)


@contextlib.contextmanager
def _lm_config_errors() -> tp.Iterator[None]:
    """moshi's LMModel checks its kwargs with asserts, or not at all: what it raises becomes one ValueError."""
    try:
        yield
    except (TypeError, KeyError, AssertionError, ZeroDivisionError) as e:
        detail = str(e) or "one of moshi's asserts failed"
        raise ValueError(f"the LM config does not build a moshi LMModel: {type(e).__name__}: {detail}") from e


def build_lm(lm_config: dict, device: torch.device | str, dtype: torch.dtype | None) -> LMModel:
    """A moshi LMModel to fill with `load_full`: built on the meta device (no memory, no random initialisation),
    except a small model bound for the CPU, which is built there directly: initialising meta tensors runs
    torch's Python reference kernels, whose first call imports torch._dynamo (~1 s, more than the whole load of
    the demo models). `dtype` None: see `resolve_dtype`.

    Raises:
        ValueError: when the kwargs do not build an LMModel (not a dict, a missing, unknown or mistyped kwarg)."""
    if not isinstance(lm_config, dict):
        raise ValueError(f"the LM config must be a dict of LMModel kwargs, not {type(lm_config).__name__}")
    with _lm_config_errors():
        dtype = resolve_dtype(dtype, lm_config, device)
        small = approx_params(lm_config) < SMALL_MODEL_PARAMS and torch.device(device).type == "cpu"
    if not small:
        return meta_lm(lm_config, dtype)
    with torch.random.fork_rng(devices=[]), _lm_config_errors():  # the initialisation must not move the caller's RNG
        return LMModel(device="cpu", dtype=dtype, **lm_config)


def _cast_like(tensor: torch.Tensor, ref: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The model tensor's dtype: the model's for most, float32 for TTT fast weights (the blocks keep those)."""
    dtype = ref.dtype if tensor.dtype.is_floating_point else tensor.dtype
    return tensor.to(device=device, dtype=dtype)


def load_full(model: LMModel, tensors: dict[str, torch.Tensor], source: str, device: torch.device | str) -> None:
    """Loads every tensor of the model (built on the meta device or not) with load_state_dict(strict=True).

    Raises:
        ValueError: naming unknown, missing or mis-shaped keys.
    """
    state = model.state_dict()
    check_keys(model_shapes(model), {k: tuple(v.shape) for k, v in tensors.items()}, source)
    on_meta = any(v.is_meta for v in state.values())
    merged = {k: _cast_like(v, state[k], device if on_meta else state[k].device) for k, v in tensors.items()}
    model.load_state_dict(merged, strict=True, assign=on_meta)


def load_part(
    model: LMModel,
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    source: str,
    device: torch.device | str,
) -> None:
    """Loads the tensors that replace or complete part of a loaded model (TTT blocks built on the meta device, base
    weights of a layer); `expected` are the keys they must be.

    The model's other tensors may be shared with other models (`shared.py`), so nothing is written into them:
    every tensor is assigned (load_state_dict(assign=True)), the new ones on `device`.

    Raises:
        ValueError: naming unknown, missing or mis-shaped keys, or parameters still without values.
    """
    check_keys(expected, {k: tuple(v.shape) for k, v in tensors.items()}, source)
    state = model.state_dict()
    merged = dict(state)
    merged.update({k: _cast_like(v, state[k], device) for k, v in tensors.items()})
    model.load_state_dict(merged, strict=True, assign=True)
    empty = [name for name, value in model.state_dict().items() if value.is_meta]
    if empty:
        raise ValueError(f"{source} leaves tensors of the model without values: {_named(empty)}")


def fast_weight_keys(model: LMModel) -> set[str]:
    """State-dict keys of the TTT parameters that stay float32 in any model dtype (saved as float32 too)."""
    from moshi_ttt.ttt.layer import FLOAT32_PARAMS
    from moshi_ttt.ttt.legacy import FLOAT32_PARAMS as LEGACY_FLOAT32_PARAMS

    keys = set()
    for i, block in ttt_blocks(model).items():
        prefix = f"transformer.layers.{i}.ttt."
        if block.cfg.legacy is not None:  # a LegacyTTTBlock (ttt/apply.py)
            names = [*LEGACY_FLOAT32_PARAMS, *(f"weights.{j}" for j in range(len(block.weights)))]
            names += [f"biases.{j}" for j in range(len(block.biases))]
        else:
            names = list(FLOAT32_PARAMS)
        keys.update(prefix + name for name in names)
    return keys


def legacy_notes(cfg: TTTConfig | None) -> list[str]:
    """Plain-language remarks that every report of a legacy-mode model shows."""
    if cfg is None or cfg.legacy is None:
        return []
    notes = [
        "Older TTT checkpoint (moshi-finetune TTT fork), evaluated in legacy mode with the fork's own TTT math: "
        "L2-normalised q and k, reconstruction target v - k normalised with the unbiased std + 1e-5, LayerNorm eps "
        "1e-8, learning rate without the 1/i position factor, the doubled inner step of 3+-layer MLPs, zero padding "
        "of a partial last mini-batch, gate tanh(clamp(alpha, -3, 3)) with no norm before the TTT branch. Its "
        "post_norm and wo weights are loaded but not applied, as in the fork."
    ]
    b = cfg.mini_batch_size
    if not cfg.legacy.causal:
        notes.append(
            f"WARNING: this checkpoint's TTT uses non-causal mini-batches of {b} tokens: each token is scored with "
            f"fast weights that already learned from the later tokens of its mini-batch (up to {b - 1} future "
            "tokens), so part of any measured gain is future audio leaking into the loss. Load it again with "
            "legacy_causal=True to score the same weights causally and compare."
        )
    else:
        notes.append(
            "Causal variant of a legacy checkpoint (legacy_causal=True): each token only uses the gradients of "
            "itself and the earlier tokens of its mini-batch. The checkpoint was trained non-causally, so these "
            "numbers show what remains without the leak, not how it was trained."
        )
    return notes
