"""What the Run event shows at each step: a run's LiveUpdate (and, at its end, the results document and the
downloads) mapped to the UI's outputs, in one place.

`RunOutputs` holds one value per output, in the order of the event's outputs (the layout builds its outputs list
from `OUTPUT_NAMES`); None leaves that output as it is. Building it needs no Gradio; `for_gradio()` turns it into
the tuple a Gradio generator yields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.components.plot import PlotData

from moshi_ttt.app import view
from moshi_ttt.app.engine import LiveUpdate, trim_note
from moshi_ttt.app.figure import figure_json
from moshi_ttt.reports import headline
from moshi_ttt.reports import results as report

SUMMARY_COLUMNS = ["run", "checkpoint", "mean loss", "improvement %", "mean loss past context",
                   "improvement % past context", "slope / 1k tokens", "tokens/s", "peak MB"]  # fmt: skip
READING_COLUMNS = ["reading", "span (s)", "baseline loss", "TTT loss", "improvement %"]


@dataclass(frozen=True)
class RunOutputs:
    """One step of the Run event: a value per output (None: leave that output as it is)."""

    figure: str | None = None  # plotly JSON of the live figure (figure_json)
    status: str | None = None  # the progress line beside the figure
    headline: str | None = None  # Markdown; "" clears the previous run's
    summary: list[list] | None = None  # rows in SUMMARY_COLUMNS order
    readings: list[list] | None = None  # rows in READING_COLUMNS order; [] hides the table
    downloads: list[str] | None = None  # paths of results.json, results.csv, report.html
    notes: str | None = None  # Markdown: trimming, legacy and other notes of the run

    def for_gradio(self) -> tuple:
        """The tuple a Gradio generator yields for the outputs named by OUTPUT_NAMES, in that order.

        Returns:
            gr.skip() for each None, the figure as Plot data, the readings table as an update of its value and
            visibility, every other value as it is.
        """
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.figure is not None:
            shown["figure"] = PlotData(type="plotly", plot=self.figure)
        if self.readings is not None:
            shown["readings"] = gr.update(value=self.readings, visible=bool(self.readings))
        return tuple(gr.skip() if value is None else value for value in shown.values())


OUTPUT_NAMES = tuple(f.name for f in dataclasses.fields(RunOutputs))


def starting(mode: str) -> RunOutputs:
    """Before the first update: the status says what comes, the previous run's headline goes.

    Args:
        mode: the engine's mode ("stream", "chunked" or "full").
    """
    then = " the whole clip in one call (the figure comes at the end)…" if mode == "full" else "…"
    return RunOutputs(status=view.status_text(None, "reading and encoding the audio, then scoring" + then), headline="")


def live(update: LiveUpdate) -> RunOutputs:
    """An update while scoring: the figure so far and the progress line."""
    figure = figure_json(update.loss_per_token, update.drift, total_tokens=update.total_tokens,
                         inner_loss=update.inner_loss)  # fmt: skip
    return RunOutputs(figure=figure, status=view.status_text(update))


def final(update: LiveUpdate, downloads: list[str]) -> RunOutputs:
    """The last update (complete or stopped): the figure, headline, tables, downloads and notes.

    Args:
        update: a complete update (`update.document` set).
        downloads: the paths written by `write_downloads`.
    """
    if not update.complete:
        raise ValueError("final() takes the last update of a run, the one with the results document")
    document = update.document
    notes = [trim_note(document["audio"])]
    notes += [n for run_notes in document["config"]["notes"].values() for n in run_notes]
    return dataclasses.replace(
        live(update),
        headline=view.headline_for(update),
        summary=view.table_rows(update.summary, SUMMARY_COLUMNS, update.stopped),
        readings=view.table_rows(headline.reading_rows(document), READING_COLUMNS, False),
        downloads=downloads,
        notes="\n\n".join(n for n in notes if n),
    )


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
