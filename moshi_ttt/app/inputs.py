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
    choices: tuple[str, ...]
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
        path = value.get("path") if isinstance(value, dict) else value
        if not isinstance(path, str) or not path or "\x00" in path:
            raise InputError(f"{self.label} must be an uploaded file.")
        resolved = Path(os.path.realpath(path))  # symlinks and .. resolved before the comparison
        allowed_files = {Path(os.path.realpath(f)) for f in self.files}
        allowed_roots = [Path(os.path.realpath(r)) for r in self.roots]
        if resolved not in allowed_files and not any(resolved.is_relative_to(root) for root in allowed_roots):
            raise InputError(f"{self.label} must be a file uploaded to this app or one of its demo clips.")
        if not resolved.is_file():
            raise InputError(f"{self.label}: the file is no longer on the server; upload it again.")
        return str(resolved)


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
