"""The app with In-Place TTT checkpoints (the In-Place fork's): paired with their base, the live figure's In-Place
rows and one-sentence verdicts, the tokens-per-update control as a chunk, YaRN and lora.safetensors pairings, and the
demo's two checkpoints (scripts/inplace_demo.py: the fork's tau = 1e-5 against a working clip) through Run."""

import json
import re
import shutil
from pathlib import Path

import gradio as gr
import pytest
import torch
from conftest import raw_values
from safetensors.torch import load_file, save_file
from test_codec import tiny_codec_config
from test_inplace import inplace_model
from tiny_models import random_audio_codes, tiny_lm, tiny_lm_config

from moshi_ttt import load, save, score
from moshi_ttt.app import layout, outputs
from moshi_ttt.app.compare import compare_settings, settings_grid
from moshi_ttt.app.compare_view import compare_figure
from moshi_ttt.app.engine import compare_live, live_options
from moshi_ttt.app.figure import FigureInfo, figure_dict
from moshi_ttt.app.handlers import run_handler, run_specs
from moshi_ttt.app.inplace_view import inplace_markdown
from moshi_ttt.app.inputs import InputError
from moshi_ttt.app.models import CheckpointMismatch, ModelCache, build_allow_list
from moshi_ttt.app.reopen import validate_document
from moshi_ttt.app.resources import RunFolders
from moshi_ttt.app.update_size import update_size
from moshi_ttt.data.codec import build_codec, save_codec
from moshi_ttt.reports.results import run_record, to_json_safe
from moshi_ttt.ttt.inplace import inplace_blocks
from scripts import inplace_demo

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo_assets"
CLIP = DEMO / "demo_repeat.wav"
FORK_DATA = Path(__file__).parent / "data" / "inplace_fork"
needs_demo = pytest.mark.skipif(not (DEMO / "fair_baseline").is_dir(), reason="demo_assets/ not built")


# ---- the demo: the fork's settings against a working clip, through the Run handler ----


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> ModelCache:
    """The demo assets and the two In-Place checkpoints of scripts/inplace_demo.py, as `--checkpoint-dir
    demo_assets --checkpoint-dir OUT` serves them."""
    out = tmp_path_factory.mktemp("inplace_demo")
    assert inplace_demo.main(["--out", str(out)]) == 0
    return ModelCache(build_allow_list([DEMO, out], use_env=False))


def run_demo(cache: ModelCache, ttt: str, tmp_path: Path, **given):
    """The Run handler's outputs, step by step (a generator: a refusal yields its outputs, then raises)."""
    specs = run_specs(cache.names(), [str(tmp_path)], [str(CLIP)])
    run = run_handler(cache, specs, RunFolders(tmp_path / "runs"))
    values = {"audio": str(CLIP), "baseline": "fair_baseline", "ttt": ttt, "max_seconds": 16, **given}
    return run(None, *raw_values(specs, **values))


