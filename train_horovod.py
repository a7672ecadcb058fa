"""Trains the U-Net data-parallel across processes and nodes with Horovod.

Launch it with run_multinode.sh (mpirun across hosts.txt); run alone it trains on one process.
The recipe: every rank builds the same model, reads its own shard of the training slices,
computes gradients on its batch, and averages them with all other ranks (allreduce) before
applying them, so all ranks make identical updates. With N ranks each update sees N times
the data, so the learning rate is scaled by N, warmed up from the single-worker rate over
the first epochs (large rates destabilize an untrained network) and then decayed.

Keras 3 note: Horovod's DistributedGradientTape and DistributedOptimizer do not work with
Keras 3 variables and optimizers, so gradients are averaged explicitly with grouped_allreduce.
"""
import hashlib
import os
import time

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

import cli
import data
import model as unet
import threads

SETTINGS = ["DATA_DIR", "OUTPUT_DIR", "EPOCHS", "STEPS_PER_EPOCH", "BATCH_SIZE",
            "LEARNING_RATE", "WARMUP_EPOCHS", "FINAL_LR_FRACTION", "BASE_FILTERS", "DEPTH",
            "USE_TRANSPOSED_CONV", "USE_BATCH_NORM", "DROPOUT", "SEED", "LOG_EVERY_STEPS",
            "NUM_INTRA_THREADS", "NUM_INTER_THREADS"]
HELP = {"BATCH_SIZE": "per worker", "LEARNING_RATE": "single-worker rate; scaled by workers",
        "STEPS_PER_EPOCH": "0 = one pass over the largest shard"}


def learning_rate_schedule(base_lr, num_workers, steps_per_epoch, epochs, warmup_epochs,
                           final_lr_fraction):
    """Linear warm-up from base_lr to base_lr x num_workers over warmup_epochs, then cosine
    decay to final_lr_fraction of the peak by the last step (Goyal et al., 2017)."""
    warmup_steps = min(warmup_epochs, epochs) * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=base_lr,
        warmup_target=base_lr * num_workers,
        warmup_steps=warmup_steps,
        decay_steps=max(1, epochs * steps_per_epoch - warmup_steps),
        alpha=final_lr_fraction)


def broadcast_from_rank0(variables):
    """Makes every rank start from rank 0's weights and optimizer state."""
    for variable in variables:
        variable.assign(hvd.broadcast(variable.value, root_rank=0))


def make_train_step(model, optimizer, loss_fn):
    # No XLA (jit_compile): Horovod's XLA ops are not built for TF 2.21 (see README).
    @tf.function(jit_compile=False)
    def train_step(images, masks):
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            loss = loss_fn(masks, probabilities)
        gradients = tape.gradient(loss, model.trainable_variables)
        gradients = hvd.grouped_allreduce(gradients, op=hvd.Average)
        optimizer.apply(gradients, model.trainable_variables)
        intersection, total = unet.dice_sums(masks, tf.cast(probabilities > 0.5, tf.float32))
        return loss, intersection, total
    return train_step


def make_eval_step(model, loss_fn):
    @tf.function(jit_compile=False)
    def eval_step(images, masks):
        probabilities = model(images, training=False)
        intersection, total = unet.dice_sums(masks, tf.cast(probabilities > 0.5, tf.float32))
        batch = tf.cast(tf.shape(images)[0], tf.float32)
        return tf.stack([loss_fn(masks, probabilities) * batch, intersection, total, batch])
    return eval_step


def evaluate(eval_step, dataset):
    """Loss and Dice over the whole validation set: each rank sums over its shard, then the
    sums are added across ranks (one allreduce, so unequal shard sizes cannot hang)."""
    sums = tf.zeros(4)
    for images, masks in dataset:
        sums += eval_step(images, masks)
    loss_sum, intersection, total, count = hvd.allreduce(sums, op=hvd.Sum).numpy()
    return loss_sum / max(count, 1), unet.dice_from_sums(intersection, total)


def save_atomically(model, path):
    """Writes the checkpoint under a temporary name, then renames it: a crash mid-save never
    leaves a truncated model.keras behind."""
    temporary = path.replace(".keras", ".partial.keras")
    model.save(temporary)
    os.replace(temporary, path)


