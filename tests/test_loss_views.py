"""Loss views against hand computations: per codebook, semantic vs acoustic, text, moshi-finetune's weighted losses;
and where they appear (results.json, CSV, report)."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import random_audio_codes, tiny_lm

from moshi_ttt import RunOptions, score
from moshi_ttt.compat.sequence import model_codes
from moshi_ttt.reports import loss_views
from moshi_ttt.reports.results import results_document, run_record, write_report


def small_case():
    """loss[k, t] = k + 1 + t / 10 over K = 8, T = 3; codebooks 1-7 invalid at the last step (their delay), codebook
    3 also at step 0. Text: padding (3) then a word token (7) then moshi's zero token (-1, not scored)."""
    loss = torch.tensor([[k + 1 + t / 10 for t in range(3)] for k in range(8)])
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[1:, 2] = False
    mask[3, 0] = False
    text_loss = torch.tensor([0.5, 2.0, float("nan")])
    text_tokens = torch.tensor([3, 7, -1])
    return loss, mask, text_loss, text_tokens


def test_each_view_equals_its_hand_computation():
    loss, mask, text_loss, text_tokens = small_case()
    views = loss_views.loss_views(
        loss, mask, first_codebook_weight_multiplier=100.0, text_loss=text_loss, text_tokens=text_tokens,
        text_padding_ids=(3, 0), text_padding_weight=0.5,
    )  # fmt: skip
    # Codebook 0: 1.0, 1.1, 1.2. Codebook 3: only 4.1. Codebook k of the others: k + 1 and k + 1.1.
    assert views.per_codebook == pytest.approx([1.1, 2.05, 3.05, 4.1, 5.05, 6.05, 7.05, 8.05])
    assert views.semantic == pytest.approx(1.1)
    acoustic_sum = 2.0 + 2.1 + 3.0 + 3.1 + 4.1 + 5.0 + 5.1 + 6.0 + 6.1 + 7.0 + 7.1 + 8.0 + 8.1  # 66.7 over 13
    assert views.acoustic == pytest.approx(acoustic_sum / 13)
    assert views.mean == pytest.approx((3.3 + acoustic_sum) / 16)  # = 4.375
    assert views.weighted_mean == pytest.approx((100 * 3.3 + acoustic_sum) / (100 * 3 + 13))  # moshi-finetune's
    assert views.text == pytest.approx((0.5 + 2.0) / 2)
    assert views.text_weighted == pytest.approx((0.5 * 0.5 + 2.0) / (0.5 + 1))  # padding weighs 0.5
    assert views.finetune_loss == pytest.approx(views.text_weighted + views.weighted_mean)
    plain = loss_views.loss_views(loss, mask)
    assert plain.weighted_mean == pytest.approx(plain.mean) and plain.text is None and plain.finetune_loss is None


def test_a_non_finite_valid_entry_makes_the_views_it_enters_non_finite():
    loss, mask, _, _ = small_case()
    loss[2, 1] = float("nan")
    loss[5, 2] = float("inf")  # invalid (masked): ignored
    views = loss_views.loss_views(loss, mask)
    assert not any(math.isfinite(v) for v in (views.mean, views.acoustic, views.weighted_mean, views.per_codebook[2]))
    assert math.isfinite(views.per_codebook[5])
    assert views.semantic == pytest.approx(1.1)  # codebook 0 is untouched


def moshi_finetune_losses(model, audio_codes, text_tokens, multiplier: float, padding_weight: float):
    """moshi-finetune's train.py losses written out from its description (finetune/loss.py: masked cross-entropy
    weighted per entry, sum(w * loss) / sum(w); audio: codebook 0 x multiplier; text: padding and end-of-padding
    x padding_weight) on LMModel.forward's outputs."""
    codes = model_codes(model, audio_codes, text_tokens)
    with torch.no_grad():
        out = model(codes)

    def weighted(logits, target, mask, weights):
        ce = F.cross_entropy(logits.flatten(0, -2).nan_to_num(), target.clamp_min(0).flatten(), reduction="none")
        w = (mask.float() * weights).flatten()
        return float((ce * w).sum() / w.sum())

    audio_weights = torch.ones_like(out.mask, dtype=torch.float)
    audio_weights[:, 0] = multiplier
    audio = weighted(out.logits, audio_codes, out.mask, audio_weights)
    text_target = codes[:, :1]
    is_padding = (text_target == model.text_padding_token_id) | (text_target == model.end_of_text_padding_id)
    text = weighted(out.text_logits, text_target, out.text_mask, torch.where(is_padding, padding_weight, 1.0))
    return audio, text


