"""Random-weight checkpoints in kyutai's Hugging Face Hub layout, written into a local Hub cache, for loading offline.

`write_moshi_repo` fills `<cache>/models--kyutai--moshiko-pytorch-bf16/` as `hf download kyutai/moshiko-pytorch-bf16`
would: `refs/main` holding a commit hash and `snapshots/<hash>/` with `model.safetensors` (moshi's LM kwargs, here
in bf16), the Mimi codec `tokenizer-e351c8d8-checkpoint125.safetensors`, the text tokenizer
`tokenizer_spm_32k_3.model` and `config.json`. Files are stored in the snapshot folder itself rather than as links
to `blobs/` (huggingface_hub reads both; it writes real files where links are not allowed).

The LM weights are written one tensor at a time by `write_safetensors` (safetensors' `save_file` holds the whole
file's bytes besides the tensors: 15 GB of weights would need 30 GB). `write_ttt_checkpoint` writes a TTT checkpoint
of ours over such a base, building only the TTT blocks (on the meta device, then `to_empty`).

Used by bench/hub_7b.py (full size) and tests/test_hub_layout.py (7B width, 2 layers). From the command line, a
small cache to try offline Hub references by hand (1.8 GB of LM weights and 385 MB of Mimi at these sizes):
    NO_TORCH_COMPILE=1 python -m bench.hub_cache --root /tmp/hub --num-layers 2 --depth-layers 1
    HF_HOME=/tmp/hub/hf_home HF_HUB_OFFLINE=1 python -m moshi_ttt.evaluate --audio clip.wav \
        --baseline hf://kyutai/moshiko-pytorch-bf16 --ttt /tmp/hub/ttt --out /tmp/hub/results
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import typing as tp
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from safetensors.torch import save_file

from moshi_ttt import TTTConfig, apply_ttt, save
from moshi_ttt.compat.moshi import default_lm_kwargs
from moshi_ttt.ttt.apply import ttt_blocks

REPO = loaders.DEFAULT_REPO
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot's (made-up) commit hash
WEIGHT_STD = 0.02  # of the random LM and TTT weights (uniform, this standard deviation)
RANDOM_PERIOD = 1_000_003  # a prime: the random LM weights repeat with this period (see random_weight)
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}
TensorSpec = tuple[str, tuple[int, ...], torch.dtype]


def snapshot_dir(cache: Path, repo: str = REPO, commit: str = COMMIT, refs: tp.Sequence[str] = ("main",)) -> Path:
    """Creates the cache folders of one revision of `repo` (`refs/<ref>` -> `commit`); returns its snapshot folder."""
    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


def write_safetensors(path: Path, specs: tp.Sequence[TensorSpec], make: tp.Callable[[TensorSpec], torch.Tensor]) -> int:
    """Writes a safetensors file holding one tensor in memory at a time; returns the bytes of tensor data.

    The format: an 8-byte little-endian header length, the JSON header (name -> dtype, shape, [begin, end) offsets
    into the data), padded with spaces to a multiple of 8, then the tensors' bytes in header order.
    """
    header: dict[str, tp.Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        size = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for spec in specs:
            tensor = make(spec)
            if tensor.dtype != spec[2] or tuple(tensor.shape) != tuple(spec[1]):
                raise ValueError(f"{spec[0]}: made {tensor.dtype} {tuple(tensor.shape)}, declared {spec[2]} {spec[1]}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return offset


def random_weight(spec: TensorSpec, seed: int) -> torch.Tensor:
    """A random tensor for an LM weight: ones for norm scales, uniform noise of std WEIGHT_STD for the rest.

    The noise is a random sequence of RANDOM_PERIOD values repeated: drawing 7.7e9 independent values takes minutes
    on 2 cores, copying takes seconds, and the period is prime, so no two rows of a matrix are alike.
    """
    name, shape, dtype = spec
    if name.endswith(".alpha") or "norm" in name:
        return torch.ones(shape, dtype=dtype)
    numel = int(torch.Size(shape).numel())
    generator = torch.Generator().manual_seed(seed)
    bound = WEIGHT_STD * 3**0.5
    period = torch.empty(min(numel, RANDOM_PERIOD), dtype=dtype).uniform_(-bound, bound, generator=generator)
    return period.repeat(-(-numel // period.numel()))[:numel].view(shape)


def lm_specs(lm_config: dict, dtype: torch.dtype) -> list[TensorSpec]:
    """Names, shapes and dtypes of the LMModel of `lm_config` (built on the meta device: no memory)."""
    model = LMModel(device="meta", dtype=dtype, **lm_config)
    return [(name, tuple(t.shape), t.dtype) for name, t in model.state_dict().items()]


def write_text_tokenizer(path: Path) -> None:
    """A tiny real sentencepiece model under moshi's tokenizer name (CheckpointInfo resolves the file; scoring
    never reads it, moshi's text generation would)."""
    import sentencepiece

    text = ["the quick brown fox jumps over the lazy dog", "moshi listens and speaks", "a random tokenizer"] * 10
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buffer,
        vocab_size=32,
        hard_vocab_limit=False,
        model_type="unigram",
        minloglevel=2,
    )
    path.write_bytes(buffer.getvalue())