@needs_demo
def test_the_demo_checkpoints_show_their_difference_in_drift_and_verdict(demo_cache, tmp_path):
    """16 s = 200 tokens, 3 chunks of 64: at tau = 1e-5 every update is ~5e-11 per entry, below float32 resolution
    (~1e-8 at a typical entry of the demo model), so w_down keeps all but the entries near 0; with tau = 100 float32
    keeps the updates and w_down drifts by ~1e-3 of its norm."""
    found = {}
    for name in ("fork_settings", "working_clip"):
        *_, last = run_demo(demo_cache, name, tmp_path / name, mini_batch_size=64)
        figure, status, headline, downloads = json.loads(last[0].plot), last[1], last[2], last[5]
        assert status.startswith("Done: 200 / 200 tokens")
        document = json.loads(Path(next(p for p in downloads if p.endswith("results.json"))).read_text())
        inplace = document["runs"]["ttt"]["inplace"]  # results.json of the app's download, as the CLI's
        assert sorted(inplace) == ["1", "3"] and all(rec["updates"] == 3 for rec in inplace.values())
        assert "inplace" not in document["runs"]["baseline"]
        rows = {(trace["name"], trace["line"]["dash"]): trace for trace in figure["data"]
                if trace.get("yaxis") in ("y3", "y4")}  # fmt: skip
        assert rows["relative drift", "solid"]["yaxis"] == "y3" and rows["lr * clipped update", "dash"]["yaxis"] == "y4"
        assert rows["float32 resolution x √entries", "dash"]["hovertemplate"].startswith("layer 3: ")
        assert sum(trace["showlegend"] for trace in rows.values()) == len(rows) // 2  # one entry for both layers
        assert "layer 1 solid, layer 3 dash" in figure["layout"]["annotations"][2]["text"]
        assert figure["layout"]["yaxis3"]["type"] == figure["layout"]["yaxis4"]["type"] == "log"
        found[name] = (inplace, headline, document["config"]["notes"]["ttt"], rows)
    fork, fork_headline, fork_notes, fork_rows = found["fork_settings"]
    clip, clip_headline, clip_notes, clip_rows = found["working_clip"]
    for layer in ("1", "3"):
        assert fork[layer]["clip"] == 1e-5 and clip[layer]["clip"] == 100.0
        assert max(fork[layer]["drift_relative"]) < 1e-8 < 1e-4 < clip[layer]["drift_relative"][-1]
        assert fork[layer]["drift_error_relative"][-1] > 0.5 > 1e-3 > clip[layer]["drift_error_relative"][-1]
        assert max(fork[layer]["changed_fraction"]) < 0.02 and min(clip[layer]["changed_fraction"]) > 0.5
        assert set(clip[layer]["clip_factor"]) == {1.0} and max(fork[layer]["clip_factor"]) < 1e-3
        fork_line = rf"- layer {layer}: update 5e-11 per entry, below float32 resolution \(([0-9.]+e-[0-9]+)\) for all"
        resolution = re.search(fork_line, fork_headline)
        assert resolution and 1e-9 < float(resolution.group(1)) < 1e-7, fork_headline
        assert f"- layer {layer}: update " in clip_headline and "above float32 resolution" in clip_headline
    assert "float32 kept the updates and the fast weight moved" in clip_headline
    assert "below float32 resolution" not in clip_headline + " ".join(clip_notes)
    assert sum("below float32 resolution" in note for note in fork_notes) == 2  # the notes say it too, per layer
    steps = ("step kept by float32", "solid")  # layer 1
    assert max(fork_rows[steps]["y"]) < 1e-7 < min(clip_rows[steps]["y"])


@needs_demo
def test_the_control_is_the_in_place_chunk_and_refuses_what_a_model_cannot_take(demo_cache, tmp_path):
    assert demo_cache.mini_batch_size("fork_settings") == 64 and demo_cache.mini_batch_size("ttt") == 16
    size = layout.update_size_of(demo_cache, "working_clip", "fair_baseline")
    assert (size.kind, size.label, size.default) == ("chunk", "In-Place chunk size (tokens per update)", 64)
    assert layout.update_control(size)["value"] == 64 and "chunk is 64" in layout.update_control(size)["info"]
    assert layout.update_control(layout.update_size_of(demo_cache, "ttt"))["value"] == 16
    assert layout.update_size_of(demo_cache, "fair_baseline").kind == "none"
    with pytest.raises(InputError, match=r"^TTT mini_batch_size of checkpoint 'ttt' must be between 1 and 64, got 256"):
        update_size(demo_cache.get("ttt").model).check(256, "ttt")
    refused = run_demo(demo_cache, "ttt", tmp_path, mini_batch_size=256)
    assert next(refused)[1] == "Not scored: TTT mini_batch_size of checkpoint 'ttt' must be between 1 and 64, got 256."
    with pytest.raises(gr.Error):
        next(refused)
    *_, last = run_demo(demo_cache, "working_clip", tmp_path, mini_batch_size=256)  # an In-Place chunk of 256
    document = json.loads(Path(next(p for p in last[5] if p.endswith("results.json"))).read_text())
    assert {rec["chunk_size"] for rec in document["runs"]["ttt"]["inplace"].values()} == {256}
    assert "no chunk update yet (one every 256 tokens)" in last[2]
    figure = json.loads(last[0].plot)
    assert any("every In-Place chunk" in a["text"] or "one In-Place chunk" in a["text"]
               for a in figure["layout"]["annotations"])  # fmt: skip


@needs_demo
def test_compare_settings_shows_the_in_place_drift_on_a_log_row(demo_cache):
    settings = settings_grid(("fork_settings", "working_clip"), (64,), (True,))
    *_, last = compare_settings(demo_cache, str(CLIP), "fair_baseline", settings, 16)
    figure = compare_figure(last.document, last.settings)
    assert figure["layout"]["yaxis3"]["type"] == "log"
    drift = {trace["name"]: trace["y"] for trace in figure["data"] if trace["yaxis"] == "y3"}
    assert max(drift[settings[0].name]) < 1e-8 < 1e-4 < min(drift[settings[1].name])  # tau = 1e-5 against 100


