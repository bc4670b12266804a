"""Batches of independent clips: whole short clips, random crops of long ones and synthetic copy clips.

Every row is a clip of its own (each forward starts the TTT layers from W_base; nothing is carried from one batch to
the next), drawn by one seeded `random.Random`: the same seed and clips give the same batches in every process, so
a TTT model and its fair baseline trained in two processes still see the same batches (`moshi_ttt.training.paired`).
This is the data of the demo assets' recipe (demo_assets/MANIFEST.md, J7/J8).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipMixConfig:
    """What a batch holds: rows of `seq_len` tokens, each a copy clip, a short clip or a crop of a long one."""

    batch_size: int = 8  # rows per batch
    seq_len: int = 288  # tokens per row; shorter clips are padded with -1 (masked out of the loss)
    short_frac: float = 0.5  # share of rows that are whole short clips (their first seq_len tokens)
    copy_frac: float = 0.0  # share of rows that are synthetic copy clips (`copy_clip`); the rest: crops of long clips
    seed: int = 0  # seed of the one random.Random that draws every row

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {self.batch_size} and {self.seq_len}")
        if self.short_frac < 0 or self.copy_frac < 0 or self.short_frac + self.copy_frac > 1:
            raise ValueError(
                f"short_frac and copy_frac must be >= 0 with a sum <= 1, got {self.short_frac} and {self.copy_frac}"
            )


def copy_clip(rng: random.Random, length: int, card: int = 256, n_q: int = 8) -> torch.Tensor:
    """A synthetic repeat clip of uniformly random codes, cut to `length` tokens.

    A passage of 57-150 frames (4.6-12 s at 12.5 Hz, longer than the demo LM's 50-token attention window) read three
    times with fresh random filler of 19-60 frames between: on the 2nd and 3rd readings nothing but an in-context
    memory predicts the next frame (the weights cannot).

    Args:
        rng: draws the lengths and the seed of the codes' torch.Generator (one `randrange` first).
        length: tokens kept from the start of the clip.
        card: codebook size (codes are in [0, card)).
        n_q: codebooks.
    Returns:
        Codes [n_q, <= length] (int64).
    """
    g = torch.Generator().manual_seed(rng.randrange(2**62))
    passage = torch.randint(0, card, (n_q, rng.randint(57, 150)), generator=g)  # [n_q, P]
    parts = [torch.randint(0, card, (n_q, rng.randint(1, 12)), generator=g), passage]
    for _ in range(2):
        parts += [torch.randint(0, card, (n_q, rng.randint(19, 60)), generator=g), passage]
    return torch.cat(parts, dim=1)[:, :length]


class ClipMixBatcher:
    """Draws batches of `ClipMixConfig.batch_size` independent rows (a `BatchSource` of `moshi_ttt.training.data`).

    Each row: with probability copy_frac a `copy_clip`, with probability short_frac a short clip chosen uniformly,
    else a crop of a long clip chosen with probability proportional to its length (crops start uniformly).
    """

    def __init__(
        self, short: list[torch.Tensor], long: list[torch.Tensor], cfg: ClipMixConfig, card: int = 256, n_q: int = 8
    ):
        """Args:
        short: audio codes [n_q, T] of the short clips (read whole, from their start).
        long: audio codes [n_q, T] of the long clips (random crops).
        cfg: the mix.
        card, n_q: the copy clips' codebook size and codebooks (the model's).
        """
        if cfg.short_frac > 0 and not short:
            raise ValueError(f"short_frac is {cfg.short_frac} but no short clip was given")
        if cfg.short_frac + cfg.copy_frac < 1 and not long:
            raise ValueError("the mix has crops of long clips (short_frac + copy_frac < 1) but no long clip was given")
        for i, codes in enumerate([*short, *long]):
            if codes.dim() != 2 or codes.shape[0] != n_q or codes.shape[1] == 0:
                raise ValueError(f"clip {i}: codes must be [{n_q}, T] with T > 0, got {list(codes.shape)}")
        self.short, self.long, self.cfg, self.card, self.n_q = short, long, cfg, card, n_q
        self.lengths = [f.shape[1] for f in long]  # crop weights
        self.rng = random.Random(cfg.seed)

    def next_batch(self) -> tuple[torch.Tensor, None]:
        """Returns audio codes [B, n_q, seq_len] (-1 where padded) and None: no state is carried between batches."""
        L, rng = self.cfg.seq_len, self.rng
        rows = []
        for _ in range(self.cfg.batch_size):
            u = rng.random()
            if u < self.cfg.copy_frac:
                f = self.copy_row(rng, L)
            elif u < self.cfg.copy_frac + self.cfg.short_frac:
                f = rng.choice(self.short)[:, :L]
            else:
                f = rng.choices(self.long, weights=self.lengths)[0]
                start = rng.randrange(0, max(1, f.shape[1] - L + 1))
                f = f[:, start : start + L]
            rows.append(torch.nn.functional.pad(f, (0, L - f.shape[1]), value=-1))  # [n_q, L]
        return torch.stack(rows), None

    def copy_row(self, rng: random.Random, length: int) -> torch.Tensor:
        """A copy row: `copy_clip` (a subclass may draw another kind from the same `rng`)."""
        return copy_clip(rng, length, self.card, self.n_q)

    def state(self) -> dict:
        """The position in the stream (JSON-serialisable): the random.Random state."""
        version, internal, gauss_next = self.rng.getstate()
        return {"rng": [version, list(internal), gauss_next], "seed": self.cfg.seed}

    def load_state(self, state: dict) -> None:
        """Continues the stream from `state()`."""
        if state.get("seed") != self.cfg.seed:
            raise ValueError(f"saved clip mix has seed {state.get('seed')}, this one {self.cfg.seed}")
        version, internal, gauss_next = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss_next))
