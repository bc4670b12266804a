"""Live side-by-side scoring of a baseline and a TTT model: both advance in lockstep, one update per step.

This is the engine of the app: it knows nothing of Gradio. Each run has its own streaming sessions
(`app.models.SharedModelRun`), so many users can share the cached models. An uploaded file really streams: it is read
and encoded block by block (moshi's streaming Mimi, moshi_ttt.data.stream) while both models score the codes as
they come, so the first curves appear after the first block, not after the whole file was encoded.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch
from moshi.models.compression import MimiModel

from moshi_ttt.app.models import ModelCache, SharedModelRun
from moshi_ttt.data.audio import FRAME_RATE, AudioInfo, check_audio, read_blocks
from moshi_ttt.data.checkpoints import LoadedCheckpoint, code_format_differences, same_codec
from moshi_ttt.data.stream import ENCODE_FRAMES, encode_blocks
from moshi_ttt.options import RunOptions
from moshi_ttt.reports import results as report
from moshi_ttt.reports.inplace_report import inplace_record
from moshi_ttt.scoring.peak_memory import PeakMemory
from moshi_ttt.scoring.teacher_forcing import ScoreResult, iter_score, iter_score_blocks, non_causal_mini_batch, score
from moshi_ttt.ttt.apply import ttt_blocks
from moshi_ttt.ttt.fork_yarn import fork_yarn_of
from moshi_ttt.ttt.inplace import inplace_blocks
from moshi_ttt.ttt.legacy import causal_reading

logger = logging.getLogger(__name__)

LIVE_MODES = {"live token by token": "stream", "chunked": "chunked", "whole sequence": "full"}
LIVE_CHUNK_TOKENS = 25  # chunked mode: tokens per chunk, one update per chunk (25 tokens = 2 s of audio)
# Stream mode: tokens between recorded updates (1.6 s of audio). Recording at every token doubles the scoring time on
# the demo models; every 5-20 tokens costs the scoring nothing. But each update costs the browser ~0.2-0.4 s of
# drawing (Gradio redraws and resizes the 4-row figure): on 2 cores shared with the browser, every 10 tokens made
# the page fall behind and the run take 52 s instead of 26 s for demo_repeat.wav.
STREAM_RECORD_EVERY = 20
MIN_INTERVAL_S = 0.05  # at most ~20 updates a second reach the UI; the scoring never waits for them


def live_options(mode: str, mini_batch_size: int | None = None, persistent_states: bool | None = None) -> RunOptions:
    """The app's RunOptions for a mode ("stream", "chunked", "full"): chunks of LIVE_CHUNK_TOKENS, a figure update
    every STREAM_RECORD_EVERY tokens in stream mode; None takes the checkpoint's value."""
    return RunOptions(
        mode=mode,
        chunk_size=LIVE_CHUNK_TOKENS if mode == "chunked" else None,
        mini_batch_size=mini_batch_size,
        persistent_states=persistent_states,
        record_every=STREAM_RECORD_EVERY if mode == "stream" else LIVE_CHUNK_TOKENS,
    )


@dataclass
class LiveUpdate:
    """What the UI shows after each step; `document` (results.json) is set on the last update only."""

    tokens_done: int
    total_tokens: int
    loss_per_token: dict[str, list[float]]  # run name -> [tokens_done] mean loss over the codebooks (NaN invalid)
    drift: dict[str, dict]  # TTT layer -> {"W1": [...], "W2": [...] (TTT-MLP), "t": [...]} as in results.json
    tokens_per_s: dict[str, float]
    elapsed_s: float
    inner_loss: dict[str, dict] = field(default_factory=dict)  # TTT layer -> results.json "inner_loss" record
    inplace: dict[str, dict] = field(default_factory=dict)  # In-Place layer -> results.json "inplace" record
    document: dict | None = None  # set on the last update: the whole clip, or what was scored before a stop
    summary: list[dict] = field(default_factory=list)
    stopped: bool = False  # the run was stopped: `document` covers the first `tokens_done` tokens only

    @property
    def complete(self) -> bool:
        return self.document is not None