@pytest.mark.parametrize("mode", ["full", "chunked", "stream"])
def test_weighted_views_of_a_scored_run_equal_moshi_finetunes_losses(mode):
    model = tiny_lm(0)
    codes = random_audio_codes(1, 30, seed=1)
    text = torch.randint(0, model.text_card, (1, 30), generator=torch.Generator().manual_seed(2))
    text[0, ::3] = model.text_padding_token_id
    text[0, 1::7] = model.end_of_text_padding_id
    options = RunOptions(mode=mode, text_stream="transcript", first_codebook_weight_multiplier=100.0)
    result = score(model, codes, options=options, text_tokens=text)
    ids = (model.text_padding_token_id, model.end_of_text_padding_id)
    views = loss_views.from_result(result, options, ids)
    audio, text_loss = moshi_finetune_losses(model, codes, text, 100.0, 0.5)
    assert views.weighted_mean == pytest.approx(audio, abs=1e-5)
    assert views.text_weighted == pytest.approx(text_loss, abs=1e-5)
    assert views.finetune_loss == pytest.approx(audio + text_loss, abs=1e-5)
    assert views.mean == pytest.approx(float(result.loss.nanmean()), abs=1e-6)


def test_views_go_to_results_json_csv_and_the_report(tmp_path):
    model = tiny_lm(0)
    codes = random_audio_codes(1, 20, seed=3)
    text = torch.full((1, 20), model.text_padding_token_id)
    text[0, 5:8] = torch.tensor([4, 5, 6])
    options = RunOptions(text_stream="transcript", first_codebook_weight_multiplier=100.0)
    result = score(model, codes, options=options, text_tokens=text)
    views = loss_views.from_result(result, options, (model.text_padding_token_id, model.end_of_text_padding_id))
    runs = {"baseline": run_record(result, checkpoint="tiny", views=views)}
    paths = write_report(tmp_path, results_document({"name": "x.wav", "tokens": 20}, {}, runs))
    doc = json.loads(paths["json"].read_text())
    stored = doc["runs"]["baseline"]["loss_views"]
    assert stored["weighted_mean"] == pytest.approx(views.weighted_mean) and len(stored["per_codebook"]) == 8
    assert len(doc["runs"]["baseline"]["text_loss_per_token"]) == 20
    rows = list(csv.DictReader(paths["csv"].open()))
    assert float(rows[6]["text_loss"]) == pytest.approx(float(result.text_loss[0, 6]), rel=1e-5)
    page = paths["html"].read_text()
    assert "Loss views" in page and "weighted (cb0 x100)" in page and "moshi-finetune loss" in page


# The older TTT fork's own code (tests/data/legacy_fork/README.md, "Loss and minimal-pair figures"), run outside the
# repository on its mlp3_full checkpoint and the first 200 frames of the v1 demo_plain.wav encoded by tiny_mimi() (those
# codes are kept in tests/data/legacy_fork/v1_demo_plain_200_codes.json: the demo clips were rebuilt for issue 21):
FORK_LOSS_PY = {1.0: 3.418752908706665, 100.0: 4.1427178382873535}  # finetune/loss.py, audio, padding text
FORK_COMPUTE_LIKELIHOOD = 3.398691415786743  # paper_metrics._compute_likelihood: zero text, codebook 0 x100


def test_the_older_forks_loss_and_minimal_pair_figures_are_reproduced_with_its_conventions():
    import json

    from moshi_ttt import load
    from moshi_ttt.benchmarks.minimal_pairs import clip_score

    root = Path(__file__).resolve().parent.parent
    kept = json.loads((root / "tests" / "data" / "legacy_fork" / "v1_demo_plain_200_codes.json").read_text())
    codes = torch.tensor(kept["codes"])[None]  # [1, 8, 200]
    model = load(root / "tests" / "data" / "legacy_fork" / "mlp3_full").model
    ids = (model.text_padding_token_id, model.end_of_text_padding_id)
    for multiplier, expected in FORK_LOSS_PY.items():
        options = RunOptions(mode="chunked", first_codebook_weight_multiplier=multiplier)
        views = loss_views.from_result(score(model, codes, options=options), options, ids)
        assert views.weighted_mean == pytest.approx(expected, abs=1e-5)
    fork_convention = RunOptions(mode="full", text_stream="zero", first_codebook_weight_multiplier=100.0)
    assert clip_score(model, codes, fork_convention).nll_mean == pytest.approx(FORK_COMPUTE_LIKELIHOOD, abs=1e-5)
