"""Trains the U-Net data-parallel across processes and nodes with Horovod.

Launch it with run_multinode.sh (mpirun across hosts.txt); run alone it trains on one process.
The recipe: every rank builds the same model, reads its own shard of the training slices,
computes gradients on its batch, and averages them with all other ranks (allreduce) before
applying them, so all ranks make identical updates. With N ranks each update sees N times
the data, so the learning rate is scaled by N, warmed up from the single-worker rate over
the first epochs (large rates destabilize an untrained network) and then decayed.

After every epoch rank 0 checkpoints the model, optimizer and progress
(brainseg/checkpoints.py); rerunning the same command with the same --train-dir resumes
from the last checkpoint, and TRAIN_DIR/model.keras is always the best epoch by validation
Dice, ready for inference.py. Training stops early when validation Dice stops improving.

Why a loop of our own rather than Keras' fit() with a train_step override: Horovod's
DistributedGradientTape and DistributedOptimizer do not work with Keras 3 variables and
optimizers, so gradients are averaged explicitly with grouped_allreduce in train_step either
way; and an exact resume needs the data stream skipped to the sample where the interrupted
run stopped, validation sums added across ranks before early stopping decides, and the
early-stopping counters restored, none of which fit() exposes (its EarlyStopping callback
resets its counters at every start). The loop is fit()'s own, twenty lines, and it still
drives Keras callbacks (CSV log, TensorBoard).

A rank that stops making progress (stopped, frozen on a dead mount) would hold the others in
their allreduce forever: every rank feeds a watchdog after each step, batch, validation and
checkpoint, and one not fed for STALL_TIMEOUT_SECONDS stops the job (brainseg/watchdog.py).
"""
import atexit
import contextlib
import datetime
import functools
import hashlib
import json
import os
import socket
import sys
import time

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf

import data
import model as unet
from brainseg import (checkpoints, cli, context, dataset, folders, hardware, metrics, watchdog,
                      weight_average)

SETTINGS = ["DATA_DIR", "TRAIN_DIR", "EPOCHS", "STEPS_PER_EPOCH", "MIN_SLICES_PER_EPOCH",
            "BATCH_SIZE", "DICE_PER_REGION", "DICE_FALSE_NEGATIVE_WEIGHT", "TUMOR_SAMPLE_SHARE",
            "OVERSAMPLED_SLICES", "SCALE_AUGMENTATION", "ROTATION_AUGMENTATION_DEGREES",
            "INTENSITY_AUGMENTATION", "GAMMA_AUGMENTATION", "MODALITY_DROPOUT",
            "BIAS_FIELD_AUGMENTATION",
            "CONTEXT_SLICES", "LEARNING_RATE", "WARMUP_EPOCHS", "FINAL_LR_FRACTION",
            "WEIGHT_AVERAGE_MOMENTUM", "BASE_FILTERS", "DEPTH", "USE_TRANSPOSED_CONV",
            "USE_BATCH_NORM", "DROPOUT", "SEED",
            "LOG_EVERY_STEPS", "NUM_INTRA_THREADS", "NUM_INTER_THREADS", "PRECISION",
            "EARLY_STOPPING_PATIENCE", "TIMELINE", "HOROVOD_CYCLE_TIME_MS",
            "STALL_TIMEOUT_SECONDS"]