@needs_demo
def test_live_updates_say_what_the_fast_weight_did_so_far(demo_cache):
    codes = random_audio_codes(1, 150, seed=3, card=demo_cache.get("fair_baseline").model.card)
    options = live_options("stream", None, True).replace(record_every=10)
    updates = list(compare_live(demo_cache, "fair_baseline", "working_clip", codes, options, min_interval_s=0.0))
    live = [u for u in updates if not u.complete]
    first = next(u for u in live if u.inplace and u.inplace["1"]["updates"])
    assert first.tokens_done < 150 and first.inplace["1"]["t"] == [64]
    shown = outputs.live(first, outputs.LiveFigure(FigureInfo(mini_batch_size=64)))
    assert shown.headline.startswith("**In-Place fast weight w_down** (so far)") and "- layer 3:" in shown.headline
    assert updates[-1].inplace["1"]["t"] == [64, 128]


# ---- the view alone: verdicts, figure, reopening ----


def test_a_fast_weight_that_never_changed_says_so_in_the_verdict():
    """tiny_lm with w_down entries of size 1 at the fork's tau and lr: every update rounds away (test_inplace)."""
    model = inplace_model(lr=1e-3, clip=1e-5)
    with torch.no_grad():
        for block in inplace_blocks(model).values():
            block.w_down.copy_(torch.where(block.w_down >= 0, 1.0, -1.0))
    record = run_record(score(model, random_audio_codes(1, 40, seed=8), mode="chunked", chunk_size=7), checkpoint="x")
    text = inplace_markdown(record["inplace"], done=True)
    assert text.splitlines()[2:] == [
        f"- layer {layer}: update 3e-10 per entry, below float32 resolution (6e-08): the fast weight never changed "
        "(5 chunk updates, lr = 0.001, clip tau = 1e-05)."
        for layer in (1, 2)
    ]
    figure = figure_dict({"ttt": record["loss_per_token"]}, {}, inplace=record["inplace"], total_tokens=40)
    steps = next(t for t in figure["data"] if t.get("name") == "step kept by float32")
    assert steps["y"] == [None] * 5  # zeros: gaps on the log axis
    assert inplace_markdown({}, done=True) == ""


def test_a_reopened_results_json_shows_the_in_place_rows_and_verdicts():
    record = run_record(score(inplace_model(), random_audio_codes(1, 40, seed=8), mode="full"), checkpoint="x")
    document = {"version": 2, "audio": {"name": "clip.wav"}, "runs": {"ttt": to_json_safe(record)}}
    clean = validate_document(document)
    assert clean["runs"]["ttt"]["inplace"]["1"]["changed_any"] and clean["runs"]["ttt"]["inplace"]["1"]["updates"] == 5
    shown = outputs.reopened(clean, "results.json")
    assert "float32 kept the updates" in shown.headline
    assert json.loads(shown.figure)["layout"]["yaxis4"]["type"] == "log"
    document["runs"]["ttt"]["inplace"]["1"]["update_norm"][0] = None
    with pytest.raises(InputError, match=r"inplace\[1\]\.update_norm must hold a number for every update"):
        validate_document(document)
    document["runs"]["ttt"]["inplace"]["1"]["update_norm"][0] = "x"
    with pytest.raises(InputError, match="update_norm holds 'x'"):
        validate_document(document)


# ---- pairings: lora.safetensors over the baseline, YaRN's longer window ----


@pytest.fixture(scope="module")
def fork_cache(tmp_path_factory) -> ModelCache:
    """The In-Place fork's tiny checkpoints (tests/data/inplace_fork) beside their base, a moshi-format directory
    with a small codec, as a server's --checkpoint-dir would hold them."""
    root = tmp_path_factory.mktemp("fork_app")
    config = tiny_codec_config(transformer=False)
    torch.manual_seed(0)
    save_codec(root / "codec", build_codec(config), config)
    tensors = load_file(str(FORK_DATA / "full_yarn" / "consolidated.safetensors"))
    base = {k: v for k, v in tensors.items() if ".gating.w_down" not in k and ".target_generator." not in k}
    save_file(base, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(tiny_lm_config(card=16)))  # moshi's format, then ours with a codec
    save(root / "checkpoints" / "fork_base", load(str(root)).model, lm_config=tiny_lm_config(card=16),
         mimi_ref="../../codec")  # fmt: skip
    other = root / "checkpoints" / "other_base"  # a plain model of another vocabulary
    save(other, tiny_lm(0, card=17), lm_config=tiny_lm_config(card=17), mimi_ref="../../codec")
    for name in ("ttt_only_lora", "lora_ttt_yarn", "full_yarn"):
        copy = root / "checkpoints" / name
        shutil.copytree(FORK_DATA / name, copy, ignore=shutil.ignore_patterns("fork_outputs*"))
        raw = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**raw, "mimi_name": "../../codec"}))  # else moshi's, on the Hub
    return ModelCache(build_allow_list([root / "checkpoints"], use_env=False))


