"""The app's In-Place paths as a user or an attacker calls them through the public API (raw JSON, `preprocess=False`):
every value gives one sentence or a correct run, never a traceback or a server path. Also: hf:// lora.safetensors
checkpoints over the chosen baseline (an offline Hub cache, nothing downloaded), the Compare tab's sizes named per
model, and the In-Place numbers of the three modes and the app's live path for a chunk that does not divide T."""

import json
import shutil
from pathlib import Path

import gradio as gr
import pytest
import soundfile as sf
import torch
from conftest import raw_values, speechlike
from test_app_inplace import FORK_DATA, fork_cache  # noqa: F401 (the fork's tiny checkpoints beside their base)
from tiny_models import random_audio_codes

from bench.hub_cache import snapshot_dir
from moshi_ttt import score
from moshi_ttt.app import layout
from moshi_ttt.app.compare import settings_grid
from moshi_ttt.app.compare_view import compare_rows
from moshi_ttt.app.engine import LIVE_CHUNK_TOKENS, compare_live, live_options
from moshi_ttt.app.handlers import add_hub_checkpoint, compare_handler, compare_specs, run_handler, run_specs
from moshi_ttt.app.inputs import InputError
from moshi_ttt.app.models import CheckpointMismatch, CheckpointUnavailable, ModelCache, build_allow_list
from moshi_ttt.app.resources import RunFolders
from moshi_ttt.app.update_size import UpdateSize
from moshi_ttt.data.checkpoints.inplace_format import InPlaceOptions, inplace_config, yarn_config
from moshi_ttt.ttt.inplace import inplace_blocks

HUB_LORA = "hf://someone/inplace-ttt-lora"
LORA_NAME = "someone/inplace-ttt-lora"
SECONDS = 2.0  # of audio: 25 tokens under the tiny codec (12.5 Hz)
T = 25


@pytest.fixture
def hub_cache(fork_cache, offline_hub_cache) -> ModelCache:  # noqa: F811
    """The fork's ttt_only_lora checkpoint as a Hub repo in an offline cache (`hf download someone/inplace-ttt-lora`
    would put it there), beside the local checkpoints; the fork's default base (kyutai's) is not in the cache."""
    snapshot = snapshot_dir(offline_hub_cache, LORA_NAME)
    for name in ("config.json", "lora.safetensors"):
        shutil.copy(FORK_DATA / "ttt_only_lora" / name, snapshot / name)
    bad = snapshot_dir(offline_hub_cache, "someone/bad-config")  # a full In-Place checkpoint whose chunk is a list
    shutil.copy(FORK_DATA / "full_yarn" / "consolidated.safetensors", bad / "consolidated.safetensors")
    raw = json.loads((FORK_DATA / "full_yarn" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "ttt_config": {**raw["ttt_config"], "chunk_size": [8]}}))
    refs = [HUB_LORA, "hf://someone/missing", "hf://someone/bad-config"]
    return ModelCache({**fork_cache.allow_list, **build_allow_list([], refs, use_env=False)})


def test_a_hub_lora_checkpoint_loads_over_the_chosen_baseline(hub_cache):
    with pytest.raises(CheckpointMismatch, match="lora.safetensors layout: it holds only what it changes"):
        hub_cache.get(LORA_NAME)  # not over the fork's default base from the Hub: over the run's baseline only
    base = hub_cache.get("fork_base").model
    loaded = hub_cache.get(LORA_NAME, base="fork_base")
    assert loaded.kind == "inplace_ttt" and sorted(inplace_blocks(loaded.model)) == [1, 2]
    shared = dict(loaded.model.named_parameters())["transformer.layers.0.self_attn.in_projs.0.weight"]
    assert shared.data_ptr() == base.transformer.layers[0].self_attn.in_projs[0].weight.data_ptr()
    local = hub_cache.get("ttt_only_lora", base="fork_base").model  # the same files, from a local folder
    codes = random_audio_codes(1, 30, seed=2, card=16)
    torch.testing.assert_close(score(loaded.model, codes).loss, score(local, codes).loss, rtol=0, atol=0,
                               equal_nan=True)  # fmt: skip
    with pytest.raises(CheckpointMismatch) as refused:
        hub_cache.get(LORA_NAME, base="other_base")
    assert str(refused.value) == (
        f"checkpoint {LORA_NAME!r} does not load over the baseline 'other_base': {LORA_NAME} and the base "
        "other_base disagree on card: 16 vs 17."
    )  # no snapshot path of the server's Hub cache
    last = list(compare_live(hub_cache, "fork_base", LORA_NAME, codes, live_options("chunked", None, True)))[-1]
    assert {rec["updates"] for rec in last.document["runs"]["ttt"]["inplace"].values()} == {3}


