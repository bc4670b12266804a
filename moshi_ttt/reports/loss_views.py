"""Loss views of one run: per codebook, semantic vs acoustic, text, and moshi-finetune's weighted loss.

Notation: K = 8 audio codebooks (codebook 0 is Mimi's semantic one, 1..K-1 the acoustic ones), T steps.

- `mean`: the plain mean over every valid (codebook, step) entry: results.json's `mean_loss`.
- `weighted_mean`: moshi-finetune's audio loss (finetune/loss.py `compute_loss_with_mask`, mode "audio"): the mean
  of the valid entries with codebook 0 weighted `first_codebook_weight_multiplier` times, sum(w * loss) / sum(w).
  With multiplier 1 it equals `mean`; the older TTT fork trained and ran its minimal pairs with 100.
- `text_weighted`: moshi-finetune's text loss (mode "text"): the valid text entries with the padding and
  end-of-padding tokens weighted `text_padding_weight`; `finetune_loss` = `text_weighted + weighted_mean`, the
  number moshi-finetune trains on and logs as its eval loss (None unless a text is scored).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LossViews:
    """Summary losses of one run (nats; NaN when nothing is valid or a valid entry is not finite)."""

    per_codebook: list[float]  # [K] mean of each codebook's valid entries
    semantic: float  # codebook 0
    acoustic: float  # codebooks 1..K-1, every valid entry counted once
    mean: float  # all valid entries (results.json "mean_loss")
    weighted_mean: float  # moshi-finetune's audio loss with first_codebook_weight_multiplier
    first_codebook_weight_multiplier: float
    text: float | None  # mean text cross-entropy; None when the text stream is not scored
    text_weighted: float | None  # moshi-finetune's text loss with text_padding_weight
    text_padding_weight: float
    finetune_loss: float | None  # text_weighted + weighted_mean: moshi-finetune's training / eval loss

    def as_dict(self) -> dict:
        return asdict(self)


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """sum(w * x) / sum(w) over the entries with w > 0 (NaN when none, or when one of them is not finite)."""
    keep = weights > 0
    total = weights[keep].sum()
    return float((values[keep] * weights[keep]).sum() / total) if total > 0 else float("nan")


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def loss_views(
    loss,
    mask,
    *,
    first_codebook_weight_multiplier: float = 1.0,
    text_loss=None,
    text_tokens=None,
    text_padding_ids: tuple[int, ...] = (),
    text_padding_weight: float = 0.5,
) -> LossViews:
    """The loss views of one batch row.

    Args:
        loss: [K, T] per-entry cross-entropy; mask: [K, T] bool, moshi's validity mask.
        first_codebook_weight_multiplier: weight of codebook 0 in `weighted_mean`.
        text_loss: [T] text cross-entropy (NaN where invalid) or None; text_tokens: [T] the text targets.
        text_padding_ids: the text tokens moshi-finetune weighs `text_padding_weight` (padding, end of padding).
    Returns:
        LossViews.
    """
    loss, valid = _array(loss).astype(np.float64), _array(mask).astype(bool)
    if loss.ndim != 2 or loss.shape != valid.shape:
        raise ValueError(f"expected loss and mask [K, T], got {list(loss.shape)} and {list(valid.shape)}")
    ones = valid.astype(np.float64)  # [K, T]
    per_codebook = [_weighted_mean(loss[k], ones[k]) for k in range(loss.shape[0])]
    weights = ones.copy()
    weights[0] *= first_codebook_weight_multiplier
    text = text_weighted = finetune = None
    if text_loss is not None:
        text_values = _array(text_loss).astype(np.float64)  # [T]
        tokens = _array(text_tokens)  # [T]
        # moshi's text mask: every step but the zero token (-1); its text stream is undelayed.
        text_valid = (tokens >= 0).astype(np.float64)
        text_weights = text_valid * np.where(np.isin(tokens, list(text_padding_ids)), text_padding_weight, 1.0)
        text = _weighted_mean(text_values, text_valid)
        text_weighted = _weighted_mean(text_values, text_weights)
    weighted = _weighted_mean(loss, weights)
    if text_weighted is not None:
        finetune = text_weighted + weighted
    return LossViews(
        per_codebook=per_codebook,
        semantic=per_codebook[0],
        acoustic=_weighted_mean(loss[1:], ones[1:]),
        mean=_weighted_mean(loss, ones),
        weighted_mean=weighted,
        first_codebook_weight_multiplier=float(first_codebook_weight_multiplier),
        text=text,
        text_weighted=text_weighted,
        text_padding_weight=float(text_padding_weight),
        finetune_loss=finetune,
    )


def from_result(result, options, text_padding_ids: tuple[int, ...], row: int = 0) -> LossViews:
    """The loss views of batch row `row` of a complete ScoreResult under a run's RunOptions (its weights).

    Args:
        text_padding_ids: the model's (text_padding_token_id, end_of_text_padding_id).
    """
    text_loss = None if result.text_loss is None else result.text_loss[row]
    return loss_views(
        result.loss[row],
        result.mask[row],
        first_codebook_weight_multiplier=options.first_codebook_weight_multiplier,
        text_loss=text_loss,
        text_tokens=None if result.text_tokens is None else result.text_tokens[row],
        text_padding_ids=tuple(text_padding_ids),
        text_padding_weight=options.text_padding_weight,
    )


def view_rows(runs: dict[str, dict]) -> list[dict]:
    """One report row per run that has "loss_views" (results.json): the views side by side."""
    rows = []
    for name, run in runs.items():
        views = run.get("loss_views")
        if not views:
            continue
        row = {
            "run": name,
            "mean": views["mean"],
            f"weighted (cb0 x{views['first_codebook_weight_multiplier']:g})": views["weighted_mean"],
            "semantic (cb0)": views["semantic"],
            "acoustic (cb1-7)": views["acoustic"],
        }
        if views.get("text") is not None:
            row["text"] = views["text"]
            row[f"text (padding x{views['text_padding_weight']:g})"] = views["text_weighted"]
            row["moshi-finetune loss"] = views["finetune_loss"]
        row.update({f"cb{k}": value for k, value in enumerate(views["per_codebook"])})
        rows.append(row)
    return rows