HELP = {"BATCH_SIZE": "per worker", "LEARNING_RATE": "single-worker rate; scaled by workers",
        "STEPS_PER_EPOCH": "0 = one pass over the largest shard, or MIN_SLICES_PER_EPOCH",
        "MIN_SLICES_PER_EPOCH": "an epoch draws at least this many slices (all workers)",
        "CONTEXT_SLICES": "neighbouring slices on each side fed as extra channels (2.5D)",
        "DICE_FALSE_NEGATIVE_WEIGHT": "Tversky weight of missed pixels; 0.5 = Dice",
        "WEIGHT_AVERAGE_MOMENTUM": "validate and export a moving average of the weights; 0 = off",
        "TUMOR_SAMPLE_SHARE": "share of samples drawn from slices with tumor; 0 = uniform",
        "OVERSAMPLED_SLICES": "what TUMOR_SAMPLE_SHARE draws: tumor | unenhanced_core",
        "SCALE_AUGMENTATION": "zoom each training slice by 1 +- up to this; 0 = off",
        "ROTATION_AUGMENTATION_DEGREES": "turn each training slice by up to this; 0 = off",
        "MODALITY_DROPOUT": "chance that a training slice loses one modality; 0 = off",
        "BIAS_FIELD_AUGMENTATION": "largest std of a training slice's log bias field; 0 = off",
        "PRECISION": "auto | float32 | mixed_bfloat16",
        "EARLY_STOPPING_PATIENCE": "epochs without a better validation Dice; 0 = never",
        "TIMELINE": "write a Horovod timeline (Chrome trace) to this file",
        "HOROVOD_CYCLE_TIME_MS": "an exported HOROVOD_CYCLE_TIME wins",
        "STALL_TIMEOUT_SECONDS": "a rank without progress this long stops the job; 0 = never"}
# Earlier spellings of the flags, still accepted (the README used them).
ALIASES = {"TRAIN_DIR": ["--output-dir"]}


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


def average_batch_norm_statistics(model):
    """Batch normalization's moving mean and variance are not trained, so the gradient
    allreduce never touches them: each rank updates them from its own batches and the ranks'
    models drift apart (seen: different final weights on the two ranks). Averaging them
    after every epoch, before validation, keeps every rank's model identical. Only these:
    the model's other untrained variables (dropout's random-seed state) are not statistics.
    Without batch normalization there is nothing to average."""
    if hvd.size() > 1:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                for variable in layer.non_trainable_variables:
                    variable.assign(hvd.allreduce(variable.value, op=hvd.Average))


def make_train_step(model, optimizer, loss_fn, average=True):
    """One synchronous training step; average=False leaves out the allreduce (a step timed on
    one rank alone, seconds_per_step)."""
    # No XLA (jit_compile): Horovod's XLA ops are not built for TF 2.21 (see README).
    @tf.function(jit_compile=False)
    def train_step(images, masks):
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            loss = loss_fn(masks, probabilities)
        gradients = tape.gradient(loss, model.trainable_variables)
        if average and hvd.size() > 1:  # one worker has nothing to average: no Horovod copy
            gradients = hvd.grouped_allreduce(gradients, op=hvd.Average)
        optimizer.apply(gradients, model.trainable_variables)
        intersection, total = unet.thresholded_dice_sums(masks, probabilities)
        return loss, intersection, total
    return train_step


def make_eval_step(model, loss_fn):
    @tf.function(jit_compile=False)
    def eval_step(images, masks):
        probabilities = model(images, training=False)
        intersection, total = unet.thresholded_dice_sums(masks, probabilities)
        batch = tf.cast(tf.shape(images)[0], tf.float32)
        return tf.concat([[loss_fn(masks, probabilities) * batch, batch], intersection, total],
                         axis=0)
    return eval_step


def mean_region_dice(intersection, total):
    """The mean over regions of each region's Dice (smoothed as in training): what early
    stopping and the best model follow, so that the small enhancing tumor counts as much
    as the whole tumor. With one region, its Dice."""
    return float(np.mean(metrics.dice_from_sums(np.asarray(intersection), np.asarray(total),
                                                unet.SMOOTH)))


def evaluate(eval_step, dataset, num_regions, epoch, stall_watchdog):
    """Loss and mean region Dice over the whole validation set: each rank sums over its
    shard, then the sums are added across ranks (one allreduce, so unequal shard sizes
    cannot hang)."""
    sums = tf.zeros(2 + 2 * num_regions)
    for batch, (images, masks) in enumerate(dataset, 1):
        sums += eval_step(images, masks)
        stall_watchdog.feed(f"epoch {epoch + 1} validation batch {batch}")
    sums = hvd.allreduce(sums, op=hvd.Sum).numpy()
    stall_watchdog.feed(f"epoch {epoch + 1} validation")
    loss_sum, count = sums[:2]
    intersection, total = sums[2:2 + num_regions], sums[2 + num_regions:]
    return loss_sum / max(count, 1), mean_region_dice(intersection, total)