def test_a_hub_checkpoint_the_server_cannot_have_is_one_sentence(hub_cache):
    with pytest.raises(CheckpointUnavailable) as refused:
        hub_cache.get("someone/missing", base="fork_base")
    assert str(refused.value) == (
        "checkpoint 'someone/missing' cannot be loaded: cannot download config.json from the Hugging Face Hub repo "
        "someone/missing."
    )
    assert layout.update_size_of(hub_cache, "someone/missing", "fork_base").kind == "none"  # the dropdown's change


def test_a_hub_checkpoint_with_a_config_the_loader_refuses_is_one_sentence(hub_cache, clip):
    """With --allow-hub any user chooses the files: the loader's refusal reaches them as a sentence, without paths."""
    assert refusal(run_event(hub_cache, clip, ttt="someone/bad-config")) == (
        "checkpoint 'someone/bad-config' cannot be loaded: ttt_config.chunk_size must be a finite number, got [8]."
    )


CONFIG_VALUES = [None, "8", "NaN", float("nan"), float("inf"), [8], {}, True, 2.5]


@pytest.mark.parametrize("key", ["layer_frequency", "start_layer", "chunk_size", "learning_rate", "conv_kernel_size",
                                 "delta_clip_epsilon"])  # fmt: skip
def test_the_fork_config_numbers_are_numbers(key):
    """config.json's ttt_config and yarn_config: a value that is not a (finite, whole where it must be) number is a
    ValueError naming it, never a TypeError, an OverflowError or a silent int(2.5) = 2."""
    section = {"enabled": True, "layer_frequency": 1, "start_layer": 1, "chunk_size": 8, "learning_rate": 0.05}
    for value in CONFIG_VALUES:
        if key in ("learning_rate", "delta_clip_epsilon") and value == 2.5:
            continue  # a float where a float belongs
        with pytest.raises(ValueError, match=f"ttt_config.{key} must be|InPlaceConfig"):
            inplace_config({**section, key: value}, 3)
    assert inplace_config({**section, "chunk_size": 8.0}, 3).chunk_size == 8
    yarn = {"enabled": True, "scale": 4.0, "original_max_seq_len": 8}
    for key in ("scale", "original_max_seq_len", "beta_fast", "mscale"):
        for value in CONFIG_VALUES:
            if key != "original_max_seq_len" and value == 2.5:
                continue
            with pytest.raises(ValueError, match=f"yarn_config.{key} must be|YarnConfig"):
                yarn_config({**yarn, key: value}, {"context": 16}, InPlaceOptions())


# ---- the Run and Compare events with raw values ----


@pytest.fixture
def clip(tmp_path) -> Path:
    sf.write(tmp_path / "clip.wav", speechlike(SECONDS, 1), 24_000)
    return tmp_path / "clip.wav"


def run_event(cache: ModelCache, clip: Path, **given):
    specs = run_specs(cache.names(), [str(clip.parent)], [])
    run = run_handler(cache, specs, RunFolders(clip.parent / "runs"))
    values = {"audio": str(clip), "baseline": "fork_base", "ttt": "ttt_only_lora", "max_seconds": 5, **given}
    return run(None, *raw_values(specs, **values))


def refusal(outputs) -> str:
    """The one sentence a refused event shows (its status line), after checking that it then raises gr.Error."""
    status = next(outputs)[1]
    with pytest.raises(gr.Error):
        next(outputs)
    assert status.startswith("Not scored: ") and status.count(". ") == 0 and status.endswith(".")
    assert "/tmp" not in status and "/root" not in status and "Traceback" not in status
    return status.removeprefix("Not scored: ")


NOT_A_SIZE = [None, -1, 0, 1025, "NaN", float("nan"), float("inf"), [8], {"a": 1}, 2.5, True, 10**30, "8"]


