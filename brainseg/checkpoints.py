"""Checkpoints that let a crashed run continue where it stopped, and the model inference loads.

TRAIN_DIR holds, after every epoch:

    training_state_epochNNNN.keras  the compiled model: weights *and* optimizer state (Adam's
                                    moments and its step counter, hence the learning-rate
                                    schedule position), written by rank 0
    training_state.json             the commit record: which state file is current, epochs
                                    done, best validation Dice, epochs without improvement,
                                    and the random-number states of dropout
    model.keras                     the best epoch by validation Dice, without optimizer:
                                    what inference.py loads (compile=False, safe mode),
                                    with DESCRIPTION inside: how its input slices were made

Why two files for the state: the .keras file is the format Keras 3 restores model and
optimizer from (model.load_weights also reads the optimizer variables of a compiled model),
but it has no place for the epoch and the early-stopping counters, and it leaves out the
states of the layers' random-number generators (dropout's masks). Each file is written under
a temporary name and renamed (os.replace is atomic), the state file first and the JSON last,
so the JSON only ever names a complete state file and a crash at any moment leaves the
previous epoch's pair intact. Older state files are deleted only after the JSON moved on.

Nothing here knows about Horovod: train_horovod.py has rank 0 call these and broadcasts.
"""
import dataclasses
import glob
import hashlib
import json
import os
import zipfile

import numpy as np

from brainseg import atomic, hardware, json_names

STATE_RECORD = "training_state.json"
STATE_PATTERN = "training_state_epoch{epoch:04d}.keras"
EXPORT_NAME = "model.keras"
DESCRIPTION = "brainseg_description.json"  # inside the exported .keras archive


