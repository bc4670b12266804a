"""What a careless or hostile caller of the library and the CLI meets: one clear error, never a wrong number, a
traceback or a model left unusable (found by a review of the public API; each test failed before its fix)."""

import json
import math
import shutil

import pytest
import torch
from test_codec import tiny_codec_config
from test_legacy import write_fork_checkpoint
from tiny_models import random_audio_codes, tiny_lm, tiny_lm_config

from moshi_ttt import TTTConfig, apply_ttt, evaluate, load, save, score
from moshi_ttt.data.codec import build_codec, save_codec
from moshi_ttt.ttt.apply import ttt_blocks


def cli(*args) -> int:
    return evaluate.main(["--device", "cpu", *map(str, args)])


# Checkpoints and codec references


def test_a_relative_checkpoint_path_reads_its_relative_codec_once(assets, monkeypatch):
    """load("checkpoints/ttt") from the assets folder, its config naming "../../codec": the codec folder was
    joined to the checkpoint path twice (checkpoints/ttt/checkpoints/ttt/../../codec) and not found."""
    monkeypatch.chdir(assets)
    loaded = load("checkpoints/ttt", load_mimi=True)
    assert loaded.mimi_ref == str((assets / "codec").resolve())
    assert loaded.mimi is not None


def test_a_relative_base_is_looked_for_beside_the_checkpoint_only(tmp_path, monkeypatch):
    ttt = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4))
    save(tmp_path / "run" / "ttt", ttt, base="../baseline")
    save(tmp_path / "baseline", tiny_lm(0), lm_config=tiny_lm_config())  # what "../baseline" means from cwd
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "run" / "baseline")):
        load(tmp_path / "run" / "ttt")
    shutil.copytree(tmp_path / "baseline", tmp_path / "run" / "baseline")
    assert load(tmp_path / "run" / "ttt").ttt_config is not None


def test_a_reference_given_from_the_working_directory_is_stored_beside(tmp_path, monkeypatch):
    """save(d, base="runs/baseline") from the folder holding runs/: stored relative to d, so that it loads from
    anywhere (a relative reference is read beside the checkpoint only)."""
    monkeypatch.chdir(tmp_path)
    save(tmp_path / "runs" / "baseline", tiny_lm(0), lm_config=tiny_lm_config())
    ttt = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4))
    save(tmp_path / "out" / "ttt", ttt, base="runs/baseline")
    assert json.loads((tmp_path / "out" / "ttt" / "config.json").read_text())["base"] == "../../runs/baseline"
    monkeypatch.chdir(tmp_path / "out")
    assert load(tmp_path / "out" / "ttt").ttt_config is not None


def test_a_chain_of_bases_that_comes_back_is_refused(tmp_path):
    ttt = apply_ttt(tiny_lm(0), TTTConfig(layers="1", mini_batch_size=4))
    save(tmp_path / "b", ttt, base="../c")
    save(tmp_path / "c", ttt, base="../b")
    with pytest.raises(ValueError, match="comes back"):
        load(tmp_path / "b")
    with pytest.raises(ValueError, match="itself"):
        save(tmp_path / "a", ttt, base=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="itself"):
        save(tmp_path / "b", ttt, base=".", overwrite=True)  # "." beside b is b


def test_save_refuses_what_would_not_load_back(tmp_path):
    model = tiny_lm(0)
    with pytest.raises(ValueError, match="does not describe this model"):
        save(tmp_path / "wide", model, lm_config=tiny_lm_config(card=model.card + 8))
    with pytest.raises(ValueError, match="finite"):
        save(tmp_path / "nan", model, lm_config={**tiny_lm_config(), "max_period": math.nan})
    with pytest.raises(TypeError, match="mimi_ref"):
        save(tmp_path / "mimi", model, lm_config=tiny_lm_config(), mimi_ref=5)
    with pytest.raises(TypeError, match="dtype"):
        save(tmp_path / "dtype", model, lm_config=tiny_lm_config(), dtype="bfloat16")
    assert not any(tmp_path.iterdir())  # nothing written by a refused save
    save(tmp_path / "ok", model, lm_config=tiny_lm_config())
    raw = json.loads((tmp_path / "ok" / "config.json").read_text())
    raw["mimi"] = 5
    (tmp_path / "ok" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="mimi must be a path"):
        load(tmp_path / "ok")


