"""Every value the app's API receives, checked in one place before any of it is used.

Anyone can call a public app's API with hand-made JSON, whatever its sliders allow: NaN, 2.5 for an integer, a list
for a checkpoint name, a server path for the audio. The app's Run event therefore takes its inputs unprocessed
(Gradio's `preprocess=False`) and passes them through `validate(specs, values)`, which gives back clean Python values
or raises `InputError` with one sentence for the user (naming no server path).

One spec per input, in the order of the event's inputs:

    specs = {
        "audio": AudioFile("Audio", roots=(upload_folder,), files=tuple(demo_clips)),
        "mini_batch_size": Number("TTT mini_batch_size", 1, 64, integer=True, default=16),
        "mode": Choice("Mode", ("chunked", "live token by token"), default="chunked", radio=True),
        "persistent_states": Flag("persistent_states", default=True, info="keep the fast weights between calls"),
    }
    values = validate(specs, raw_values)  # {"audio": "/…/clip.wav", "mini_batch_size": 16, ...}

A spec also says what its control shows (label, help text, default, step): `moshi_ttt.app.controls` builds each
control from its spec, so the UI's labels and bounds are the server's by construction. Adding an input is one spec
line in `moshi_ttt.app.handlers.run_specs` plus placing its control in the layout. For a new kind of value write a
small frozen dataclass with `label` and `check(value) -> clean value` that raises `InputError` (and teach
`controls.control` its component).

Gradio-free on purpose: tested without a server.
"""

from __future__ import annotations

import math
import os
import re
import typing as tp
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moshi_ttt.data.checkpoints.hub import HubRef
from moshi_ttt.reports.headline import Reading


class InputError(ValueError):
    """A value the app refuses; its message is one sentence shown to the user as it is."""


