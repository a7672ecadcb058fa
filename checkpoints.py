"""Checkpoints that let a crashed run continue where it stopped, and the model inference loads.

OUTPUT_DIR holds, after every epoch:

    training_state_epochNNNN.keras  the compiled model: weights *and* optimizer state (Adam's
                                    moments and its step counter, hence the learning-rate
                                    schedule position), written by rank 0
    training_state.json             the commit record: which state file is current, epochs
                                    done, best validation Dice, epochs without improvement
    model.keras                     the best epoch by validation Dice, without optimizer:
                                    what inference.py loads (compile=False, safe mode)

Why two files for the state: the .keras file is the format Keras 3 restores model and
optimizer from (model.load_weights also reads the optimizer variables of a compiled model),
but it has no place for the epoch and the early-stopping counters. Each file is written under
a temporary name and renamed (os.replace is atomic), the state file first and the JSON last,
so the JSON only ever names a complete state file and a crash at any moment leaves the
previous epoch's pair intact. Older state files are deleted only after the JSON moved on.

Nothing here knows about Horovod: train_horovod.py has rank 0 call these and broadcasts.
"""
import glob
import hashlib
import json
import os

import keras
import numpy as np

import atomic

STATE_RECORD = "training_state.json"
STATE_PATTERN = "training_state_epoch{epoch:04d}.keras"
EXPORT_NAME = "model.keras"


def weights_fingerprint(model):
    """A short hash of all weights, in model order: equal on every rank when the ranks stayed
    in sync, and equal to the fingerprint of a checkpoint the weights were loaded from."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def new_progress(num_workers, steps_per_epoch):
    """What a resume needs besides weights and optimizer: saved with every checkpoint."""
    return {"epoch": 0, "best_val_dice": -1.0, "best_epoch": 0,
            "epochs_without_improvement": 0, "stopped_early": False,
            "num_workers": num_workers, "steps_per_epoch": steps_per_epoch}


def record_epoch(progress, epoch, val_dice, patience):
    """Updates the progress after an epoch (0-based) and returns whether its validation Dice
    is the best so far. Early stopping, as keras.callbacks.EarlyStopping(monitor="val_dice",
    mode="max", patience=patience) would decide, but with its counters in `progress` so that
    they survive a restart (the Keras callback resets them in on_train_begin)."""
    improved = val_dice > progress["best_val_dice"]
    progress["epoch"] = epoch + 1
    progress["epochs_without_improvement"] = 0 if improved else \
        progress["epochs_without_improvement"] + 1
    if improved:
        progress.update(best_val_dice=val_dice, best_epoch=epoch + 1)
    progress["stopped_early"] = bool(patience) and \
        progress["epochs_without_improvement"] >= patience
    return improved


def save_state(model, output_dir, progress):
    """Writes the resumable state after an epoch. `progress` is a JSON-able dict that must
    hold "epoch" (epochs completed); the caller adds whatever else a resume needs."""
    state_name = STATE_PATTERN.format(epoch=progress["epoch"])
    atomic.replace_atomically(os.path.join(output_dir, state_name), model.save)
    record = dict(progress, state_file=state_name,
                  weights_fingerprint=weights_fingerprint(model))
    atomic.write_json(os.path.join(output_dir, STATE_RECORD), record)
    for old in glob.glob(os.path.join(output_dir, "training_state_epoch*.keras")):
        if os.path.basename(old) != state_name:
            os.remove(old)


def load_state(output_dir):
    """The last committed state record (with "state_path" added), or None for a fresh run.
    A record that is unreadable or names a missing file is an error naming the file: silently
    starting over would throw away hours of training."""
    record_path = os.path.join(output_dir, STATE_RECORD)
    if not os.path.exists(record_path):
        return None
    try:
        with open(record_path) as file:
            record = json.load(file)
        state_path = os.path.join(output_dir, record["state_file"])
        int(record["epoch"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{record_path}: not a valid training state record ({error!r}); "
                         f"delete it to start over") from error
    if not os.path.exists(state_path):
        raise FileNotFoundError(f"{record_path} names {state_path}, which does not exist; "
                                f"delete {record_path} to start over")
    return dict(record, state_path=state_path)


def restore_state(model, state):
    """Loads weights and optimizer state (including optimizer.iterations, which drives the
    learning-rate schedule) from a load_state() record into an already compiled model with a
    built optimizer. Keras skips unmatched parts of a weights file with only a warning, so the
    restored weights are checked against the fingerprint recorded when they were saved."""
    state_path = state["state_path"]
    try:
        model.load_weights(state_path)
    except Exception as error:
        raise ValueError(f"{state_path}: cannot restore the training state into this model "
                         f"({error}); was it written with other model settings?") from error
    restored = weights_fingerprint(model)
    if restored != state.get("weights_fingerprint", restored):
        raise ValueError(f"{state_path}: restored weights (fingerprint {restored}) differ "
                         f"from the saved ones ({state['weights_fingerprint']}); was it "
                         f"written with other model settings?")


def export_for_inference(model, path):
    """Saves the model without training-only objects (no optimizer, not compiled): a clone of
    the architecture, which keeps each layer's dtype policy (a bfloat16-trained model predicts
    in bfloat16 with a float32 output layer), carrying the current weights."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    atomic.replace_atomically(path, clone.save)