def test_a_config_whose_lm_kwargs_do_not_build_a_model_is_one_value_error(tmp_path):
    save(tmp_path / "ck", tiny_lm(0), lm_config=tiny_lm_config())
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    for lm_config in ({k: v for k, v in raw["lm_config"].items() if k != "dim"}, {**raw["lm_config"], "dim": "64"},
                      {**raw["lm_config"], "no_such_kwarg": 1}, [1, 2]):  # fmt: skip
        (tmp_path / "ck" / "config.json").write_text(json.dumps({**raw, "lm_config": lm_config}))
        with pytest.raises(ValueError, match="LM config"):
            load(tmp_path / "ck", share=False)


def test_a_truncated_weights_file_and_a_codec_folder_are_named(assets, tmp_path):
    shutil.copytree(assets / "checkpoints" / "baseline", tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(tmp_path / "cut", share=False)
    with pytest.raises(ValueError, match="is a codec"):
        load(assets / "codec")


# score()


def test_score_refuses_codes_that_are_not_integers():
    model = tiny_lm(0).eval()
    codes = random_audio_codes(1, 12)
    for bad in (codes.float() + 0.7, codes > 5, codes.tolist()):
        with pytest.raises(TypeError, match="audio codes"):
            score(model, bad)
    with pytest.raises(ValueError, match="B >= 1"):
        score(model, codes[:0])


def test_a_failure_while_opening_the_session_leaves_the_model_usable(monkeypatch):
    """A TTT layer's state allocation fails (out of memory): moshi registers the stop of its session only once
    every module has started, so the others stayed streaming and every later score() was refused."""
    model = apply_ttt(tiny_lm(0), TTTConfig(layers="1,2", mini_batch_size=4)).eval()
    codes = random_audio_codes(1, 12)
    expected = score(model, codes).loss
    block = ttt_blocks(model)[2]

    def out_of_memory(batch_size):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(block, "_init_streaming_state", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        score(model, codes)
    monkeypatch.undo()
    assert not [m for m in model.modules() if getattr(m, "_streaming_state", None) is not None]
    torch.testing.assert_close(score(model, codes).loss, expected, equal_nan=True)


# The command line


@pytest.fixture(scope="module")
def other_codec_ttt(assets, tmp_path_factory):
    """A TTT checkpoint like assets' but naming another codec (same code format)."""
    root = tmp_path_factory.mktemp("other_codec")
    config = tiny_codec_config(transformer=False)
    torch.manual_seed(1)
    save_codec(root / "codec", build_codec(config), config)
    card = config["quantizer"]["bins"]
    ttt = apply_ttt(tiny_lm(0, card=card), TTTConfig(layers="1", mini_batch_size=4))
    save(root / "ttt", ttt, lm_config=tiny_lm_config(card=card), mimi_ref="../codec")
    return root / "ttt"


def test_the_cli_refuses_checkpoints_with_different_codecs(assets, other_codec_ttt, tmp_path, capsys):
    """It encoded the audio with the first checkpoint's codec and scored the others on those codes, silently."""
    out = tmp_path / "out"
    assert cli("--audio", assets / "a.wav", "--baseline", assets / "checkpoints" / "baseline",
               "--ttt", other_codec_ttt, "--out", out) == 2  # fmt: skip
    assert "different codecs" in capsys.readouterr().err
    assert not out.exists()


def test_the_cli_checks_run_flags_before_loading_and_in_one_line(assets, tmp_path, capsys):
    base = ["--audio", assets / "a.wav", "--baseline", assets / "checkpoints" / "baseline"]
    (tmp_path / "file").write_text("x")
    (tmp_path / "arr").mkdir()
    (tmp_path / "arr" / "run.json").write_text("[]")
    cases = {
        "--max-seconds": ("--max-seconds", "0", "--out", tmp_path / "o1"),
        "--max-seconds ": ("--max-seconds", "nan", "--out", tmp_path / "o2"),
        "--bin-size": ("--bin-size", "0", "--out", tmp_path / "o3"),
        "is a file": ("--out", tmp_path / "file"),
        "not a device": ("--out", tmp_path / "o4", "--device", "tpu"),
        "not a run record": ("--out", tmp_path / "arr"),
    }
    for expected, args in cases.items():
        assert cli(*base, *args) == 2, expected
        err = capsys.readouterr().err
        assert expected.strip() in err and "Traceback" not in err, err
    for name in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / name).exists()


def test_max_seconds_inf_means_no_limit(assets, tmp_path):
    assert cli("--audio", assets / "a.wav", "--baseline", assets / "checkpoints" / "baseline",
               "--max-seconds", "inf", "--out", tmp_path / "o") == 0  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [("persistent_states", "false"), ("use_rope", 0),
                                            ("base_lr", "fast"), ("mini_batch_size", 2.5)])  # fmt: skip
