"""Hostile inputs to training: resumes under other settings, data or a cut-off save; non-finite settings and
losses; stereo files; broken code files."""

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from tiny_models import random_audio_codes, tiny_lm

import moshi_ttt.train as cli
from moshi_ttt import TTTConfig, apply_ttt, ttt_blocks
from moshi_ttt.training.trainer import STATE_TENSORS, TrainConfig, Trainer


def ttt_lm(seed=0):
    return apply_ttt(tiny_lm(seed), TTTConfig(layers="1,2", mini_batch_size=4, gating_alpha_init=0.5))


def init(assets):
    return ["--init", str(assets / "checkpoints" / "baseline"), "--ttt-layers", "1", "--mini-batch-size", "4"]


def data(assets):
    return ["--audio", str(assets / "a.wav"), str(assets / "b.wav"), "--batch-size", "1", "--chunk-size", "8"]


@pytest.fixture(scope="module")
def saved_run(assets, tmp_path_factory):
    """A 2-step CLI run (constant lr), to be copied and resumed."""
    out = tmp_path_factory.mktemp("runs") / "saved"
    assert cli.main([*init(assets), *data(assets), "--out", str(out), "--steps", "2"]) == 0
    return out


def resume(assets, saved_run, tmp_path, extra):
    out = tmp_path / "resumed"
    shutil.copytree(saved_run, out)
    return cli.main([*init(assets), *data(assets), "--out", str(out), "--resume", "--steps", "4", *extra])


# --- finding 1: a resume continues the run as it was started, or refuses ---


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--lr", "0.5"], "lr: 0.001 then, 0.5 now"),
        (["--chunk-size", "16"], "chunk_size: 8 then, 16 now"),
        (["--seed", "7"], "seed: 0 then, 7 now"),
        (["--weight-decay", "0.5", "--adam-betas", "0.1", "0.2"], "weight_decay: 0.0 then, 0.5 now"),
        (["--ttt-layers", "0,1,2"], "--ttt-layers: [1] then, [0, 1, 2] now"),
        (["--mini-batch-size", "2"], "--mini-batch-size: 4 then, 2 now"),
        (["--lr-decay", "cosine"], "schedule"),
    ],
    ids=["lr", "chunk-size", "seed", "optimizer", "ttt-layers", "mini-batch-size", "schedule"],
)
def test_resume_refuses_other_settings_naming_them(assets, saved_run, tmp_path, capsys, extra, named):
    assert resume(assets, saved_run, tmp_path, extra) == 2
    assert named in capsys.readouterr().err


