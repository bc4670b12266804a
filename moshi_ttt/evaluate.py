"""Command line: score audio files under a baseline and a TTT checkpoint and write reports.

    python -m moshi_ttt.evaluate --audio a.wav b.flac --baseline CKPT --ttt CKPT --out results/
    python -m moshi_ttt.evaluate --manifest files.jsonl --out results/        # resumable: done files are skipped
    torchrun --nproc_per_node 2 -m moshi_ttt.evaluate --manifest files.jsonl --device cuda --out results/
    python -m moshi_ttt.evaluate --benchmark swuggy=ZR2021 --benchmark sblimp=ZR2021 --out results/   # minimal pairs

Files of any length (an hour and more): each is read, encoded with moshi's streaming Mimi and scored block by block,
at flat memory in "chunked" and "stream" mode; progress is counted in tokens. Each file gets OUT/<nnnn>_<stem>/ with
results.json (ARCHITECTURE.md, Results), results.csv, report.html and last, atomically, summary.json (its done marker);
older non-causal TTT checkpoints are also scored causally (results.json `causal_comparison`), and a run whose loss
went NaN/inf at valid tokens gets a one-sentence warning naming it and the codebooks. OUT/index.json lists every
file with its mean losses, and OUT/aggregate.json, aggregate.csv and report.html give the loss by position across
files with 95% intervals (moshi_ttt.reports.aggregate); under torchrun each process takes cuda:LOCAL_RANK, scores
its share of the files, and rank 0 writes these once. OUT/run.json fingerprints the settings and checkpoints: a
rerun with others is refused (moshi_ttt.reports.outdir). A file that cannot be read, or turns out damaged half-way,
gets one line and is counted as failed while the others go on; bad usage ends with one line, never a traceback.
A stereo file is read as a dialogue (--channels; moshi-finetune's left = Moshi, right = user), the text stream is
--text-stream (a transcript: moshi-finetune's FILE.json beside the audio), and each run reports its loss views
(moshi_ttt.reports.loss_views); dialogues, greedy text and transcripts need the whole file's codes, so those files are
read whole (memory grows with them). --benchmark NAME=PATH scores minimal pairs into OUT/benchmarks/
(moshi_ttt.benchmarks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
import time
from pathlib import Path

import soundfile as sf
import torch
from tqdm import tqdm

from moshi_ttt import distributed
from moshi_ttt.data import audio as audio_io
from moshi_ttt.data import dialogue, stream
from moshi_ttt.data.alignments import alignment_path, load_text_tokenizer
from moshi_ttt.options import MODES, TEXT_STREAMS, RunOptions
from moshi_ttt.reports import aggregate, headline, loss_views, outdir, sweeps
from moshi_ttt.reports.inplace_report import inplace_messages
from moshi_ttt.reports.results import (
    causal_comparison,
    non_finite_message,
    results_document,
    run_record,
    write_json,
    write_report,
)
from moshi_ttt.scoring.audio_file import score_audio_file
from moshi_ttt.scoring.cost import model_dtype
from moshi_ttt.scoring.peak_memory import PeakMemory
from moshi_ttt.scoring.teacher_forcing import non_causal_mini_batch, score
from moshi_ttt.ttt.apply import ttt_blocks
from moshi_ttt.ttt.legacy import causal_reading

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_assets"
# The demo's baseline is the fair one: the same extra training as the TTT model, without TTT.
DEMO_CHECKPOINTS = {"baseline": DEMO_DIR / "fair_baseline", "ttt": DEMO_DIR / "ttt"}
# "auto": float32, bfloat16 for models of 4e9 parameters and more (Moshi 7B: 14.3 GiB instead of 28.6), on every
# device; TTT fast weights stay float32 (moshi_ttt.data.checkpoints.common.resolve_dtype).
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.evaluate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()  # or only --benchmark
    src.add_argument("--audio", nargs="+", type=Path, help="audio files (anything libsndfile reads)")
    src.add_argument("--manifest", type=Path, help='JSONL with one {"path": ..., "duration": ...} per line')
    p.add_argument("--baseline", help="baseline checkpoint (default: demo_assets/fair_baseline when it exists)")
    p.add_argument(
        "--ttt",
        help="TTT checkpoint (default: demo_assets/ttt when it exists); an In-Place fork checkpoint in the "
        "lora.safetensors layout (its step folder checkpoint_NNNNNN/ or consolidated/) loads over --baseline when "
        "given, as in the app, else over the fork's default base",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="chunked",
        help="chunked (default) and stream score the codes as they come, at flat memory; full needs every code at "
        "once, so its memory grows with the file (attention over all T tokens: minutes, not an hour)",
    )
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: min(250, context))")
    p.add_argument("--mini-batch-size", type=int, default=None, help="TTT inner mini-batch size for this run")
    p.add_argument(
        "--no-persistent-states",
        action="store_true",
        help="reset the fast weights to W_base every --reset-every tokens (default: the attention context)",
    )
    p.add_argument(
        "--reset-every",
        type=int,
        default=None,
        help="tokens between resets of the fast weights (turns persistence off); the same in every mode",
    )
    p.add_argument("--no-telemetry", action="store_true", help="skip drift and inner-loop losses")
    p.add_argument(
        "--text-stream",
        choices=TEXT_STREAMS,
        default="padding",
        help="what the model reads as its text: padding (default), zero (no text), greedy (its own inner monologue, "
        "as LMGen when the TTT state persists), transcript (moshi-finetune's FILE.json word alignments beside each "
        "file; scored)",
    )
    p.add_argument("--text-tokenizer", type=Path, help="the model's sentencepiece tokenizer (--text-stream transcript)")
    p.add_argument(
        "--channels",
        choices=dialogue.CHANNEL_MAPS,
        default=dialogue.DEFAULT_CHANNEL_MAP,
        help="stereo files: moshi-left (moshi-finetune's: left Moshi, right user), moshi-right (not with a transcript: "
        "its words are the left channel's), or mix to mono",
    )
    p.add_argument(
        "--first-codebook-weight-multiplier",
        type=float,
        default=1.0,
        help="moshi-finetune's weight of codebook 0 in the weighted loss view and the benchmarks (the fork: 100)",
    )
    p.add_argument("--text-padding-weight", type=float, default=0.5, help="moshi-finetune's weight of text padding")
    p.add_argument(
        "--benchmark",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="minimal pairs (repeatable): swuggy / sblimp (ZeroSpeech 2021 root), sstorycloze / tstorycloze (folder)",
    )
    p.add_argument("--max-pairs", type=int, default=None, help="score only the first pairs of each benchmark")
    p.add_argument("--max-seconds", type=float, default=None, help="longest file accepted (default: no limit)")
    p.add_argument("--allow-silence", action="store_true", help="score silent files instead of rejecting them")
    p.add_argument("--bin-size", type=int, default=250, help="tokens per position bin in the summaries")
    p.add_argument("--sweep", action="store_true", help="add mini-batch size, persistence and context sweeps")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda (under torchrun: cuda:LOCAL_RANK each) or cuda:N; default: cuda when there is a GPU",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="auto",
        help="auto: float32, bfloat16 from 4e9 parameters (Moshi 7B); TTT fast weights stay float32",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p


def read_manifest(path: Path) -> list[Path]:
    """Audio paths of a moshi-finetune manifest; relative paths are relative to the manifest's folder."""
    if not path.is_file():
        raise UsageError(f"manifest {path} does not exist")
    files = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file = Path(entry["path"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UsageError(f'{path} line {number} is not a JSON object with a "path"') from e
        files.append(file if file.is_absolute() else path.parent / file)
    if not files:
        raise UsageError(f"manifest {path} lists no files")
    return files


def _load_checkpoint(ref: str, device: str, dtype: torch.dtype, **base):
    """moshi_ttt.data.checkpoints.load, imported here so that the CLI starts without it (tests replace this);
    `base=` only for an In-Place lora.safetensors checkpoint over --baseline (`_base_of`)."""
    from moshi_ttt.data.checkpoints import load

    return load(ref, device=device, dtype=dtype, load_mimi=True, **base)


def _base_of(name: str, refs: dict[str, str]) -> dict[str, str]:
    """{"base": --baseline} for a --ttt In-Place checkpoint in the fork's lora.safetensors layout (it holds only what
    it changes; the app loads it over the run's baseline too), else {}."""
    from moshi_ttt.data.checkpoints.loader import inplace_over_base

    if name != "ttt" or "baseline" not in refs or not inplace_over_base(refs["ttt"]):
        return {}
    logger.info("In-Place checkpoint %s loads over the baseline %s", refs["ttt"], refs["baseline"])
    return {"base": refs["baseline"]}


def _checkpoint_refs(args) -> dict[str, str]:
    refs = {name: getattr(args, name) for name in ("baseline", "ttt")}
    if refs["baseline"] is None and refs["ttt"] is None:
        refs = {name: str(path) for name, path in DEMO_CHECKPOINTS.items() if path.exists()}
        if not refs:
            raise UsageError("give --baseline and/or --ttt (the demo checkpoints in demo_assets/ are not there)")
    return {name: ref for name, ref in refs.items() if ref is not None}


def _out_name(index: int, file: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", file.stem)[:60] or "audio"
    return f"{index:04d}_{stem}"


def _settings(args, options: RunOptions) -> dict:
    """What changes the numbers of a run, for the fingerprint (reports.outdir): `text_tokenizer` (its content) with
    a transcript; `aggregate_bins` names the binning of the done markers, so that an OUT written with the older
    merged tails is refused rather than mixed."""
    settings = {
        "options": dataclasses.asdict(options),
        "bin_size": args.bin_size,
        "aggregate_bins": "strict",  # summary.json bins: [i*b, (i+1)*b) without a merged tail (older OUTs merged it)
        "sweep": args.sweep,
        "dtype": args.dtype,
        "channels": args.channels,
        "encoding": {"frames_per_call": stream.ENCODE_FRAMES, "exact_window": True,
                     "resample_quality": audio_io.RESAMPLE_QUALITY},
    }  # fmt: skip
    if getattr(args, "tokenizer_identity", None) is not None:  # the transcript's text tokens depend on it
        settings["text_tokenizer"] = args.tokenizer_identity
    return settings


def _tokenizer_identity(path: Path) -> dict:
    """The text tokenizer's content (outdir.file_identity): another tokenizer gives other text tokens and losses."""
    return outdir.file_identity(path) if path.is_file() else {"path": str(path)}


def _tokenizer_record(args) -> dict | None:
    """results.json config "text_tokenizer": the --text-tokenizer of a transcript run (path and content), else None."""
    identity = getattr(args, "tokenizer_identity", None)
    return None if identity is None else {"path": str(args.text_tokenizer), **identity}


def _transcript_identity(file: Path, options: RunOptions) -> dict | None:
    """The content of a file's alignments when the run reads them, for its done marker: an edited transcript makes
    the file be scored again on resume. None without a transcript (or without the file: it fails when scored)."""
    json_path = alignment_path(file)
    if options.text_stream != "transcript" or not json_path.is_file():
        return None
    return outdir.file_identity(json_path)


def score_file(file: Path, index: int, models: dict, mimi, args, options: RunOptions, progress=None) -> dict:
    """Scores one file under every model (streamed: moshi_ttt.scoring.audio_file), writes its reports and, last, its
    done marker; returns its index.json entry."""
    out_dir = args.out / _out_name(index, file)
    transcript = _transcript_identity(file, options)  # before reading it: a later edit is scored again on resume
    info = audio_io.check_audio(file, max_seconds=args.max_seconds, allow_silence=args.allow_silence)
    device = torch.device(args.device)
    lms = {name: model for name, (_, model) in models.items()}
    dialogue_file = info.source_channels > 1 and args.channels != "mix"
    if dialogue_file or options.text_stream in ("greedy", "transcript"):
        scores = _score_whole_file(file, lms, mimi, args, options, device)  # needs every code first
        if progress is not None:
            progress.update(scores.tokens)
    else:
        keep_codes = args.sweep or any(non_causal_mini_batch(m) is not None for m in lms.values())
        on_tokens = None if progress is None else progress.update
        scores = score_audio_file(info, mimi, lms, options, device=device, keep_codes=keep_codes, on_tokens=on_tokens)
    inputs = getattr(scores, "inputs", None) or dict.fromkeys(lms, {})  # per run: the file's other streams
    readings = headline.readings_for(file)  # from FILE.txt when it names the readings of a repeated passage
    runs, tables = {}, {}
    for name, (ref, model) in models.items():
        result = scores.results[name]
        views = loss_views.from_result(result, options, (model.text_padding_token_id, model.end_of_text_padding_id))
        runs[name] = run_record(
            result, checkpoint=ref, peak_memory_mb=scores.peak_memory_mb, bin_size=args.bin_size,
            context_tokens=model.context, readings=readings, views=views,
        )  # fmt: skip
        leaky_b = non_causal_mini_batch(model)
        if leaky_b is not None:  # an older non-causal TTT checkpoint: the same weights, scored causally, next to it
            with causal_reading(model):
                causal = score(model, scores.codes, options=options.replace(telemetry=False), **inputs[name])
            runs[name]["causal_comparison"] = causal_comparison(runs[name], causal, leaky_b)
        message = non_finite_message(name, runs[name])
        if message:
            tqdm.write(f"warning: {file}: {message}", file=sys.stderr)
        for message in inplace_messages(name, runs[name]):  # In-Place updates that rounded away in float32
            tqdm.write(f"note: {file}: {message}", file=sys.stderr)
        if args.sweep:
            tables.update(_sweep_tables(name, model, scores.codes, result, options, inputs[name]))
    audio_record = {
        "path": str(file),
        "name": info.name,
        "duration_s": info.duration_s,
        "source_sample_rate": info.source_sample_rate,
        "source_channels": info.source_channels,
        "silent": info.silent,
        "tokens": scores.tokens,
        **(getattr(scores, "stream_info", None) or {}),
    }
    config = {
        **dataclasses.asdict(options),
        "device": str(device),
        "dtype": args.dtype,
        "max_seconds": args.max_seconds,
        "channels": args.channels,
        "encoding": _settings(args, options)["encoding"],
        "text_tokenizer": _tokenizer_record(args),
        "peak_memory": "all runs, the reading and the encoding together (they run interleaved, block by block)",
        "tokens_per_s": "each run's own scoring time (the encoding and the other runs left out)",
    }
    notes = getattr(args, "checkpoint_notes", None) or {}  # the checkpoints' own remarks (LoadedCheckpoint.notes)
    if any(notes.values()):
        config["notes"] = {name: list(values) for name, values in notes.items() if values}
    document = results_document(audio_record, config, runs, bin_size=args.bin_size)
    if tables:
        document["tables"] = tables
    write_report(out_dir, document, title=f"moshi-ttt: {info.name}")
    entry = {
        "path": str(file),
        "dir": out_dir.name,
        "tokens": scores.tokens,
        "duration_s": info.duration_s,
        "mean_loss": {name: run["mean_loss"] for name, run in runs.items()},
        "slope_per_1k_tokens": {name: run["slope_per_1k_tokens"] for name, run in runs.items()},
        "mean_loss_past_context": {name: run["mean_loss_past_context"] for name, run in runs.items()},
        "bins": aggregate.file_bins(runs, args.bin_size),
        "fingerprint": args.fingerprint,
    }
    if transcript is not None:
        entry["transcript"] = transcript
    comparison = headline.headline(document)
    if comparison is not None:
        entry["headline"] = headline.headline_text(comparison)
        entry["readings"] = headline.reading_rows(document)
    write_json(out_dir / outdir.DONE_FILE, entry)  # the done marker: last, atomic
    return entry


@dataclasses.dataclass
class _WholeFileScores:
    """The scores of a file read whole (dialogues, greedy text, transcripts), shaped like audio_file.FileScores."""

    results: dict
    codes: torch.Tensor  # [1, K, T] the Moshi channel
    tokens: int
    peak_memory_mb: float | None
    inputs: dict  # run -> score() keywords: the user stream, the transcript's text tokens
    stream_info: dict  # results.json "audio" fields: channels, transcript words


def _score_whole_file(file: Path, models: dict, mimi, args, options: RunOptions, device) -> _WholeFileScores:
    """Reads a file whole as Moshi and user channels (and its transcript) and scores it under every model."""
    dep_q = next(iter(models.values())).dep_q
    streams = dialogue.read_streams(
        file, mimi, dep_q, args.channels, transcript=options.text_stream == "transcript",
        max_seconds=args.max_seconds, allow_silence=args.allow_silence,
    )  # fmt: skip
    codes = streams.moshi_codes.to(device)  # [1, K, T]
    results, inputs = {}, {}
    with PeakMemory(device) as memory:
        for name, model in models.items():
            inputs[name] = streams.score_inputs(model, args.tokenizer)  # user stream, transcript tokens
            results[name] = score(model, codes, options=options, **inputs[name])
    return _WholeFileScores(results, codes, int(codes.shape[-1]), memory.peak_mb, inputs, streams.info())


def _sweep_tables(name: str, model, codes: torch.Tensor, result, options: RunOptions, inputs: dict) -> dict:
    """Sweep tables for report.html, each varying one option of the run (`inputs`: the file's other streams)."""
    tables = {f"{name}: loss by context length": sweeps.sweep_context_length(result)}
    if ttt_blocks(model):
        tables[f"{name}: inner mini-batch size"] = sweeps.sweep_mini_batch_size(model, codes, options, inputs=inputs)
        tables[f"{name}: persistent states"] = sweeps.sweep_persistent_states(model, codes, options, inputs=inputs)
    return tables


def run_options_from_args(args) -> RunOptions:
    """The run's options from the command line, built once (RunOptions validates them), and the run-level flags
    checked before any model loads."""
    if args.max_seconds == math.inf:
        args.max_seconds = None  # no limit, as without the flag
    if args.max_seconds is not None and not (math.isfinite(args.max_seconds) and args.max_seconds > 0):
        raise UsageError(f"--max-seconds must be a positive number of seconds, not {args.max_seconds}")
    if args.bin_size < 1:
        raise UsageError(f"--bin-size must be a positive number of tokens, not {args.bin_size}")
    try:
        return RunOptions(
            mode=args.mode,
            chunk_size=args.chunk_size,
            mini_batch_size=args.mini_batch_size,
            persistent_states=False if args.no_persistent_states or args.reset_every is not None else None,
            reset_every=args.reset_every,
            telemetry=not args.no_telemetry,
            text_stream=args.text_stream,
            first_codebook_weight_multiplier=args.first_codebook_weight_multiplier,
            text_padding_weight=args.text_padding_weight,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e


def _check_same_codes(loaded: dict) -> None:
    """Every model scores the same codes (encoded once): the checkpoints must name the same codec (or none) and
    read codes of the same shape (codebooks, cardinality, delays).

    Raises:
        UsageError: naming the checkpoints that differ and how."""
    from moshi_ttt.data.checkpoints import code_format_differences, same_codec  # as _load_checkpoint

    codecs = {name: ckpt.mimi for name, ckpt in loaded.items() if ckpt.mimi is not None}
    (first_codec, mimi), *other_codecs = codecs.items() if codecs else [(None, None)]
    for name, other in other_codecs:
        if not same_codec(mimi, other):  # the same file named two ways (hf://, a snapshot path) is the same codec
            refs = {n: getattr(loaded[n], "mimi_ref", None) for n in (first_codec, name)}
            detail = ", ".join(f"{n}: {ref}" for n, ref in refs.items())
            raise UsageError(f"the checkpoints name different codecs ({detail}): score them in separate runs")
    (first, ckpt), *others = loaded.items()
    for name, other in others:
        detail = code_format_differences(ckpt.model, other.model)
        if detail:
            raise UsageError(f"{first} and {name} do not read the same audio codes ({detail})")


def _expected_tokens(file: Path) -> int:
    """Tokens a file should give, from its header alone (0 when it cannot be read: it fails later, with a message)."""
    try:
        info = sf.info(str(file))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return 0
    return math.ceil(info.frames * audio_io.SAMPLE_RATE / max(info.samplerate, 1) / audio_io.FRAME_SIZE)


def _cpu_time_note(models: list, audio: list[Path] | None, device: str) -> str | None:
    """For a CPU run with a model of LARGE_MODEL_PARAMS or more: how long scoring will take, from measured
    seconds per token by model size (moshi_ttt.scoring.cost)."""
    import soundfile

    from moshi_ttt.data.checkpoints.common import LARGE_MODEL_PARAMS
    from moshi_ttt.scoring.cost import FRAME_RATE_HZ, scoring_seconds

    largest = max(sum(t.numel() for t in m.parameters()) for m in models)
    if torch.device(device).type != "cpu" or largest < LARGE_MODEL_PARAMS:
        return None
    per_token_s = scoring_seconds(models, 1, device)
    if per_token_s is None:
        return None
    per_audio_s = per_token_s * FRAME_RATE_HZ
    note = (
        f"note: scoring on the CPU ({torch.get_num_threads()} threads) with {len(models)} model(s) of up to "
        f"{largest / 1e9:.1f}e9 parameters takes about {per_audio_s:.0f} s per second of audio"
    )
    if audio:
        seconds = 0.0
        for file in audio:
            try:
                seconds += soundfile.info(str(file)).duration
            except RuntimeError:  # unreadable (soundfile's LibsndfileError): reported when it is scored
                continue
        note += f": about {seconds * per_audio_s / 60:.0f} min for these {len(audio)} file(s) ({seconds:.0f} s)"
    return note


def run(args) -> int:
    """Scores the files of this rank; returns the exit status."""
    ranks = distributed.Ranks.from_env()
    try:
        args.device = distributed.setup(ranks, args.device)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.audio is None and args.manifest is None and not args.benchmark:
        raise UsageError("give --audio, --manifest or --benchmark NAME=PATH")
    files = list(args.audio) if args.audio is not None else read_manifest(args.manifest) if args.manifest else []
    options = run_options_from_args(args)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file: give a folder (created if missing)")
    args.tokenizer = args.tokenizer_identity = None
    if options.text_stream == "transcript":
        if args.text_tokenizer is None:
            raise UsageError("--text-stream transcript needs --text-tokenizer (the model's sentencepiece .model)")
        args.tokenizer = load_text_tokenizer(args.text_tokenizer)
        args.tokenizer_identity = _tokenizer_identity(args.text_tokenizer)
    refs = _checkpoint_refs(args)
    models, mimi, identities, args.checkpoint_notes = {}, None, {}, {}
    loaded = {}
    for name, ref in refs.items():
        ckpt = loaded[name] = _load_checkpoint(ref, args.device, DTYPES[args.dtype], **_base_of(name, refs))
        models[name] = (ref, ckpt.model.eval())
        args.checkpoint_notes[name] = list(getattr(ckpt, "notes", None) or [])
        mimi = mimi if mimi is not None else ckpt.mimi
        identities[name] = {**outdir.checkpoint_identity(ref), "codec": outdir.checkpoint_identity(
            getattr(ckpt, "mimi_ref", None))}  # fmt: skip
    if mimi is None:
        raise UsageError("none of the checkpoints names a Mimi codec to encode the audio with")
    _check_same_codes(loaded)
    args.dtype = "/".join(sorted({str(model_dtype(m)).removeprefix("torch.") for _, m in models.values()}))
    note = _cpu_time_note([m for _, m in models.values()], args.audio, args.device)
    if note and ranks.rank == 0:
        tqdm.write(note, file=sys.stderr)
    fingerprint = outdir.fingerprint(_settings(args, options), identities)
    outdir.claim(args.out, fingerprint, write=ranks.rank == 0)
    args.out.mkdir(parents=True, exist_ok=True)
    args.fingerprint = fingerprint["hash"]
    mine = [(i, f) for i, f in enumerate(files) if i % ranks.world == ranks.rank]
    entries, failures, todo = [], [], []
    for index, file in mine:
        done = outdir.done_entry(args.out / _out_name(index, file), str(file))
        if (done is not None and done.get("fingerprint") == args.fingerprint
                and done.get("transcript") == _transcript_identity(file, options)):  # fmt: skip
            entries.append({"index": index, **done, "skipped": True})
        else:
            todo.append((index, file))
    desc = f"scoring (rank {ranks.rank})" if ranks.world > 1 else "scoring"
    with tqdm(total=sum(_expected_tokens(f) for _, f in todo), desc=desc, unit="token", unit_scale=True,
              smoothing=0.05, dynamic_ncols=True) as progress:  # fmt: skip
        for index, file in todo:
            start_n = progress.n
            try:
                entries.append({"index": index, **score_file(file, index, models, mimi, args, options, progress)})
            except (ValueError, FileNotFoundError) as e:
                failures.append({"index": index, "path": str(file), "error": str(e)})
                tqdm.write(f"error: {e}", file=sys.stderr)
                progress.total -= max(0, _expected_tokens(file) - (progress.n - start_n))  # the file's rest: not coming
                progress.refresh()
    gathered = distributed.gather([entries, failures], ranks)
    if gathered is None:
        return 1 if failures else 0
    if args.benchmark:  # rank 0, once
        from moshi_ttt.benchmarks.report import run_benchmarks, summary_lines

        plain = {name: model for name, (_, model) in models.items()}
        document = run_benchmarks(args.benchmark, plain, mimi, options, args.out, max_pairs=args.max_pairs)
        print("\n".join(summary_lines(document)) + f"\nbenchmarks written to {args.out / 'benchmarks'}")
        if not files:
            return 0
    entries = sorted((e for part in gathered for e in part[0]), key=lambda e: e["index"])
    failures = sorted((f for part in gathered for f in part[1]), key=lambda f: f["index"])
    write_json(args.out / "index.json", {"files": entries, "failures": failures, "runs": sorted(models)})
    if entries:
        aggregate.write_aggregate(args.out, aggregate.aggregate(entries, failures))
    for entry in entries:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in entry["mean_loss"].items() if v is not None)
        print(f"{entry['path']}: {losses}{' (already scored)' if entry.get('skipped') else ''}")
        if entry.get("headline"):
            print(f"  {entry['headline']}")
        for row in entry.get("readings") or []:
            print(f"  reading {row['reading']} ({row['span (s)']} s): baseline {row['baseline loss']}, "
                  f"TTT {row['TTT loss']}, {row['improvement %']:+.2f}%")  # fmt: skip
    report = f", loss by position across files in {args.out / 'report.html'}" if entries else ""
    print(f"{len(entries)} file(s) scored into {args.out}, {len(failures)} failed{report}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        status = run(args)
    except (UsageError, ValueError, OSError) as e:  # OSError: a missing file, an --out that is a file, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    logger.info("done in %.1f s", time.perf_counter() - start)
    return status


if __name__ == "__main__":
    sys.exit(main())
