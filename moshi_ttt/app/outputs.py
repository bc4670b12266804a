"""What the Run event (and the reopening of a results.json) shows at each step: a run's LiveUpdate (and, at its end,
the results document and the downloads) mapped to the UI's outputs, in one place.

`RunOutputs` holds one value per output, in the order of the event's outputs (the layout builds its outputs list
from `OUTPUT_NAMES`); None leaves that output as it is, "" clears a figure, [] a table or the downloads. Building it
needs no Gradio; `for_gradio()` turns it into the tuple a Gradio generator yields.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.components.plot import PlotData

from moshi_ttt.app import view
from moshi_ttt.app.codebook_view import COLUMNS as CODEBOOK_COLUMNS
from moshi_ttt.app.codebook_view import codebook_figure, codebook_table
from moshi_ttt.app.engine import LiveUpdate
from moshi_ttt.app.figure import FigureInfo, Span, empty_figure, figure_dict, grown_range, to_json
from moshi_ttt.app.inplace_view import inplace_markdown
from moshi_ttt.reports import headline
from moshi_ttt.reports import results as report
from moshi_ttt.reports.figures import FRAME_RATE

SUMMARY_COLUMNS = {  # the app's summary table: column -> key of reports.results.summary_rows
    "run": "run",
    "checkpoint": "checkpoint",
    "mean loss": "mean loss",
    "TTT vs baseline": "improvement %",
    "loss past 1st window": "mean loss past context",
    "vs baseline past 1st window": "improvement % past context",
    "slope / 1k tokens": "slope / 1k tokens",
    "tokens/s": "tokens/s",
}


@dataclass(frozen=True)
class RunOutputs:
    """One step of the Run event: a value per output (None: leave that output as it is)."""

    figure: str | None = None  # plotly JSON of the live figure (figure_json); "" clears it
    status: str | None = None  # the progress line above the figure
    headline: str | None = None  # Markdown; "" clears the previous run's
    summary: list[list] | None = None  # rows in SUMMARY_COLUMNS order; [] empties the table
    readings: str | None = None  # Markdown: the per-reading table (`view.readings_markdown`); "" clears it
    downloads: list[str] | None = None  # paths of results.json, results.csv, report.html; [] empties the list
    notes: str | None = None  # Markdown: trimming, resampling, legacy and other notes of the run
    codebook_figure: str | None = None  # plotly JSON of the per-codebook view; "" clears it
    codebook_table: str | None = None  # Markdown: the per-codebook table (codebook_view.COLUMNS); "" clears it

    def for_gradio(self) -> tuple:
        """The tuple a Gradio generator yields for the outputs named by OUTPUT_NAMES, in that order.

        Returns:
            gr.skip() for each None, the figures as Plot data (None to clear), every other value as it is.
        """
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("figure", "codebook_figure"):
            if shown[name] is not None:
                shown[name] = PlotData(type="plotly", plot=shown[name]) if shown[name] else gr.update(value=None)
        return tuple(gr.skip() if value is None else value for value in shown.values())


OUTPUT_NAMES = tuple(f.name for f in dataclasses.fields(RunOutputs))
WAITING_FIGURE = to_json(
    empty_figure("Choose a clip and press Run: the four rows fill in as the models read."), "moshi_ttt"
)
STARTING_FIGURE = to_json(empty_figure("Reading and encoding the audio…"), "moshi_ttt")
CLEARED = RunOutputs(figure="", headline="", summary=[], readings="", downloads=[], notes="", codebook_figure="",
                     codebook_table="")  # fmt: skip


class LiveFigure:
    """One run's figure through its updates: the same clip, readings and marks, a fresh zoom state (plotly's
    uirevision) and a TTT − baseline range that only grows (`figure.grown_range`), so the row does not jump.

    Per run (a local of the Run handler's generator), never shared between users.
    """

    def __init__(self, info: FigureInfo):
        self.info = dataclasses.replace(info, revision=uuid.uuid4().hex)
        self.difference_range: list[float] | None = None

    def json(self, update: LiveUpdate, info: FigureInfo | None = None) -> str:
        """The figure of `update` as plotly JSON.

        Args:
            update: a live or last update.
            info: replaces the run's info (the last update's readings are those actually scored).
        """
        info = dataclasses.replace(info, revision=self.info.revision) if info is not None else self.info
        fig = figure_dict(update.loss_per_token, update.drift, total_tokens=update.total_tokens,
                          inner_loss=update.inner_loss, info=info, inplace=update.inplace)  # fmt: skip
        current = fig["layout"]["yaxis2"].get("range")
        if current is not None:
            self.difference_range = grown_range(self.difference_range, current)
            fig["layout"]["yaxis2"]["range"] = self.difference_range
        return to_json(fig, info.clip)


def reading_spans(readings: list) -> tuple[Span, ...]:
    """Shaded spans of readings: `headline.Reading`s, or results.json "readings" dicts (a partial one says so)."""
    spans = []
    for i, r in enumerate(readings, start=1):
        if isinstance(r, dict):
            label = f"reading {i}" + (" (partial)" if r.get("partial") else "")
            spans.append(Span(float(r["start_s"]), float(r["end_s"]), label))
        else:
            spans.append(Span(r.start_s, r.end_s, f"reading {r.number}"))
    return tuple(spans)


def starting(mode: str) -> RunOutputs:
    """Before the first update: the status says what comes; the previous run's figure, headline, tables, downloads
    and notes go, so nothing on the page belongs to another run.

    Args:
        mode: the engine's mode ("stream", "chunked" or "full").
    """
    then = " the whole clip in one call (the figure comes at the end)…" if mode == "full" else "…"
    status = view.status_text(None, "reading and encoding the audio, then scoring" + then)
    return dataclasses.replace(CLEARED, status=status, figure=STARTING_FIGURE)


def refused(message: str, started: bool = False) -> RunOutputs:
    """A refused run: the status line says why (the same sentence as Gradio's error toast).

    Args:
        message: the sentence.
        started: the run had begun (`starting` cleared the page): the figure's frame says it too, instead of
            "Reading and encoding the audio…". A run refused before it began leaves the previous results as they are.
    """
    text = f"Not scored: {message}"
    return RunOutputs(status=text, figure=to_json(empty_figure(text), "moshi_ttt") if started else None)


def live(update: LiveUpdate, figure: LiveFigure) -> RunOutputs:
    """An update while scoring: the figure so far and the progress line (and, for an In-Place TTT model, what its
    fast weight did so far, where the headline comes at the end)."""
    verdicts = inplace_markdown(update.inplace, done=False) or None
    return RunOutputs(figure=figure.json(update), status=view.status_text(update), headline=verdicts)


def final(update: LiveUpdate, downloads: list[str], figure: LiveFigure) -> RunOutputs:
    """The last update (complete or stopped): the figure, headline, tables, downloads, notes and the per-codebook
    view.

    Args:
        update: a complete update (`update.document` set).
        downloads: the paths written by `write_downloads`.
        figure: the run's figure (its readings become those scored: a reading cut by a Stop is marked partial).
    """
    if not update.complete:
        raise ValueError("final() takes the last update of a run, the one with the results document")
    document = update.document
    info = dataclasses.replace(figure.info, spans=reading_spans(_readings(document)))
    codebooks = codebook_figure(document, dataclasses.replace(info, revision=uuid.uuid4().hex))
    return RunOutputs(
        figure=figure.json(update, info),
        status=view.status_text(update),
        headline=_with_inplace(view.headline_for(update), update.inplace),
        summary=view.table_rows(update.summary, SUMMARY_COLUMNS, update.stopped),
        readings=view.readings_markdown(document),
        downloads=downloads,
        notes=view.notes_markdown(document),
        codebook_figure=to_json(codebooks, info.clip) if codebooks else "",
        codebook_table=view.markdown_table(list(CODEBOOK_COLUMNS), codebook_table(document, update.stopped)),
    )


def reopened(document: dict, file_name: str) -> RunOutputs:
    """A results.json read back (`reopen.read_results`): its figure, headline, tables, notes and per-codebook view,
    as a run that just ended would show them; nothing is rescored.

    Args:
        document: the validated document.
        file_name: the name of the file the user opened (for the status line).
    """
    runs = document["runs"]
    audio = document.get("audio") or {}
    ttt = runs.get("ttt") or next(iter(runs.values()))
    tokens = max(len(run["loss_per_token"]) for run in runs.values())
    total = (audio.get("partial") or {}).get("total_tokens") or tokens
    info = FigureInfo(clip=report.file_stem(document), spans=reading_spans(_readings(document)),
                      context_tokens=ttt.get("context_tokens"), revision=uuid.uuid4().hex)  # fmt: skip
    fig = figure_dict({name: run["loss_per_token"] for name, run in runs.items()}, ttt.get("drift") or {},
                      total_tokens=total, inner_loss=ttt.get("inner_loss") or {}, info=info,
                      inplace=ttt.get("inplace") or {})  # fmt: skip
    if "range" in fig["layout"]["yaxis2"]:
        fig["layout"]["yaxis2"]["range"] = grown_range(None, fig["layout"]["yaxis2"]["range"])
    stopped = bool(audio.get("partial"))
    codebooks = codebook_figure(document, dataclasses.replace(info, revision=uuid.uuid4().hex))
    clip = view.plain(audio.get("name") or "an unnamed clip")
    what = f"{clip}, {tokens} tokens ({tokens / FRAME_RATE:.1f} s) of {len(runs)} run(s)"
    status = f"Opened {view.plain(file_name)}: {what}, as scored when the file was written (nothing rescored)."
    return RunOutputs(
        figure=to_json(fig, info.clip),
        status=status,
        headline=_with_inplace(_reopened_headline(document), ttt.get("inplace")),
        summary=view.table_rows(report.summary_rows(document), SUMMARY_COLUMNS, stopped),
        readings=view.readings_markdown(document),
        downloads=[],
        notes=view.notes_markdown(document),
        codebook_figure=to_json(codebooks, info.clip) if codebooks else "",
        codebook_table=view.markdown_table(list(CODEBOOK_COLUMNS), codebook_table(document, stopped)),
    )


def _reopened_headline(document: dict) -> str:
    """The headline of an opened file, or a sentence where the file leaves out the mean losses it compares (a file
    of the command line may: reopen keeps them optional); "" without a baseline and a TTT run."""
    comparison = headline.headline(document)
    if comparison is None:
        return ""
    if not (math.isfinite(comparison.baseline_loss) and math.isfinite(comparison.ttt_loss)):
        return "The file gives no mean_loss of its baseline or TTT run, so there is no headline comparison."
    past = (comparison.baseline_loss_past_context, comparison.ttt_loss_past_context)
    if comparison.context is not None and comparison.tokens > comparison.context and not all(map(math.isfinite, past)):
        comparison = dataclasses.replace(comparison, context=None)  # no "after the first window" line of NaNs
    return headline.headline_markdown(comparison)


def _with_inplace(text: str, inplace: dict | None) -> str:
    """The headline, then the verdicts of the TTT run's In-Place layers (`inplace_view.inplace_markdown`)."""
    return "\n\n".join(part for part in (text, inplace_markdown(inplace or {}, done=True)) if part)


def _readings(document: dict) -> list:
    """The readings a document's TTT run (else its first run) lists; [] without any."""
    runs = document.get("runs", {})
    run = runs.get("ttt") or next(iter(runs.values()), {})
    return run.get("readings") or []


def write_downloads(folder: Path, update: LiveUpdate) -> list[str]:
    """Writes the run's results.json, results.csv and report.html into `folder`, named after the clip.

    Args:
        folder: the run's own folder (`RunFolders.new`).
        update: the last update; a stopped run's files are named `<clip>_partial_*`.
    Returns:
        The paths written.
    """
    prefix = report.file_stem(update.document) + ("_partial_" if update.stopped else "_")
    files = report.write_report(folder, update.document, prefix=prefix)
    return [str(p) for p in files.values()]
