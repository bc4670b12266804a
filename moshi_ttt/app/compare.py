"""Several settings on one clip: TTT checkpoints x mini_batch_size values x persistence on/off, each scored against
the baseline, collected into one results document (a run per setting) for one figure and one table.

Each setting is scored by `engine.compare_file` exactly as the Run button scores it alone (a fresh streaming
session, the same options, the same chunking), so its numbers are the ones it gets alone, whatever else is compared
(tests/test_app_compare.py checks it). The price: the clip is encoded and the baseline scored once per setting; the
baseline's numbers are checked to be the same every time. Gradio-free.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import typing as tp
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from moshi_ttt.app.engine import compare_file, live_options
from moshi_ttt.app.inputs import InputError
from moshi_ttt.app.models import ModelCache
from moshi_ttt.reports import results as report

MAX_SETTINGS = 12  # settings compared in one go (each costs a full run of both models)


@dataclass(frozen=True)
class Setting:
    """One setting to compare: a TTT checkpoint and the options of its run."""

    checkpoint: str  # a name of the model cache's allow-list
    mini_batch_size: int  # tokens per fast-weight update: the TTT mini-batch, or an In-Place model's chunk
    persistent_states: bool  # fast weights through the clip (True) or reset every attention window (False)
    chunk: bool = False  # the checkpoint has In-Place layers: `mini_batch_size` is their chunk size

    @property
    def size(self) -> str:
        """The size as the table and run names show it: "b=8" (TTT mini-batch) or "chunk=8" (In-Place chunk)."""
        return f"{'chunk' if self.chunk else 'b'}={self.mini_batch_size}"

    @property
    def name(self) -> str:
        """The setting's run name in the document, figure and table: "ttt · b=8 · persistent"."""
        persistence = "persistent" if self.persistent_states else "reset every window"
        return f"{self.checkpoint} · {self.size} · {persistence}"


def settings_grid(
    checkpoints: tuple[str, ...],
    sizes: tuple[int, ...],
    persistence: tuple[bool, ...],
    chunked: tp.Collection[str] = (),
) -> list[Setting]:
    """Every combination, checkpoint first, then mini_batch_size, then persistence (on before off).

    Args:
        chunked: the checkpoints with In-Place layers (their size is a chunk size: `Setting.chunk`).
    Raises:
        InputError: an empty choice, or more than MAX_SETTINGS combinations (one sentence for the user).
    """
    if not checkpoints or not sizes or not persistence:
        raise InputError("Choose at least one TTT checkpoint, one mini_batch_size and one persistence setting.")
    combinations = itertools.product(checkpoints, sizes, sorted(persistence, reverse=True))
    grid = [Setting(c, b, p, c in chunked) for c, b, p in combinations]
    if len(grid) > MAX_SETTINGS:
        raise InputError(f"{len(grid)} settings is more than {MAX_SETTINGS} at once; choose fewer combinations.")
    return grid


@dataclass
class CompareUpdate:
    """Before and after each setting, and while one is scored: the settings scored so far, as one results document."""

    done: int  # settings scored
    total: int  # settings to score
    document: dict  # results document: "baseline" and a run per setting scored so far (`Setting.name`)
    elapsed_s: float
    current: str = ""  # the setting being scored next ("" when all are done)
    stopped: bool = False  # the comparison was stopped: `document` holds the settings finished before the Stop
    settings: list[Setting] = field(default_factory=list)  # the settings scored so far, in order
    progress: tuple[int, int] | None = None  # (tokens scored, tokens) of the current setting, while it is scored
    partial: bool = False  # stopped inside the first setting: `document` holds the tokens it scored before the Stop

    @property
    def complete(self) -> bool:
        return self.stopped or self.done == self.total

    @property
    def status(self) -> str:
        """The Compare tab's status line: the settings scored, the current one and its tokens, or how it ended."""
        scored = f"{self.done} of {self.total} settings"
        if self.partial:
            tokens = len(self.document["runs"]["baseline"]["loss_per_token"])
            return f"Stopped inside the first setting after {self.elapsed_s:.1f} s: its first {tokens} tokens only."
        if self.complete:
            return f"{'Stopped after' if self.stopped else 'Done:'} {scored} in {self.elapsed_s:.1f} s."
        tokens = f" ({self.progress[0]} of {self.progress[1]} tokens)" if self.progress else ""
        return f"Comparing: {scored} scored in {self.elapsed_s:.1f} s; now {self.current}{tokens}…"


