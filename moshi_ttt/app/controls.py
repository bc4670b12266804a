"""Each input control of the app built from its spec (`moshi_ttt.app.inputs`): the label, help text, default,
bounds and choices a user sees are the ones the server checks, by construction.

Number -> Slider, Choice -> Dropdown (or Radio), MultiChoice -> CheckboxGroup (or a multi-select Dropdown),
Flag -> Checkbox, AudioFile -> Audio (upload or microphone), JsonFile -> File, HubReference and Spans -> Textbox.
"""

from __future__ import annotations

import gradio as gr

from moshi_ttt.app.inputs import AudioFile, Choice, Flag, HubReference, JsonFile, MultiChoice, Number, Spans, Spec


def control(spec: Spec, elem_id: str | None = None) -> gr.components.Component:
    """A new Gradio component for `spec` (call it inside the Blocks where the control goes).

    Args:
        spec: an input's spec.
        elem_id: the component's HTML id (for the page's script and tests).
    Returns:
        The component, showing the spec's label, help text and default.
    Raises:
        TypeError: a kind of spec that has no control yet.
    """
    info = getattr(spec, "info", "") or None
    if isinstance(spec, Number):
        step = spec.step if spec.step is not None else (1 if spec.integer else None)
        value = spec.default if spec.default is not None else spec.minimum
        extra = {"step": step} if step is not None else {}
        return gr.Slider(spec.minimum, spec.maximum, value=value, label=spec.label, info=info, **extra)
    if isinstance(spec, Choice):
        kind = gr.Radio if spec.radio else gr.Dropdown
        return kind(list(spec.choices), value=spec.default, label=spec.label, info=info)
    if isinstance(spec, MultiChoice):
        if spec.dropdown:
            return gr.Dropdown(list(spec.choices), value=list(spec.default), multiselect=True, label=spec.label,
                               info=info, max_choices=spec.maximum)  # fmt: skip
        return gr.CheckboxGroup(list(spec.choices), value=list(spec.default), label=spec.label, info=info)
    if isinstance(spec, Flag):
        return gr.Checkbox(value=spec.default, label=spec.label, info=info)
    if isinstance(spec, AudioFile):
        return gr.Audio(type="filepath", sources=["upload", "microphone"], label=spec.label, elem_id=elem_id)
    if isinstance(spec, JsonFile):
        return gr.File(label=spec.label, file_types=[".json"], file_count="single", type="filepath")
    if isinstance(spec, Spans):
        return gr.Textbox(label=spec.label, info=info, value=spec.default, placeholder="e.g. 0.6-15.3, 21.3-35.9",
                          max_lines=2)  # fmt: skip
    if isinstance(spec, HubReference):
        return gr.Textbox(label=spec.label, info=info, placeholder="hf://owner/repo")
    raise TypeError(f"no control for a spec of type {type(spec).__name__}")