def compare_live(
    cache: ModelCache,
    baseline_name: str,
    ttt_name: str,
    audio_codes: torch.Tensor,
    options: RunOptions,
    audio_info: dict | None = None,
    readings: list | None = None,
    stop_requested: Callable[[], bool] | None = None,
    min_interval_s: float = MIN_INTERVAL_S,
) -> Iterator[LiveUpdate]:
    """Scores `audio_codes` [1, 8, T] with both models, yielding a LiveUpdate every `options.record_every` tokens
    (at chunk boundaries; once in "full" mode), at most one per `min_interval_s`, then a last one with the results
    document.

    Args:
        options: the run's options (`live_options` for the app's); the chunk size is capped at each model's
            context and rounded to whole mini-batches of older non-causal TTT layers.
        readings: `headline.Reading`s of a passage the clip repeats (results.json "readings").
        stop_requested: polled between steps; when it returns True, the last update holds the results of the
            tokens scored so far (`stopped=True`) and the run ends.
    Raises:
        ValueError: for unknown names or models that cannot be compared (see `check_compatible`).
    """

    def scores(run: str, model, run_options: RunOptions) -> Iterator[ScoreResult]:
        return iter_score(model, audio_codes.to(model.device), options=run_options)

    yield from _compare(cache, {"baseline": baseline_name, "ttt": ttt_name}, options, scores, lambda: audio_codes,
                        audio_info or {}, readings, stop_requested, min_interval_s)  # fmt: skip


def _compare(
    cache: ModelCache,
    names: dict[str, str],
    options: RunOptions,
    scores: Callable[[str, torch.nn.Module, RunOptions], Iterator[ScoreResult]],
    all_codes: Callable[[], torch.Tensor],
    audio_info: dict,
    readings: list | None,
    stop_requested: Callable[[], bool] | None,
    min_interval_s: float,
) -> Iterator[LiveUpdate]:
    """compare_live's loop over the runs' score generators (`scores(run, model, options)`, each advanced in turn in
    its own SharedModelRun); `all_codes()` gives the codes [1, 8, T] for the causal re-scoring of older non-causal
    checkpoints, once every run is complete."""
    # An In-Place checkpoint in the fork's lora.safetensors layout loads over the run's baseline (models.needs_base).
    loaded = {"baseline": cache.get(names["baseline"]), "ttt": cache.get(names["ttt"], base=names["baseline"])}
    pairing_notes = check_compatible(loaded["baseline"], loaded["ttt"], names)
    codecs = loaded["baseline"].mimi, loaded["ttt"].mimi  # one file named two ways (hf://, snapshot) is one codec
    if (codecs[0] is None) != (codecs[1] is None) or (codecs[0] is not None and not same_codec(*codecs)):
        pair = f"the baseline {names['baseline']!r} and TTT {names['ttt']!r}"
        raise ValueError(f"{pair} checkpoints use different codecs")
    sessions, run_options = {}, {}
    for run, ckpt in loaded.items():
        # The chosen mini-batch size and persistence are the TTT run's: a baseline with TTT layers of its own runs
        # with its checkpoint's (`own_settings_note` says which), so that it scores the same whatever is chosen.
        run_options[run] = options if run == "ttt" else own_options(options)
        if options.mode == "chunked" and options.chunk_size is not None:
            context = ckpt.model.context
            size = min(options.chunk_size, context) if context is not None else options.chunk_size
            whole = non_causal_mini_batch(ckpt.model)
            if whole is not None:  # legacy non-causal layers: whole mini-batches per chunk
                size = max(whole, size - size % whole)
            run_options[run] = run_options[run].replace(chunk_size=size)
        sessions[run] = SharedModelRun(ckpt.model, cache.lock(ckpt.model), scores(run, ckpt.model, run_options[run]))
    start = time.perf_counter()
    latest: dict[str, ScoreResult] = {}
    last_sent = -float("inf")
    stopped = False
    try:
        with PeakMemory(loaded["ttt"].model.device) as memory:
            while True:
                if stop_requested is not None and stop_requested() and latest:
                    stopped = True
                    break
                finished = 0
                for run, session in sessions.items():
                    if run in latest and latest[run].complete:
                        finished += 1
                        continue
                    latest[run] = next(session)
                if finished == len(sessions):
                    break
                now = time.perf_counter()
                if now - last_sent >= min_interval_s and not all(r.complete for r in latest.values()):
                    last_sent = now
                    yield _update(latest, start)
        causal = {}  # older non-causal TTT checkpoints: the same weights scored causally (report.causal_comparison)
        for run, ckpt in loaded.items():
            b = non_causal_mini_batch(ckpt.model)
            if b is not None and not stopped:
                with cache.lock(ckpt.model), causal_reading(ckpt.model):
                    result = score(ckpt.model, all_codes().to(ckpt.model.device), options=run_options[run])
                causal[run] = (result, b)
        if not stopped:
            audio_info = {**audio_info, "tokens": latest["baseline"].total_tokens}
        context = {run: ckpt.model.context for run, ckpt in loaded.items()}
        notes = {run: list(ckpt.notes) for run, ckpt in loaded.items()}
        notes["ttt"] += pairing_notes
        notes["baseline"] += own_settings_note(loaded["baseline"].model, names["baseline"])
        resets = _reset_periods(loaded, run_options)
        yield _final(latest, names, notes, options, audio_info, start, context, readings, memory.peak_mb,
                     stopped, causal, resets)  # fmt: skip
    finally:
        for session in sessions.values():
            session.close()


