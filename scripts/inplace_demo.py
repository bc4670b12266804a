"""Two In-Place TTT checkpoints in the In-Place fork's layout over the demo model, to see what their fast weights do.

Writes OUT/fork_settings and OUT/working_clip: the fork's `consolidated/` layout (config.json with its ttt_config,
consolidated.safetensors) over demo_assets/fair_baseline, In-Place layers 1 and 3, chunk 64, lr 1e-3 (the fork's),
target generators at the fork's initialisation N(0, 1e-2) (untrained), the same in both. They differ in one thing:
- fork_settings: no delta_clip_fro_norm in ttt_config, so the fork's TTTGating default tau = 1e-5, which is what
  every training run of the fork ran with (its train.py drops the YAML's delta_clip_fro_norm);
- working_clip: delta_clip_fro_norm 100, the value its YAML asked for.
Then score a clip with both (one results.json, report.html with the In-Place figure):

    NO_TORCH_COMPILE=1 python -m scripts.inplace_demo --out /tmp/inplace_demo
    NO_TORCH_COMPILE=1 python -m moshi_ttt.evaluate --audio demo_assets/demo_repeat.wav \
        --baseline /tmp/inplace_demo/fork_settings --ttt /tmp/inplace_demo/working_clip --out /tmp/inplace_demo/eval

("baseline" and "ttt" are only the CLI's run names here: both runs are In-Place models.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from moshi_ttt import load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "demo_assets" / "fair_baseline"
CODEC = ROOT / "demo_assets" / "codec"
TTT_CONFIG = {
    "enabled": True,
    "layer_frequency": 2,
    "start_layer": 1,
    "chunk_size": 64,
    "learning_rate": 1e-3,
    "conv_kernel_size": 2,
}
VARIANTS = {"fork_settings": {}, "working_clip": {"delta_clip_fro_norm": 100.0}}


def fork_tensors(model: torch.nn.Module, layers: list[int], seed: int) -> dict[str, torch.Tensor]:
    """The state dict the fork's trainer saves for a full checkpoint: the base's tensors, and per TTT layer the float32
    w_down (a copy of linear_out), w_down_pretrained, and the target generator at its initialisation."""
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    dim = model.dim
    g = torch.Generator().manual_seed(seed)
    for i in layers:
        prefix = f"transformer.layers.{i}.gating."
        tensors[prefix + "w_down"] = tensors[prefix + "linear_out.weight"].clone()
        tensors[prefix + "w_down_pretrained"] = tensors[prefix + "linear_out.weight"].clone()
        kernel = TTT_CONFIG["conv_kernel_size"]
        conv = torch.randn(dim, dim, kernel, generator=g) * 1e-2
        tensors[prefix + "target_generator.conv1d.conv.weight"] = conv
        tensors[prefix + "target_generator.W_target.weight"] = torch.randn(dim, dim, generator=g) * 1e-2
    return tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=26)
    args = parser.parse_args(argv)
    base = load(BASE)
    num_layers = len(base.model.transformer.layers)
    start, step = TTT_CONFIG["start_layer"], TTT_CONFIG["layer_frequency"]
    layers = list(range(start, num_layers, step))
    tensors = fork_tensors(base.model, layers, args.seed)
    for name, extra in VARIANTS.items():
        directory = args.out / name
        directory.mkdir(parents=True, exist_ok=True)
        config = {**base.lm_config, "lora": False, "lora_rank": 128, "lora_scaling": 2.0}
        config["ttt_config"] = {**TTT_CONFIG, **extra}
        config["mimi_name"] = os.path.relpath(CODEC, directory)  # moshi's config key; a codec directory here
        (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        save_file(tensors, str(directory / "consolidated.safetensors"))
        print(f"wrote {directory} (In-Place layers {layers}, ttt_config {config['ttt_config']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
