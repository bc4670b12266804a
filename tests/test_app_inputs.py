"""The app's validation layer without a server, and the app's settings for Spaces and containers."""

import math

import pytest
import soundfile as sf
import torch
from conftest import SR, raw_values, speechlike

from moshi_ttt.app import server, zerogpu
from moshi_ttt.app.handlers import MAX_SECONDS, compare_specs, compared_runs, run_specs
from moshi_ttt.app.inputs import AudioFile, Choice, Flag, InputError, Number, validate
from moshi_ttt.app.models import ModelCache, build_allow_list
from moshi_ttt.app.update_size import MAX_TOKENS
from moshi_ttt.data.audio import load_audio
from moshi_ttt.data.checkpoints import weight_bytes
from moshi_ttt.scoring.cost import MOSHI_7B_PARAMS, MOSHI_7B_WEIGHT_BYTES, gpu_seconds_per_token

MINI_BATCH = Number("TTT mini_batch_size", 1, 64, integer=True)
SECONDS = Number("Max duration (s)", 5, 600)


@pytest.mark.parametrize(
    ("spec", "value", "clean"),
    [(MINI_BATCH, 16, 16), (MINI_BATCH, 16.0, 16), (MINI_BATCH, 1, 1), (MINI_BATCH, 64, 64), (SECONDS, 7.5, 7.5),
     (Choice("Mode", ("chunked", "stream")), "stream", "stream"), (Flag("persistent_states"), False, False)],
    ids=["int", "int-as-float", "low-bound", "high-bound", "float", "choice", "flag"],
)  # fmt: skip
def test_good_values_come_back_clean(spec, value, clean):
    got = spec.check(value)
    assert got == clean and type(got) is type(clean)


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [(SECONDS, math.nan, "must be a finite number, got nan"), (SECONDS, -math.inf, "finite"),
     (SECONDS, -1, "between 5 and 600, got -1"), (SECONDS, 601, "between 5 and 600"),
     (SECONDS, "120", "must be a number, got '120'"), (SECONDS, None, "must be a number"),
     (MINI_BATCH, 2.5, "must be a whole number, got 2.5"), (MINI_BATCH, 0, "between 1 and 64, got 0"),
     (MINI_BATCH, "abc", "must be a number, got 'abc'"), (MINI_BATCH, True, "must be a number"),
     (MINI_BATCH, [4], "must be a number"), (MINI_BATCH, 1e300, "between 1 and 64"),
     (SECONDS, 10**400, "between 5 and 600, got a huge number"),
     (Choice("Baseline checkpoint", ("a", "b")), ["a"], "must be one of: a, b; got ['a']"),
     (Choice("Baseline checkpoint", ("a", "b")), "../a", "must be one of"),
     (Choice("Baseline checkpoint", ("a", "b")), "x" * 500, "got 'xxxxx"),
     (Flag("persistent_states"), "false", "must be true or false"), (Flag("persistent_states"), 1, "true or false")],
    ids=["nan", "-inf", "negative", "over-cap", "string-number", "null", "2.5", "0", "abc", "bool", "list", "huge",
         "huge-int", "list-choice", "path-choice", "long-choice", "string-flag", "int-flag"],
)  # fmt: skip
def test_bad_values_get_one_sentence(spec, value, message):
    with pytest.raises(InputError, match="^" + spec.label.replace("(", r"\(").replace(")", r"\)")) as e:
        spec.check(value)
    text = str(e.value)
    assert message in text and text.endswith(".") and "\n" not in text and len(text) < 200


def test_audio_only_from_the_upload_folder_or_the_demo_clips(tmp_path):
    uploads, other = tmp_path / "uploads", tmp_path / "other"
    (uploads / "abc").mkdir(parents=True)
    other.mkdir()
    uploaded, demo, secret = uploads / "abc" / "clip.wav", other / "demo.wav", other / "secret.wav"
    for f in (uploaded, demo, secret):
        f.write_bytes(b"x")
    (uploads / "link.wav").symlink_to(secret)
    spec = AudioFile("Audio", roots=(str(uploads),), files=(str(demo),))
    assert spec.check(str(uploaded)) == str(uploaded.resolve())
    assert spec.check({"path": str(uploaded), "meta": {"_type": "gradio.FileData"}}) == str(uploaded.resolve())
    assert spec.check(str(demo)) == str(demo.resolve())
    refused = [str(secret), str(uploads / ".." / "other" / "secret.wav"), str(uploads / "link.wav"), "/etc/passwd",
               {"path": str(secret)}, {"url": "http://x"}, ["a"], 3, "a\x00b"]  # fmt: skip
    for value in refused:
        with pytest.raises(InputError, match="^Audio must be") as e:
            spec.check(value)
        assert str(tmp_path) not in str(e.value)
    with pytest.raises(InputError, match="no longer on the server; upload it again"):
        spec.check(str(uploads / "gone.wav"))
    with pytest.raises(InputError, match="Upload or record a clip first"):
        spec.check(None)