def _shown(value: object) -> str:
    """A short, safe rendering of a refused value (never a long or multi-line string)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Number:
    """A finite number inside [minimum, maximum]; a whole number when `integer` (2.0 is accepted as 2)."""

    label: str  # the control's label, used in messages
    minimum: float
    maximum: float
    integer: bool = False
    default: float | None = None  # the control's initial value; None: the minimum
    step: float | None = None  # the slider's step; None: 1 for whole numbers, Gradio's own otherwise
    info: str = ""  # help text under the label

    def __post_init__(self) -> None:
        if not self.minimum <= self.maximum:
            raise ValueError(f"{self.label}: minimum {self.minimum:g} is above maximum {self.maximum:g}")
        if self.default is not None and not self.minimum <= self.default <= self.maximum:
            raise ValueError(f"{self.label}: default {self.default:g} is outside [{self.minimum:g}, {self.maximum:g}]")

    def check(self, value: object) -> int | float:
        # bool is an int subclass in Python, and JSON true is not a number the user meant.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{self.label} must be a number, got {_shown(value)}.")
        if isinstance(value, float) and not math.isfinite(value):  # (JSON ints are exact, of any size)
            raise InputError(f"{self.label} must be a finite number, got {value}.")
        if self.integer and value != int(value):
            raise InputError(f"{self.label} must be a whole number, got {value:g}.")
        if not self.minimum <= value <= self.maximum:
            shown = f"{value:g}" if isinstance(value, float) or abs(value) < 10**15 else "a huge number"
            raise InputError(f"{self.label} must be between {self.minimum:g} and {self.maximum:g}, got {shown}.")
        return int(value) if self.integer else float(value)


@dataclass(frozen=True)
class Choice:
    """One of the offered strings, exactly."""

    label: str
    choices: Sequence[str]  # a tuple, or a live view of names that grows while the app runs (models.CheckpointNames)
    default: str | None = None  # the control's initial value (one of `choices`); None: nothing chosen
    radio: bool = False  # shown as radio buttons (a few fixed options) rather than a dropdown
    info: str = ""

    def __post_init__(self) -> None:
        if self.default is not None and self.default not in self.choices:
            raise ValueError(f"{self.label}: default {self.default!r} is not one of {self.choices}")

    def check(self, value: object) -> str:
        if not isinstance(value, str) or value not in self.choices:
            offered = ", ".join(self.choices) or "none"
            raise InputError(f"{self.label} must be one of: {offered}; got {_shown(value)}.")
        return value


@dataclass(frozen=True)
class Flag:
    """true or false (JSON booleans only: "false" as a string would be truthy)."""

    label: str
    default: bool = False
    info: str = ""

    def check(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise InputError(f"{self.label} must be true or false, got {_shown(value)}.")
        return value


def _uploaded_path(label: str, value: object, roots: tuple[str, ...], files: tuple[str, ...] = ()) -> Path:
    """The resolved path of an uploaded file (Gradio's FileData or a path string) under one of `roots`, or one of
    `files`; InputError otherwise (naming no server path)."""
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path or "\x00" in path:
        raise InputError(f"{label} must be an uploaded file.")
    resolved = Path(os.path.realpath(path))  # symlinks and .. resolved before the comparison
    allowed_files = {Path(os.path.realpath(f)) for f in files}
    allowed_roots = [Path(os.path.realpath(r)) for r in roots]
    if resolved not in allowed_files and not any(resolved.is_relative_to(root) for root in allowed_roots):
        what = "a file uploaded to this app or one of its demo clips" if files else "a file uploaded to this app"
        raise InputError(f"{label} must be {what}.")
    if not resolved.is_file():
        raise InputError(f"{label}: the file is no longer on the server; upload it again.")
    return resolved


@dataclass(frozen=True)
class AudioFile:
    """An audio file that a user uploaded (under one of `roots`: Gradio's upload/cache folder) or an offered clip.

    Accepts Gradio's FileData (a dict with "path") or a path string. Whatever Gradio itself allows (a future version,
    an `allowed_paths` setting), no other file on the server can be read through the app.
    """

    label: str
    roots: tuple[str, ...]  # folders whose files may be read (resolved when checked)
    files: tuple[str, ...] = ()  # single files that may be read: the offered demo clips

    def check(self, value: object) -> str:
        if value is None or value == "":
            raise InputError("Upload or record a clip first.")
        return str(_uploaded_path(self.label, value, self.roots, self.files))


@dataclass(frozen=True)
class JsonFile:
    """A .json file that a user uploaded (under one of `roots`), at most `max_bytes` long: its path. What it holds
    is checked by its reader (`moshi_ttt.app.reopen`)."""

    label: str
    roots: tuple[str, ...]
    max_bytes: int = 64 * 2**20

    def check(self, value: object) -> str:
        if value is None or value == "":
            raise InputError("Choose a results.json file first.")
        path = _uploaded_path(self.label, value, self.roots)
        if path.suffix.lower() != ".json":
            raise InputError(f"{self.label} must be a .json file (a results.json of the app or the command line).")
        if path.stat().st_size > self.max_bytes:
            raise InputError(f"{self.label} is larger than {self.max_bytes // 2**20} MB.")
        return str(path)


@dataclass(frozen=True)
class MultiChoice:
    """Some of the offered strings, each at most once: a tuple in the order of `choices`."""

    label: str
    choices: Sequence[str]  # as Choice's
    default: tuple[str, ...] = ()  # the control's initial selection
    minimum: int = 1  # fewest selected
    maximum: int | None = None  # most selected (None: all)
    dropdown: bool = False  # a multi-select dropdown (long lists) rather than checkboxes
    info: str = ""

    def __post_init__(self) -> None:
        if any(d not in self.choices for d in self.default):
            raise ValueError(f"{self.label}: default {self.default!r} is not among {self.choices}")

    def check(self, value: object) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{self.label} must be a list of choices, got {_shown(value)}.")
        unknown = [v for v in value if v not in self.choices]
        if unknown:
            raise InputError(f"{self.label}: {_shown(unknown[0])} is not one of: {', '.join(self.choices)}.")
        if len(set(value)) != len(value):
            raise InputError(f"{self.label} names a choice twice.")
        most = self.maximum if self.maximum is not None else len(self.choices)
        if not self.minimum <= len(value) <= most:
            raise InputError(f"{self.label}: choose between {self.minimum} and {most}, got {len(value)}.")
        return tuple(c for c in self.choices if c in value)


# "0.6-15.3, 21.3-35.9 s": spans in seconds, separated by commas, semicolons or new lines.
_SPAN = re.compile(r"^(\d+(?:\.\d*)?)\s*(?:-|–|to)\s*(\d+(?:\.\d*)?)\s*s?$")


@dataclass(frozen=True)
class Spans:
    """The readings of a repeated passage in an own upload, typed as spans in seconds ("0.6-15.3, 21.3-35.9"); ""
    for none. Gives `headline.Reading`s, numbered in order (the per-reading table and the shaded spans)."""

    label: str
    maximum_s: float = 3600.0  # no span may end later
    max_spans: int = 20
    max_chars: int = 400
    default: str = ""
    info: str = ""

    def check(self, value: object) -> tuple[Reading, ...]:
        if value is None:
            return ()
        if not isinstance(value, str):
            raise InputError(f"{self.label} must be text such as 0.6-15.3, 21.3-35.9; got {_shown(value)}.")
        if len(value) > self.max_chars:
            raise InputError(f"{self.label} is longer than {self.max_chars} characters.")
        parts = [p.strip() for p in re.split(r"[,;\n]", value) if p.strip()]
        if len(parts) > self.max_spans:
            raise InputError(f"{self.label}: at most {self.max_spans} spans, got {len(parts)}.")
        readings = []
        for part in parts:
            match = _SPAN.match(part)
            if match is None:
                raise InputError(f"{self.label}: {_shown(part)} is not a span such as 21.3-35.9 (seconds).")
            start, end = float(match.group(1)), float(match.group(2))
            if not start < end <= self.maximum_s:
                raise InputError(f"{self.label}: the span {part} is empty, reversed or past {self.maximum_s:g} s.")
            if readings and start < readings[-1].end_s:
                raise InputError(f"{self.label}: the span {part} starts before the one before it ends.")
            readings.append(Reading(len(readings) + 1, start, end))
        if len(readings) == 1:
            raise InputError(f"{self.label}: give at least two readings (the passage and a repeat), or none.")
        return tuple(readings)


# hf://owner/repo[@revision]: Hub names only (no "..", no further path), so a reference never names a server file.
_HUB_REF = re.compile(
    r"^hf://[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,80})?$"
)


@dataclass(frozen=True)
class HubReference:
    """An hf://owner/repo reference (optionally @revision), stripped of surrounding spaces."""

    label: str
    info: str = ""

    def check(self, value: object) -> str:
        text = value.strip() if isinstance(value, str) else None
        if text is None or not _HUB_REF.match(text) or ".." in text:
            raise InputError(
                f"{self.label} must look like hf://owner/repo (optionally @revision); got {_shown(value)}."
            )
        try:  # the allow-list reads it so (models.build_allow_list): repo ids as the Hub checks them, no empty revision
            HubRef.parse(text)
        except ValueError as e:
            raise InputError(f"{self.label}: {e}.") from None
        return text


class Spec(tp.Protocol):
    label: str

    def check(self, value: object) -> tp.Any: ...


def validate(specs: dict[str, Spec], values: Sequence[object]) -> dict[str, tp.Any]:
    """Checks `values` (the event's inputs, in the order of `specs`) and returns {name: clean value}.

    Raises:
        InputError: one sentence for the first value refused (or a wrong number of values).
    """
    if len(values) != len(specs):
        raise InputError(f"expected {len(specs)} input values, got {len(values)}.")
    return {name: spec.check(value) for (name, spec), value in zip(specs.items(), values, strict=True)}
