"""A broken model scores NaN (never a healthy-looking number) and the CLI names the run and codebook; older
non-causal TTT checkpoints are also scored causally, with the difference in results.json and report.html."""

import json
import math
import threading
import types

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_legacy import write_fork_checkpoint
from tiny_mimi import tiny_mimi
from tiny_models import random_audio_codes, tiny_lm, tiny_lm_config

from moshi_ttt import evaluate, load, score
from moshi_ttt.app.engine import compare_live, live_options
from moshi_ttt.reports.results import non_finite_message, run_record
from moshi_ttt.scoring.teacher_forcing import _cross_entropy
from moshi_ttt.ttt.legacy import causal_reading

BROKEN_CODEBOOK = 3


def broken_lm():
    """tiny_lm(0) whose output head of one codebook gives a NaN logit for class 5 at every token."""
    model = tiny_lm(0)
    with torch.no_grad():
        model.linears[BROKEN_CODEBOOK].weight[5] = float("nan")
    return model


def test_non_finite_logits_at_valid_positions_give_nan_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 5, 7, generator=g)  # [B, K, n, V]
    target = torch.randint(0, 7, (1, 2, 5), generator=g)
    target[0, 1, 4] = -1  # moshi's zero token: no prediction, masked
    logits[0, 0, 1, 3] = float("nan")  # one NaN class (nan_to_num used to read it as 0)
    logits[0, 0, 2] = float("nan")  # a whole NaN head (used to score exactly log V)
    logits[0, 1, 0, 2] = float("inf")
    logits[0, 1, 3, 6] = float("-inf")
    loss = _cross_entropy(logits, target)
    bad = torch.zeros(1, 2, 5, dtype=torch.bool)
    bad[0, 0, 1] = bad[0, 0, 2] = bad[0, 1, 0] = bad[0, 1, 3] = bad[0, 1, 4] = True
    assert torch.isnan(loss[bad]).all()
    expected = F.cross_entropy(logits[~bad], target[~bad], reduction="none")
    torch.testing.assert_close(loss[~bad], expected)


def test_a_broken_output_head_scores_nan_and_is_named():
    codes = random_audio_codes(1, 12, seed=1)
    result = score(broken_lm(), codes, "full")
    valid = result.mask[0]
    loss = result.loss[0]
    assert torch.isnan(loss[BROKEN_CODEBOOK][valid[BROKEN_CODEBOOK]]).all()
    others = [k for k in range(8) if k != BROKEN_CODEBOOK]
    assert torch.isfinite(loss[others][valid[others]]).all()
    run = run_record(result, checkpoint="broken")
    assert math.isnan(run["mean_loss"]) and math.isnan(run["perplexity"])
    assert run["non_finite_tokens"][BROKEN_CODEBOOK] == int(valid[BROKEN_CODEBOOK].sum()) > 0
    assert sum(run["non_finite_tokens"]) == run["non_finite_tokens"][BROKEN_CODEBOOK]
    message = non_finite_message("ttt", run)
    assert "'ttt'" in message and f"codebook {BROKEN_CODEBOOK} has" in message and message.count(".") == 1
    assert non_finite_message("ok", run_record(score(tiny_lm(0), codes, "full"), checkpoint="ok")) is None


