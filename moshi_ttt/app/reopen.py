"""Reading back a results.json that a user uploads (the app's download, or the command line's output, e.g. of
Moshi 7B on a cluster), to view it without rescoring.

The file comes from a user, so it is read strictly: strict JSON (no NaN or Infinity, no repeated keys, bounded
nesting), then every field the app shows is checked for its type, its range and its length, and a clean document
is rebuilt from those fields only (anything else in the file is left behind, so nothing unchecked reaches the
page). A refusal is `InputError` with one sentence that names the field, never a server path. Gradio-free.

Notation: T tokens, K codebooks, U inner-loop updates.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import typing as tp
from pathlib import Path

from moshi_ttt.app.inputs import InputError
from moshi_ttt.app.view import plain

MAX_TOKENS = 200_000  # 4.4 h at 12.5 Hz
MAX_RUNS = 16
MAX_CODEBOOKS = 32
MAX_LAYERS = 64
MAX_READINGS = 50
MAX_TEXT = 300  # characters of a name, checkpoint or note shown on the page
MAX_NOTES = 20
# Values read from one file (runs x series x tokens, counted as the commas that separate them, before parsing): a
# 60-minute clip (45,000 tokens) holds about 0.5 million per run with its 8 codebooks and telemetry, so several runs
# fit. Opening costs ~50 bytes and ~1 us per value: 5.4 million took 250 MB and 4.3 s on one busy core (a 50 MB file
# of 26 million, unbounded before, took 1.2 GB and 7.5 s).
MAX_VALUES = 6_000_000
MAX_DIGITS = 30  # of a whole number (results.json's are token counts and positions; a float's range is ~1e308)


def read_results(path: str | Path) -> dict:
    """The validated document of a results.json (version 1 or 2).

    Args:
        path: the uploaded file (its size already checked by `inputs.JsonFile`).
    Returns:
        {"version", "audio", "config": {"notes"}, "runs"}: the fields the app shows, checked.
    Raises:
        InputError: one sentence naming what is wrong.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError("The file is not UTF-8 text, so it is not a results.json.") from None
    if text.count(",") > MAX_VALUES:  # refused before parsing: the parsed values are what costs memory
        raise InputError(
            f"The file holds more than {MAX_VALUES:,} values (runs x series x tokens), more than the app opens at "
            "once; open a file of fewer runs or a shorter clip."
        )
    try:
        raw = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys, parse_int=_whole_number)
    except RecursionError:  # only what the app reads is kept, so any other nesting is harmless up to this
        raise InputError("The file nests too deeply to be a results.json.") from None
    except InputError:
        raise
    except json.JSONDecodeError as e:
        raise InputError(f"The file is not valid JSON ({e.msg} at line {e.lineno}).") from None
    return validate_document(raw)


def validate_document(raw: object) -> dict:
    """Checks a parsed results document and rebuilds it from the checked fields (see `read_results`)."""
    if not isinstance(raw, dict):
        raise InputError("A results.json holds one JSON object; this file holds something else.")
    version = raw.get("version")
    if version not in (1, 2) or isinstance(version, bool):
        raise InputError(f"Only results.json versions 1 and 2 can be opened; this file says {_shown(version)}.")
    runs_raw = raw.get("runs")
    if not isinstance(runs_raw, dict) or not 1 <= len(runs_raw) <= MAX_RUNS:
        raise InputError(f"'runs' must be an object of 1 to {MAX_RUNS} runs.")
    runs = {_text(name, "a run name", 64): _run(name, run) for name, run in runs_raw.items()}
    lengths = {len(run["loss_per_token"]) for run in runs.values()}
    if len(lengths) > 1:
        raise InputError("The runs cover different numbers of tokens, so they are not scores of one clip.")
    tokens = lengths.pop()
    return {
        "version": version,
        "audio": _audio(raw.get("audio"), tokens),
        "config": {"notes": _notes(raw.get("config"), set(runs))},
        "runs": runs,
    }


