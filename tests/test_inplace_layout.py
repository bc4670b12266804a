"""The In-Place fork's checkpoint tree (`<run>/checkpoints/checkpoint_{step:06d}/consolidated/`) as users point at it:
the app's allow-list finds the steps at any level (named "<run>/checkpoint_000500", in order, no symlink out of the
allowed folder), `load` and the CLI take a step folder, and a folder of several steps or a step without its
consolidated/ is refused with a sentence that says what to give."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_app_inplace import fork_cache  # noqa: F401 (the fork's tiny checkpoints beside their base)
from test_codec import tiny_codec_config
from tiny_models import random_audio_codes

from moshi_ttt import evaluate, load, score
from moshi_ttt.app.models import ModelCache, build_allow_list, discover, without_paths
from moshi_ttt.data.checkpoints.inplace_layout import find_steps
from moshi_ttt.data.codec import build_codec, save_codec
from moshi_ttt.reports.outdir import checkpoint_identity

FORK_DATA = Path(__file__).parent / "data" / "inplace_fork"


def write_step(run: Path, step: int, source: str = "full_yarn") -> Path:
    """One saved step of a fork run, as its trainer writes it; returns its consolidated/ folder."""
    consolidated = run / "checkpoints" / f"checkpoint_{step:06d}" / "consolidated"
    shutil.copytree(FORK_DATA / source, consolidated, ignore=shutil.ignore_patterns("fork_outputs*"))
    return consolidated


def use_codec(consolidated: Path, codec: Path) -> None:
    """A codec of ours for the step (else moshi's, from the Hub)."""
    raw = json.loads((consolidated / "config.json").read_text())
    (consolidated / "config.json").write_text(json.dumps({**raw, "mimi_name": str(codec)}))


@pytest.fixture
def codec(tmp_path) -> Path:
    config = tiny_codec_config(transformer=False)
    torch.manual_seed(0)
    save_codec(tmp_path / "codec", build_codec(config), config)
    return tmp_path / "codec"


@pytest.fixture
def runs(tmp_path) -> Path:
    """Two runs: alpha (steps 500, 100 and 1000000, written out of order) and beta (step 300)."""
    for step in (500, 100, 1_000_000):
        write_step(tmp_path / "runs" / "alpha", step)
    write_step(tmp_path / "runs" / "beta", 300)
    return tmp_path / "runs"


ALPHA = ["alpha/checkpoint_000100", "alpha/checkpoint_000500", "alpha/checkpoint_1000000"]


@pytest.mark.parametrize(
    "where, names",
    [
        ("alpha", ALPHA),
        ("alpha/checkpoints", ALPHA),
        ("alpha/checkpoints/checkpoint_000500", ["alpha/checkpoint_000500"]),
        ("alpha/checkpoints/checkpoint_000500/consolidated", ["alpha/checkpoint_000500"]),
        (".", [*ALPHA, "beta/checkpoint_000300"]),
    ],
    ids=["run", "checkpoints", "step", "consolidated", "folder_of_runs"],
)
def test_the_allow_list_finds_the_fork_steps_at_any_level_in_order(runs, where, names):
    entries = discover(runs / where)
    assert [e.name for e in entries] == names  # by run, then step number (1000000 after 500)
    assert all(Path(e.ref).name == "consolidated" and Path(e.ref).is_absolute() for e in entries)
    assert list(build_allow_list([runs / where], use_env=False)) == names


def test_steps_beside_plain_checkpoint_folders_and_no_symlink_out_of_the_allowed_folder(runs, tmp_path):
    outside = write_step(tmp_path / "elsewhere" / "gamma", 700)
    (runs / "alpha" / "checkpoints" / "checkpoint_000900").symlink_to(outside.parent)  # a step linked from outside
    (runs / "linked").symlink_to(outside)  # a checkpoint folder linked from outside
    shutil.copytree(FORK_DATA / "ttt_only_lora", runs / "plain", ignore=shutil.ignore_patterns("fork_outputs*"))
    inside = runs / "alpha" / "checkpoints" / "checkpoint_000200"
    inside.symlink_to(runs / "alpha" / "checkpoints" / "checkpoint_000100")  # inside: the same step, listed once
    names = [e.name for e in discover(runs)]
    assert names == ["plain", *ALPHA, "beta/checkpoint_000300"]
    assert [s.name for s in find_steps(outside.parent)] == ["gamma/checkpoint_000700"]  # allowed where it is


def test_a_folder_without_checkpoints_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "run" / "checkpoints" / "checkpoint_000100").mkdir(parents=True)  # no consolidated/ yet
    with pytest.raises(FileNotFoundError) as refused:
        discover(tmp_path / "run")
    assert str(refused.value) == (
        f"no checkpoint in {tmp_path / 'run'}: expected directories with a config.json, or the In-Place fork's "
        "<run>/checkpoints/checkpoint_NNNNNN/consolidated/ folders"
    )


