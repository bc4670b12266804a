"""Outer-loop training: overfitting, gradients across file boundaries, exact resume."""

import copy
import math

import pytest
import torch
from tiny_models import random_audio_codes, tiny_lm

from moshi_ttt import TTTConfig, apply_ttt, ttt_blocks
from moshi_ttt.train import TrainConfig, Trainer
from moshi_ttt.training.data import CodeBatcher


def ttt_lm(seed=0, share_qk=False):
    cfg = TTTConfig(layers="1,2", mini_batch_size=4, gating_alpha_init=0.5, share_qk=share_qk)
    return apply_ttt(tiny_lm(seed), cfg)


def test_batcher_reads_files_in_order_and_flags_new_files():
    files = [torch.arange(10).repeat(8, 1), 100 + torch.arange(6).repeat(8, 1)]
    batcher = CodeBatcher(files, batch_size=1, chunk_size=4, seed=0)
    seen = [batcher.next_batch() for _ in range(5)]
    flags = [bool(f[0]) for _, f in seen]
    firsts = [int(c[0, 0, 0]) for c, _ in seen]
    assert flags.count(True) == 2 and flags[0]
    # Each file's chunks come in order, back to back, and only a file's first chunk is flagged as new.
    assert sorted(firsts) == [0, 4, 8, 100, 104]
    assert firsts in ([0, 4, 8, 100, 104], [100, 104, 0, 4, 8])
    assert [f in (0, 100) for f in firsts] == flags
    padded = [c for c, _ in seen if (c < 0).any()]
    assert padded, "the last chunk of a file is padded with the zero token"


def test_ttt_model_overfits_one_short_file():
    """Only the TTT layers train. The random output heads of a tiny model bound its logit margins (its best loss
    on random codes stalls near 2.2 nats whatever the TTT layers do), so they get a trained model's scale here."""
    torch.manual_seed(0)
    model = ttt_lm()
    with torch.no_grad():
        for linear in model.linears:
            linear.weight.mul_(3.0)
    files = [random_audio_codes(1, 32, seed=3)[0]]
    trainer = Trainer(model, files, TrainConfig(steps=100, batch_size=1, chunk_size=32, lr=1e-2))
    losses = trainer.run()
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert losses[-1] < 0.5 * math.log(model.card)  # well below chance on random codes: memorised
    assert all(not p.requires_grad for p in model.linears.parameters())


def test_w_base_gets_gradients_after_a_file_boundary_and_rows_restart_from_current_w_base():
    model = ttt_lm()
    files = [random_audio_codes(1, 8, seed=s)[0] for s in range(3)]
    trainer = Trainer(model, files, TrainConfig(steps=10, batch_size=2, chunk_size=8, lr=1e-2))
    trainer.step()  # both rows read a whole 8-token file: the next step starts new files on both rows
    block = ttt_blocks(model)[1]
    w1_now = block.W1.detach().clone()
    trainer.step()
    grad = block.W1.grad
    assert grad is not None and grad.abs().sum() > 0
    # The carried state of the new files started from W_base as it was at that step (not the initial values).
    carried = trainer.carry.states[1].weights.W1
    assert not torch.equal(carried[0], w1_now)  # it moved during the chunk ...
    assert (carried[0] - w1_now).abs().max() < (carried[0] - ttt_lm().transformer.layers[1].ttt.W1).abs().max()


@pytest.mark.parametrize("share_qk", [False, True], ids=["wq-wk", "share_qk"])
def test_resume_continues_bit_identically(tmp_path, share_qk):
    files = [random_audio_codes(1, 20, seed=s)[0] for s in range(3)]
    cfg = TrainConfig(steps=3, batch_size=2, chunk_size=8, lr=1e-2)
    reference = Trainer(ttt_lm(share_qk=share_qk), files, cfg)
    reference.step()
    reference.step()
    saved_model = copy.deepcopy(reference.model.state_dict())
    reference.save_state(tmp_path / "state")
    reference.step()

    if share_qk:  # the convolutions' history crossed the saved step: it must be in the state
        assert sorted(reference.carry.histories) == [1, 2]
    resumed_model = ttt_lm(share_qk=share_qk)
    resumed_model.load_state_dict(saved_model)
    resumed = Trainer(resumed_model, files, cfg)
    resumed.load_state(tmp_path / "state")
    assert resumed.step_count == 2
    resumed.step()
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_chunk_size_must_be_a_multiple_of_the_mini_batch():
    with pytest.raises(ValueError, match="multiple of the TTT mini_batch_size"):
        Trainer(ttt_lm(), [random_audio_codes(1, 8)[0]], TrainConfig(chunk_size=6))