def _run(name: str, run: object) -> dict:
    where = f"run {_shown(name)}"
    if not isinstance(run, dict):
        raise InputError(f"{where} must be an object.")
    loss = _series(run.get("loss_per_token"), f"{where}: loss_per_token", 1, MAX_TOKENS)
    tokens = len(loss)
    if run.get("tokens") is not None and _whole(run["tokens"], f"{where}: tokens") != tokens:
        raise InputError(f"{where}: 'tokens' says {run['tokens']} but loss_per_token has {tokens} values.")
    out = {"checkpoint": _text(run.get("checkpoint", ""), f"{where}: checkpoint", MAX_TEXT), "tokens": tokens,
           "loss_per_token": loss}  # fmt: skip
    for key in ("mean_loss", "perplexity", "slope_per_1k_tokens", "tokens_per_s", "peak_memory_mb",
                "mean_loss_past_context"):  # fmt: skip
        out[key] = _number(run.get(key), f"{where}: {key}")
    context = run.get("context_tokens")
    out["context_tokens"] = None if context is None else _whole(context, f"{where}: context_tokens", minimum=1)
    if run.get("loss_per_codebook") is not None:
        books = run["loss_per_codebook"]
        if not isinstance(books, list) or not 1 <= len(books) <= MAX_CODEBOOKS:
            raise InputError(f"{where}: loss_per_codebook must be a list of 1 to {MAX_CODEBOOKS} codebooks.")
        out["loss_per_codebook"] = [
            _series(row, f"{where}: loss_per_codebook[{k}]", tokens, tokens) for k, row in enumerate(books)
        ]
    out["drift"] = _layers(run.get("drift"), f"{where}: drift", ("W1",), ("W2",), tokens)  # TTT-Linear: no W2
    inner = _layers(run.get("inner_loss"), f"{where}: inner_loss", ("base", "start", "after"), ("target_variance",),
                    tokens)  # fmt: skip
    if inner:
        out["inner_loss"] = inner
    inplace = _inplace(run.get("inplace"), f"{where}: inplace", tokens)
    if inplace:
        out["inplace"] = inplace
    if run.get("readings") is not None:
        out["readings"] = _readings(run["readings"], where, tokens)
    return out


def _layers(value: object, where: str, keys: tuple[str, ...], optional: tuple[str, ...], tokens: int) -> dict:
    """drift / inner_loss: {"<layer index>": {key: [U numbers], ..., "t": [U tokens, increasing]}}."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LAYERS:
        raise InputError(f"{where} must be an object of at most {MAX_LAYERS} layers.")
    out = {}
    for layer, record in value.items():
        if not re.fullmatch(r"\d{1,4}", layer) or not isinstance(record, dict):
            raise InputError(f"{where}: layers are named by their index and hold objects, got {_shown(layer)}.")
        steps = record.get("t")
        if not isinstance(steps, list) or len(steps) > tokens:
            raise InputError(f"{where}[{layer}].t must be a list of at most {tokens} token positions.")
        steps = [_whole(s, f"{where}[{layer}].t", minimum=0) for s in steps]
        if any(b <= a for a, b in itertools.pairwise(steps)) or any(s > tokens for s in steps):
            raise InputError(f"{where}[{layer}].t must increase and stay within the clip's {tokens} tokens.")
        clean = {"t": steps}
        for key in keys + tuple(k for k in optional if record.get(k) is not None):
            clean[key] = _series(record.get(key), f"{where}[{layer}].{key}", len(steps), len(steps))
        out[layer] = clean
    return out


# The "inplace" record of an In-Place TTT run (reports/inplace_report.py): series of one number per chunk update
INPLACE_SERIES = ("drift", "drift_intended", "raw_update_norm", "clip_factor", "update_norm", "update_per_entry",
                  "step_norm", "changed_fraction")  # fmt: skip


def _inplace(value: object, where: str, tokens: int) -> dict:
    """inplace: {"<layer>": {"t", the INPLACE_SERIES (numbers), "drift_relative" and "drift_error_relative" (numbers
    or null), "w0_norm", "float32_resolution", "lr", "clip" (null: none), "entries", "chunk_size"}}; "updates" and
    "changed_any" are recomputed from the series, not taken from the file."""
    layers = _layers(value, where, INPLACE_SERIES, ("drift_relative", "drift_error_relative"), tokens)
    for layer, clean in layers.items():
        record, at = value[layer], f"{where}[{layer}]"
        for key in INPLACE_SERIES:
            if any(v is None for v in clean[key]):
                raise InputError(f"{at}.{key} must hold a number for every update.")
        clean.setdefault("drift_relative", None)
        clean.setdefault("drift_error_relative", [None] * len(clean["t"]))
        for key in ("w0_norm", "float32_resolution", "lr"):
            clean[key] = _number(record.get(key), f"{at}.{key}", required=True)
        clean["clip"] = _number(record.get("clip"), f"{at}.clip")
        clean["entries"] = _whole(record.get("entries"), f"{at}.entries", minimum=1)
        clean["chunk_size"] = _whole(record.get("chunk_size"), f"{at}.chunk_size", minimum=1)
        clean["updates"] = len(clean["t"])
        clean["changed_any"] = any(v > 0 for v in clean["changed_fraction"])
    return layers


def _readings(value: object, where: str, tokens: int) -> list[dict]:
    if not isinstance(value, list) or len(value) > MAX_READINGS:
        raise InputError(f"{where}: readings must be a list of at most {MAX_READINGS} readings.")
    out, end = [], 0.0
    for i, reading in enumerate(value, start=1):
        if not isinstance(reading, dict):
            raise InputError(f"{where}: reading {i} must be an object.")
        start_s = _number(reading.get("start_s"), f"{where}: reading {i} start_s", required=True)
        end_s = _number(reading.get("end_s"), f"{where}: reading {i} end_s", required=True)
        if not end <= start_s < end_s <= tokens / 12.5 + 1.0:
            raise InputError(f"{where}: reading {i} spans {start_s:g}-{end_s:g} s, out of order or past the clip.")
        clean = {"start_s": start_s, "end_s": end_s, "mean_loss": _number(reading.get("mean_loss"), where)}
        if reading.get("partial") is True:
            clean["partial"] = True
        out.append(clean)
        end = end_s
    return out


def _audio(value: object, tokens: int) -> dict:
    """The clip's record: its name (the file name only), duration, rate, channels, and what was scored of it."""
    if value is None:
        return {"tokens": tokens}
    if not isinstance(value, dict):
        raise InputError("'audio' must be an object.")
    name = value.get("name") or value.get("path") or ""
    out = {"name": _text(Path(str(name)).name, "audio name", 200), "tokens": tokens}
    for key in ("duration_s", "trimmed_from_s"):
        if value.get(key) is not None:
            out[key] = _number(value[key], f"audio {key}")
    for key in ("sample_rate", "channels"):
        if value.get(key) is not None:
            out[key] = _whole(value[key], f"audio {key}", minimum=1)
    if value.get("silent") is not None:
        if not isinstance(value["silent"], bool):
            raise InputError("audio silent must be true or false.")
        out["silent"] = value["silent"]
    partial = value.get("partial")
    if partial is not None:
        if not isinstance(partial, dict):
            raise InputError("audio partial must be an object.")
        total = _whole(partial.get("total_tokens"), "audio partial total_tokens", minimum=tokens)
        out["partial"] = {"tokens_scored": tokens, "total_tokens": total}
    return out