def weights_fingerprint(model):
    """A short hash of all weights, in model order: equal on every rank when the ranks stayed
    in sync, and equal to the fingerprint of a checkpoint the weights were loaded from."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class Progress:
    """What a resume needs besides weights and optimizer; saved with every checkpoint.
    Early stopping is decided here, as keras.callbacks.EarlyStopping(monitor="val_dice",
    mode="max", patience=patience) would decide, but with its counters saved, so that they
    survive a restart (the Keras callback resets them in on_train_begin)."""
    num_workers: int
    steps_per_epoch: int  # with num_workers: the schedule and data order a resume continues
    epochs: int = 0  # epochs the run that wrote it was asked for
    epoch: int = 0  # epochs completed
    best_val_dice: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    stopped_early: bool = False

    def record_epoch(self, epoch, val_dice, patience):
        """Updates the progress after an epoch (0-based); returns whether its validation
        Dice is the best so far."""
        improved = val_dice > self.best_val_dice
        self.epoch = epoch + 1
        self.epochs_without_improvement = 0 if improved else self.epochs_without_improvement + 1
        if improved:
            self.best_val_dice, self.best_epoch = val_dice, epoch + 1
        self.stopped_early = bool(patience) and self.epochs_without_improvement >= patience
        return improved

    def finished(self, epochs):
        return self.stopped_early or self.epoch >= epochs


@dataclasses.dataclass
class SavedState:
    """A committed checkpoint: its progress, the .keras file with weights and optimizer, the
    fingerprint of the weights in it, and the random-number states (random_states)."""
    progress: Progress
    path: str
    weights_fingerprint: str = ""
    random_states: list = None  # None: a record from before they were saved


def random_states(model):
    """The variables that hold the model's random-number states: one per layer that draws
    (Dropout; Keras' SeedGenerator, a seed and a counter advanced by every draw). Keras saves
    them neither in a .keras file nor in its weights, so without them a resumed run would draw
    the first epoch's dropout masks again and not continue as the uninterrupted run does."""
    return [variable for variable in model.variables
            if variable.path.endswith("seed_generator_state")]


def save_state(model, output_dir, progress):
    """Writes the resumable state after an epoch: the model (weights and optimizer) as
    training_state_epochNNNN.keras for progress.epoch, then the record naming it."""
    state_name = STATE_PATTERN.format(epoch=progress.epoch)
    atomic.replace_atomically(os.path.join(output_dir, state_name), model.save)
    record = dict(dataclasses.asdict(progress), state_file=state_name,
                  weights_fingerprint=weights_fingerprint(model),
                  random_states=[np.asarray(state).tolist() for state in random_states(model)])
    atomic.write_json(os.path.join(output_dir, STATE_RECORD), record)
    for old in glob.glob(os.path.join(output_dir, "training_state_epoch*.keras")):
        if os.path.basename(old) != state_name:
            os.remove(old)


def load_state(output_dir):
    """The last committed SavedState, or None for a fresh run. A record that is unreadable
    or names a missing file is an error naming the file: silently starting over would throw
    away hours of training. So is one naming a file outside output_dir (json_names)."""
    record_path = os.path.join(output_dir, STATE_RECORD)
    if not os.path.exists(record_path):
        return None
    def invalid(error):
        return ValueError(f"{record_path}: not a valid training state record ({error!r}); "
                          f"delete it to start over")
    try:
        with open(record_path) as file:
            record = json.load(file)
        state_file = record["state_file"]
    except (ValueError, KeyError, TypeError) as error:
        raise invalid(error) from error
    state_path = json_names.join(output_dir, state_file, record_path, "state_file")
    if not os.path.exists(state_path):
        raise FileNotFoundError(f"{record_path} names {state_path}, which does not exist; "
                                f"delete {record_path} to start over")
    try:
        fields = {field.name for field in dataclasses.fields(Progress)}
        progress = Progress(**{k: v for k, v in record.items() if k in fields})
        int(progress.epoch)
    except (ValueError, TypeError) as error:
        raise invalid(error) from error
    return SavedState(progress, state_path, record.get("weights_fingerprint", ""),
                      record.get("random_states"))


def restore_state(model, state):
    """Loads weights and optimizer state (including optimizer.iterations, which drives the
    learning-rate schedule) and the random-number states from a SavedState into an already
    compiled model with a built optimizer. Keras skips unmatched parts of a weights file with
    only a warning, so the restored weights are checked against the fingerprint recorded
    when they were saved."""
    try:
        model.load_weights(state.path)
    except Exception as error:
        raise ValueError(f"{state.path}: cannot restore the training state into this model "
                         f"({error}); was it written with other model settings, or by "
                         f"another version of model.py (Keras files a layer's weights under "
                         f"its class)? Finish that run with the code that started it, or "
                         f"start over with a new --train-dir") from error
    restored = weights_fingerprint(model)
    if state.weights_fingerprint and restored != state.weights_fingerprint:
        raise ValueError(f"{state.path}: restored weights (fingerprint {restored}) differ "
                         f"from the saved ones ({state.weights_fingerprint}); was it "
                         f"written with other model settings?")
    if state.random_states is None:
        return
    variables = random_states(model)
    if len(state.random_states) != len(variables):
        raise ValueError(f"{state.path}: {len(state.random_states)} random-number states "
                         f"recorded, the model has {len(variables)} (dropout on in one of "
                         f"them, off in the other?); was it written with other model "
                         f"settings?")
    for variable, value in zip(variables, state.random_states):
        variable.assign(np.asarray(value, dtype=variable.dtype))


def describe(manifest, context_slices=0):
    """What inference needs to prepare new cases as the model's training data was prepared,
    from the converter's manifest (None without one): the preprocessing (crop, slice policy,
    label mode), the modalities in channel order, the region names of the outputs, and the
    neighbouring slices on each side stacked with every slice (2.5D input, brainseg/context.py;
    0 for one slice)."""
    if manifest is None:
        return None
    return {"preprocessing": manifest["preprocessing"], "modalities": manifest["modalities"],
            "regions": manifest["targets"], "context_slices": context_slices}


def export_for_inference(model, path, description=None):
    """Saves the model without training-only objects (no optimizer, not compiled): a clone of
    the architecture, which keeps each layer's dtype policy (a bfloat16-trained model predicts
    in bfloat16 with a float32 output layer), carrying the current weights. The description
    goes inside the .keras file (a zip archive; Keras ignores members it does not know), so
    the model describes itself on a machine without the training data."""
    def save(temporary):
        hardware.in_precision(model, None).save(temporary)
        if description is not None:
            with zipfile.ZipFile(temporary, "a") as archive:
                archive.writestr(DESCRIPTION, json.dumps(description, indent=1))
    atomic.replace_atomically(path, save)


def read_description(path):
    """The description export_for_inference stored in a model file, or None (a model saved
    by an earlier version of this project, or by plain Keras)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if DESCRIPTION in archive.namelist():
                return json.loads(archive.read(DESCRIPTION))
    except (zipfile.BadZipFile, OSError, ValueError):
        pass
    return None
