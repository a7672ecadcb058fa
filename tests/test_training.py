"""train_horovod.py pieces that run without mpirun: the learning-rate schedule, the weight
average, and the timing behind PRECISION "auto"."""
import os

import keras
import pytest

import train_horovod
from brainseg import hardware, weight_average


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


def test_the_weight_average_is_bias_corrected_and_swapped_in_only_inside_the_block():
    """After n steps with momentum m the model holds, inside the block, the average Keras
    would keep had it started from zero, divided by (1 - m^n): sum_i (1 - m) m^(n-i) w_i /
    (1 - m^n), where w_i are the weights after step i. It never leans on the untrained start
    (Keras' own average gives the first step's weights m^(n-1)). After the block the model
    holds exactly its own weights again."""
    import keras
    import numpy as np
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    momentum, steps = 0.9, 5
    optimizer = weight_average.AdamWithWeightAverage(0.1, momentum)
    optimizer.build(net.trainable_variables)
    history = []
    for step in range(steps):
        gradients = [np.full(v.shape, (-1.0) ** step * (step + 1), np.float32)
                     for v in net.trainable_variables]
        optimizer.apply(gradients, net.trainable_variables)
        history.append([v.numpy() for v in net.trainable_variables])
    shares = np.array([(1 - momentum) * momentum ** (steps - i) for i in range(1, steps + 1)])
    shares /= 1 - momentum ** steps
    assert shares.sum() == pytest.approx(1.0)
    expected = [sum(share * weights[k] for share, weights in zip(shares, history))
                for k in range(len(history[0]))]
    keras_style = [momentum ** (steps - 1) * history[0][k]
                   + sum((1 - momentum) * momentum ** (steps - i) * history[i - 1][k]
                         for i in range(2, steps + 1)) for k in range(len(history[0]))]
    own = history[-1]
    with weight_average.averaged_weights(net, optimizer):
        for variable, average, keras_average in zip(net.trainable_variables, expected,
                                                    keras_style):
            np.testing.assert_allclose(variable.numpy(), average, rtol=1e-5, atol=1e-6)
            assert not np.allclose(variable.numpy(), keras_average, rtol=1e-3)
    for variable, weights in zip(net.trainable_variables, own):
        np.testing.assert_array_equal(variable.numpy(), weights)


def test_the_first_average_is_the_first_steps_weights():
    """Update 1 takes momentum 0: a run of one step validates its own weights."""
    import keras
    import numpy as np
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = weight_average.AdamWithWeightAverage(0.1, 0.99)
    optimizer.build(net.trainable_variables)
    optimizer.apply([np.ones(v.shape, np.float32) for v in net.trainable_variables],
                    net.trainable_variables)
    for variable, average in zip(net.trainable_variables,
                                 optimizer._model_variables_moving_average):
        np.testing.assert_allclose(average.numpy(), variable.numpy(), rtol=1e-6)


def test_without_a_weight_average_the_model_stays_as_it_is():
    import keras
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = weight_average.AdamWithWeightAverage(0.1, 0.0)
    optimizer.build(net.trainable_variables)
    assert not optimizer.use_ema
    before = [v.numpy().copy() for v in net.trainable_variables]
    with weight_average.averaged_weights(net, optimizer):
        assert all((v.numpy() == b).all() for v, b in zip(net.trainable_variables, before))


@pytest.mark.parametrize("momentum", [0.0, 0.99])
def test_the_optimizer_survives_its_config(momentum):
    """A saved training state stores the optimizer's config; loading it rebuilds the same."""
    optimizer = weight_average.AdamWithWeightAverage(0.1, momentum)
    again = weight_average.AdamWithWeightAverage.from_config(optimizer.get_config())
    assert (again.use_ema, again.get_config()["momentum"]) == (momentum > 0, momentum)


def tiny_args(*flags):
    return train_horovod.cli.parse("test", train_horovod.SETTINGS,
                                   ["--base-filters", "4", "--depth", "2", "--batch-size", "4",
                                    *flags], train_horovod.HELP, train_horovod.ALIASES)


def test_a_training_step_is_timed_in_the_precision_asked_for():
    images_shape, masks_shape = (100, 32, 32, 4), (100, 32, 32, 3)
    for policy in ("float32", "mixed_bfloat16"):
        fed = []  # the stall watchdog is fed after every step
        seconds = train_horovod.seconds_per_step(tiny_args(), images_shape, masks_shape, policy,
                                                 fed.append)
        assert 0 < seconds < 10
        assert keras.mixed_precision.global_policy().name == policy
        assert fed == [f"a training step timed in {policy}"] * 5
    keras.mixed_precision.set_dtype_policy("float32")


def test_the_precision_record_is_per_network_batch_and_threads():
    shapes = (100, 32, 32, 4), (100, 32, 32, 3)
    record = train_horovod.precision_record(tiny_args(), *shapes, 2)
    assert record == train_horovod.precision_record(tiny_args("--epochs", "9"), *shapes, 2)
    assert os.path.basename(record).startswith(f"training-precision-{hardware.cpu_id()}-")
    others = {train_horovod.precision_record(tiny_args("--base-filters", "8"), *shapes, 2),
              train_horovod.precision_record(tiny_args("--batch-size", "8"), *shapes, 2),
              train_horovod.precision_record(tiny_args(), *shapes, 1),
              train_horovod.precision_record(tiny_args("--context-slices", "1"), *shapes, 2),
              train_horovod.precision_record(tiny_args(), (100, 64, 64, 4), shapes[1], 2)}
    assert record not in others and len(others) == 5


def test_the_precision_record_changes_with_the_model_code(tmp_path, monkeypatch):
    """A record timed with other layers is not read: a new model.py is timed again."""
    shapes = (100, 32, 32, 4), (100, 32, 32, 3)
    record = train_horovod.precision_record(tiny_args(), *shapes, 2)
    changed = tmp_path / "model.py"
    with open(train_horovod.unet.__file__) as source:
        changed.write_text(source.read() + "\n# a changed layer\n")
    monkeypatch.setattr(train_horovod.unet, "__file__", str(changed))
    assert train_horovod.precision_record(tiny_args(), *shapes, 2) != record