@pytest.mark.parametrize("size", NOT_A_SIZE, ids=[repr(v)[:12] for v in NOT_A_SIZE])
def test_a_chunk_size_that_is_not_one_is_one_sentence(fork_cache, clip, size):  # noqa: F811
    assert refusal(run_event(fork_cache, clip, mini_batch_size=size)).startswith("TTT mini_batch_size must be")


BAD_PAIRS = [
    ({"ttt": None}, "TTT checkpoint must be one of: "),
    ({"ttt": ["ttt_only_lora"]}, "TTT checkpoint must be one of: "),
    ({"ttt": "../ttt_only_lora"}, "TTT checkpoint must be one of: "),
    ({"baseline": 5}, "Baseline checkpoint must be one of: "),
    ({"baseline": None}, "Baseline checkpoint must be one of: "),  # a lora checkpoint without a baseline
    ({"baseline": "nope"}, "Baseline checkpoint must be one of: "),
    ({"baseline": "ttt_only_lora"}, "checkpoint 'ttt_only_lora' is an In-Place TTT checkpoint in the fork's "),
    (
        {"baseline": "full_yarn"},
        "checkpoint 'ttt_only_lora' (In-Place TTT, lora.safetensors layout) loads over a "
        "plain model, but the baseline 'full_yarn' has TTT layers",
    ),  # fmt: skip
    ({"baseline": "other_base"}, "checkpoint 'ttt_only_lora' does not load over the baseline 'other_base': "),
]


@pytest.mark.parametrize("given, sentence", BAD_PAIRS, ids=[str(g)[:30] for g, _ in BAD_PAIRS])
def test_checkpoints_that_cannot_be_run_together_are_one_sentence(fork_cache, clip, given, sentence):  # noqa: F811
    assert refusal(run_event(fork_cache, clip, **given)).startswith(sentence)


def finished(outputs) -> dict:
    *_, last = outputs
    assert last[1].startswith(f"Done: {T} / {T} tokens"), last[1]
    return json.loads(Path(next(p for p in last[5] if p.endswith("results.json"))).read_text())