def _update(latest: dict[str, ScoreResult], start: float) -> LiveUpdate:
    done = min(r.tokens_done for r in latest.values())
    drift, inner = report.telemetry_record(latest["ttt"].telemetry, 0) if "ttt" in latest else ({}, {})
    inplace = inplace_record(latest["ttt"].telemetry, 0) if "ttt" in latest else {}
    return LiveUpdate(
        tokens_done=done,
        total_tokens=next(iter(latest.values())).total_tokens,
        loss_per_token={run: r.loss_per_token[0, :done].tolist() for run, r in latest.items()},
        drift=drift,
        tokens_per_s={run: r.tokens_per_s for run, r in latest.items()},
        elapsed_s=time.perf_counter() - start,
        inner_loss=inner,
        inplace=inplace,
    )


def _scored_part(result: ScoreResult, done: int) -> ScoreResult:
    """The first `done` tokens of a (partial) result as a complete result of `done` tokens."""
    return replace(result, loss=result.loss[..., :done], mask=result.mask[..., :done], tokens_done=done,
                   total_tokens=done)  # fmt: skip


def own_options(options: RunOptions) -> RunOptions:
    """The baseline's options: the run's, with its checkpoint's own mini-batch size and persistence."""
    return options.replace(mini_batch_size=None, persistent_states=None, reset_every=None)


def own_settings_note(model: torch.nn.Module, name: str) -> list[str]:
    """The note of a baseline with TTT layers of its own (it runs with its checkpoint's settings, `own_options`);
    [] for a baseline without TTT layers."""
    inplace = inplace_blocks(model)
    blocks = {**ttt_blocks(model), **inplace}
    if not blocks:
        return []
    cfg = next(iter(blocks.values())).cfg
    size = f"chunk size {cfg.chunk_size}" if inplace else f"mini_batch_size {cfg.mini_batch_size}"
    persistent = "on" if all(block.cfg.persistent_states for block in blocks.values()) else "off"
    return [
        f"The baseline {name!r} has TTT layers of its own: it ran with its checkpoint's {size} and persistent_states "
        f"{persistent}; the chosen values apply to the TTT run only."
    ]


def _reset_periods(loaded: dict, run_options: dict[str, RunOptions]) -> dict[str, int | None]:
    """Tokens between resets of each run's fast weights (None: never; runs without TTT layers are left out)."""
    periods = {}
    for run, ckpt in loaded.items():
        blocks = {**ttt_blocks(ckpt.model), **inplace_blocks(ckpt.model)}
        if blocks:
            persistent = all(block.cfg.persistent_states for block in blocks.values())
            periods[run] = run_options[run].resets(persistent, ckpt.model.context)
    return periods