def compare_settings(
    cache: ModelCache,
    audio_path: str,
    baseline_name: str,
    settings: list[Setting],
    max_seconds: float,
    *,
    mode: str = "chunked",
    allow_silence: bool = False,
    readings: list | None = None,
    stop_requested: Callable[[], bool] | None = None,
    min_interval_s: float = float("inf"),
) -> Iterator[CompareUpdate]:
    """Scores each setting against the baseline, one after the other, yielding an update before the first and after
    each (and, every `min_interval_s`, the current setting's progress).

    Args:
        cache: the shared models.
        audio_path: the clip (checked by the caller).
        baseline_name: the baseline checkpoint.
        settings: what to compare (`settings_grid`).
        max_seconds: the duration scored, as for a single run.
        mode: the engine's mode for every setting (LIVE_MODES' values).
        allow_silence, readings: as for `engine.compare_file`.
        stop_requested: polled between the steps of each setting; a Stop ends the comparison with the settings
            already scored (a setting stopped part-way is left out, its tokens being fewer than the others'),
            or, inside the first setting, with the tokens it scored (`CompareUpdate.partial`), as a Run's Stop.
        min_interval_s: least time between two progress updates inside a setting (inf: none).
    Raises:
        ValueError / FileNotFoundError: `compare_file`'s one-sentence errors; a baseline whose numbers differ
            between settings (a leak between runs: a bug).
    """
    start = time.perf_counter()
    runs: dict[str, dict] = {}
    audio: dict = {}
    done: list[Setting] = []
    notes: dict[str, list[str]] = {}
    configs: dict[str, dict] = {}
    for i, setting in enumerate(settings):
        before = _update(done, len(settings), runs, audio, configs, notes, start, current=setting.name)
        yield before
        if stop_requested is not None and stop_requested() and done:
            yield _update(done, len(settings), runs, audio, configs, notes, start, stopped=True)
            return
        options = live_options(mode, setting.mini_batch_size, setting.persistent_states)
        updates = compare_file(cache, audio_path, baseline_name, setting.checkpoint, options, max_seconds,
                               allow_silence=allow_silence, readings=readings, stop_requested=stop_requested,
                               min_interval_s=min_interval_s)  # fmt: skip
        shown = time.perf_counter()  # the setting's first progress comes after min_interval_s too
        with contextlib.closing(updates):  # closed also when the comparison is (its sessions release the models)
            for last in updates:
                if not last.complete and time.perf_counter() - shown >= min_interval_s:
                    shown = time.perf_counter()
                    yield replace(before, elapsed_s=shown - start, progress=(last.tokens_done, last.total_tokens))
        document = last.document
        if last.stopped and done:  # fewer tokens than the settings scored before it: left out
            yield _update(done, len(settings), runs, audio, configs, notes, start, stopped=True)
            return
        if i == 0:
            runs["baseline"], audio = document["runs"]["baseline"], document["audio"]
            notes.update({"baseline": document["config"].get("notes", {}).get("baseline", [])})
        elif document["runs"]["baseline"]["loss_per_token"] != runs["baseline"]["loss_per_token"]:
            raise ValueError("the baseline scored differently between two settings: runs are not independent")
        runs[setting.name] = document["runs"]["ttt"]
        notes[setting.name] = document["config"].get("notes", {}).get("ttt", [])
        configs[setting.name] = {k: document["config"].get(k) for k in ("mode", "chunk_size", "mini_batch_size",
                                                                         "persistent_states")}  # fmt: skip
        done.append(setting)
        if last.stopped:
            yield _update(done, len(settings), runs, audio, configs, notes, start, stopped=True, partial=True)
            return
    yield _update(done, len(settings), runs, audio, configs, notes, start)


def _update(done, total, runs, audio, configs, notes, start, current="", stopped=False, partial=False) -> CompareUpdate:
    config = {"compared": "settings of one clip, each scored alone against the baseline", "runs": dict(configs),
              "notes": {run: list(items) for run, items in notes.items() if run in runs}}  # fmt: skip
    document = report.results_document(dict(audio), config, dict(runs)) if runs else {"runs": {}, "audio": audio}
    return CompareUpdate(len(done), total, document, time.perf_counter() - start, current, stopped, list(done),
                         partial=partial)  # fmt: skip
