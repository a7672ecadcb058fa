"""train_horovod.py pieces that run without mpirun: the learning-rate schedule and threads."""

import pytest

import train_horovod


def test_learning_rate_warms_up_to_the_scaled_rate_then_decays():
    schedule = train_horovod.learning_rate_schedule(
        base_lr=1e-3, num_workers=4, steps_per_epoch=10, epochs=5, warmup_epochs=1,
        final_lr_fraction=0.05)
    rate = lambda step: float(schedule(step))  # noqa: E731
    assert rate(0) == pytest.approx(1e-3)  # starts at the single-worker rate
    assert rate(5) == pytest.approx(2.5e-3)  # linear warm-up
    assert rate(10) == pytest.approx(4e-3)  # peak: base x workers
    assert rate(30) == pytest.approx(4e-3 * (0.05 + 0.95 * 0.5))  # cosine half-way
    assert rate(50) == pytest.approx(4e-3 * 0.05)  # final fraction of the peak
    decaying = [rate(step) for step in range(10, 51)]
    assert decaying == sorted(decaying, reverse=True)


def test_no_warmup_starts_at_the_scaled_rate():
    schedule = train_horovod.learning_rate_schedule(1e-3, 2, 10, 3, 0, 0.0)
    assert float(schedule(0)) == pytest.approx(2e-3)
    assert float(schedule(30)) == pytest.approx(0.0, abs=1e-9)
