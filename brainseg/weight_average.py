"""A moving average of the weights (Polyak averaging) for validation and the exported model.

Keras' optimizers keep one when asked (`use_ema`): after every step, a <- m a + (1 - m) w.
They start it at the weights after the first step, which are as good as untrained and still
weigh m^n after n steps: 0.99^180 = 16% after the demo's few epochs, enough to spoil the
model a short run exports. Here the average is bias-corrected instead, as Adam corrects its
moments: it is the average Keras would keep had it started from zero, divided by (1 - m^n).
That is the plain mean of the weights while n is small against 1 / (1 - m), and Keras'
average once m^n is negligible (after 540 steps at 0.99, the benchmark's 12 epochs, the
untrained start weighed 0.4% in Keras' average).

Training itself continues from the weights, never the average: averaged_weights() swaps the
average in for validation and the export only.
"""
import contextlib

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="brainseg")
class AdamWithWeightAverage(keras.optimizers.Adam):
    """Adam whose moving average of the weights is bias-corrected (see the module docstring).
    With momentum 0 it is plain Adam, keeping no average."""

    def __init__(self, learning_rate, momentum, **kwargs):
        super().__init__(learning_rate=learning_rate, use_ema=momentum > 0,
                         ema_momentum=momentum, **kwargs)

    def get_config(self):
        config = super().get_config()
        momentum, use_ema = config.pop("ema_momentum"), config.pop("use_ema")
        config["momentum"] = momentum if use_ema else 0.0
        return config

    def _update_model_variables_moving_average(self, trainable_variables):
        """Keras calls this after each update, before counting it in `iterations`: update
        n = iterations + 1 takes momentum m (1 - m^(n-1)) / (1 - m^n), which is 0 for the
        first (the average starts at those weights) and tends to m."""
        momentum = self.ema_momentum
        updates_before = ops.cast(self.iterations, "float32")
        corrected = (momentum * (1 - ops.power(momentum, updates_before))
                     / (1 - ops.power(momentum, updates_before + 1)))
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                weight = ops.cast(corrected, variable.dtype)
                average.assign(weight * average + (1 - weight) * variable)


@contextlib.contextmanager
def averaged_weights(model, optimizer):
    """Inside the block the model holds the moving average of its weights that the optimizer
    keeps, so validation and the export see it; after it, its own weights again, from which
    training and the resumable state continue. Without an average, the model as it is."""
    if not optimizer.use_ema:
        yield
        return
    # Keras' own record of the averages, in the order of model.trainable_variables (the list
    # the optimizer was built on); its SwapEMAWeights callback swaps the same way.
    pairs = list(zip(model.trainable_variables, optimizer._model_variables_moving_average))
    swap_values(pairs)
    try:
        yield
    finally:
        swap_values(pairs)


def swap_values(pairs):
    """Exchanges the values of each (weight, average) pair, exactly (no arithmetic)."""
    for variable, average in pairs:
        weights = variable.numpy()
        variable.assign(average)
        average.assign(weights)
