"""Paired fair-baseline training: one init, the same batches, lockstep = one model per process; the clip mix."""

import random

import pytest
import torch
from tiny_models import tiny_lm_config

from moshi_ttt import TTTConfig, ttt_blocks
from moshi_ttt.training.clip_mix import ClipMixBatcher, ClipMixConfig, copy_clip
from moshi_ttt.training.paired import PairedTrainer, TTTStart, fair_pair, pair_member, seeded_lm
from moshi_ttt.training.schedule import LrSchedule
from moshi_ttt.training.trainer import TrainConfig, Trainer

CARD = 24
LM = tiny_lm_config(card=CARD, num_layers=2)
TTT = TTTConfig(layers="0", mini_batch_size=4, share_qk=True, num_heads=1, branch_input="before_attention")
START = TTTStart(seed=1, qk_shift=True, identity_qv=True)
CFG = TrainConfig(
    steps=3, lr=3e-3, alpha_lr_multiplier=10.0, weight_decay=0.01, betas=(0.9, 0.95), train_all=True,
    schedule=LrSchedule(warmup_steps=2, decay="cosine", decay_start=0.3),
)  # fmt: skip


def clips() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    short = [torch.randint(0, CARD, (8, n), generator=g) for n in (10, 14, 20)]
    long = [torch.randint(0, CARD, (8, n), generator=g) for n in (40, 64)]
    return short, long


def source(seed: int = 0) -> ClipMixBatcher:
    return ClipMixBatcher(*clips(), ClipMixConfig(batch_size=3, seq_len=24, short_frac=0.3, copy_frac=0.3, seed=seed),
                          card=CARD)  # fmt: skip


def test_pair_starts_from_one_init_and_only_the_ttt_model_has_ttt_layers():
    pair = fair_pair(seeded_lm(LM, seed=0), TTT, START)
    ttt, base = pair.ttt.state_dict(), pair.baseline.state_dict()
    assert set(base) < set(ttt) and all(torch.equal(ttt[k], v) for k, v in base.items())
    assert list(ttt_blocks(pair.ttt)) == [0] and not ttt_blocks(pair.baseline)
    block = ttt_blocks(pair.ttt)[0]
    assert torch.equal(block.wq.weight, torch.eye(LM["dim"])) and not block.wv.bias.any()
    assert block.conv_k.weight[:, 0, TTT.conv_kernel - 2].eq(1).all()  # the one-token shift
    again = pair_member("ttt", seeded_lm(LM, seed=0), TTT, START).state_dict()
    assert all(torch.equal(again[k], v) for k, v in ttt.items())  # seeded: the same in another process


def test_pair_refuses_a_make_lm_that_is_not_deterministic():
    seeds = iter([0, 1])
    with pytest.raises(ValueError, match="different weights at its two calls"):
        fair_pair(lambda: seeded_lm(LM, seed=next(seeds))(), TTT, START)


def test_lockstep_pair_sees_the_same_batches_and_equals_one_model_per_process(monkeypatch):
    seen = []
    train_on = Trainer.train_on

    def recording(self, audio, new_file):
        seen.append((bool(ttt_blocks(self.model)), audio.clone()))
        return train_on(self, audio, new_file)

    monkeypatch.setattr(Trainer, "train_on", recording)
    paired = PairedTrainer(fair_pair(seeded_lm(LM, seed=0), TTT, START), source(), CFG)
    losses = paired.run()
    monkeypatch.setattr(Trainer, "train_on", train_on)
    assert len(losses) == 3 and paired.step_count == 3
    assert [has_ttt for has_ttt, _ in seen] == [True, False] * 3
    for (_, ttt_batch), (_, base_batch) in zip(seen[::2], seen[1::2], strict=True):
        assert torch.equal(ttt_batch, base_batch)
    assert not torch.equal(seen[0][1], seen[2][1])  # a new batch every step
    # The same members trained apart, each on its own stream of the same seed (the build's --variant processes).
    for kind, trained in (("ttt", paired.ttt.model), ("baseline", paired.baseline.model)):
        alone = Trainer(pair_member(kind, seeded_lm(LM, seed=0), TTT, START), source(), CFG)
        alone_losses = alone.run()
        assert alone_losses == [getattr(loss, kind) for loss in losses]
        for (name, a), b in zip(trained.state_dict().items(), alone.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    initial = seeded_lm(LM, seed=0)().state_dict()
    assert not torch.equal(paired.baseline.model.state_dict()["text_emb.weight"], initial["text_emb.weight"])


def test_paired_training_needs_train_all_and_a_real_pair():
    pair = fair_pair(seeded_lm(LM, seed=0), TTT, START)
    with pytest.raises(ValueError, match="needs TrainConfig.train_all"):
        PairedTrainer(pair, source(), TrainConfig(steps=1))
    with pytest.raises(ValueError, match="a model with TTT layers and a baseline without"):
        PairedTrainer(type(pair)(pair.baseline, pair.baseline), source(), CFG)


def test_clip_mix_is_seeded_and_resumes_exactly():
    batcher = source(seed=3)
    first = [batcher.next_batch() for _ in range(2)]
    state = batcher.state()
    later = [batcher.next_batch()[0] for _ in range(3)]
    resumed = source(seed=3)
    resumed.load_state(state)
    assert all(torch.equal(a, resumed.next_batch()[0]) for a in later)
    fresh = source(seed=3)
    assert all(torch.equal(a, fresh.next_batch()[0]) for a, _ in first)
    assert not torch.equal(first[0][0], source(seed=4).next_batch()[0])
    audio, new_file = first[0]
    assert new_file is None  # nothing is carried between batches: every row starts from W_base
    assert audio.shape == (3, 8, 24) and int(audio.min()) >= -1 and int(audio.max()) < CARD
    with pytest.raises(ValueError, match="saved clip mix has seed 3"):
        source(seed=4).load_state(state)


def test_copy_clip_reads_a_random_passage_three_times():
    clip = copy_clip(random.Random(0), length=10_000, card=CARD)  # [8, T]
    draws = random.Random(0)
    draws.randrange(2**62)  # the codes' seed
    passage, lead = draws.randint(57, 150), draws.randint(1, 12)
    gaps = [draws.randint(19, 60) for _ in range(2)]
    assert clip.shape == (8, lead + 3 * passage + sum(gaps))
    starts = [lead, lead + passage + gaps[0], lead + 2 * passage + sum(gaps)]
    readings = [clip[:, s : s + passage] for s in starts]
    assert torch.equal(readings[0], readings[1]) and torch.equal(readings[0], readings[2])
    assert not torch.equal(clip[:, :passage], clip[:, -passage:])  # the filler is random, not a copy
    assert copy_clip(random.Random(0), length=50, card=CARD).shape == (8, 50)


def test_a_subclass_draws_the_copy_rows_from_the_same_stream():
    class Marked(ClipMixBatcher):
        def copy_row(self, rng, length):
            rng.random()  # draws from the batcher's own stream, as copy_clip does
            return torch.full((8, length), CARD - 1)

    cfg = ClipMixConfig(batch_size=4, seq_len=24, short_frac=0.0, copy_frac=1.0, seed=5)
    audio, _ = Marked(*clips(), cfg, card=CARD).next_batch()
    assert bool((audio == CARD - 1).all())  # every row a copy row, each from the subclass
    plain = ClipMixBatcher(*clips(), cfg, card=CARD).next_batch()[0]
    assert plain.shape == audio.shape and not torch.equal(plain, audio)