def test_load_takes_a_step_folder_and_says_what_to_give_otherwise(runs):
    step = runs / "alpha" / "checkpoints" / "checkpoint_000500"
    by_step, by_folder = load(step, share=False), load(step / "consolidated", share=False)
    assert by_step.kind == by_folder.kind == "inplace_ttt"
    codes = random_audio_codes(1, 20, seed=1, card=16)
    torch.testing.assert_close(score(by_step.model, codes).loss, score(by_folder.model, codes).loss, equal_nan=True)
    assert load(runs / "beta", share=False).kind == "inplace_ttt"  # a run of one step: that step
    with pytest.raises(ValueError) as refused:
        load(runs / "alpha")
    assert str(refused.value) == (
        f"{runs / 'alpha'} is a folder of the In-Place fork's trainer with 3 saved steps (alpha/checkpoint_000100, "
        "alpha/checkpoint_000500, alpha/checkpoint_1000000); give one step's folder, e.g. "
        f"{(runs / 'alpha' / 'checkpoints' / 'checkpoint_1000000').resolve()}"
    )
    empty = runs / "alpha" / "checkpoints" / "checkpoint_000600"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as refused:
        load(empty)
    expected = f"{empty} is named as a step folder of the In-Place fork's trainer but holds no consolidated/config.json"
    assert str(refused.value).startswith(expected + " (the trainer writes consolidated/ with config.json and")


def test_the_cli_scores_a_step_folder_and_refuses_a_run_of_several(runs, codec, tmp_path, capsys):
    """`--ttt <run>/checkpoints/checkpoint_000500` as the fork names its steps; the whole run is refused by name."""
    import soundfile as sf
    from conftest import speechlike

    for consolidated in (runs / "alpha" / "checkpoints").glob("*/consolidated"):
        use_codec(consolidated, codec)
    sf.write(tmp_path / "a.wav", speechlike(1.0, 0), 24_000)
    step = runs / "alpha" / "checkpoints" / "checkpoint_000500"
    argv = ["--audio", str(tmp_path / "a.wav"), "--mode", "full", "--device", "cpu"]
    assert evaluate.main([*argv, "--ttt", str(step), "--out", str(tmp_path / "out")]) == 0
    results = json.loads(next((tmp_path / "out").glob("*/results.json")).read_text())
    assert results["runs"]["ttt"]["checkpoint"] == str(step) and "inplace" in results["runs"]["ttt"]
    identity = checkpoint_identity(str(step))  # the fingerprint of a rerun sees the step's files change
    assert identity["ref"] == str(step) and sorted(identity["files"]) == ["config.json", "consolidated.safetensors"]
    assert evaluate.main([*argv, "--ttt", str(runs / "alpha"), "--out", str(tmp_path / "out2")]) != 0
    assert "with 3 saved steps (alpha/checkpoint_000100," in capsys.readouterr().err


def test_messages_for_users_name_no_server_path():
    text = "/srv/hf/hub/models--o--r/snapshots/0123/lora.safetensors misses x; base hf://kyutai/moshiko-pytorch-bf16"
    assert without_paths(text) == "lora.safetensors misses x; base hf://kyutai/moshiko-pytorch-bf16"
    assert without_paths("tokens 1/2 of ./rel/x (C:\\srv\\a.json)") == "tokens 1/2 of ./rel/x (a.json)"


def test_the_model_cache_lists_fork_steps_as_models(runs, codec):
    use_codec(runs / "beta" / "checkpoints" / "checkpoint_000300" / "consolidated", codec)
    cache = ModelCache(build_allow_list([runs / "beta"], use_env=False))
    assert cache.names() == ["beta/checkpoint_000300"] and cache.mini_batch_size("beta/checkpoint_000300") == 8


def test_the_cli_loads_a_lora_step_over_the_baseline_as_the_app_does(fork_cache, tmp_path, offline_hub_cache):  # noqa: F811
    """--ttt a lora.safetensors step with --baseline: over that baseline (nothing from the Hub, whose cache is empty
    and offline here), the numbers of the app's pairing."""
    import soundfile as sf
    from conftest import speechlike

    base = fork_cache.allow_list["fork_base"].ref
    step = write_step(tmp_path / "run", 40, source="ttt_only_lora").parent
    sf.write(tmp_path / "a.wav", speechlike(1.0, 0), 24_000)
    argv = ["--audio", str(tmp_path / "a.wav"), "--mode", "full", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert evaluate.main([*argv, "--baseline", base, "--ttt", str(step)]) == 0
    results = json.loads(next((tmp_path / "out").glob("*/results.json")).read_text())
    app = fork_cache.get("ttt_only_lora", base="fork_base").model
    codes = fork_cache.get("fork_base").mimi.encode(torch.from_numpy(speechlike(1.0, 0))[None, None])
    expected = score(app, codes[:, :, : results["runs"]["ttt"]["tokens"]], mode="full").loss_per_token[0]
    got = torch.tensor([float("nan") if v is None else v for v in results["runs"]["ttt"]["loss_per_token"]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_a_lora_step_is_told_apart_at_every_level_the_cli_takes(tmp_path):
    """`inplace_over_base` reads a folder as `load` does: a run or its checkpoints/ holding one lora step loads over
    the baseline (else the CLI would load it over the fork's default base from the Hub)."""
    from moshi_ttt.data.checkpoints.loader import inplace_over_base

    consolidated = write_step(tmp_path / "run", 40, source="ttt_only_lora")
    for where in (consolidated, consolidated.parent, consolidated.parent.parent, tmp_path / "run"):
        assert inplace_over_base(str(where)), where
    write_step(tmp_path / "run", 80, source="ttt_only_lora")
    assert not inplace_over_base(str(tmp_path / "run"))  # two steps: load refuses it, naming them
    assert not inplace_over_base(str(write_step(tmp_path / "full", 1, source="full_yarn")))