def test_validate_checks_every_value_in_order():
    specs = {"n": MINI_BATCH, "s": SECONDS}
    assert validate(specs, [4, 10]) == {"n": 4, "s": 10.0}
    with pytest.raises(InputError, match="Max duration"):
        validate(specs, [4, math.nan])
    with pytest.raises(InputError, match="expected 2 input values, got 3"):
        validate(specs, [4, 10, 1])


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda: Number("n", 5, 1), "minimum 5 is above maximum 1"), (lambda: Number("n", 1, 5, default=6), "default 6"),
     (lambda: Choice("c", ("a", "b"), default="z"), "default 'z' is not one of")],
    ids=["bounds", "number-default", "choice-default"],
)  # fmt: skip
def test_a_spec_whose_default_its_own_check_would_refuse_is_an_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_run_specs_defaults_are_values_they_accept():
    specs = run_specs(["fair_baseline", "ttt_j8"], ["/uploads"], [], max_seconds=60)
    defaults = raw_values(specs)[1:]  # the audio has no default
    assert validate(dict(list(specs.items())[1:]), defaults) == {
        "baseline": "fair_baseline", "ttt": "ttt_j8", "mini_batch_size": 16, "persistent_states": True,
        "mode": "chunked", "max_seconds": 60.0, "allow_silence": False, "readings": (),
    }  # fmt: skip
    # the bound over every kind of model (In-Place chunks of 256 included); each model's own range is checked later
    assert specs["mini_batch_size"].maximum == MAX_TOKENS
    assert run_specs([], [], [])["max_seconds"].maximum == MAX_SECONDS


def test_a_long_file_is_trimmed_to_the_limit_and_says_so(tmp_path):
    clip = tmp_path / "long.wav"
    sf.write(clip, speechlike(7.0, 1), SR)
    audio = load_audio(clip, max_seconds=5, trim=True)
    assert audio.duration_s == 5.0 and audio.trimmed_from_s == pytest.approx(7.0)
    assert load_audio(clip, max_seconds=10, trim=True).trimmed_from_s is None
    with pytest.raises(ValueError, match="longer than the limit of 5 s"):
        load_audio(clip, max_seconds=5)
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="max_seconds must be a positive finite number"):
            load_audio(clip, max_seconds=bad, trim=True)


def test_server_address_honours_the_gradio_variables_unless_flags_are_given():
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7879"}
    assert server.server_address(None, None, env) == ("0.0.0.0", 7879)
    assert server.server_address("127.0.0.2", 8000, env) == ("127.0.0.2", 8000)
    assert server.server_address(None, None, {}) == ("127.0.0.1", 7860)
    with pytest.raises(ValueError, match="GRADIO_SERVER_PORT must be a port number"):
        server.server_address(None, None, {"GRADIO_SERVER_PORT": "http"})


class Refused(Exception):
    """What the handler's `refuse` would raise (gr.Error), without Gradio."""


def sizes_of(params: dict[str, int]):
    """`zerogpu.cache_sizes` of a cache whose models of these names have these sizes (bfloat16: 2 bytes each)."""
    return lambda names: zerogpu.RunSize(tuple(params[n] for n in names), 2 * sum(params[n] for n in set(names)))


MOSHI_7B = {"baseline": MOSHI_7B_PARAMS, "ttt": MOSHI_7B_PARAMS + 217_000_000}  # TTT on 3 layers: +0.2e9
DEMO = {"baseline": 1_618_816, "ttt": 1_802_001}


