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


def test_averaged_weights_holds_adams_moving_average_and_gives_the_weights_back():
    """Inside the block the model holds the average Adam keeps (with momentum m, after the
    first step: a <- m a + (1 - m) w); after it, exactly its own weights again."""
    import keras
    import numpy as np
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=0.5)
    optimizer.build(net.trainable_variables)
    expected = None
    for step in range(3):
        gradients = [np.full(v.shape, step + 1.0, np.float32) for v in net.trainable_variables]
        optimizer.apply(gradients, net.trainable_variables)
        weights = [v.numpy() for v in net.trainable_variables]
        expected = weights if expected is None else [0.5 * a + 0.5 * w for a, w
                                                     in zip(expected, weights)]
    with train_horovod.averaged_weights(net, optimizer):
        for variable, average in zip(net.trainable_variables, expected):
            np.testing.assert_allclose(variable.numpy(), average, rtol=1e-6)
        assert not np.allclose(net.trainable_variables[0].numpy(), weights[0])
    for variable, own in zip(net.trainable_variables, weights):
        np.testing.assert_array_equal(variable.numpy(), own)


def test_without_a_weight_average_the_model_stays_as_it_is():
    import keras
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam(0.1)
    optimizer.build(net.trainable_variables)
    before = [v.numpy().copy() for v in net.trainable_variables]
    with train_horovod.averaged_weights(net, optimizer):
        assert all((v.numpy() == b).all() for v, b in zip(net.trainable_variables, before))