def test_a_lora_layout_checkpoint_loads_over_the_baseline_and_leaves_it_alone(fork_cache):
    with pytest.raises(CheckpointMismatch, match="lora.safetensors layout: it holds only what it changes and loads "
                       "over its base model; choose that base as the baseline"):  # fmt: skip
        fork_cache.get("ttt_only_lora")
    base = fork_cache.get("fork_base").model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = fork_cache.get("ttt_only_lora", base="fork_base")
    assert loaded.kind == "inplace_ttt" and sorted(inplace_blocks(loaded.model)) == [1, 2]
    assert fork_cache.get("ttt_only_lora", base="fork_base") is loaded  # loaded once per pair
    assert fork_cache.mini_batch_size("ttt_only_lora", base="fork_base") == 8
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    shared = dict(loaded.model.named_parameters())["transformer.layers.0.self_attn.in_projs.0.weight"]
    assert shared.data_ptr() == base.transformer.layers[0].self_attn.in_projs[0].weight.data_ptr()
    with pytest.raises(CheckpointMismatch, match="loads over a plain model, but the baseline 'full_yarn' has TTT"):
        fork_cache.get("ttt_only_lora", base="full_yarn")
    with pytest.raises(CheckpointMismatch) as refused:
        fork_cache.get("ttt_only_lora", base="other_base")
    assert str(refused.value) == (
        "checkpoint 'ttt_only_lora' does not load over the baseline 'other_base': ttt_only_lora and the base "
        "other_base disagree on card: 16 vs 17."
    )  # the names the user chose, no server path


@pytest.mark.parametrize("ttt", ["full_yarn", "lora_ttt_yarn"], ids=["consolidated", "lora_over_the_baseline"])
def test_yarn_checkpoints_are_compared_with_a_note_on_their_longer_window(fork_cache, ttt):
    """The fork's inference attends over context x scale (16 x 4 here): compared, with a note that says so."""
    codes = random_audio_codes(1, 30, seed=5, card=16)
    last = list(compare_live(fork_cache, "fork_base", ttt, codes, live_options("chunked", None, True)))[-1]
    notes = last.document["config"]["notes"]["ttt"]
    assert (f"The TTT checkpoint {ttt!r} attends over 64 tokens (the In-Place fork's YaRN, scale 4: its context "
            "times the scale, as its inference), the baseline 'fork_base' over 16: where one window reaches further "
            "back than the other, attention differs as well as TTT.") in notes  # fmt: skip
    assert last.document["runs"]["ttt"]["context_tokens"] == 64
    assert {rec["updates"] for rec in last.inplace.values()} == {3}  # 30 tokens, chunks of 8


def test_updates_below_resolution_whose_sum_float32_keeps_are_not_called_lost_nor_above_resolution():
    """The demo at tau = 1e-5 over 60 s: each update is 5e-11 per entry, but W = W0 + lr S rounds once, and after
    46 updates float32 keeps most of the sum in one layer (measured: 22% off). The sentence says just that."""
    rec = {"t": [64, 128], "updates": 2, "update_norm": [1e-8, 1e-8], "update_per_entry": [5e-11, 5e-11],
           "float32_resolution": 6e-9, "changed_any": True, "changed_fraction": [0.01, 0.3],
           "drift_error_relative": [0.9, 0.22], "drift": [1e-9, 1.4e-7], "drift_intended": [1e-8, 1.6e-7],
           "drift_relative": [1e-11, 1e-8], "clip_factor": [2.6e-7, 3e-7], "lr": 1e-3, "clip": 1e-5,
           "chunk_size": 64}  # fmt: skip
    assert inplace_markdown({"3": rec}, done=True).splitlines()[2] == (
        "- layer 3: each update (5e-11 per entry) is below float32 resolution (6e-09), but the fast weight is W0 + lr "
        "x their sum, rounded once, so float32 keeps more of it as the sum grows: the stored drift (1.4e-07) is 22% "
        "off the 1.6e-07 the updates add up to (relative drift 1.0e-08, clip factor 2.6e-07 at its smallest; 2 chunk "
        "updates, lr = 0.001, clip tau = 1e-05)."
    )