def test_zerogpu_duration_grows_with_the_clip_and_stays_small_for_refused_inputs(tmp_path):
    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    sf.write(short, speechlike(2.0, 1), SR)
    sf.write(long, speechlike(20.0, 1), SR)
    specs = run_specs(["baseline", "ttt"], [str(tmp_path)], [])
    duration = zerogpu.gpu_duration(specs, sizes_of(MOSHI_7B), Refused)

    def seconds(clip, mode="chunked", max_seconds=600):  # called as ZeroGPU calls it: with the handler's arguments
        return duration(None, *raw_values(specs, audio={"path": str(clip)}, mode=mode, max_seconds=max_seconds))

    assert seconds(short) < seconds(long) < seconds(long, "live token by token")
    assert seconds(long, max_seconds=5) < seconds(long)  # the duration limit bounds it too
    start_s = zerogpu.GPU_START_S + 2 * sum(MOSHI_7B.values()) / zerogpu.GPU_TRANSFER_BYTES_PER_S
    per_token = sum(gpu_seconds_per_token(p, "chunked") for p in MOSHI_7B.values())
    assert seconds(long) == math.ceil(start_s + 20 * 12.5 * per_token)
    refused = [seconds("/etc/passwd"), seconds(long, max_seconds=math.nan), seconds(long, max_seconds="9")]
    assert refused == [math.ceil(start_s + 5 * 12.5 * per_token)] * 3
    assert seconds(long, mode=["x"]) == seconds(long)  # any JSON: no crash before the handler refuses it
    assert duration(None) == zerogpu.GPU_START_S  # no values: a refused run, no model named, nothing to score
    assert duration(None, *raw_values(specs)) == refused[0]  # no clip: refused before the models run
    more = compare_specs(specs, ["baseline", "ttt"])
    compare = zerogpu.gpu_duration(more, sizes_of(MOSHI_7B), Refused, runs=compared_runs,
                                   models=zerogpu.compare_models)  # fmt: skip
    given = raw_values(more, audio={"path": str(long)}, compare_checkpoints=["ttt"], compare_sizes=["4", "16"],
                       compare_persistence=["on", "off"])  # fmt: skip
    assert compare(None, *given) == math.ceil(start_s + 4 * 20 * 12.5 * per_token)
    assert compare(None, *raw_values(more, audio={"path": str(long)}, compare_sizes="x")) == seconds(long)


def test_zerogpu_duration_follows_the_models_chosen_and_refuses_what_cannot_fit(tmp_path):
    clip = tmp_path / "clip.wav"
    sf.write(clip, speechlike(180.0, 1), SR)
    specs = run_specs(["baseline", "ttt"], [str(tmp_path)], [])

    def seconds(params, mode="chunked", max_seconds=180):
        duration = zerogpu.gpu_duration(specs, sizes_of(params), Refused)
        return duration(None, *raw_values(specs, audio={"path": str(clip)}, mode=mode, max_seconds=max_seconds))

    # The demo models ask for the start-up allowance and next to nothing more, even live token by token...
    assert seconds(DEMO) <= seconds(DEMO, "live token by token") <= zerogpu.GPU_START_S + 15
    # ...Moshi 7B for much more: 3 minutes chunked fit, live token by token they do not.
    assert 40 < seconds(MOSHI_7B) < zerogpu.ZEROGPU_MAX_S
    with pytest.raises(Refused, match=r"more than the 300 s ZeroGPU grants one run: lower Max duration to \d+ s or"):
        seconds(MOSHI_7B, "live token by token")
    try:
        seconds(MOSHI_7B, "live token by token")
    except Refused as e:
        fits = int(str(e).split("lower Max duration to ")[1].split(" s")[0])
    assert 5 <= fits < 180  # what the sentence proposes fits, and a little more would not
    assert seconds(MOSHI_7B, "live token by token", max_seconds=fits) <= zerogpu.ZEROGPU_MAX_S
    with pytest.raises(Refused):
        seconds(MOSHI_7B, "live token by token", max_seconds=fits + 5)
    with pytest.raises(Refused, match="choose smaller models"):  # nothing fits: no duration to propose
        seconds({"baseline": 40 * MOSHI_7B_PARAMS, "ttt": 40 * MOSHI_7B_PARAMS}, "live token by token")


def test_zerogpu_sizes_come_from_the_models_loaded_at_start_up_and_never_load_one(assets):
    cache = ModelCache(build_allow_list([assets / "checkpoints"], use_env=False))
    sizes = zerogpu.cache_sizes(cache)
    assert sizes(["ttt"]) == zerogpu.RunSize((MOSHI_7B_PARAMS,), MOSHI_7B_WEIGHT_BYTES)  # not loaded: taken as 7B
    assert cache.loaded("ttt") is None  # ...and still not loaded
    ttt = cache.get("ttt")
    baseline = cache.get("baseline")
    sizes = zerogpu.cache_sizes(cache)  # read once, as the handler is built (on ZeroGPU: after the start-up loading)
    packed = weight_bytes(ttt.model, ttt.mimi, baseline.model, baseline.mimi)  # all loaded: a worker moves them all
    assert sizes(["ttt", "ttt"]) == zerogpu.RunSize((sum(p.numel() for p in ttt.model.parameters()),) * 2, packed)
    assert sizes(["baseline", "added"]).weight_bytes == packed + MOSHI_7B_WEIGHT_BYTES