def _final(latest, names, notes, options: RunOptions, audio_info: dict, start: float, context: dict, readings,
           peak_mb, stopped: bool, causal=None, resets=None) -> LiveUpdate:  # fmt: skip
    update = _update(latest, start)
    done = update.tokens_done
    runs = {
        run: report.run_record(_scored_part(r, done), checkpoint=names[run], peak_memory_mb=peak_mb,
                               context_tokens=context[run], readings=readings)
        for run, r in latest.items()
    }  # fmt: skip
    for run, (result, b) in (causal or {}).items():
        runs[run]["causal_comparison"] = report.causal_comparison(runs[run], result, b)
    config = {
        **asdict(options),
        "reset_every_by_run": resets or {},
        "peak_memory": "both runs together (they run interleaved): GPU max_memory_allocated or CPU RSS growth",
        "notes": notes,
    }
    if stopped:
        audio_info = {**audio_info, "partial": {"tokens_scored": done, "total_tokens": update.total_tokens}}
    update.document = report.results_document(audio_info, config, runs)
    update.summary = report.summary_rows(update.document)
    update.stopped = stopped
    return update


def check_compatible(baseline: LoadedCheckpoint, ttt: LoadedCheckpoint, names: dict[str, str]) -> list[str]:
    """Whether two loaded checkpoints can be compared, and what the comparison must say about them.

    Both models must read the same codes: same codebooks, cardinality and delays. A TTT checkpoint whose attention
    window differs from the baseline's is compared all the same, with a note: the In-Place fork's YaRN checkpoints
    attend over their context times the YaRN scale (its run_inference), so past the baseline's window attention
    differs as well as TTT. (An In-Place checkpoint in the lora.safetensors layout is loaded over the baseline by
    `ModelCache.get`, which says in one sentence when it cannot be.)

    Args:
        names: {"baseline": name, "ttt": name} as the user chose them.
    Returns:
        Notes for the TTT run (results.json config.notes), [] when there is nothing to say.
    Raises:
        ValueError: one sentence when the two do not read the same audio codes.
    """
    detail = code_format_differences(baseline.model, ttt.model)
    if detail:
        raise ValueError(f"the baseline and TTT checkpoints do not read the same audio codes ({detail})")
    base_context, ttt_context = baseline.model.context, ttt.model.context
    if base_context == ttt_context:
        return []
    yarn = fork_yarn_of(ttt.model)
    window = f"{ttt_context} tokens"
    if yarn is not None and yarn.extend_context:
        window += f" (the In-Place fork's YaRN, scale {yarn.scale:g}: its context times the scale, as its inference)"
    return [
        f"The TTT checkpoint {names['ttt']!r} attends over {window}, the baseline {names['baseline']!r} over "
        f"{base_context}: where one window reaches further back than the other, attention differs as well as TTT."
    ]


# One lock per shared codec: a run's streaming Mimi state is installed only while it holds it (data.stream).
_CODEC_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CODEC_LOCKS_GUARD = threading.Lock()


def codec_lock(mimi: torch.nn.Module) -> threading.Lock:
    """The lock of a codec shared by the runs of this process."""
    with _CODEC_LOCKS_GUARD:
        return _CODEC_LOCKS.setdefault(mimi, threading.Lock())


def open_clip(
    cache: ModelCache, audio_path: str, baseline_name: str, max_seconds: float, *, allow_silence: bool = False
) -> tuple[AudioInfo, MimiModel]:
    """The clip a run scores (its first `max_seconds`, checked in one pass) and the codec that encodes it: the
    baseline's. `compare_file` and the codec's reconstruction (app/reconstruction.py) both start here, so that they
    read the same codes.

    Raises:
        ValueError / FileNotFoundError: one readable sentence for bad audio or a checkpoint without a codec.
    """
    info = check_audio(audio_path, max_seconds=max_seconds, trim=True, allow_silence=allow_silence)
    if info.num_frames < 2:
        raise ValueError(f"{info.name} is too short to score ({info.duration_s:.2f} s)")
    baseline = cache.get(baseline_name)
    if baseline.mimi is None:
        raise ValueError(f"checkpoint {baseline_name!r} names no audio codec, so uploads cannot be encoded")
    return info, baseline.mimi


