"""Bit-identity of the demo build's training (stage joint) before and after the recipe moved into the library.

Pinned to the v1 build (scripts/build_demo_assets.py before commit 3a85f14, with JOINT_RECIPE and the work/corpus,
work/short layout): run it from a checkout of that build. The v2 build trains with research/recipe_long_carry.py,
whose bit-identity to the research run is recorded in demo_assets/MANIFEST.md ("Reproducibility").

Runs `build_demo_assets --stage joint` on a small synthetic work dir (random codes with repeated passages: no
espeak-ng, no codec) with the code of an earlier commit (default bc785c4: scripts/recipe_joint.py, extracted with
`git archive` into a scratch folder, its own moshi_ttt included) and with this tree (moshi_ttt.training through
scripts/demo_recipe.py), each in processes of its own. JOINT_RECIPE is shortened to --steps N with validation every
2 steps on 2 + 2 clips; the rest is recipe J8 as built (6 x 416-token batches of copy, short and cropped clips,
warm-up 30 steps, the peak held for half the steps, then the cosine; the gate at 10x; weight decay 0.01, betas 0.9 /
0.95, clipping at 1). The old code trains one model per process (--variant, as the assets were built); this tree
does it that way and also both models in lockstep in one process (`PairedTrainer`). Every tensor of every
checkpoint is compared with torch.equal, the safetensors files byte for byte, and the training records (losses,
validation, the TTT block's recall, held-out scores) for equality.

Usage (from the repo root; ~1 min per model and process on one thread):
    NO_TORCH_COMPILE=1 python -m research.check_recipe_identity [--steps 5] [--warmup 2] [--commit bc785c4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scripts.demo_corpus import FRAME

REPO = Path(__file__).resolve().parent.parent
MODELS = ("ttt", "fair_baseline")
RECORD_KEYS = ("train_losses", "val", "memory_accuracy", "branch_norm_ratio", "heldout")
MANIFEST_ARGS = ("steps", "batch_size", "seq_len", "short_frac", "copy_frac", "lr", "decay_start", "val")

# The stage joint of the old tree: its JOINT_RECIPE (argparse flags) with the overrides appended (the last wins).
OLD_DRIVER = """
import sys
import build_demo_assets as b
b.JOINT_RECIPE = (*b.JOINT_RECIPE, *{overrides!r})
sys.exit(b.main({argv!r}))
"""
NEW_DRIVER = """
import dataclasses, sys
import scripts.build_demo_assets as b
b.JOINT_RECIPE = dataclasses.replace(b.JOINT_RECIPE, **{overrides!r})
sys.exit(b.main({argv!r}))
"""


def repeat_codes(rng: random.Random, g: torch.Generator, passage: int, filler: int) -> tuple[torch.Tensor, list]:
    """Codes [8, T] of a passage read three times with random filler between, and the readings in samples."""
    part = torch.randint(0, 256, (8, passage), generator=g)
    parts, readings, t = [], [], 0
    for _ in range(3):
        gap = torch.randint(0, 256, (8, rng.randint(filler // 2, filler)), generator=g)
        parts += [gap, part]
        t += gap.shape[1]
        readings.append([t * FRAME, (t + passage) * FRAME])
        t += passage
    return torch.cat(parts, dim=1), readings


def write_corpus(work: Path, clips: dict[str, tuple[str, str, int, int]], seed: int) -> None:
    """work/corpus/index.json and work/codes.safetensors: name -> (kind, split, passage or length, filler)."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    index, codes = {}, {}
    for name, (kind, split, size, filler) in clips.items():
        if kind == "repeat":
            codes[name], readings = repeat_codes(rng, g, size, filler)
        else:
            codes[name], readings = torch.randint(0, 256, (8, size), generator=g), []
        index[name] = {"kind": kind, "split": split, "readings": readings}
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    (work / "corpus" / "index.json").write_text(json.dumps(index, indent=1))
    save_file({n: c.contiguous() for n, c in codes.items()}, str(work / "codes.safetensors"))


def synthetic_work(work: Path) -> None:
    """A work dir as the build's stages corpus, codes and short leave it, small: 4 + 4 training clips (2 + 2 of
    them for validation), 1 + 1 held-out clips, 12 short repeat clips."""
    clips = {f"train_repeat_{i:02d}": ("repeat", "train", 60 + 10 * i, 40) for i in range(4)}
    clips |= {f"train_plain_{i:02d}": ("plain", "train", 250 + 20 * i, 0) for i in range(4)}
    clips |= {"heldout_repeat_00": ("repeat", "heldout", 70, 40), "heldout_plain_00": ("plain", "heldout", 300, 0)}
    write_corpus(work, clips, seed=1)
    write_corpus(work / "short", {f"train_short_{i:03d}": ("repeat", "train", 20 + i, 20) for i in range(12)}, seed=2)