def write_mimi(path: Path, seed: int = 0) -> None:
    """Random Mimi weights with moshi's default Mimi config, its codebooks initialised (random centroids), so that
    encoding gives varied codes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = loaders.get_mimi(None, device="cpu").state_dict()
        for name, tensor in state.items():
            if name.endswith("_codebook._initialized"):
                tensor.fill_(1.0)
            elif name.endswith("_codebook.cluster_usage"):
                tensor.fill_(1.0)
            elif name.endswith("_codebook.embedding_sum"):
                tensor.normal_()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def write_moshi_repo(
    cache: Path,
    lm_config: dict | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    repo: str = REPO,
    commit: str = COMMIT,
    refs: tp.Sequence[str] = ("main",),
    seed: int = 0,
    with_config: bool = True,
    mimi: bool = True,
) -> Path:
    """Writes one revision of a moshi Hub repo with random weights into the Hub cache `cache` (HF_HUB_CACHE).

    Args:
        lm_config: LMModel kwargs; None: moshi's Moshi 7B (moshiko) kwargs.
        dtype: of model.safetensors (kyutai's: bfloat16).
        refs: branch or tag names pointing at `commit`.
        seed: of the random weights (another seed, other weights).
        with_config: write config.json (the LM kwargs and file names), else a repo without one (moshi then assumes
            Moshi 7B).
        mimi: write random Mimi weights (385 MB); False writes an empty file under the codec's name, for tests that
            never build the codec (moshi's CheckpointInfo only needs the file to be there).
    Returns:
        The snapshot folder.
    """
    lm_config = default_lm_kwargs() if lm_config is None else dict(lm_config)
    snapshot = snapshot_dir(cache, repo, commit, refs)
    specs = lm_specs(lm_config, dtype)
    seeds = {spec[0]: seed * 100_003 + i for i, spec in enumerate(specs)}
    write_safetensors(snapshot / loaders.MOSHI_NAME, specs, lambda spec: random_weight(spec, seeds[spec[0]]))
    if mimi:
        write_mimi(snapshot / loaders.MIMI_NAME, seed)
    else:
        (snapshot / loaders.MIMI_NAME).write_bytes(b"")
    write_text_tokenizer(snapshot / loaders.TEXT_TOKENIZER_NAME)
    if with_config:
        names = {
            "moshi_name": loaders.MOSHI_NAME,
            "mimi_name": loaders.MIMI_NAME,
            "tokenizer_name": loaders.TEXT_TOKENIZER_NAME,
        }
        (snapshot / "config.json").write_text(json.dumps({**lm_config, **names}, indent=2))
    return snapshot


def write_ttt_checkpoint(
    directory: Path,
    base: str,
    lm_config: dict | None = None,
    *,
    layers: str = "29,30,31",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    mini_batch_size: int = 16,
) -> Path:
    """A TTT checkpoint of ours over `base` (config.json names it; model.safetensors holds only the TTT tensors).

    The base model is built on the meta device (no memory) and the TTT blocks too, then given memory with
    `to_empty` and random values (uniform, std WEIGHT_STD; LayerNorm scales 1, gates and offsets at their usual
    starting values), so that writing a 7B-sized TTT checkpoint takes the memory of the TTT blocks only.
    """
    lm_config = default_lm_kwargs() if lm_config is None else dict(lm_config)
    cfg = TTTConfig(layers=layers, mini_batch_size=mini_batch_size)
    model = apply_ttt(LMModel(device="meta", dtype=dtype, **lm_config), cfg, device="meta")
    generator = torch.Generator().manual_seed(seed)
    bound = WEIGHT_STD * 3**0.5
    with torch.no_grad():
        for block in ttt_blocks(model).values():
            block.to_empty(device="cpu")
            for name, param in block.named_parameters():
                if name == "gating_alpha":
                    param.fill_(cfg.gating_alpha_init)
                elif name in ("ttt_norm_weight",) or name.startswith("norm."):
                    param.fill_(1.0)
                elif name in ("ttt_norm_bias", "learnable_token_idx", "lr_bias") or name.startswith(("b1", "b2")):
                    param.zero_()
                else:
                    param.uniform_(-bound, bound, generator=generator)
    return save(directory, model, base=base, ttt_config=cfg, dtype=dtype, overwrite=True)


def main(argv: tp.Sequence[str] | None = None) -> None:
    """Writes ROOT/hf_home/hub (kyutai's moshiko repo, random weights) and ROOT/ttt (a TTT checkpoint over it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, required=True, help="HF_HOME is ROOT/hf_home; the TTT checkpoint ROOT/ttt")
    p.add_argument("--num-layers", type=int, help="temporal layers (default: Moshi 7B's 32, 15 GB)")
    p.add_argument("--depth-layers", type=int, help="depth transformer layers (default: Moshi 7B's)")
    p.add_argument("--ttt-layers", default=None, help="TTT layers of ROOT/ttt (default: the last layer)")
    p.add_argument("--revision", action="append", default=[], help="another branch or tag name of the snapshot")
    p.add_argument("--no-mimi", action="store_true", help="an empty codec file (nothing can encode audio then)")
    args = p.parse_args(argv)
    lm_config = default_lm_kwargs()
    if args.num_layers is not None:
        lm_config["num_layers"] = args.num_layers
    if args.depth_layers is not None:
        lm_config["depformer_num_layers"] = args.depth_layers
    cache = args.root / "hf_home" / "hub"
    snapshot = write_moshi_repo(cache, lm_config, refs=("main", *args.revision), mimi=not args.no_mimi)
    layers = args.ttt_layers or str(lm_config["num_layers"] - 1)
    ttt = write_ttt_checkpoint(args.root / "ttt", f"hf://{REPO}", lm_config, layers=layers)
    print(f"wrote {snapshot} (revisions main, {COMMIT}{''.join(', ' + r for r in args.revision)}) and {ttt}")
    print(f"use it offline with HF_HOME={args.root / 'hf_home'} HF_HUB_OFFLINE=1")


if __name__ == "__main__":
    main()