def test_resume_refuses_other_data(assets, saved_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(saved_run, out)

    def argv(*names):
        audio = [str(assets / name) for name in names]
        return [*init(assets), "--audio", *audio, "--batch-size", "1", "--chunk-size", "8", "--out", str(out),
                "--resume", "--steps", "4"]  # fmt: skip

    assert cli.main(argv("b.wav", "a.wav")) == 2  # the same files in another order
    assert "training data differ from the saved run's (file(s) 1, 2 of 2 differ)" in capsys.readouterr().err
    assert cli.main(argv("a.wav")) == 2
    assert "2 files then, 1 now" in capsys.readouterr().err


def test_resume_may_train_longer_under_a_constant_lr_only(assets, saved_run, tmp_path, capsys):
    assert resume(assets, saved_run, tmp_path, []) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4
    cosine = tmp_path / "cosine"
    argv = [*init(assets), *data(assets), "--out", str(cosine), "--lr-decay", "cosine"]
    assert cli.main([*argv, "--steps", "2"]) == 0
    assert cli.main([*argv, "--steps", "4", "--resume"]) == 2
    assert "the cosine decay spans the run's steps" in capsys.readouterr().err


def test_resume_refuses_a_save_cut_between_checkpoint_and_state(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut"
    argv = [*init(assets), *data(assets), "--out", str(out), "--steps", "4", "--save-every", "1"]
    original = Trainer.save_state

    def killed_at_step_2(self, directory):
        if self.step_count == 2:
            raise KeyboardInterrupt("killed after the checkpoint of step 2, before its state")
        original(self, directory)

    monkeypatch.setattr(Trainer, "save_state", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    monkeypatch.undo()
    assert cli.main([*argv, "--resume"]) == 2
    assert "checkpoint is from step 2 and the training state from step 1" in capsys.readouterr().err


def test_load_state_refuses_a_torn_state_and_other_settings(tmp_path):
    files = [random_audio_codes(1, 20, seed=s)[0] for s in range(2)]
    cfg = TrainConfig(steps=4, batch_size=1, chunk_size=8)
    trainer = Trainer(ttt_lm(), files, cfg)
    trainer.step()
    trainer.save_state(tmp_path / "one")
    trainer.step()
    trainer.save_state(tmp_path / "two")
    shutil.copy(tmp_path / "two" / STATE_TENSORS, tmp_path / "one" / STATE_TENSORS)  # tensors of 2, json of 1
    with pytest.raises(ValueError, match="torn"):
        Trainer(ttt_lm(), files, cfg).load_state(tmp_path / "one")
    with pytest.raises(ValueError, match="lr: 0.001 then, 0.002 now"):
        Trainer(ttt_lm(), files, TrainConfig(steps=4, batch_size=1, chunk_size=8, lr=2e-3)).load_state(tmp_path / "two")
    with pytest.raises(ValueError, match="training data differ"):
        Trainer(ttt_lm(), files[::-1], cfg).load_state(tmp_path / "two")


def test_fair_baseline_run_resumed_without_it_is_refused_up_front(assets, tmp_path, capsys):
    out = tmp_path / "pair"
    argv = [*init(assets), "--audio", str(assets / "a.wav"), "--batch-size", "1", "--chunk-size", "8", "--train-all",
            "--out", str(out)]  # fmt: skip
    assert cli.main([*argv, "--fair-baseline", "--steps", "2"]) == 0
    assert cli.main([*argv, "--resume", "--steps", "4"]) == 2
    assert "pass --fair-baseline" in capsys.readouterr().err
    assert cli.main([*argv, "--resume", "--fair-baseline", "--steps", "4"]) == 0  # the pair is still in step


def test_new_run_into_a_run_folder_is_refused(assets, saved_run, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(saved_run, out)
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    assert cli.main([*init(assets), *data(assets), "--out", str(out), "--steps", "1"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before


def test_a_run_saved_before_the_step_stamps_still_resumes(assets, saved_run, tmp_path, caplog):
    out = tmp_path / "old"
    shutil.copytree(saved_run, out)
    (out / "checkpoint" / "train_step.json").unlink()
    tensors = out / "state" / "train_state.safetensors"
    save_file(load_file(tensors), str(tensors))  # no step in the metadata, as such states were written
    with caplog.at_level("WARNING"):
        assert cli.main([*init(assets), *data(assets), "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert "predates the step stamps" in caplog.text


def test_ttt_flags_over_an_init_with_ttt_layers_are_checked_from_the_start(assets, saved_run, tmp_path, capsys):
    """They were ignored on the first run (the --init's layers are trained as they are) and refused at its resume:
    the same command line must not work once and then fail."""
    args = ["--init", str(saved_run / "checkpoint"), *data(assets), "--steps", "1"]
    assert cli.main([*args, "--mini-batch-size", "2", "--out", str(tmp_path / "a")]) == 2
    assert "--mini-batch-size: 4 then, 2 now" in capsys.readouterr().err
    assert cli.main([*args, "--mini-batch-size", "4", "--out", str(tmp_path / "b")]) == 0


# --- finding 2: finite settings; a non-finite loss stops training ---


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": math.nan},
        {"lr": math.inf},
        {"weight_lr_multiplier": math.nan},
        {"weight_lr_multiplier": -1.0},
        {"alpha_lr_multiplier": math.inf},
        {"alpha_lr_multiplier": -1.0},
        {"grad_clip": math.nan},
        {"grad_clip": math.inf},
        {"weight_decay": math.nan},
    ],
    ids=lambda bad: "-".join(f"{k}={v}" for k, v in bad.items()),
)
def test_train_config_refuses_non_finite_or_negative_rates_naming_the_field(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        TrainConfig(**bad)


def test_non_finite_loss_stops_training_before_the_step():
    model = ttt_lm()
    with torch.no_grad():
        ttt_blocks(model)[1].W1.fill_(math.nan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, [random_audio_codes(1, 16, seed=0)[0]], TrainConfig(steps=3, batch_size=1, chunk_size=8))
    with pytest.raises(ValueError, match="the loss is nan at step 1"):
        trainer.run()
    assert trainer.step_count == 0
    after = model.state_dict()
    assert all(torch.equal(after[k], v) or k.endswith("W1") for k, v in before.items())


def test_infinite_gradients_stop_training_without_clipping_too():
    model = ttt_lm()
    block = ttt_blocks(model)[1]
    block.W1.register_hook(lambda grad: torch.full_like(grad, math.inf))  # a finite loss, an infinite gradient
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=3, batch_size=1, chunk_size=8, grad_clip=0.0)
    trainer = Trainer(model, [random_audio_codes(1, 16, seed=0)[0]], cfg)
    with pytest.raises(ValueError, match="the gradient norm is inf at step 1"):
        trainer.run()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_cli_summary_writes_nan_as_null(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "run", lambda self, **kwargs: [math.nan])
    assert cli.main([*init(assets), *data(assets), "--out", str(tmp_path / "run"), "--steps", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "NaN" not in line and json.loads(line)["last_loss"] is None


# --- finding 3: stereo files are dialogues to evaluation; training refuses them ---


def test_training_refuses_a_stereo_file(assets, tmp_path, capsys):
    stereo = tmp_path / "dialogue.wav"
    (left, rate), (right, _) = sf.read(assets / "a.wav"), sf.read(assets / "b.wav")
    frames = min(len(left), len(right))
    sf.write(stereo, np.stack([left[:frames], right[:frames]], axis=1), rate)
    argv = [*init(assets), "--audio", str(stereo), "--chunk-size", "8", "--out", str(tmp_path / "run"), "--steps", "1"]
    assert cli.main(argv) == 2
    assert "2 channels" in capsys.readouterr().err


# --- finding 8: one-line errors naming the file ---


def write_codes(path, codes):
    save_file({"codes": codes}, str(path))
    return str(path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("directory", "is not a file"),
        ("damaged", "not a readable safetensors file"),
        ("float", "float32 codes"),
        ("negative", "negative codes"),
    ],
    ids=["audio-directory", "damaged-codes", "float-codes", "negative-codes"],
)
def test_cli_refuses_bad_input_files_in_one_line(assets, tmp_path, capsys, kind, message):
    good = random_audio_codes(1, 16, seed=0)[0]
    negative = good.clone()
    negative[3, 5] = -2
    source = {
        "directory": ["--audio", str(tmp_path)],
        "damaged": ["--codes", str(assets / "garbage.wav")],
        "float": ["--codes", write_codes(tmp_path / "f.safetensors", good.float() + 0.5)],
        "negative": ["--codes", write_codes(tmp_path / "n.safetensors", negative)],
    }[kind]
    argv = [*init(assets), *source, "--chunk-size", "8", "--out", str(tmp_path / "run"), "--steps", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert source[1] in err  # names the file