def test_main_parses_dtype_queue_and_duration_flags(monkeypatch):
    seen = {}
    monkeypatch.setattr(server, "build_demo", lambda cache, examples, max_seconds, allow_hub: seen.update(
        cache=cache, max_seconds=max_seconds, allow_hub=allow_hub) or pytest.fail("stop"))  # fmt: skip
    with pytest.raises(pytest.fail.Exception):
        server.main(["--device", "cpu", "--dtype", "bfloat16", "--max-seconds", "30", "--threads", "1"])
    assert seen["max_seconds"] == 30 and seen["cache"].dtype == torch.bfloat16
    assert seen["allow_hub"] is False  # the hf:// field is off unless asked for
    with pytest.raises(pytest.fail.Exception):
        server.main(["--device", "cpu", "--threads", "1", "--allow-hub"])
    assert seen["cache"].dtype is None and seen["allow_hub"] is True  # auto: float32 for the demo models
    with pytest.raises(SystemExit):
        server.main(["--max-seconds", "nan"])


def test_main_serves_without_torch_compile_unless_the_device_is_cuda(monkeypatch):
    """The console script imports moshi before it can set NO_TORCH_COMPILE (as app.py does): it serves inside moshi's
    no_compile() instead."""
    from moshi.utils import compile as moshi_compile

    seen = []

    class Demo:
        def queue(self, **kwargs):
            pass

        def launch(self, **kwargs):
            seen.append(moshi_compile._compile_disabled)
            return None, "http://127.0.0.1:7860/", None

        def block_thread(self):
            pass

    monkeypatch.setattr(server, "build_demo", lambda *args, **kwargs: Demo())
    # moshi's own no_compile() blocks save and restore this global unlocked: concurrent runs of earlier tests can
    # leave it True. (Under main's outer no_compile() every save reads True, so it stays True while serving.)
    monkeypatch.setattr(moshi_compile, "_compile_disabled", False)
    monkeypatch.delenv("MOSHI_TTT_DEVICE", raising=False)
    server.main(["--device", "cpu", "--threads", "1"])
    monkeypatch.setenv("MOSHI_TTT_DEVICE", "cuda")
    server.main(["--device", "cpu", "--threads", "1"])
    assert seen == [True, False] and moshi_compile._compile_disabled is False


def test_readings_typed_for_an_own_upload():
    from moshi_ttt.app.inputs import Spans
    from moshi_ttt.reports.headline import Reading

    spec = Spans("Readings", maximum_s=60)
    assert spec.check("0.6-15.3, 21.3 - 35.9 s;45.2–59.8\n") == (
        Reading(1, 0.6, 15.3), Reading(2, 21.3, 35.9), Reading(3, 45.2, 59.8))  # fmt: skip
    assert spec.check("") == () and spec.check(None) == () and spec.check("  ") == ()
    bad_values = [
        ("1-2", "at least two readings"),
        ("1-2, 1.5-3", "starts before the one before it ends"),
        ("5-2, 6-7", "empty, reversed"),
        ("1-2, 3-61", "past 60 s"),
        ("a-b, 1-2", "is not a span"),
        (3, "must be text"),
        ("1-2," * 200, "longer than 400"),
        (",".join(["1-1.5"] * 21), "at most 20"),
    ]
    for bad, message in bad_values:  # fmt: skip
        with pytest.raises(InputError, match=message):
            spec.check(bad)


def test_several_choices_come_back_in_the_offered_order():
    from moshi_ttt.app.inputs import MultiChoice

    spec = MultiChoice("mini_batch_size values", ("1", "4", "16"), default=("4",), maximum=2)
    assert spec.check(["16", "1"]) == ("1", "16")
    bad_values = [
        (["16", "16"], "twice"),
        ([], "between 1 and 2"),
        (["1", "4", "16"], "between 1 and 2"),
        (["8"], "'8' is not one of: 1, 4, 16"),
        ("4", "must be a list"),
        ([4], "must be a list"),
    ]
    for bad, message in bad_values:
        with pytest.raises(InputError, match=message):
            spec.check(bad)
    with pytest.raises(ValueError, match="not among"):
        MultiChoice("x", ("a",), default=("b",))


def test_the_startup_line_names_the_checkpoints_device_and_address(cache):
    line = server.startup_line(cache, "cpu", torch.float32, "http://127.0.0.1:7860/", None, share=False)
    assert line.startswith("moshi-ttt app: serving baseline (") and "ttt (" in line and "on cpu (float32" in line
    assert line.endswith("open http://127.0.0.1:7860/ (add --share for a public link)")
    shared = server.startup_line(cache, "cuda", torch.bfloat16, "http://0.0.0.0:7860/", "https://x.gradio.live", True)
    assert shared.endswith("open http://0.0.0.0:7860/ or https://x.gradio.live") and "cuda (bfloat16)" in shared