def test_an_older_fork_training_arg_of_the_wrong_kind_is_refused(tmp_path, key, value):
    """bool("false") is True: a fork checkpoint saying "persistent_states": "false" loaded as persistent."""
    write_fork_checkpoint(tmp_path / "c", layout="ttt_layer", depth=2, full=True, use_rope=False)
    path = tmp_path / "c" / "training_config.json"
    training = json.loads(path.read_text())
    training["ttt"][key] = value
    path.write_text(json.dumps(training))
    with pytest.raises(ValueError, match=f"ttt.{key}"):
        load(tmp_path / "c", share=False)


def test_an_older_fork_base_lr_written_as_yaml_1e_3_still_reads(tmp_path):
    write_fork_checkpoint(tmp_path / "c", layout="ttt_layer", depth=2, full=True, use_rope=False)
    path = tmp_path / "c" / "training_config.json"
    training = json.loads(path.read_text())
    training["ttt"]["base_lr"] = "1e-3"  # how PyYAML reads 1e-3
    path.write_text(json.dumps(training))
    assert load(tmp_path / "c", share=False).ttt_config.base_lr == 1e-3


def test_a_codec_named_through_a_link_keeps_its_name(assets, tmp_path):
    """A Hub snapshot's files are links to blobs without a suffix, and moshi's get_mimi reads the format from the
    name: the loader makes a codec reference absolute without following links."""
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "codec").symlink_to(assets / "codec", target_is_directory=True)
    save(tmp_path / "snapshot" / "ttt", tiny_lm(0, card=2048), lm_config=tiny_lm_config(card=2048), mimi_ref="../codec")
    assert load(tmp_path / "snapshot" / "ttt").mimi_ref == str(tmp_path / "snapshot" / "codec")


def test_one_codec_named_two_ways_is_one_codec_for_the_cli(assets, tmp_path):
    """The same codec through a link (as an hf:// name and its snapshot path are): scored together, not refused."""
    (tmp_path / "link").symlink_to(assets / "codec", target_is_directory=True)
    card = json.loads((assets / "checkpoints" / "ttt" / "config.json").read_text())["lm_config"]["card"]
    ttt = apply_ttt(tiny_lm(0, card=card), TTTConfig(layers="1", mini_batch_size=4))
    save(tmp_path / "ttt", ttt, lm_config=tiny_lm_config(card=card), mimi_ref=str(tmp_path / "link"))
    assert cli("--audio", assets / "a.wav", "--baseline", assets / "checkpoints" / "baseline",
               "--ttt", tmp_path / "ttt", "--out", tmp_path / "out") == 0  # fmt: skip