def run(label: str, driver: str, cwd: Path, pythonpath: list[Path], log: Path) -> None:
    """One process of the build's stage joint; its output goes to `log`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "NO_TORCH_COMPILE": "1"}
    env["OMP_NUM_THREADS"] = "1"
    with log.open("w") as out:
        result = subprocess.run([sys.executable, "-c", driver], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{label} failed (exit {result.returncode}); its output: {log}")
    print(f"{label}: done ({log})", flush=True)


def compare(reference: tuple[Path, Path], other: tuple[Path, Path], label: str) -> bool:
    """Checkpoints (every tensor, the files' bytes) and records of both models; prints one line per model."""
    same = True
    for name in MODELS:
        (ref_out, ref_work), (out, work) = reference, other
        a, b = load_file(str(ref_out / name / "model.safetensors")), load_file(str(out / name / "model.safetensors"))
        unequal = [k for k in a if k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        unequal += [k for k in b if k not in a]
        sha = [hashlib.sha256((o / name / "model.safetensors").read_bytes()).hexdigest() for o in (ref_out, out)]
        config_same = (ref_out / name / "config.json").read_text() == (out / name / "config.json").read_text()
        ra, rb = (json.loads((w / f"joint_{name}.json").read_text()) for w in (ref_work, work))
        records = [k for k in RECORD_KEYS if ra.get(k) != rb.get(k)]
        records += [f"args.{k}" for k in MANIFEST_ARGS if ra["args"][k] != rb["args"][k]]
        ok = not unequal and sha[0] == sha[1] and config_same and not records
        same &= ok
        print(f"{label:40s} {name:14s} {len(a):3d} tensors, torch.equal on all: {not unequal}; "
              f"model.safetensors sha256 {sha[1][:16]} {'==' if sha[0] == sha[1] else '!='} {sha[0][:16]}; "
              f"config.json same: {config_same}; records differ in: {records or 'nothing'}")  # fmt: skip
        if unequal:
            print(f"    unequal tensors: {unequal[:10]}{' ...' if len(unequal) > 10 else ''}")
    return same


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="optimizer steps of each model")
    p.add_argument("--warmup", type=int, help="also override the recipe's warm-up (30 steps) with this many")
    p.add_argument("--commit", default="bc785c4", help="the tree before the change")
    p.add_argument("--keep", type=Path, help="scratch folder to use and keep (default: a temporary one, removed "
                   "unless the check fails)")  # fmt: skip
    args = p.parse_args(argv)
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="recipe_identity_"))
    scratch.mkdir(parents=True, exist_ok=True)
    old_tree = scratch / "old_tree"
    old_tree.mkdir(exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.commit], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
    runs = {  # label -> (tree, one process per model with --variant; else both in one process: lockstep)
        "old": ("old", True),
        "new_variant": ("new", True),
        "new_lockstep": ("new", False),
    }
    old_overrides = ("--steps", str(args.steps), "--eval-every", "2", "--val", "2")
    new_overrides = {"steps": args.steps, "eval_every": 2, "val": 2}
    if args.warmup is not None:
        old_overrides += ("--warmup", str(args.warmup))
        new_overrides["warmup"] = args.warmup
    dirs = {}
    for label, (tree, per_model) in runs.items():
        work, out = scratch / label / "work", scratch / label / "out"
        synthetic_work(work)
        dirs[label] = (out, work)
        common = ["--stage", "joint", "--work", str(work), "--out", str(out), "--threads", "1", "--seed", "0"]
        for variant in MODELS if per_model else [None]:
            argv_ = common + (["--variant", variant] if variant else [])
            log = scratch / label / f"log_{variant or 'both'}.txt"
            if tree == "old":
                driver = OLD_DRIVER.format(overrides=old_overrides, argv=argv_)
                run(f"{label} {variant}", driver, old_tree, [old_tree / "scripts", old_tree], log)
            else:
                driver = NEW_DRIVER.format(overrides=new_overrides, argv=argv_)
                run(f"{label} {variant or 'both'}", driver, REPO, [REPO], log)
    same = compare(dirs["old"], dirs["new_variant"], f"{args.commit} vs this tree (--variant)")
    same &= compare(dirs["old"], dirs["new_lockstep"], f"{args.commit} vs this tree (lockstep)")
    warmup = "the recipe's" if args.warmup is None else args.warmup
    print(f"steps {args.steps}, warm-up {warmup}; scratch {scratch}; {'BIT-IDENTICAL' if same else 'DIFFERENT'}")
    if same and args.keep is None:
        shutil.rmtree(scratch)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