def _notes(config: object, runs: set[str]) -> dict[str, list[str]]:
    """config.notes: run -> sentences, kept for known runs, escaped to show as plain text in Markdown."""
    notes = config.get("notes") if isinstance(config, dict) else None
    if not isinstance(notes, dict):
        return {}
    out: dict[str, list[str]] = {}
    count = 0
    for run, items in notes.items():
        if run not in runs or not isinstance(items, list):
            continue
        for item in items:
            if isinstance(item, str) and count < MAX_NOTES:
                out.setdefault(run, []).append(plain(item[:MAX_TEXT]))
                count += 1
    return out


def _series(value: object, where: str, minimum: int, maximum: int) -> list[float | None]:
    """A list of finite numbers or nulls, of a length in [minimum, maximum]."""
    if not isinstance(value, list) or not minimum <= len(value) <= maximum:
        size = f"{minimum}" if minimum == maximum else f"{minimum} to {maximum}"
        raise InputError(f"{where} must be a list of {size} numbers.")
    for v in value:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise InputError(f"{where} holds {_shown(v)} where numbers (or null) belong.")
    numbers = [None if v is None else float(v) for v in value]  # whole numbers have at most MAX_DIGITS digits
    if not all(map(math.isfinite, (v for v in numbers if v is not None))):
        _refuse_infinite(where)
    return numbers


def _number(value: object, where: str, required: bool = False) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where} must be a number, got {_shown(value)}.")
    if not math.isfinite(value):
        _refuse_infinite(where)
    return float(value)


def _refuse_infinite(where: str) -> tp.NoReturn:
    """A number too large for a float (JSON's 1e400 reads as infinity): refused as strict JSON refuses Infinity."""
    raise InputError(f"{where} holds a number too large to be finite (it reads as Infinity, which strict JSON does "
                     "not allow; results.json writes null).")  # fmt: skip


def _whole(value: object, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 10**9:
        raise InputError(f"{where} must be a whole number of at least {minimum}, got {_shown(value)}.")
    return value


def _text(value: object, where: str, limit: int) -> str:
    """A short single-line string of printable characters (shown on the page: Markdown escapes it, see
    `view.plain`)."""
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise InputError(f"{where} must be a single line of at most {limit} printable characters.")
    return value


def _whole_number(text: str) -> int:
    """JSON whole numbers of at most MAX_DIGITS digits (Python's int refuses over 4,300, a float overflows at 309)."""
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise InputError(f"The file holds a whole number of {len(text.lstrip('-'))} digits, far too long for a "
                         "results.json.")  # fmt: skip
    return int(text)


def _refuse_constant(name: str):
    raise InputError(f"The file holds {name}, which strict JSON does not allow (results.json writes null).")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        repeated = next(k for k in keys if keys.count(k) > 1)
        raise InputError(f"The file repeats the key {_shown(repeated)} in one object.")
    return dict(pairs)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
