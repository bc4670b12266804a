"""The demo assets' build runs end to end: `--tiny` (every stage on a few clips and steps, about a minute) into a
temporary folder. Skipped without the voices it speaks with (espeak-ng, flite)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None,
    reason="espeak-ng and flite are not installed (the build's corpus speaks with them)",
)


def test_the_tiny_build_runs_every_stage_and_writes_what_it_says(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    command = [sys.executable, "-m", "scripts.build_demo_assets", "--tiny", "--work", str(work), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("codec", "fair_baseline", "ttt"):
        assert (out / name / "model.safetensors").is_file() and (out / name / "config.json").is_file()
    assert json.loads((out / "ttt" / "config.json").read_text())["mimi"] == "../codec"
    assert "[reading 3:" in (out / "demo_repeat.txt").read_text()
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    evaluation = work / "eval"
    for name in ("summary.txt", "ceiling.txt", "long_table.md", "codec.txt", "files.md", "L/long_drift.svg"):
        assert (evaluation / name).is_file(), name
    assert set(json.loads((work / "timings.json").read_text())) == {"corpus", "codec", "encode", "joint", "eval"}


def test_the_codec_stage_refuses_to_run_before_the_corpus_it_trains_on(tmp_path):
    """v3's student and decoder train on WORK/train (the LM's own audio): without it, one clear error, nothing
    trained."""
    command = [sys.executable, "-m", "scripts.build_demo_assets", "--tiny", "--stage", "codec", "--work",
               str(tmp_path / "work"), "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "run stage corpus first" in done.stderr
    assert not (tmp_path / "work" / "codec").exists()