def say(text):
    """Prints a whole line in one write: print() writes the text and its newline separately,
    and mpirun, merging the ranks' output, can put another rank's line in between."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def log(text):
    """Progress is printed by rank 0 only; lines that every rank prints use say()."""
    if hvd.rank() == 0:
        say(text)


def start_horovod(timeline, cycle_time_ms, stall_timeout_seconds):
    """hvd.init(), with a timeline when asked. Horovod reads HOROVOD_TIMELINE once, in
    hvd.init(), so it is set here rather than by the launcher (exporting it with mpirun -x
    works too); only rank 0, Horovod's coordinator, writes the file. Its stall check is set
    from the watchdog's timeout the same way (brainseg/watchdog.py).

    Open MPI is also told to yield the core while it waits (OMPI_MCA_mpi_yield_when_idle,
    read by MPI_Init inside hvd.init). Horovod's background thread meets the other ranks in
    MPI every HOROVOD_CYCLE_TIME ms, and by default Open MPI busy-polls until they arrive:
    a rank bound to as many cores as it has compute threads (2 ranks x 1 thread on 2 cores)
    then loses its core to the polling (measured: 28 img/s busy-polling against 50
    yielding, bench/training.py). The cycle time comes from settings.py; variables already
    exported take precedence."""
    if timeline:
        os.environ["HOROVOD_TIMELINE"] = os.path.abspath(timeline)
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    os.environ.setdefault("HOROVOD_CYCLE_TIME", str(cycle_time_ms))
    for name, value in watchdog.horovod_stall_environment(stall_timeout_seconds).items():
        os.environ.setdefault(name, value)
    hvd.init()


# Held by rank 0 until the process exits (the kernel releases an flock with its holder).
_TRAIN_DIR_LOCK = contextlib.ExitStack()


def lock_train_dir(train_dir):
    """One training per TRAIN_DIR: a second run there would interleave its checkpoints with
    the first's. Rank 0 takes the folder's lock and every rank learns whether it could, so
    they all stop together (with the message naming the run that holds it)."""
    problem = None
    if hvd.rank() == 0:
        try:
            _TRAIN_DIR_LOCK.enter_context(folders.locked(train_dir))
        except folders.FolderBusyError as error:
            problem = str(error)
    problem = hvd.broadcast_object(problem, root_rank=0, name="train_dir_lock")
    if problem:
        sys.exit(f"ERROR: {problem}")


def open_splits(data_dir):
    """The training and validation arrays, or exit naming the file that is missing, that
    the folder's manifest does not vouch for (every rank checks its own copy), or that holds
    no training slice (every training case skipped by the converter)."""
    try:
        imgs_train, msks_train = dataset.open_split(data_dir, "train")
        imgs_test, msks_test = dataset.open_split(data_dir, "test")
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"ERROR: rank {hvd.rank()}: {error}")
    if not len(imgs_train):
        sys.exit(f"ERROR: rank {hvd.rank()}: {imgs_train.filename}: no training slices (the "
                 f"converter skipped every training case: see its manifest's \"skipped\")")
    return imgs_train, msks_train, imgs_test, msks_test


def start_watchdog(timeout_seconds):
    """This rank's stall watchdog, started. Under mpirun it can ask the other ranks which
    one is stuck (MPI beside Horovod, which needs MPI's thread support); under horovodrun
    --gloo there is no MPI to ask with."""
    peers = None
    if (timeout_seconds > 0 and hvd.size() > 1 and hvd.mpi_enabled()
            and hvd.mpi_threads_supported()):
        peers = watchdog.MpiPeers()
        atexit.register(peers.close)  # runs before Horovod's own atexit finalizes MPI
    return watchdog.Watchdog(timeout_seconds, f"rank {hvd.rank()} on {socket.gethostname()}",
                             peers).start()


def resume_point(output_dir, num_workers, steps_per_epoch):
    """The progress to continue from, the same on every rank (rank 0 reads its last
    committed checkpoint and broadcasts it: with local disks the other ranks may not even see
    the file), and that checkpoint (None for a fresh run). A state from another number of
    workers or steps per epoch would not continue the same schedule and data order, so it is
    refused on every rank alike, saying how to continue it (the default epoch length changes
    with MIN_SLICES_PER_EPOCH and the data; --steps-per-epoch fixes it)."""
    saved = checkpoints.load_state(output_dir) if hvd.rank() == 0 else None
    saved = hvd.broadcast_object(saved, root_rank=0, name="resume_state")
    if saved is None:
        return checkpoints.Progress(num_workers, steps_per_epoch), None
    progress = saved.progress
    if (progress.num_workers, progress.steps_per_epoch) != (num_workers, steps_per_epoch):
        sys.exit(f"ERROR: rank {hvd.rank()}: {saved.path}: saved by {progress.num_workers} "
                 f"workers with {progress.steps_per_epoch} steps per epoch; this run has "
                 f"{num_workers} and {steps_per_epoch}. Continue it with "
                 f"{progress.num_workers} workers and --steps-per-epoch "
                 f"{progress.steps_per_epoch}, or use another --train-dir")
    return progress, saved


def sharded_datasets(args, imgs_train, msks_train, imgs_test, msks_test, samples_done):
    """This rank's endless, shuffled training batches, continuing after `samples_done`
    samples (a resumed run sees the batches the uninterrupted one would have), and its shard
    of the validation slices. With CONTEXT_SLICES each slice comes with its neighbours in
    its case (the manifest's rows), as extra channels."""
    manifest = dataset.load_manifest(args.DATA_DIR) if args.CONTEXT_SLICES else None
    neighbours = {split: context.split_neighbours(manifest, split, len(imgs),
                                                  args.CONTEXT_SLICES)
                  for split, imgs in (("train", imgs_train), ("test", imgs_test))}
    shard = data.shard_indices(len(imgs_train), hvd.rank(), hvd.size())
    shard_tumor = None
    if args.TUMOR_SAMPLE_SHARE:
        try:  # every rank finds the same problem, so they all stop
            shard_tumor = np.intersect1d(shard, data.tumor_rows(msks_train,
                                                                slices=args.OVERSAMPLED_SLICES))
        except ValueError as error:
            sys.exit(f"ERROR: rank {hvd.rank()}: {error}")
        log(f"Tumor-slice oversampling: {args.TUMOR_SAMPLE_SHARE:.0%} of the samples drawn "
            f"from the {len(shard_tumor)} of {len(shard)} slices with "
            f"{args.OVERSAMPLED_SLICES.replace('_', ' ')} (rank 0's shard)")
    train_batches = iter(data.training_dataset(
        imgs_train, msks_train, shard, args.BATCH_SIZE, seed=args.SEED + hvd.rank(),
        skip_samples=samples_done, intensity_augmentation=args.INTENSITY_AUGMENTATION,
        neighbours=neighbours["train"], tumor_indices=shard_tumor,
        tumor_share=args.TUMOR_SAMPLE_SHARE, max_scale=args.SCALE_AUGMENTATION,
        max_degrees=args.ROTATION_AUGMENTATION_DEGREES, gamma=args.GAMMA_AUGMENTATION,
        modality_dropout=args.MODALITY_DROPOUT, bias_field=args.BIAS_FIELD_AUGMENTATION))
    test_batches = data.evaluation_dataset(
        imgs_test, msks_test, data.shard_indices(len(imgs_test), hvd.rank(), hvd.size()),
        args.BATCH_SIZE, neighbours=neighbours["test"])
    return train_batches, test_batches


def restore_and_broadcast(model, optimizer, saved):
    """Rank 0 restores the checkpoint, if any; then every rank takes rank 0's weights and
    optimizer state, so all start identical."""
    if saved and hvd.rank() == 0:
        checkpoints.restore_state(model, saved)
    broadcast_from_rank0(model.variables + optimizer.variables)
    if saved:
        log(f"Resuming from {saved.path} after epoch {saved.progress.epoch} "
            f"(step {int(optimizer.iterations)})")
        say(f"rank {hvd.rank()}: resumed weights fingerprint "
            f"{checkpoints.weights_fingerprint(model)}")


def build_unet(args, images_shape, masks_shape):
    """The run's U-Net, under the precision policy already set."""
    return unet.build_unet(images_shape[1], context.channels(images_shape[3],
                                                             args.CONTEXT_SLICES),
                           masks_shape[3], args.BASE_FILTERS, args.DEPTH,
                           args.USE_TRANSPOSED_CONV, args.USE_BATCH_NORM, args.DROPOUT)


def loss_function(args):
    return functools.partial(unet.bce_dice_loss, per_region=args.DICE_PER_REGION,
                             false_negative_weight=args.DICE_FALSE_NEGATIVE_WEIGHT)


def seconds_per_step(args, images_shape, masks_shape, policy, feed, repeats=3):
    """The best of `repeats` timed training steps of the run's U-Net and loss in the given
    precision policy, on a batch of zeros (a convolution's time does not depend on the
    values), after two untimed ones (tracing, oneDNN's choice of kernels); this rank alone.
    feed(done) is called after every step (the stall watchdog's)."""
    keras.mixed_precision.set_dtype_policy(policy)
    model = build_unet(args, images_shape, masks_shape)
    step = make_train_step(model, keras.optimizers.Adam(), loss_function(args), average=False)
    images = tf.zeros((args.BATCH_SIZE, *images_shape[1:3],
                       context.channels(images_shape[3], args.CONTEXT_SLICES)))
    masks = tf.zeros((args.BATCH_SIZE, *masks_shape[1:]))
    timings = []
    for _ in range(2 + repeats):
        started = time.perf_counter()
        float(step(images, masks)[0])  # its loss read back, so that the step has run
        timings.append(time.perf_counter() - started)
        feed(f"a training step timed in {policy}")
    return min(timings[2:])


def precision_record(args, images_shape, masks_shape, intra_threads):
    """The file recording which precision trains faster for this CPU model, TensorFlow, thread
    count, batch and network (any of them can move the ratio), and for this model.py: a
    change to its layers can move it too (batch normalization on bfloat16 activations took
    bfloat16 from 1.34x to 1.48x float32 on the EPYC), so a new model.py times again."""
    with open(unet.__file__, "rb") as source:
        model_code = hashlib.sha256(source.read()).hexdigest()[:12]
    timed = {"tensorflow": tf.__version__, "model_code": model_code,
             "intra_threads": intra_threads,
             "batch_size": args.BATCH_SIZE, "images": images_shape[1:],
             "masks": masks_shape[1:], "context_slices": args.CONTEXT_SLICES,
             "network": [args.BASE_FILTERS, args.DEPTH, args.USE_TRANSPOSED_CONV,
                         args.USE_BATCH_NORM]}
    key = hashlib.sha256(json.dumps(timed, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(hardware.CACHE_DIR,
                        f"training-precision-{hardware.cpu_id()}-{key}.json")


def timed_precision(args, images_shape, masks_shape, intra_threads, feed=lambda done: None):
    """(policy, "measured" or "recorded"): the precision that trains this run's network faster
    on this CPU, timed the first time (seconds) and recorded (precision_record) for the next.
    Ranks of a node asking at once take turns on a file lock: one times, alone on the cores,
    and the others read its record. feed: the stall watchdog's; a rank waiting for the lock
    is not fed, so a rank that stopped while timing stops the job."""
    timed = functools.partial(seconds_per_step, args, images_shape, masks_shape, feed=feed)
    feed("reading the data; next, the training precision recorded or timed on this node")
    choice = hardware.recorded_choice(
        precision_record(args, images_shape, masks_shape, intra_threads),
        hardware.PRECISIONS[1:], lambda: hardware.faster_training_precision(timed))
    keras.backend.clear_session()  # the timed models' layer names must not shift the run's
    return choice


def training_precision(args, images_shape, masks_shape, intra_threads, stall_watchdog):
    """(Keras policy, how it was chosen), set as the global policy. PRECISION "auto" on a CPU
    with AVX512_BF16 but no AMX, where either precision may train faster
    (brainseg/hardware.py), is timed (timed_precision). The ranks waiting for the one that
    times wait on a file lock, outside Horovod, whose stall check (half the stall timeout)
    would count a wait in a collective. Then every rank trains in bfloat16 only if every rank
    found it faster: the ranks must compute alike, and a job goes at its slowest rank's pace."""
    if not hardware.precision_is_timed(args.PRECISION):
        policy = hardware.set_precision(args.PRECISION)
        return policy, "from the CPU flags" if args.PRECISION == "auto" else "as asked"
    policy, how = timed_precision(args, images_shape, masks_shape, intra_threads,
                                  stall_watchdog.feed)
    say(f"rank {hvd.rank()}: {policy} {how} as the faster training precision on this CPU")
    policies = hvd.allgather_object(policy) if hvd.size() > 1 else [policy]
    stall_watchdog.feed("agreeing on the training precision")
    policy = hardware.set_precision(
        "mixed_bfloat16" if set(policies) == {"mixed_bfloat16"} else "float32")
    return policy, "timed on this CPU" if len(set(policies)) == 1 else \
        "the ranks' CPUs disagree on the faster"


def build_model_and_optimizer(args, images_shape, masks_shape, steps_per_epoch):
    """The U-Net (under the precision policy already set), Adam on the scaled, warmed-up
    schedule, and the model compiled with that optimizer: not for fit() (the loop in main()
    trains), but so that the callbacks find it and the saved state holds its variables."""
    model = build_unet(args, images_shape, masks_shape)
    schedule = learning_rate_schedule(args.LEARNING_RATE, hvd.size(), steps_per_epoch,
                                      args.EPOCHS, args.WARMUP_EPOCHS, args.FINAL_LR_FRACTION)
    optimizer = weight_average.AdamWithWeightAverage(schedule, args.WEIGHT_AVERAGE_MOMENTUM)
    optimizer.build(model.trainable_variables)
    model.compile(optimizer=optimizer, jit_compile=False)
    return model, optimizer, schedule


def make_callbacks(model, output_dir, resuming):
    """Rank 0 logs every epoch's figures to training_log.csv (appended to when resuming) and
    TensorBoard; the other ranks get an empty list, so the loop is the same on every rank."""
    if hvd.rank() != 0:
        return keras.callbacks.CallbackList(model=model)
    os.makedirs(output_dir, exist_ok=True)
    return keras.callbacks.CallbackList([
        keras.callbacks.CSVLogger(os.path.join(output_dir, "training_log.csv"),
                                  append=resuming),
        keras.callbacks.TensorBoard(os.path.join(output_dir, "tensorboard"),
                                    write_graph=False, profile_batch=0),
    ], model=model)


def train_one_epoch(train_step, batches, steps, epoch, log_every, stall_watchdog):
    """Runs `steps` synchronous steps; returns rank 0's mean loss and Dice sums, and the
    seconds it took (all ranks wait for each other at every allreduce, so it is the
    job's time)."""
    started = time.perf_counter()
    loss_sum, intersection, total = 0.0, 0.0, 0.0
    for step in range(1, steps + 1):
        images, masks = next(batches)
        stall_watchdog.feed(f"reading the batch of epoch {epoch + 1} step {step}")
        loss, batch_intersection, batch_total = train_step(images, masks)
        loss_sum += float(loss)
        intersection += batch_intersection.numpy()
        total += batch_total.numpy()
        stall_watchdog.feed(f"epoch {epoch + 1} step {step}")
        if step % log_every == 0 and step < steps:
            log(f"  epoch {epoch + 1} step {step}/{steps} loss {loss_sum / step:.4f}")
    return loss_sum / steps, mean_region_dice(intersection, total), \
        time.perf_counter() - started


def memory_line():
    """Peak resident memory of this process, and what is resident now: anonymous memory
    (tensors, Python) and file-backed pages (mostly TensorFlow's libraries; data.py reads the
    arrays without mapping them, so a larger dataset must grow neither)."""
    with open("/proc/self/status") as file:
        status = dict(line.split(":", 1) for line in file)
    mib = lambda key: int(status[key].split()[0]) / 1024  # noqa: E731 (values are in kB)
    return (f"peak RSS {mib('VmHWM'):.0f} MiB (now {mib('RssAnon'):.0f} MiB anonymous, "
            f"{mib('RssFile'):.0f} MiB file-backed)")


def epoch_line(epoch, epochs, logs):
    return (f"epoch {epoch + 1}/{epochs}  loss {logs['loss']:.4f}  dice {logs['dice']:.4f}  "
            f"val_loss {logs['val_loss']:.4f}  val_dice {logs['val_dice']:.4f}  "
            f"lr {logs['learning_rate']:.3g}  {logs['images_per_second']:.1f} img/s  "
            f"{logs['epoch_seconds']:.1f} s/epoch  "
            f"ETA {datetime.timedelta(seconds=round(logs['eta_seconds']))}")


def fit(model, optimizer, schedule, train_batches, test_batches, progress, description, args,
        stall_watchdog):
    """Trains the epochs left in `progress`: synchronous steps on every rank, then the
    validation Dice, which the allreduce makes bit-identical on every rank, so all ranks take
    the same early-stopping decision without a broadcast. Rank 0 logs and checkpoints; the
    best model is exported with `description` (how its input was prepared). Every piece of
    work feeds `stall_watchdog`."""
    loss_fn = loss_function(args)
    train_step = make_train_step(model, optimizer, loss_fn)
    eval_step = make_eval_step(model, loss_fn)
    num_regions = model.output_shape[-1]
    callbacks = make_callbacks(model, args.TRAIN_DIR, resuming=progress.epoch > 0)
    callbacks.on_train_begin()
    export_path = os.path.join(args.TRAIN_DIR, checkpoints.EXPORT_NAME)
    seconds_this_run = []
    for epoch in range(progress.epoch, args.EPOCHS):
        callbacks.on_epoch_begin(epoch)
        loss, dice, seconds = train_one_epoch(train_step, train_batches,
                                              progress.steps_per_epoch, epoch,
                                              args.LOG_EVERY_STEPS, stall_watchdog)
        average_batch_norm_statistics(model)
        with weight_average.averaged_weights(model, optimizer):
            val_loss, val_dice = evaluate(eval_step, test_batches, num_regions, epoch,
                                          stall_watchdog)
        seconds_this_run.append(seconds)
        improved = progress.record_epoch(epoch, val_dice, args.EARLY_STOPPING_PATIENCE)
        epochs_left = 0 if progress.stopped_early else args.EPOCHS - epoch - 1
        logs = {"loss": loss, "dice": dice, "val_loss": val_loss, "val_dice": val_dice,
                "learning_rate": float(schedule(optimizer.iterations)),
                "images_per_second": progress.steps_per_epoch * args.BATCH_SIZE * hvd.size()
                / seconds, "epoch_seconds": seconds,
                "eta_seconds": epochs_left * sum(seconds_this_run) / len(seconds_this_run)}
        callbacks.on_epoch_end(epoch, logs)
        log(epoch_line(epoch, args.EPOCHS, logs))
        if hvd.rank() == 0:
            # The export first: a crash in between then re-runs this epoch rather than
            # leaving a state that claims a best model the export does not hold.
            if improved:
                with weight_average.averaged_weights(model, optimizer):
                    checkpoints.export_for_inference(model, export_path, description)
            checkpoints.save_state(model, args.TRAIN_DIR, progress)
        stall_watchdog.feed(f"epoch {epoch + 1} checkpoint")
        if progress.stopped_early:
            log(f"Early stopping: validation Dice has not improved for "
                f"{args.EARLY_STOPPING_PATIENCE} epochs")
            break
    callbacks.on_train_end()
    log(f"Saved {export_path}: epoch {progress.best_epoch}, the best validation Dice "
        f"({progress.best_val_dice:.4f})")


def main(argv=None):
    args = cli.parse(__doc__.splitlines()[0], SETTINGS, argv, HELP, ALIASES)

    # Horovod, and each worker's threads pinned to the cores it owns; from now on a rank
    # that stops making progress stops the job.
    start_horovod(args.TIMELINE, args.HOROVOD_CYCLE_TIME_MS, args.STALL_TIMEOUT_SECONDS)
    stall_watchdog = start_watchdog(args.STALL_TIMEOUT_SECONDS)
    intra, inter = hardware.configure(args.NUM_INTRA_THREADS, args.NUM_INTER_THREADS,
                                      hvd.local_size())

    # The converted slices (memory-mapped), and the precision that trains them faster here
    # (timed the first time on a CPU, for seconds).
    imgs_train, msks_train, imgs_test, msks_test = open_splits(args.DATA_DIR)
    precision, chosen = training_precision(args, imgs_train.shape, msks_train.shape, intra,
                                           stall_watchdog)
    log(f"Horovod: {hvd.size()} workers; each uses {intra} intra-op and {inter} inter-op "
        f"threads; precision {precision} ({chosen}; CPU has AMX-BF16: "
        f"{hardware.cpu_has_fast_bfloat16()})\nConfiguration:\n{cli.format_config(args)}")
    keras.utils.set_random_seed(args.SEED)

    # The same number of steps on every rank.
    steps_per_epoch = args.STEPS_PER_EPOCH or data.steps_per_epoch(
        len(imgs_train), hvd.size(), args.BATCH_SIZE, args.MIN_SLICES_PER_EPOCH)
    log(f"{len(imgs_train)} training slices, {len(imgs_test)} validation slices; "
        f"{steps_per_epoch} steps per epoch of {args.BATCH_SIZE} x {hvd.size()} slices "
        f"({steps_per_epoch * args.BATCH_SIZE * hvd.size() / len(imgs_train):.1f} passes "
        f"over the training slices)")

    # A rerun of the same command continues from the last checkpoint in TRAIN_DIR.
    lock_train_dir(args.TRAIN_DIR)
    progress, saved = resume_point(args.TRAIN_DIR, hvd.size(), steps_per_epoch)
    stall_watchdog.feed("reading the resume point")
    if progress.finished(args.EPOCHS):
        log(f"{args.TRAIN_DIR} holds a finished run (epoch {progress.epoch}); nothing to "
            f"train. Use another --train-dir to train anew")
        return
    if saved and progress.epochs not in (0, args.EPOCHS):
        log(f"Note: the checkpoint was written by a run of {progress.epochs} epochs; the "
            f"learning-rate schedule now follows {args.EPOCHS}")
    progress.epochs = args.EPOCHS

    # Each rank's shard of the data, from where the last run stopped.
    train_batches, test_batches = sharded_datasets(
        args, imgs_train, msks_train, imgs_test, msks_test,
        samples_done=progress.epoch * steps_per_epoch * args.BATCH_SIZE)

    # The model, and Adam at a learning rate scaled by the workers, warmed up, then decayed.
    model, optimizer, schedule = build_model_and_optimizer(args, imgs_train.shape,
                                                           msks_train.shape, steps_per_epoch)

    # Every rank starts from rank 0's weights and optimizer state, fresh or restored.
    restore_and_broadcast(model, optimizer, saved)
    stall_watchdog.feed("building and broadcasting the model")

    # Train, averaging gradients across workers; rank 0 checkpoints every epoch.
    fit(model, optimizer, schedule, train_batches, test_batches, progress,
        checkpoints.describe(dataset.load_manifest(args.DATA_DIR), args.CONTEXT_SLICES), args,
        stall_watchdog)
    say(f"rank {hvd.rank()}: final weights fingerprint {checkpoints.weights_fingerprint(model)}")
    say(f"rank {hvd.rank()}: {memory_line()}")
    say(f"rank {hvd.rank()}: longest pause between steps {stall_watchdog.longest_wait:.1f} s "
        f"(the stall timeout is {args.STALL_TIMEOUT_SECONDS:g} s)")


if __name__ == "__main__":
    main()
