"""The public layouts of the minimal-pair benchmarks the Moshi paper reports, read into pairs of clips.

The data is not shipped: users point at their own copies.

- sWUGGY: ZeroSpeech 2021 lexical set (github.com/zerospeech/zerospeech2021: `ROOT/lexical/dev/gold.csv` beside the
  `.wav` files). gold.csv has a header and, per clip, `filename` (without `.wav`), `correct` (1: a word, 0: a
  non-word), `id` (the pair) and `voice`, read by name (also `frequency`, `word`, `phones`, `length`). A pair is one
  word and one non-word of the same `id` and `voice`.
- sBLIMP: ZeroSpeech 2021 syntactic set (`ROOT/syntactic/dev/gold.csv`): `filename`, `correct` (1: grammatical),
  `id`, `voice`, `type`, `subtype` (and `transcription`); a pair shares `id`, `voice`, `type` and `subtype`.
- spoken / topic StoryCloze (github.com/slp-rl/SpokenStoryCloze: sStoryCloze, tStoryCloze): a folder of
  `<n>_<story id>_correct.wav` and `<n>_<story id>_incorrect.wav`, the same story with its right and a wrong ending.

PATH may be the dataset root (holding `lexical/dev/` or `syntactic/dev/`) or the folder holding gold.csv.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = ("swuggy", "sblimp", "sstorycloze", "tstorycloze")
_ZEROSPEECH = {  # name -> (folder under the root, columns a pair shares, label of the group column or None)
    "swuggy": ("lexical/dev", ("id", "voice"), None),
    "sblimp": ("syntactic/dev", ("id", "voice", "type", "subtype"), "type"),
}
_STORY = re.compile(r"^(\d+)_(.+)_(correct|incorrect)\.wav$")


@dataclass(frozen=True)
class Pair:
    """Two clips that differ in one respect; the model should give `good` the higher likelihood."""

    key: str  # what identifies the pair in its benchmark ("id=12 voice=Alex", "17_b929f263-...")
    good: Path  # the word, the grammatical sentence, the story with its right ending
    bad: Path
    group: str | None = None  # sBLIMP: the phenomenon (its `type`)


@dataclass(frozen=True)
class Benchmark:
    name: str  # one of BENCHMARKS
    folder: Path  # where the clips are
    layout: str  # the layout it was read as, in words
    pairs: list[Pair]


def parse_spec(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` of the command line -> (name, path).

    Raises:
        ValueError: no `=` or an unknown name.
    """
    name, sep, path = spec.partition("=")
    name = name.strip().lower()
    if not sep or not path:
        raise ValueError(f"a benchmark is given as NAME=PATH with NAME one of {BENCHMARKS}, got {spec!r}")
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")
    return name, Path(path)


def read_benchmark(name: str, path: str | Path) -> Benchmark:
    """The pairs of benchmark `name` in the user's copy at `path`.

    Raises:
        FileNotFoundError: the folder, its gold file or a clip it names is missing.
        ValueError: one sentence naming what was expected when the folder is in another layout.
    """
    path = Path(path)
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: {path} is not a folder")
    if name in _ZEROSPEECH:
        return _read_zerospeech(name, path)
    return _read_story_cloze(name, path)


def _read_zerospeech(name: str, path: Path) -> Benchmark:
    sub, keys, group_column = _ZEROSPEECH[name]
    folder = path if (path / "gold.csv").is_file() else path / sub
    gold = folder / "gold.csv"
    expected = f"the ZeroSpeech 2021 layout ROOT/{sub}/gold.csv with the .wav files beside it"
    if not gold.is_file():
        if folder.is_dir() and any(folder.glob("*.wav")):
            raise FileNotFoundError(f"{name}: {folder} has .wav files but no gold.csv (expected {expected})")
        raise FileNotFoundError(f"{name}: no gold.csv in {path} or {path / sub} (expected {expected})")
    with gold.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = ("filename", "correct", *keys)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{name}: {gold} lacks the column(s) {missing}; expected a header with {list(columns)} ({expected})"
            )
        rows = list(reader)
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: {"1": [], "0": []})
    for number, row in enumerate(rows, start=2):
        label = row["correct"].strip()
        if label not in ("0", "1"):
            raise ValueError(f"{name}: {gold} line {number} has correct={label!r}; expected 1 (real) or 0 (foil)")
        groups[tuple(row[k] for k in keys)][label].append(row)
    pairs = []
    for key, found in groups.items():
        if len(found["1"]) != 1 or len(found["0"]) != 1:
            described = " ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True))
            raise ValueError(
                f"{name}: {gold} has {len(found['1'])} correct and {len(found['0'])} incorrect clip(s) for "
                f"{described}; expected one of each per {'/'.join(keys)}"
            )
        good, bad = found["1"][0], found["0"][0]
        pairs.append(
            Pair(
                " ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True)),
                _clip(folder, good["filename"]),
                _clip(folder, bad["filename"]),
                None if group_column is None else good[group_column],
            )
        )
    if not pairs:
        raise ValueError(f"{name}: {gold} lists no clips ({expected})")
    _check_clips(name, folder, pairs)
    return Benchmark(name, folder, f"ZeroSpeech 2021 {sub.split('/')[0]}", pairs)


def _clip(folder: Path, filename: str) -> Path:
    stem = filename.strip()
    return folder / (stem if stem.endswith(".wav") else f"{stem}.wav")


def _check_clips(name: str, folder: Path, pairs: list[Pair]) -> None:
    clips = [clip for pair in pairs for clip in (pair.good, pair.bad)]
    missing = [clip for clip in clips if not clip.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: {len(missing)} of the {len(clips)} clips the gold file names are not in {folder} "
            f"(first: {missing[0].name})"
        )


def _read_story_cloze(name: str, path: Path) -> Benchmark:
    stories: dict[str, dict[str, Path]] = defaultdict(dict)
    for wav in sorted(path.rglob("*.wav")):
        match = _STORY.match(wav.name)
        if match:
            stories[f"{match[1]}_{match[2]}"][match[3]] = wav
    expected = (
        "the spoken StoryCloze layout: <n>_<story id>_correct.wav and <n>_<story id>_incorrect.wav "
        "(github.com/slp-rl/SpokenStoryCloze)"
    )
    if not stories:
        raise ValueError(f"{name}: {path} has no clips named in {expected}")
    half = [key for key, found in stories.items() if len(found) != 2]
    if half:
        raise ValueError(f"{name}: story {half[0]} in {path} lacks its {_other(stories[half[0]])} clip ({expected})")
    ordered = sorted(stories.items(), key=_story_order)
    pairs = [Pair(key, found["correct"], found["incorrect"]) for key, found in ordered]
    return Benchmark(name, path, "spoken StoryCloze", pairs)


def _other(found: dict[str, Path]) -> str:
    return "_incorrect" if "correct" in found else "_correct"


def _story_order(item: tuple[str, dict]) -> tuple[int, str]:
    number, _, rest = item[0].partition("_")
    return int(number), rest