@pytest.fixture()
def legacy_dirs(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file(tiny_lm(0).state_dict(), str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps(tiny_lm_config()))
    write_fork_checkpoint(tmp_path / "legacy", layout="ttt_layer", depth=2, full=False, use_rope=False)
    return {"legacy": (tmp_path / "legacy", base)}


@pytest.fixture()
def cli(tmp_path, monkeypatch, legacy_dirs):
    def fake_load(ref, device, dtype):
        if ref == "broken":
            model = broken_lm()
        elif ref == "legacy":
            directory, base = legacy_dirs["legacy"]
            model = load(directory, base=str(base)).model
        else:
            model = tiny_lm(0)
        return types.SimpleNamespace(model=model, mimi=tiny_mimi())

    monkeypatch.setattr(evaluate, "_load_checkpoint", fake_load)
    path = tmp_path / "clip.wav"
    rng = np.random.default_rng(0)
    sf.write(path, (0.2 * rng.standard_normal(int(2.5 * 24000))).astype(np.float32), 24000)
    return path


def test_cli_names_the_run_and_codebook_that_went_non_finite(tmp_path, cli, capsys):
    out = tmp_path / "out"
    assert evaluate.main(["--audio", str(cli), "--baseline", "base", "--ttt", "broken", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "non-finite" in line]
    assert len(lines) == 1 and "'ttt'" in lines[0] and f"codebook {BROKEN_CODEBOOK} has" in lines[0]
    doc = json.loads((out / "0000_clip" / "results.json").read_text())
    assert doc["runs"]["ttt"]["mean_loss"] is None and doc["runs"]["baseline"]["mean_loss"] is not None
    assert any("non-finite" in note for note in doc["config"]["notes"]["ttt"])
    assert "went non-finite" in (out / "0000_clip" / "report.html").read_text()


def test_cli_scores_legacy_checkpoints_causally_next_to_the_leaky_scoring(tmp_path, cli, legacy_dirs):
    out = tmp_path / "out"
    assert evaluate.main(["--audio", str(cli), "--baseline", "base", "--ttt", "legacy", "--out", str(out)]) == 0
    doc = json.loads((out / "0000_clip" / "results.json").read_text())
    comp = doc["runs"]["ttt"]["causal_comparison"]
    assert "causal_comparison" not in doc["runs"]["baseline"]
    # The numbers are those of the causal variant loaded on its own, and of the legacy (leaky) scoring.
    directory, base = legacy_dirs["legacy"]
    from moshi_ttt.data.audio import encode, load_audio

    codes = encode(tiny_mimi(), load_audio(cli))
    causal = score(load(directory, base=str(base), legacy_causal=True).model, codes, "chunked").loss[0]
    got = torch.tensor([np.nan if v is None else v for v in comp["loss_per_token_causal"]])
    torch.testing.assert_close(got, causal.nanmean(dim=0), rtol=0, atol=1e-5, equal_nan=True)
    assert comp["mean_loss_leaky"] == doc["runs"]["ttt"]["mean_loss"] and comp["mini_batch_size"] == 4
    assert comp["difference"] == pytest.approx(comp["mean_loss_causal"] - comp["mean_loss_leaky"])
    assert comp["difference"] != 0
    assert any("scored causally" in note for note in doc["config"]["notes"]["ttt"])
    page = (out / "0000_clip" / "report.html").read_text()
    assert "causal vs leaky scoring" in page and "legacy (leaky) vs causal" in page


def test_causal_reading_switches_only_inside_the_block(legacy_dirs):
    directory, base = legacy_dirs["legacy"]
    model = load(directory, base=str(base)).model
    codes = random_audio_codes(1, 12, seed=3)
    leaky = score(model, codes, "full").loss
    with causal_reading(model) as switched:
        assert switched == 2
        inside = score(model, codes, "stream").loss  # allowed: nothing is non-causal inside
    causal = score(load(directory, base=str(base), legacy_causal=True).model, codes, "full").loss
    torch.testing.assert_close(inside, causal, rtol=0, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(score(model, codes, "full").loss, leaky, rtol=0, atol=0, equal_nan=True)
    assert not torch.allclose(leaky.nan_to_num(), causal.nan_to_num())


def test_app_comparison_scores_legacy_checkpoints_causally_too(legacy_dirs):
    """The app's live comparison adds the causal comparison and its note to the results document."""
    directory, base = legacy_dirs["legacy"]
    loaded = {"base": load(base), "legacy": load(directory, base=str(base))}
    locks = {id(c.model): threading.Lock() for c in loaded.values()}
    cache = types.SimpleNamespace(get=lambda name, base=None: loaded[name], lock=lambda model: locks[id(model)])
    codes = random_audio_codes(1, 14, seed=6)
    updates = list(
        compare_live(cache, "base", "legacy", codes, live_options("chunked").replace(chunk_size=8, record_every=8))
    )
    doc = updates[-1].document
    comp = doc["runs"]["ttt"]["causal_comparison"]
    expected = score(load(directory, base=str(base), legacy_causal=True).model, codes, "chunked").loss[0]
    got = torch.tensor([np.nan if v is None else v for v in comp["loss_per_token_causal"]])
    torch.testing.assert_close(got, expected.nanmean(dim=0), rtol=0, atol=1e-5, equal_nan=True)
    assert "causal_comparison" not in doc["runs"]["baseline"]
    assert any("scored causally" in note for note in doc["config"]["notes"]["ttt"])
    assert not any(locks[k].locked() for k in locks)