@pytest.mark.parametrize("size", [1, 7, T + 1, 1024], ids=["1", "7-not-a-divisor", "T+1", "1024"])
def test_every_chunk_size_the_control_offers_runs_correctly(fork_cache, clip, size):  # noqa: F811
    document = finished(run_event(fork_cache, clip, mini_batch_size=size, mode="whole sequence"))
    inplace = document["runs"]["ttt"]["inplace"]
    assert {rec["chunk_size"] for rec in inplace.values()} == {size}
    assert {rec["updates"] for rec in inplace.values()} == {T // size}  # no update for a chunk longer than T


def test_a_yarn_checkpoint_over_a_baseline_of_another_context_runs_with_a_note(fork_cache, clip):  # noqa: F811
    document = finished(run_event(fork_cache, clip, ttt="full_yarn", mini_batch_size=8))
    assert any("attends over 64 tokens" in note for note in document["config"]["notes"]["ttt"])


def test_the_dropdown_events_take_any_json(fork_cache):  # noqa: F811
    """The checkpoint dropdowns' change events are public too: any value gives the plain control, no error."""
    for ttt, baseline in (("ttt_only_lora", ["fork_base"]), ("ttt_only_lora", "nope"), (["x"], None), ({}, {}),
                          ("ttt_only_lora", None), ("ttt_only_lora", "ttt_only_lora")):  # fmt: skip
        assert layout.update_size_of(fork_cache, ttt, baseline).kind == "none"
        assert layout.persistence_note(fork_cache, ttt, baseline).startswith("persistent_states: on, the fast")
    assert layout.update_size_of(fork_cache, "ttt_only_lora", "fork_base").kind == "chunk"
    assert layout.compare_sizes_label(fork_cache, ["ttt_only_lora"], "fork_base") == "In-Place chunk sizes " \
        "(tokens per update)"  # fmt: skip
    for chosen in ("ttt_only_lora", None, [3], ["nope"]):
        assert layout.compare_sizes_label(fork_cache, chosen, "fork_base") == "TTT mini_batch_size values"


def test_hub_references_added_by_users_can_be_run_and_never_replace_a_checkpoint(fork_cache):  # noqa: F811
    """--allow-hub: a reference added while the app runs is offered by the dropdowns and accepted by the Run and
    Compare events (their specs hold the cache's live names); a name taken by another checkpoint is never replaced."""
    cache = ModelCache(dict(fork_cache.allow_list))
    cache.allow_list["someone/repo"] = build_allow_list([], ["hf://other/thing"], use_env=False)["other/thing"]
    specs = run_specs(cache.live_names(), ["/uploads"], [])
    more = compare_specs(specs, cache.live_names())
    add = add_hub_checkpoint(cache)
    *_, note = add("hf://someone/repo")
    assert note == "Added hf://someone/repo as someone/repo (2): choose it in the dropdowns."
    assert cache.allow_list["someone/repo"].ref == "hf://other/thing"
    assert add("hf://someone/repo")[2].endswith("as someone/repo (2): choose it in the dropdowns.")  # once
    assert specs["ttt"].check("someone/repo (2)") == specs["baseline"].check("someone/repo (2)") == "someone/repo (2)"
    assert more["compare_checkpoints"].check(["someone/repo (2)"]) == ("someone/repo (2)",)
    for bad in (["someone/repo (2)"], {"a": 1}, None, "someone/repo (3)"):
        with pytest.raises(InputError, match="TTT checkpoint must be one of: "):
            specs["ttt"].check(bad)


def compare_event(cache: ModelCache, clip: Path, **given):
    specs = compare_specs(run_specs(cache.names(), [str(clip.parent)], []), cache.names())
    compare = compare_handler(cache, specs, RunFolders(clip.parent / "compare"))
    values = {"audio": str(clip), "baseline": "fork_base", "max_seconds": 5, "compare_persistence": ["on"], **given}
    return compare(None, *raw_values(specs, **values))


def test_compare_names_in_place_sizes_chunks_and_refuses_what_a_model_cannot_take(fork_cache, clip):  # noqa: F811
    events = compare_event(fork_cache, clip, compare_checkpoints=["ttt_only_lora", "full_yarn"], compare_sizes=["4"])
    *_, last = events
    assert last[0].startswith("Done: 2 of 2 settings"), last[0]
    assert "| ttt\\_only\\_lora · chunk=4 · persistent | ttt\\_only\\_lora | chunk=4 | on |" in last[2]
    grid = settings_grid(("a", "b"), (4,), (True,), chunked=("b",))
    assert [s.name for s in grid] == ["a · b=4 · persistent", "b · chunk=4 · persistent"]
    refused = compare_event(fork_cache, clip, baseline="ttt_only_lora", compare_checkpoints=["full_yarn"])
    status = next(refused)[0]
    assert status.startswith("Not compared: checkpoint 'ttt_only_lora' is an In-Place TTT checkpoint")
    with pytest.raises(gr.Error):
        next(refused)
    for sizes, sentence in ((["3"], "mini_batch_size or In-Place chunk sizes: '3' is not one of"),
                            ("4", "mini_batch_size or In-Place chunk sizes must be a list")):  # fmt: skip
        status = next(compare_event(fork_cache, clip, compare_checkpoints=["full_yarn"], compare_sizes=sizes))[0]
        assert status.startswith(f"Not compared: {sentence}")
    assert compare_rows({"runs": {}}, grid, False) == []


def test_compare_refuses_a_size_a_compared_model_does_not_take_before_scoring(fork_cache, clip, monkeypatch):  # noqa: F811
    """An older-fork checkpoint takes its own mini-batch only (update_size.py): refused before anything is scored,
    as the Run tab refuses it, rather than failing half-way through the settings."""
    from moshi_ttt.app import handlers

    fixed = UpdateSize("legacy", "TTT mini_batch_size", 16, 16, 16, "fixed at 16 by this older-fork checkpoint")
    monkeypatch.setattr(handlers, "update_size", lambda model: fixed)
    events = compare_event(fork_cache, clip, compare_checkpoints=["full_yarn"], compare_sizes=["4", "16"])
    assert next(events)[0] == (
        "Not compared: checkpoint 'full_yarn' is a TTT checkpoint of the older fork: its mini-batch size (16) is part "
        "of its math; set TTT mini_batch_size to 16, got 4."
    )


# ---- the same In-Place numbers in every mode and in the app's live path ----


def test_modes_and_the_live_path_agree_for_a_chunk_that_does_not_divide_t(fork_cache):  # noqa: F811
    """float64 model, T = 70 past the YaRN context (64), In-Place chunks of 9 (70 = 7 x 9 + 7): full, chunked (the
    app's 25 and 4, both cutting the update chunks) and stream give the same losses and drift; so do the app's three
    live modes (SharedModelRun, iter_score's partial results)."""
    cache = ModelCache(fork_cache.allow_list, dtype=torch.float64)
    model = cache.get("full_yarn").model
    assert next(iter(inplace_blocks(model).values())).w_down.dtype == torch.float64 and model.context == 64
    codes = random_audio_codes(1, 70, seed=11, card=16)
    full = score(model, codes, mode="full", mini_batch_size=9)
    first = min(full.telemetry.inplace)
    steps = full.telemetry.inplace[first].update_step.tolist()
    assert steps == [9, 18, 27, 36, 45, 54, 63]
    for mode, chunk in (("chunked", LIVE_CHUNK_TOKENS), ("chunked", 4), ("stream", None)):
        other = score(model, codes, mode=mode, chunk_size=chunk, mini_batch_size=9)
        torch.testing.assert_close(other.loss, full.loss, rtol=1e-6, atol=1e-6, equal_nan=True)  # float32 losses
        for layer, tel in full.telemetry.inplace.items():
            assert other.telemetry.inplace[layer].update_step.tolist() == steps
            torch.testing.assert_close(other.telemetry.inplace[layer].drift, tel.drift, rtol=1e-12, atol=1e-15)
    no_update = score(model, codes, mode="full", mini_batch_size=71)  # the update matters: the above could fail
    assert (no_update.loss - full.loss).nan_to_num().abs().max() > 1e-4
    expected = full.loss_per_token[0].double()
    for mode in ("stream", "chunked", "full"):
        last = list(compare_live(cache, "fork_base", "full_yarn", codes, live_options(mode, 9, True)))[-1]
        run = last.document["runs"]["ttt"]
        got = torch.tensor([float("nan") if v is None else v for v in run["loss_per_token"]], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
        record = run["inplace"][str(first)]
        assert record["t"] == steps and record["chunk_size"] == 9
        drift = torch.tensor(record["drift"], dtype=torch.float64)
        torch.testing.assert_close(drift, full.telemetry.inplace[first].drift[0].double(), rtol=1e-12, atol=1e-15)


def test_the_control_never_offers_a_chunk_the_run_event_refuses():
    """A checkpoint whose chunk is above the Run event's bound (MAX_TOKENS) starts the control at that bound and
    says so, rather than offering a value the server refuses."""
    from tiny_models import tiny_lm

    from moshi_ttt.app.update_size import MAX_TOKENS, update_size
    from moshi_ttt.config import InPlaceConfig
    from moshi_ttt.ttt.inplace import apply_inplace

    size = update_size(apply_inplace(tiny_lm(0), InPlaceConfig(layers=(1,), chunk_size=2048)))
    assert (size.default, size.maximum) == (MAX_TOKENS, MAX_TOKENS) == (1024, 1024)
    assert size.info.endswith("this checkpoint's chunk is 2048, above the app's 1024: runs here use at most 1024")
    spec = run_specs(["a"], [], [])["mini_batch_size"]
    assert spec.maximum == size.maximum and size.check(1024, "x") == spec.check(1024) == 1024
    with pytest.raises(InputError, match="must be between 1 and 1024, got 1025"):
        spec.check(1025)


def test_start_up_loading_leaves_a_hub_lora_checkpoint_to_its_first_run(fork_cache, offline_hub_cache):  # noqa: F811
    """needs_base looks into hf:// references too: the start-up loading (app/startup.preload) does not load a Hub
    In-Place lora checkpoint over the fork's default base (not in the cache here), and its first run pairs it."""
    from moshi_ttt.app.startup import preload

    snapshot = snapshot_dir(offline_hub_cache, LORA_NAME)
    for name in ("config.json", "lora.safetensors"):
        shutil.copy(FORK_DATA / "ttt_only_lora" / name, snapshot / name)
    cache = ModelCache({"fork_base": fork_cache.allow_list["fork_base"],
                        **build_allow_list([], [HUB_LORA], use_env=False)})  # fmt: skip
    assert list(preload(cache)) == ["fork_base"] and cache.loaded(LORA_NAME) is None
    assert cache.mini_batch_size(LORA_NAME, base="fork_base") == 8
