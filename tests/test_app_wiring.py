"""The app's controls built from their specs."""

import gradio as gr
import pytest

from moshi_ttt.app.controls import control
from moshi_ttt.app.inputs import AudioFile, Choice, Flag, HubReference, Number


def test_each_control_shows_what_its_spec_checks():
    with gr.Blocks():
        slider = control(Number("Max duration (s)", 5, 60, default=30, step=5, info="scored at most"))
        whole = control(Number("TTT mini_batch_size", 1, 64, integer=True))
        dropdown = control(Choice("Baseline checkpoint", ("a", "b"), default="b"))
        radio = control(Choice("Mode", ("chunked", "whole sequence"), default="chunked", radio=True))
        checkbox = control(Flag("persistent_states", default=True, info="keep the fast weights between calls"))
        audio = control(AudioFile("Audio", roots=("/uploads",)))
        hub = control(HubReference("Hub checkpoint"))
    assert isinstance(slider, gr.Slider)
    assert (slider.minimum, slider.maximum, slider.value, slider.step) == (5, 60, 30, 5)
    assert slider.label == "Max duration (s)" and slider.info == "scored at most"
    assert (whole.minimum, whole.maximum, whole.value, whole.step) == (1, 64, 1, 1)
    assert isinstance(dropdown, gr.Dropdown) and [c[1] for c in dropdown.choices] == ["a", "b"]
    assert dropdown.value == "b"
    assert isinstance(radio, gr.Radio) and [c[1] for c in radio.choices] == ["chunked", "whole sequence"]
    assert isinstance(checkbox, gr.Checkbox) and checkbox.value is True and checkbox.label == "persistent_states"
    assert checkbox.info == "keep the fast weights between calls"
    assert isinstance(audio, gr.Audio) and audio.type == "filepath" and audio.label == "Audio"
    assert isinstance(hub, gr.Textbox) and hub.label == "Hub checkpoint"
    with pytest.raises(TypeError, match="no control for a spec of type str"):
        control("Audio")
