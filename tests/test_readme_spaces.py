"""The README's Spaces settings: its front matter is a valid Spaces configuration, and the GPU seconds its "Running
on Spaces" table gives are what `zerogpu.gpu_duration` asks for (the figures change with `scoring/cost.py`)."""

import math
import re
from pathlib import Path

import pytest
import soundfile as sf
import yaml
from conftest import SR, raw_values, speechlike
from huggingface_hub import SpaceHardware

from moshi_ttt.app import zerogpu
from moshi_ttt.app.handlers import run_specs
from moshi_ttt.scoring.cost import MOSHI_7B_PARAMS, MOSHI_7B_WEIGHT_BYTES

README = Path(__file__).resolve().parent.parent / "README.md"
# The Spaces configuration reference (huggingface.co/docs/hub/spaces-config-reference): thumbnail colours and the
# sdk values it accepts; short_description is shown on the Space's card, at most 60 characters.
COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
SDKS = {"gradio", "streamlit", "docker", "static"}
# What the table's columns hold: the demo models (their parameters, and 14 MB of weights with the codec), and Moshi 7B
# with a TTT checkpoint on layers 29-31 over it (214,462,608 TTT parameters, 455,074,368 bytes: apply_ttt on the
# meta device) and moshi's Mimi file (384,644,996 bytes), all of which a ZeroGPU worker moves onto its GPU.
DEMO = ({"baseline": 1_618_816, "ttt": 1_802_001}, 14_000_000)
MOSHI_7B_TTT = (
    {"baseline": MOSHI_7B_PARAMS, "ttt": MOSHI_7B_PARAMS + 214_462_608},
    MOSHI_7B_WEIGHT_BYTES + 455_074_368 + 384_644_996,
)


def front_matter() -> dict:
    text = README.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_front_matter_is_a_valid_spaces_configuration():
    config = front_matter()
    assert config["sdk"] in SDKS and config["colorFrom"] in COLORS and config["colorTo"] in COLORS
    assert Path(README.parent / config["app_file"]).is_file()
    assert config["suggested_hardware"] in {h.value for h in SpaceHardware}
    assert isinstance(config["python_version"], str) and re.fullmatch(r"3\.\d+(\.\d+)?", config["python_version"])
    assert isinstance(config["sdk_version"], str) and len(config["short_description"]) <= 60
    pinned = re.search(r"^gradio==(\S+)$", (README.parent / "requirements.txt").read_text(), re.M).group(1)
    assert re.fullmatch(pinned.replace(".", r"\.").replace("*", r"\d+"), config["sdk_version"])  # the same Gradio


def table_row(label: str) -> list[int]:
    """The integers of the table row that starts with `label`, column by column (the "longest clip" note apart)."""
    row = next(line for line in README.read_text().splitlines() if line.startswith(f"| {label}"))
    return [int(n) for cell in row.split("|")[2:4] for n in re.findall(r"\b(\d+) / (\d+)\b", cell)[0]]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("clips")
    paths = {}
    for seconds in (60, 120, 180):
        paths[seconds] = str(root / f"{seconds}s.wav")
        sf.write(paths[seconds], speechlike(seconds, 1), SR)
    return paths


def test_the_spaces_table_gives_the_gpu_seconds_the_app_asks_for(clips):
    specs = run_specs(["baseline", "ttt"], [str(Path(clips[60]).parent)], [])

    def asked(models, mode, seconds):
        params, held = models
        sizes = lambda names: zerogpu.RunSize(tuple(params[n] for n in names), held)  # noqa: E731
        duration = zerogpu.gpu_duration(specs, sizes, ValueError)
        values = raw_values(specs, audio={"path": clips[seconds]}, mode=mode, max_seconds=600)
        try:
            return duration(None, *values)
        except ValueError:
            return math.inf

    chunked, live = "chunked", "live token by token"
    expected_chunked = [asked(m, chunked, s) for m in (DEMO, MOSHI_7B_TTT) for s in (60, 120)]
    expected_live = [asked(m, live, s) for m in (DEMO, MOSHI_7B_TTT) for s in (60, 120)]
    assert table_row("GPU seconds asked per run") == expected_chunked
    assert table_row("same, live token by token") == expected_live
    longest = int(re.search(r"the longest clip that fits: (\d+) s", README.read_text()).group(1))
    with pytest.raises(ValueError, match=f"lower Max duration to {longest} s"):
        duration = zerogpu.gpu_duration(specs, lambda names: zerogpu.RunSize(
            tuple(MOSHI_7B_TTT[0][n] for n in names), MOSHI_7B_TTT[1]), ValueError)  # fmt: skip
        duration(None, *raw_values(specs, audio={"path": clips[180]}, mode=live, max_seconds=600))
    comment = re.search(r"the demo models ask it for ~(\d+)-(\d+) s per run", README.read_text())
    assert [int(comment.group(1)), int(comment.group(2))] == [min(expected_chunked[:2]), max(expected_live[:2])]
