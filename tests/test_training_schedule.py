"""The lr schedule gives the floats the demo assets were trained with (scripts/recipe_joint.py's cosine_factor and
lr expression at commit bc785c4, before the recipe moved into moshi_ttt.training)."""

import pytest

from moshi_ttt.training.schedule import LrSchedule

# cosine_factor(step, steps, decay_start) of the old recipe_joint.py, written by repr() from the old code.
OLD_COSINE_FACTOR = [
    (1800, 0.5, 0, 1.0), (1800, 0.5, 899, 1.0), (1800, 0.5, 900, 1.0), (1800, 0.5, 901, 0.9999969538288952),
    (1800, 0.5, 1234, 0.6969709547954756), (1800, 0.5, 1799, 3.046171104803541e-06),
    (1800, 0.0, 0, 1.0), (1800, 0.0, 1, 0.9999992384566438), (1800, 0.0, 900, 0.5),
    (1800, 0.0, 1799, 7.615433561536378e-07), (300, 0.0, 150, 0.5), (300, 0.0, 299, 2.7415317243928428e-05),
    (7, 0.3, 2, 1.0), (7, 0.3, 3, 0.9190440524459204), (7, 0.3, 6, 0.09929318906602175),
    (1000, 0.25, 250, 1.0), (1000, 0.25, 251, 0.9999956135155688), (1000, 0.25, 999, 4.386484431184723e-06),
]  # fmt: skip

# The old per-group lr, base * min(1, (step + 1) / warmup) * cosine_factor(step, steps, decay_start), multiplied in
# that order (the other order gives other last bits at these steps, see test_lr_multiplies_in_the_old_order).
OLD_LR = [
    # J8: warm-up 30, 1800 steps, held for half; the base group (lr 3e-3) and the gate group (x10).
    (0.003, 30, 1800, 0.5, 0, 0.0001), (0.003, 30, 1800, 0.5, 28, 0.0029000000000000002),
    (0.003, 30, 1800, 0.5, 29, 0.003), (0.003, 30, 1800, 0.5, 1500, 0.0007500000000000003),
    (0.003, 30, 1800, 0.5, 1799, 9.138513314410623e-09), (0.03, 30, 1800, 0.5, 28, 0.028999999999999998),
    (0.03, 30, 1800, 0.5, 1799, 9.138513314410623e-08),
    # J1-J3: warm-up 30 and the cosine from step 0 (both factors below 1 at once).
    (0.003, 30, 300, 0.0, 7, 0.0007989257908897833), (0.003, 30, 300, 0.0, 16, 0.0016880966315099292),
    (0.03, 30, 300, 0.0, 4, 0.004997807075247145), (0.03, 30, 300, 0.0, 18, 0.018831728881922544),
]  # fmt: skip


@pytest.mark.parametrize(
    ("steps", "decay_start", "step", "expected"),
    OLD_COSINE_FACTOR,
    ids=[f"{c[0]}-{c[1]}-step{c[2]}" for c in OLD_COSINE_FACTOR],
)
def test_decay_factor_is_the_old_cosine_factor_bit_for_bit(steps, decay_start, step, expected):
    factor = LrSchedule(decay="cosine", decay_start=decay_start).decay_factor(step, steps)
    assert factor == expected, (factor, expected)


@pytest.mark.parametrize(
    ("base", "warmup", "steps", "decay_start", "step", "expected"),
    OLD_LR,
    ids=[f"lr{c[0]}-w{c[1]}-{c[2]}-{c[3]}-step{c[4]}" for c in OLD_LR],
)
def test_lr_is_the_old_recipe_lr_bit_for_bit(base, warmup, steps, decay_start, step, expected):
    lr = LrSchedule(warmup_steps=warmup, decay="cosine", decay_start=decay_start).lr(base, step, steps)
    assert lr == expected, (lr, expected)


def test_lr_multiplies_in_the_old_order():
    """The reference values tell the two orders of the product apart (else the tests above could not fail on it)."""
    schedule = LrSchedule(warmup_steps=30, decay="cosine")
    other_order = 0.003 * (schedule.warmup_factor(7) * schedule.decay_factor(7, 300))
    assert other_order != 0.0007989257908897833 == schedule.lr(0.003, 7, 300)


def test_constant_schedule_keeps_the_lr_exactly_and_warms_up_linearly():
    assert [LrSchedule().lr(1e-3, s, 100) for s in (0, 50, 99)] == [1e-3] * 3
    warm = LrSchedule(warmup_steps=4)
    assert [warm.warmup_factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"decay": "linear"}, "decay must be one of"),
        ({"decay": "cosine", "decay_start": 1.0}, r"decay_start must lie in \[0, 1\)"),
        ({"decay_start": 0.5}, "needs decay 'cosine'"),
    ],
    ids=["negative-warmup", "unknown-decay", "decay-start-1", "hold-without-decay"],
)
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LrSchedule(**kwargs)