def weights_fingerprint(model):
    """A hash of all weights: equal on every rank when the ranks stayed in sync."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def log(*values):
    if hvd.rank() == 0:
        print(*values, flush=True)


def main(argv=None):
    args = cli.parse(__doc__.splitlines()[0], SETTINGS, argv, HELP)
    hvd.init()
    intra, inter = threads.configure(args.NUM_INTRA_THREADS, args.NUM_INTER_THREADS,
                                     hvd.local_size())
    log(f"Horovod: {hvd.size()} workers; each uses {intra} intra-op and {inter} inter-op "
        f"threads\nConfiguration:\n{cli.format_config(args)}")
    keras.utils.set_random_seed(args.SEED)

    # Data: a disjoint shard of the training slices per rank, equal steps on every rank.
    imgs_train, msks_train = data.load_split(args.DATA_DIR, "train")
    imgs_test, msks_test = data.load_split(args.DATA_DIR, "test")
    train_shard = data.shard_indices(len(imgs_train), hvd.rank(), hvd.size())
    steps_per_epoch = args.STEPS_PER_EPOCH or data.steps_per_epoch(
        len(imgs_train), hvd.size(), args.BATCH_SIZE)
    train_batches = iter(data.training_dataset(
        imgs_train, msks_train, train_shard, args.BATCH_SIZE, seed=args.SEED + hvd.rank()))
    test_batches = data.evaluation_dataset(
        imgs_test, msks_test, data.shard_indices(len(imgs_test), hvd.rank(), hvd.size()),
        args.BATCH_SIZE)
    log(f"{len(imgs_train)} training slices, {len(imgs_test)} validation slices; "
        f"{steps_per_epoch} steps per epoch of {args.BATCH_SIZE} x {hvd.size()} slices")

    # Model and optimizer, identical on every rank.
    model = unet.build_unet(imgs_train.shape[1], imgs_train.shape[3], msks_train.shape[3],
                            args.BASE_FILTERS, args.DEPTH, args.USE_TRANSPOSED_CONV,
                            args.USE_BATCH_NORM, args.DROPOUT)
    schedule = learning_rate_schedule(args.LEARNING_RATE, hvd.size(), steps_per_epoch,
                                      args.EPOCHS, args.WARMUP_EPOCHS, args.FINAL_LR_FRACTION)
    optimizer = keras.optimizers.Adam(learning_rate=schedule)
    optimizer.build(model.trainable_variables)
    # Attached for the callbacks (TensorBoard logs its learning rate) and the checkpoint
    # (which then holds the optimizer state); the loop below does the training.
    model.compile(optimizer=optimizer, jit_compile=False)
    broadcast_from_rank0(model.variables + optimizer.variables)
    train_step = make_train_step(model, optimizer, unet.bce_dice_loss)
    eval_step = make_eval_step(model, unet.bce_dice_loss)

    # Only rank 0 writes: logs and the checkpoint.
    checkpoint_path = os.path.join(args.OUTPUT_DIR, "model.keras")
    callbacks = keras.callbacks.CallbackList(model=model)
    if hvd.rank() == 0:
        os.makedirs(args.OUTPUT_DIR, exist_ok=True)
        callbacks = keras.callbacks.CallbackList([
            keras.callbacks.CSVLogger(os.path.join(args.OUTPUT_DIR, "training_log.csv")),
            keras.callbacks.TensorBoard(os.path.join(args.OUTPUT_DIR, "tensorboard"),
                                        write_graph=False, profile_batch=0),
        ], model=model)
    callbacks.on_train_begin()

    for epoch in range(args.EPOCHS):
        callbacks.on_epoch_begin(epoch)
        started = time.perf_counter()
        loss_sum, intersection, total = 0.0, 0.0, 0.0
        for step in range(1, steps_per_epoch + 1):
            loss, batch_intersection, batch_total = train_step(*next(train_batches))
            loss_sum += float(loss)
            intersection += float(batch_intersection)
            total += float(batch_total)
            if step % args.LOG_EVERY_STEPS == 0 and step < steps_per_epoch:
                log(f"  epoch {epoch + 1} step {step}/{steps_per_epoch} "
                    f"loss {loss_sum / step:.4f}")
        seconds = time.perf_counter() - started
        images_per_second = steps_per_epoch * args.BATCH_SIZE * hvd.size() / seconds
        # Training loss and Dice of rank 0's shard; validation over all ranks' shards.
        val_loss, val_dice = evaluate(eval_step, test_batches)
        logs = {"loss": loss_sum / steps_per_epoch, "dice": unet.dice_from_sums(intersection, total),
                "val_loss": val_loss, "val_dice": val_dice,
                "learning_rate": float(schedule(optimizer.iterations)),
                "images_per_second": images_per_second, "epoch_seconds": seconds}
        callbacks.on_epoch_end(epoch, logs)
        log(f"epoch {epoch + 1}/{args.EPOCHS}  " + "  ".join(
            f"{name} {value:.4g}" for name, value in logs.items()))
        if hvd.rank() == 0:
            save_atomically(model, checkpoint_path)
    callbacks.on_train_end()
    print(f"rank {hvd.rank()}: final weights fingerprint {weights_fingerprint(model)}",
          flush=True)
    log(f"Saved {checkpoint_path}")


if __name__ == "__main__":
    main()
