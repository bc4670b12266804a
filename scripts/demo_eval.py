"""Stage eval of scripts/build_demo_assets.py: the built pair measured on held-out natural audio, made as users make
it (research/natural_corpus.py: voices and words never trained on, readings at random sample offsets, light noise).

Each measure is the repo's own command run in a process of its own (one thread), its output kept in WORK/eval:
    R1, R2, P, demo  `python -m moshi_ttt.evaluate` (defaults) on the repeat sets, the plain set and the demo clip
    summary.txt      `research.natural_eval summary`: readings 1 / 2+3 and whole clips, TTT against the fair baseline
    ceiling.txt      `research.natural_eval ceiling`: what an ideal copy of reading 1 could gain with this codec
    long_table.md    `research.long_drift`: the 30-minute file per 2,000-token bin, with the drift of W1
                     (L/long_drift.svg: its figure)
    codec.txt        the codec stage's own measures (agreement under random offsets, mel distance, streaming check)
    files.md         sizes and SHA-256 of OUT's files (OUT/SHA256SUMS is written too)
MANIFEST.md is written by hand from these files (its figures cite them).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUMMED = ("MANIFEST.md", "SHA256SUMS")


def _run(module: str, argv: list[str]) -> str:
    """`python -m module argv` from the repo root on one thread; its stdout."""
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"python -m {module} {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def file_table(out: Path) -> str:
    """OUT/SHA256SUMS (every file but MANIFEST.md and itself) and a markdown table of sizes and digests."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in SUMMED)
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    (out / "SHA256SUMS").write_text("".join(f"{d}  {p.relative_to(out)}\n" for p, d in digests.items()))
    rows = [f"| `{p.relative_to(out)}` | {p.stat().st_size:,} | `{d[:16]}` |" for p, d in digests.items()]
    total = sum(p.stat().st_size for p in files)
    return "\n".join(["| file | bytes | sha256 (first 16 hex) |", "|---|---:|---|", *rows, "",
                      f"Total: {total / 1e6:.1f} MB."])  # fmt: skip


def evaluate(work: Path, out: Path, log) -> dict[str, str]:
    """Every measure above into WORK/eval; returns {file name: text}."""
    heldout, ev = work / "heldout", work / "eval"
    shutil.rmtree(ev, ignore_errors=True)
    ev.mkdir(parents=True)
    pair = ["--baseline", str(out / "fair_baseline"), "--ttt", str(out / "ttt")]
    sets = {name: sorted((heldout / name).glob("*.wav")) for name in ("R1", "R2", "P")}
    sets["demo"] = [out / "demo_repeat.wav", out / "demo_plain.wav"]
    for name, wavs in sets.items():
        _run("moshi_ttt.evaluate", ["--audio", *map(str, wavs), *pair, "--out", str(ev / name)])
        log(f"eval: {name} ({len(wavs)} files)")
    results = {"summary.txt": _run("research.natural_eval", ["summary", *(str(ev / n) for n in sets)])}
    results["ceiling.txt"] = _run(
        "research.natural_eval", ["ceiling", str(heldout / "R1"), str(heldout / "R2"), *pair]
    )  # fmt: skip
    log("eval: ceiling")
    long = ev / "L"
    long.mkdir()
    for name in ("long.wav", "long.json"):
        shutil.copy(heldout / "L" / name, long / name)
    _run("research.long_drift", ["encode", "--work", str(long), "--codec", str(out / "codec")])
    _run("research.long_drift", ["score", "--work", str(long), "--baseline", "--baseline-checkpoint",
                                 str(out / "fair_baseline"), "--checkpoint", str(out / "ttt"),
                                 "--name", "ttt"])  # fmt: skip
    results["long_table.md"] = _run("research.long_drift", ["table", "--work", str(long)])
    _run("research.long_drift", ["plot", "--work", str(long)])  # L/long_drift.svg
    log("eval: long file")
    codec_log = work / "codec" / "log.txt"
    results["codec.txt"] = codec_log.read_text() if codec_log.exists() else "(no codec log: stage codes kept a codec)\n"
    results["files.md"] = file_table(out) + "\n"
    for name, text in results.items():
        (ev / name).write_text(text)
    return results