def test_cli_encodes_audio_once_trains_ttt_and_resumes(assets, tmp_path, capsys):
    from moshi_ttt import load
    from moshi_ttt.train import main

    out = tmp_path / "run"
    common = ["--audio", str(assets / "a.wav"), str(assets / "b.wav"), "--out", str(out), "--batch-size", "2",
              "--chunk-size", "8"]  # fmt: skip
    args = ["--init", str(assets / "checkpoints" / "baseline"), "--ttt-layers", "1", "--mini-batch-size", "4"]
    assert main([*args, *common, "--steps", "2"]) == 0
    cache = sorted((out / "codes_cache").iterdir())
    assert len(cache) == 2
    assert load(out / "checkpoint").ttt_config.layers == "1"
    assert main(["--init", "unused", *common, "--steps", "3", "--resume"]) == 0
    assert sorted((out / "codes_cache").iterdir()) == cache  # no re-encoding
    assert '"steps": 3' in capsys.readouterr().out
    assert main(["--init", str(assets / "checkpoints" / "baseline"), "--manifest", str(tmp_path / "no.jsonl"),
                 "--out", str(out)]) == 2  # fmt: skip


def test_save_every_calls_save_at_its_steps_and_needs_a_save_function():
    files = [random_audio_codes(1, 16, seed=s)[0] for s in range(2)]
    trainer = Trainer(ttt_lm(), files, TrainConfig(steps=5, batch_size=1, chunk_size=8, save_every=2))
    saved = []
    trainer.run(save=lambda t: saved.append(t.step_count))
    assert saved == [2, 4]
    with pytest.raises(ValueError, match="no save function"):
        Trainer(ttt_lm(), files, TrainConfig(steps=6, batch_size=1, chunk_size=8, save_every=2)).run()
    with pytest.raises(ValueError, match="save_every must be >= 0"):
        TrainConfig(save_every=-1)


def test_cli_save_every_leaves_a_resumable_checkpoint_midway(assets, tmp_path, monkeypatch):
    from moshi_ttt.train import main

    out = tmp_path / "run"
    argv = ["--init", str(assets / "checkpoints" / "baseline"), "--ttt-layers", "1", "--mini-batch-size", "4",
            "--audio", str(assets / "a.wav"), "--out", str(out), "--batch-size", "1", "--chunk-size", "8",
            "--steps", "3", "--save-every", "2", "--inner", "linear"]  # fmt: skip
    saves = []
    original = Trainer.save_state

    def recording(self, directory):
        saves.append(self.step_count)
        original(self, directory)

    monkeypatch.setattr(Trainer, "save_state", recording)
    assert main(argv) == 0
    assert saves == [2, 3]  # every 2 steps, and at the end
    from moshi_ttt import load

    assert load(out / "checkpoint").ttt_config.inner == "linear"  # TTT-Linear trained from the CLI


def test_cli_fair_baseline_trains_beside_with_a_schedule_and_resumes_bit_identically(
    assets, tmp_path, capsys, monkeypatch
):
    """--fair-baseline: the --init model without TTT trains on the same batches; a run stopped after its step-2 save
    and resumed ends with the same weights as the run that went on, for both models (warm-up, hold and cosine of
    the 3-step run included)."""
    import json
    import shutil

    import moshi_ttt.train as cli
    from moshi_ttt import load

    init = ["--init", str(assets / "checkpoints" / "baseline"), "--ttt-layers", "1", "--mini-batch-size", "4"]
    common = ["--audio", str(assets / "a.wav"), str(assets / "b.wav"), "--batch-size", "2", "--chunk-size", "8",
              "--train-all", "--fair-baseline", "--warmup-steps", "2", "--lr-decay", "cosine", "--decay-start", "0.3",
              "--weight-decay", "0.01", "--adam-betas", "0.9", "0.95", "--steps", "3"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    save = cli._save

    def snapshot(directory, trainer, loaded):
        save(directory, trainer, loaded)
        if directory == straight and trainer.step_count == 2:  # the TTT model is saved last
            shutil.copytree(straight, stopped)

    monkeypatch.setattr(cli, "_save", snapshot)
    assert cli.main([*init, *common, "--out", str(straight), "--save-every", "2"]) == 0
    monkeypatch.undo()
    assert cli.main(["--init", "unused", *common, "--out", str(stopped), "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["last_loss"] > 0 and summary["fair_baseline_last_loss"] > 0
    for sub in ("checkpoint", "fair_baseline/checkpoint"):
        a, b = load(straight / sub).model.state_dict(), load(stopped / sub).model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    ttt, baseline = load(straight / "checkpoint"), load(straight / "fair_baseline" / "checkpoint")
    assert ttt.ttt_config.layers == "1" and baseline.ttt_config is None
    initial = load(assets / "checkpoints" / "baseline").model.state_dict()["text_emb.weight"]
    assert not torch.equal(baseline.model.state_dict()["text_emb.weight"], initial)  # the baseline trained
    no_train_all = [a for a in common if a != "--train-all"]
    assert cli.main([*init, *no_train_all, "--out", str(tmp_path / "bad")]) == 2
    assert "--fair-baseline needs --train-all" in capsys.readouterr().err
