"""ZeroGPU's duration under any JSON the public API may send: `spaces` calls it in the server before the handler
validates anything, so it must neither crash nor ask for a duration ZeroGPU refuses, whatever the values.

Property-style: seeded random draws of hostile values (None, lists, dicts, NaN strings, huge and negative numbers,
unknown, path-like and unicode checkpoint names, too few or too many values) for every input of the Run, Compare
and "What the models hear" events.
"""

import math
import random

import pytest
import soundfile as sf
from conftest import SR, speechlike

from moshi_ttt.app import zerogpu
from moshi_ttt.app.handlers import compare_specs, compared_runs, hear_specs, run_specs
from moshi_ttt.scoring.cost import MOSHI_7B_PARAMS, MOSHI_7B_WEIGHT_BYTES

NAMES = ["baseline", "ttt"]
DRAWS = 1500  # per event and model size: 0.3 s each on 2 busy cores
TINY = {"baseline": 1_618_816, "ttt": 1_802_001}  # the demo models
BIG = {"baseline": MOSHI_7B_PARAMS, "ttt": MOSHI_7B_PARAMS + 217_000_000}


class Refused(Exception):
    """The handler's own user error (gr.Error in the app)."""


def sizes_of(params: dict[str, int]):
    """`cache_sizes` of a cache holding models of these sizes; a name it does not hold counts as Moshi 7B."""

    def sizes(names):
        unknown = {n for n in names if n not in params}
        held = 2 * sum(params[n] for n in set(names) - unknown) + len(unknown) * MOSHI_7B_WEIGHT_BYTES
        return zerogpu.RunSize(tuple(params.get(n, MOSHI_7B_PARAMS) for n in names), held)

    return sizes


def hostile_values(clips: list[str], rng: random.Random) -> list:
    scalars = [None, True, False, 0, -1, 1, 5, 16, 600, 601, 2**63, -(2**63), 10**400, 1e308, -1e308, 1e-300,
               math.nan, math.inf, -math.inf, "NaN", "nan", "inf", "-inf", "1e309", "", " ", "0", "16", "x" * 100_000,
               "ttt", "baseline", "TTT", "ttt ", "../ttt", "/etc/passwd", "hf://kyutai/moshiko-pytorch-bf16",
               "nope", "\u00e9\U0001f3a7", "\x00", "chunked", "live token by token", "stream", "on", "4"]  # fmt: skip
    audio = [{"path": c} for c in clips] + [{"path": None}, {"path": ["a"]}, {"path": {"x": 1}}, {"path": 3},
             {"path": "/etc/passwd"}, {"path": "/"}, {"path": "\x00"}, {}, {"url": "http://x"}, *clips]  # fmt: skip
    pool = scalars + audio

    def draw(depth=0):
        kind = rng.random()
        if kind < 0.6 or depth > 2:
            return rng.choice(pool)
        if kind < 0.85:
            return [draw(depth + 1) for _ in range(rng.randrange(0, 5))]
        return {rng.choice(["path", "x", ""]): draw(depth + 1) for _ in range(rng.randrange(0, 3))}

    return draw


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("clips")
    paths = []
    for seconds in (0.5, 200.0):
        path = root / f"clip_{seconds:g}.wav"
        sf.write(path, speechlike(seconds, 1), SR)
        paths.append(str(path))
    (root / "empty.wav").write_bytes(b"")
    (root / "not_audio.wav").write_text("RIFF but not really")
    return [*paths, str(root / "empty.wav"), str(root / "not_audio.wav")]


@pytest.mark.parametrize("params", [TINY, BIG], ids=["demo_models", "moshi_7b"])
@pytest.mark.parametrize("event", ["run", "compare", "hear"])
def test_any_json_gives_a_duration_zerogpu_accepts_or_the_handlers_refusal(clips, event, params):
    specs = run_specs(NAMES, [str(p) for p in {c.rsplit("/", 1)[0] for c in clips}], [])
    if event == "compare":
        specs = compare_specs(specs, NAMES)
        duration = zerogpu.gpu_duration(specs, sizes_of(params), Refused, runs=compared_runs,
                                        models=zerogpu.compare_models)  # fmt: skip
    elif event == "hear":
        specs = hear_specs(specs)
        duration = zerogpu.reconstruction_duration(specs, sizes_of(params))
    else:
        duration = zerogpu.gpu_duration(specs, sizes_of(params), Refused)
    rng = random.Random(f"{event}-{len(str(params))}")
    draw = hostile_values(clips, rng)
    valid = {name: [getattr(spec, "default", None)] for name, spec in specs.items()}
    valid |= {"audio": [{"path": c} for c in clips[:2]], "mode": ["chunked", "live token by token", "whole sequence"],
              "max_seconds": [5, 120, 600], "baseline": NAMES, "ttt": NAMES,
              "compare_checkpoints": [["ttt"], NAMES], "compare_sizes": [["4"], ["4", "16", "64"]]}  # fmt: skip
    answered, refused = set(), 0
    for _ in range(DRAWS):
        count = rng.choice([0, 1, len(specs) - 1, len(specs), len(specs), len(specs), len(specs) + 3])
        # each value hostile or, as often, one the handler accepts: hostile values next to valid ones
        names = [*specs, "", "", ""][:count]  # "": a value past the last input
        values = [rng.choice(valid[name]) if name and rng.random() < 0.6 else draw() for name in names]
        request = rng.choice([None, object(), "x"])
        try:
            seconds = duration(request, *values)
        except Refused as e:  # the handler's own one sentence, naming what fits
            assert str(e).startswith("This run would need about ") and str(e).endswith("."), str(e)
            assert "\n" not in str(e)
            refused += 1
            continue
        assert type(seconds) is int, (values, seconds)  # what spaces turns into a timedelta
        assert zerogpu.GPU_START_S <= seconds <= zerogpu.ZEROGPU_MAX_S, (values, seconds)
        answered.add(seconds)
    assert len(answered) > 1  # the draws reach both short and long clips, not one refused-input answer
    # The demo models always fit; Moshi 7B live over 200 s does not; a reconstruction always fits.
    assert (refused > 0) == (params is BIG and event != "hear")
