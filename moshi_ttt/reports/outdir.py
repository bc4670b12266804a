"""The CLI's output folder: atomic writes, per-file done markers, and the fingerprint that makes a resume safe.

    OUT/run.json              the fingerprint of the settings and checkpoints that wrote OUT (written once)
    OUT/<nnnn>_<stem>/...     one folder per file; its summary.json is the done marker, written last and atomically

A rerun into the same OUT skips the files whose marker is there and scores the others; a kill at any point leaves
either a marker (the file is complete) or none (it is scored again). A rerun whose fingerprint differs from
run.json is refused with one sentence naming what changed, so results of other settings are never mixed or reused.

The fingerprint holds what changes the numbers: the run options, the bin size, sweeps, the dtype, the encoding, the
text tokenizer's content (with a transcript), and for each checkpoint its reference plus the identity of its local
files (`file_identity`; the base checkpoint and the codec it references included). It leaves out the device
(resuming on another GPU, or another number of them, is allowed), the duration cap and silence flag (they decide
which files fail; failed files are retried anyway).
A file's own inputs beside its audio (its transcript) are identified in its done marker instead (the CLI's
`_transcript_identity`): an edited transcript makes that file be scored again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from moshi_ttt.data.checkpoints.inplace_layout import consolidated_of

RUN_FILE = "run.json"
DONE_FILE = "summary.json"
HASH_WHOLE_BYTES = 1 << 20  # files up to this size are hashed whole
SAMPLE_BYTES = 1 << 16  # larger files: this many bytes at each of SAMPLES evenly spaced offsets, with the size
SAMPLES = 8


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes `text` to a temporary file beside `path`, then renames it over `path`: readers (and a resume after a
    kill) see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_identity(path: Path) -> dict:
    """What identifies a file's content cheaply: its size and a SHA-256 of all of it (small files) or of its
    safetensors header and SAMPLES slices of SAMPLE_BYTES spread over it (large ones: a 15 GB checkpoint is not
    read whole)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= HASH_WHOLE_BYTES:
            digest.update(f.read())
            return {"bytes": size, "sha256": digest.hexdigest()}
        header = f.read(8)
        digest.update(header)
        if path.suffix == ".safetensors":  # u64 header length, then the JSON header (names, dtypes, shapes, offsets)
            digest.update(f.read(min(int.from_bytes(header, "little"), HASH_WHOLE_BYTES)))
        for i in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return {"bytes": size, "sha256_sampled": digest.hexdigest()}


def checkpoint_identity(ref: str | None, seen: set[str] | None = None) -> dict | None:
    """The reference and, for a local checkpoint (directory or file), the identity of each of its files, following
    the base checkpoint and codec that our config.json names (relative to the directory); for a step folder of the
    In-Place fork (`checkpoint_000500/`), the files of its consolidated/. None for None."""
    if ref is None:
        return None
    seen = set() if seen is None else seen
    identity: dict = {"ref": str(ref)}
    path = Path(ref)
    path = consolidated_of(path) or path  # a step folder of the In-Place fork's trainer: the folder `load` reads
    if "://" in str(ref) or not path.exists() or str(path.resolve()) in seen:
        return identity
    seen.add(str(path.resolve()))
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    identity["files"] = {p.name: file_identity(p) for p in files}
    config = path / "config.json" if path.is_dir() else None
    if config is not None and config.is_file():
        try:
            linked = json.loads(config.read_text())
        except json.JSONDecodeError:
            linked = {}
        for key in ("base", "mimi"):
            value = linked.get(key) if isinstance(linked, dict) else None
            if isinstance(value, str):
                target = value if "://" in value or Path(value).is_absolute() else str(path / value)
                identity[key] = checkpoint_identity(target, seen)
    return identity


def fingerprint(settings: dict, checkpoints: dict[str, dict | None]) -> dict:
    """The run's fingerprint document: settings, checkpoints (name -> identity) and a hash of both."""
    body = {"settings": settings, "checkpoints": checkpoints}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": 1, "hash": digest, **body}


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix[:-1]} {json.dumps(old)} -> {json.dumps(new)}"]


def claim(out: Path, document: dict, write: bool = True) -> None:
    """Makes `out` the folder of this run: writes run.json (when `write`) or checks the one there.

    Raises:
        ValueError: one sentence when `out` holds results of another fingerprint (what changed, at most 3 items).
    """
    path = out / RUN_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is damaged ({e}); remove it or use another --out") from e
        if not isinstance(old, dict):
            raise ValueError(f"{path} is not a run record (a JSON object); remove it or use another --out")
        if old.get("hash") != document["hash"]:
            changes = _differences({k: old.get(k) for k in ("settings", "checkpoints")},
                                   {k: document[k] for k in ("settings", "checkpoints")})  # fmt: skip
            shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
            raise ValueError(f"{out} holds results of other settings ({shown or 'another fingerprint'}); "
                             "use another --out or remove it")  # fmt: skip
        return
    if write:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(document, indent=1, sort_keys=True) + "\n")


def done_entry(file_dir: Path, audio_path: str) -> dict | None:
    """The done marker's entry of a file folder when it is complete and for this audio file, else None."""
    marker = file_dir / DONE_FILE
    if not marker.is_file():
        return None
    try:
        entry = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # not ours (ours are written atomically): score the file again
    return entry if isinstance(entry, dict) and entry.get("path") == audio_path else None