def clip_codes(info: AudioInfo, mimi: MimiModel) -> Iterator[torch.Tensor]:
    """The codes [1, K, n] of a clip (`open_clip`) as they come: read and encoded block by block with moshi's
    streaming Mimi, the codec shared through its lock. Close the generator when done with it (it leaves the codec's
    streaming session then, also after a stop or an error)."""
    block_s = ENCODE_FRAMES / FRAME_RATE  # read one encode call's audio at a time: codes as soon as possible
    return encode_blocks(mimi, read_blocks(info, block_s), lock=codec_lock(mimi))


def compare_file(
    cache: ModelCache,
    audio_path: str,
    baseline_name: str,
    ttt_name: str,
    options: RunOptions,
    max_seconds: float,
    *,
    allow_silence: bool = False,
    readings: list | None = None,
    stop_requested: Callable[[], bool] | None = None,
    min_interval_s: float = MIN_INTERVAL_S,
) -> Iterator[LiveUpdate]:
    """Streams an uploaded file: reads and encodes it block by block with the baseline's codec (moshi's streaming
    Mimi) while both models score the codes as they come (`compare_live`'s updates and final document).

    Only the first `max_seconds` of a longer file are read and scored; the results' "audio" record then holds
    "trimmed_from_s", the file's whole duration (`trim_note` words it for the user). The file is checked in one
    pass first, so a damaged or silent file is refused before anything is scored.

    Args:
        allow_silence: score a silent file instead of refusing it.
        readings, stop_requested, min_interval_s: see `compare_live`.
    Raises:
        ValueError / FileNotFoundError: one readable sentence for bad audio or checkpoints that do not fit.
    """
    info, mimi = open_clip(cache, audio_path, baseline_name, max_seconds, allow_silence=allow_silence)
    audio_info = {"name": info.name, "duration_s": info.duration_s, "sample_rate": info.source_sample_rate,
                  "channels": info.source_channels, "tokens": info.num_frames, "silent": info.silent}  # fmt: skip
    if info.trimmed_from_s is not None:
        audio_info["trimmed_from_s"] = info.trimmed_from_s
    encoded = clip_codes(info, mimi)
    kept: list[torch.Tensor] = []  # every code so far: [1, 8, n] blocks (7,500 steps at most under the app's cap)

    def keep(blocks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for block in blocks:
            kept.append(block)
            yield block

    # Both runs read the same blocks; the first to need a block encodes it (inside its own session's next()).
    copies = dict(zip(("baseline", "ttt"), itertools.tee(keep(encoded), 2), strict=True))

    def scores(run: str, model, run_options: RunOptions) -> Iterator[ScoreResult]:
        blocks = (block[:, : model.dep_q].to(model.device) for block in copies[run])
        return iter_score_blocks(model, blocks, options=run_options, expected_tokens=info.num_frames)

    try:
        yield from _compare(cache, {"baseline": baseline_name, "ttt": ttt_name}, options, scores,
                            lambda: torch.cat(kept, dim=-1), audio_info, readings, stop_requested,
                            min_interval_s)  # fmt: skip
    finally:
        encoded.close()  # leaves the codec's streaming session even after a stop or an error


def threads_per_run(concurrency: int, cpus: int | None = None) -> int:
    """Torch CPU threads for each of `concurrency` simultaneous runs: the cores shared out, at least one.

    More threads than cores (two runs of 2 threads on 2 cores) make OpenMP's threads wait on each other.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    return max(1, (cpus if cpus is not None else os.cpu_count() or 1) // concurrency)


def trim_note(audio_info: dict) -> str | None:
    """The note "Scored the first N s of M s." for a trimmed file (see `compare_file`), else None."""
    whole = audio_info.get("trimmed_from_s")
    if whole is None:
        return None
    return f"Scored the first {audio_info['duration_s']:.1f} s of {whole:.1f} s (the duration limit)."
