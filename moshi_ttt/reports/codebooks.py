"""Loss per codebook group: Mimi's codebook 0 (semantic, distilled from a speech model) against codebooks 1-7
(acoustic, the residual detail), from results.json's "loss_per_codebook".

Notation: K codebooks (8 for Mimi), T tokens. Losses are nats per valid (token, codebook) entry; NaN (null in the
JSON) marks invalid entries. Everything here takes results.json dicts and returns arrays or rows.
"""

from __future__ import annotations

import numpy as np

from moshi_ttt.reports import headline


def group_names(num_codebooks: int) -> dict[str, list[int]]:
    """The groups of `num_codebooks` codebooks: name -> codebook indices (semantic: 0; acoustic: the others)."""
    groups = {"semantic (codebook 0)": [0]}
    if num_codebooks > 1:
        groups[f"acoustic (codebooks 1-{num_codebooks - 1})"] = list(range(1, num_codebooks))
    return groups


def loss_array(loss_per_codebook) -> np.ndarray:
    """results.json "loss_per_codebook" ([K][T], null where invalid) as a float array [K, T] with NaN."""
    return np.asarray([[np.nan if v is None else v for v in row] for row in loss_per_codebook], dtype=np.float64)


def group_losses(loss_per_codebook) -> dict[str, np.ndarray]:
    """Per-token mean loss of each group over its valid entries: name -> [T] (NaN where the group has none)."""
    loss = loss_array(loss_per_codebook)  # [K, T]
    out = {}
    for name, books in group_names(loss.shape[0]).items():
        part = loss[books]  # [k, T]
        count = np.isfinite(part).sum(axis=0)
        total = np.where(np.isfinite(part), part, 0.0).sum(axis=0)
        out[name] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def codebook_rows(document: dict, ttt_run: str = "ttt") -> list[dict]:
    """The per-codebook table of a document with a "baseline" and a `ttt_run` run: one row per group, then one per
    codebook, with both mean losses and TTT's improvement (%, positive: lower loss) over the scored tokens and past
    the TTT model's attention context. [] without both runs or their "loss_per_codebook".

    Returns:
        dicts with the keys "codebooks", "baseline loss", "TTT loss", "improvement %", "improvement % past context".
    """
    runs = document.get("runs", {})
    base, ttt = runs.get("baseline"), runs.get(ttt_run)
    if not base or not ttt or not base.get("loss_per_codebook") or not ttt.get("loss_per_codebook"):
        return []
    b, t = loss_array(base["loss_per_codebook"]), loss_array(ttt["loss_per_codebook"])
    if b.shape != t.shape:
        return []
    context = ttt.get("context_tokens")
    groups = {**group_names(b.shape[0]), **{f"codebook {k}": [k] for k in range(b.shape[0])}}
    rows = []
    for name, books in groups.items():
        whole = headline.mean_loss(b[books]), headline.mean_loss(t[books])
        past = (headline.mean_loss_past_context(b[books], context), headline.mean_loss_past_context(t[books], context))
        rows.append({
            "codebooks": name,
            "baseline loss": whole[0],
            "TTT loss": whole[1],
            "improvement %": headline.improvement_pct(*whole),
            "improvement % past context": headline.improvement_pct(*past),
        })  # fmt: skip
    return rows
