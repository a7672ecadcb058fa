"""Project configuration: the one place to edit before converting, training and inferring.

Every script reads its defaults from these module-level constants and accepts command-line
flags that override them (`python train_horovod.py --help` lists the flags with the values
below). The defaults run the demo on the embedded synthetic dataset; to use real BraTS data,
point RAW_DIR at your MICCAI_BraTS... training folder.
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

# --- Data paths --------------------------------------------------------------------------
RAW_DIR = os.path.join(_HERE, "data", "raw")  # BraTS root: one folder per case
DATA_DIR = os.path.join(_HERE, "data", "converted")  # imgs_*.npy, msks_*.npy, manifest.json
TRAIN_DIR = os.path.join(_HERE, "runs", "train")  # model.keras, checkpoints, CSV, TensorBoard
INFERENCE_DIR = os.path.join(_HERE, "runs", "inference")  # metrics, per-case CSV, PNGs

# --- Synthetic BraTS cases (the demo and the tests; real data needs registration) -------
# "realistic": real brain anatomy (the MNI152 template in the nilearn wheel) with gliomas as
# they look in BraTS (brainseg/phantom.py); "cartoon": a smooth head with a bright round
# tumor, fast, for unit tests (any U-Net segments it almost perfectly).
SYNTHETIC_KIND = "realistic"
SYNTHETIC_NUM_CASES = 24
SYNTHETIC_SHAPE = (240, 240, 155)  # the BraTS grid: 1 mm isotropic, axial slices last
SYNTHETIC_SEED = 2018

# --- Conversion -----------------------------------------------------------------------------
LAYOUT = "auto"  # or brats2017 (HGG/LGG), brats2020 (2020-2021), brats2023, msd (Decathlon)
# Each axial slice is brought to IMAGE_SIZE x IMAGE_SIZE: 128 is 1.5 mm per pixel of the
# 192-voxel crop. 192 (1 mm, no resampling) drew the thin enhancing rims better (enhancing
# tumor +0.016, every case better on three seeds) but not the tumor core, for twice the
# training time (README: "Every change measured").
IMAGE_SIZE = 128
CROP_MODE = "center"  # "center": CROP_SIZE square at the grid centre (seed project), same
#                       scale for every case; "brain_box": the brain's bounding square, more
#                       pixels on the brain but a scale that differs between cases
#                       (measured: no gain beyond the seed-to-seed spread; README:
#                       "Every change measured")
CROP_SIZE = 192  # side of the centre crop (voxels); BraTS brains fit inside 192x192
SLICE_POLICY = "brain"  # "brain": only slices containing brain; "all": every axial slice
# "regions": whole tumor, tumor core and enhancing tumor channels, the three regions BraTS
# evaluates; "whole_tumor": one channel, the seed project's binary setup.
LABEL_MODE = "regions"
IMAGE_DTYPE = "float16"  # float16 halves disk and I/O against float32; masks are uint8
CONVERT_WORKERS = 0  # worker processes; 0 = one per available core
# A case not prepared, or whose header is not read, within this many seconds (a read stuck on
# a network filesystem; a full BraTS case takes about a second) has its worker killed, is
# retried once alone, then skipped; 3 such cases in a row stop the conversion (a stalled
# filesystem). inference.py --input fails a case whose files are not read within it and goes
# on with the others. 0: no limit.
CASE_TIMEOUT_SECONDS = 600
STRICT = False  # True: fail (and write nothing) when any case is skipped
TRAIN_FRACTION = 0.85  # share of *patients* in the training split
SPLIT_SEED = 816  # the same seed always gives the same patient split

# --- Model ----------------------------------------------------------------------------------
# 24 and 12 were measured on the realistic benchmark: the wider network lost tumor core, the
# narrower gained nothing (README: "Every change measured").
BASE_FILTERS = 16  # filters of the first U-Net level; doubled at every level down
DEPTH = 4  # number of down-sampling steps
USE_TRANSPOSED_CONV = True  # False: nearest-neighbour up-sampling + convolution
# Batch normalization after every convolution: every region better on two seeds of the
# realistic benchmark, the tumor core most; instance normalization in its place was worse
# everywhere (README: "Every change measured"). It trains with TensorFlow's fused kernel
# (model.FusedBatchNormalization: 6% of a step, where Keras' own layer took 22%), and its
# moving statistics are averaged across the ranks after every epoch (train_horovod.py).
USE_BATCH_NORM = True
# Measured at 0.3: tumor core better on one seed, not on the other
# (README: "Every change measured").
DROPOUT = 0.0  # dropout rate at the bottleneck; 0 disables it

# --- Training -------------------------------------------------------------------------------
# Per worker; the global batch is BATCH_SIZE x number of workers. 16 (twice the updates) gained
# less than two seeds differ, and with the weight average lost on every region
# (README: "Every change measured").
BATCH_SIZE = 32
# The loss is binary cross-entropy + soft Dice. True: the Dice term is the mean of one soft
# Dice per region; False: one Dice pooled over the regions, where the whole tumor (the
# largest) drowns the enhancing tumor (a few percent of it). See model.soft_dice_loss.
DICE_PER_REGION = True
# How much the Dice term weighs a missed tumor pixel against a false alarm (the Tversky index,
# model.soft_dice_loss): 0.5 is Dice, above it the loss pushes towards recall. At 0.7 the
# missed cores were found more, but the others lost as much precision
# (README: "Every change measured").
DICE_FALSE_NEGATIVE_WEIGHT = 0.5
# Share of the training samples drawn from the slices that contain tumor (the rest from every
# brain slice, tumor or not), as nnU-Net forces a third of its patches onto foreground; 0
# samples every slice alike. Off: at 0.33 no gain beyond the noise, 53% of the benchmark's
# slices holding tumor anyway (README: "Every change measured").
TUMOR_SAMPLE_SHARE = 0.0
# Which slices that share comes from: "tumor" (any), or "unenhanced_core": slices whose tumor
# core has no enhancing tumor (lower-grade gliomas' cores, the ends of the others), 12% of the
# benchmark's training slices and the cores it misses most (data.OVERSAMPLED_SLICES).
# Oversampling them lost tumor core, the lower-grade cores included
# (README: "Every change measured").
OVERSAMPLED_SLICES = "tumor"
# Random zoom and turn of every training slice (and its mask), on top of the flips and quarter
# turns: scaled by a factor in [1 - SCALE_AUGMENTATION, 1 + SCALE_AUGMENTATION] and turned by
# up to ROTATION_AUGMENTATION_DEGREES either way, as nnU-Net augments: a few training cases
# then show tumors of many sizes and orientations. 0 turns each off. Off: at 0.2 and 45 degrees
# the tumor core gained on one seed and lost on the other (README: "Every change measured").
SCALE_AUGMENTATION = 0.0
ROTATION_AUGMENTATION_DEGREES = 0.0
# Random intensity changes per training slice and modality, on top of the flips and rotations:
# brain voxels scaled by 1 + u and shifted by v, u and v uniform in +-this (z-score units).
# Scanners and protocols change contrast and offset after normalization too; 0 turns it off.
# Off: at 0.1 the tumor core gained on one seed and lost on the other
# (README: "Every change measured").
INTENSITY_AUGMENTATION = 0.0
# Random contrast curve per training slice and modality (data.random_gamma, as nnU-Net): the
# brain's pixels raised to a power drawn log-uniformly from [1 / (1 + this), 1 + this] between
# their minimum and maximum, their mean and spread then restored; 0 turns it off. Off: at 0.5
# nothing gained on one seed, every region lost on the other (README: "Every change measured").
GAMMA_AUGMENTATION = 0.0
# Modality dropout: the chance that a training slice loses one of its four modalities (drawn at
# random, set to 0: the brain's mean after normalization; data.random_modality_dropout); 0
# turns it off. At 0.3 the tumor core gained on three seeds (+0.026 over their 72 held-out
# cases), most in the lower-grade cases, whose core differs from edema on another modality in
# each case; whole and enhancing tumor moved by -0.002 / -0.001 (README: "Every change
# measured").
MODALITY_DROPOUT = 0.3
# Random bias field per training slice and modality (data.random_bias_field): the intensities
# multiplied by a smooth field, its log through nodes ~100 mm apart whose standard deviation is
# drawn from [0, this], as an uncorrected receive coil shades a scan (BraTS is not corrected;
# the phantom draws its fields with 0.15). 0 turns it off. At 0.3, on held-out cases whose
# fields are twice the phantom's default, every region gained on three seeds (WT +0.029, TC
# +0.029, ET +0.023 over 72 cases; the worst WT 0.611-0.824 -> 0.812-0.913); on the
# benchmark's own cases WT -0.002, TC +0.008, ET -0.004 (288 cases), and the worst of seed 1's
# 192 (grey matter shaded bright on FLAIR, called edema) 0.708 -> 0.871 (README: "Every
# change measured").
BIAS_FIELD_AUGMENTATION = 0.3
# 2.5D input: each axial slice is fed with this many neighbouring slices on EACH side as extra
# channels (1: the slice below and the one above, 12 input channels for 4 modalities; 0: one
# slice, as before). Context across slices is how a 2D model tells a vessel or a lesion's end
# from a blob on one slice; the neighbours come from the same case (edge-padded at its ends)
# and are assembled as rows are read, so the converted arrays stay as they are. The exported
# model records it, and inference follows. Off: 1 was not better, with batch normalization or
# without (README: "Every change measured").
CONTEXT_SLICES = 0
# The documented recipe (bench/accuracy.py measures it); `make demo` trains fewer, to stay
# within minutes. 24 lost tumor core before the weight average; with it, 24 gained whole
# tumor +0.005 over three seeds at 2x the time (+0.008 with modality dropout), and tumor core
# on two seeds but not the third, both times (README: "Every change measured").
EPOCHS = 12
STEPS_PER_EPOCH = 0  # 0: every epoch covers the largest shard once; > 0: that many steps
# A floor on an epoch: it draws at least this many slices (all workers together), so a small
# dataset is seen more than once per epoch, as nnU-Net fixes an epoch's iterations; a real
# BraTS release (~50,000 slices) is far above any useful floor. 0: off, one pass per epoch.
# Off: 6,000 (two passes over the benchmark's 20 patients, the steps of 24 epochs) lost tumor
# core on both seeds measured, -0.027 / -0.012 (README: "Every change measured").
MIN_SLICES_PER_EPOCH = 0
# Synchronous data parallelism makes fewer, larger updates per epoch; the learning rate is
# scaled by the number of workers to compensate (Goyal et al. 2017), warmed up linearly from
# the single-worker rate over WARMUP_EPOCHS, then decayed along a cosine to LEARNING_RATE *
# FINAL_LR_FRACTION. Half and twice 1e-3 both lost tumor core
# (README: "Every change measured").
LEARNING_RATE = 1e-3  # single-worker (base) learning rate for Adam
WARMUP_EPOCHS = 1
FINAL_LR_FRACTION = 0.05
# Validation and the exported model use a moving average of the weights (Polyak averaging,
# updated after every step with this momentum: 0.99 averages about the last 100 steps), while
# training continues from the weights themselves; 0 turns it off. It is bias-corrected
# (brainseg/weight_average.py): short runs do not carry the untrained start in it. On: measured
# on three seeds, it lifted one seed's worst case above 0.80 and cost no seed more than 0.003
# in any region, and the export no longer hangs on which epoch validated best on 4 patients
# (README: "Every change measured").
WEIGHT_AVERAGE_MOMENTUM = 0.99
SEED = 42  # weights, shuffling and augmentation
LOG_EVERY_STEPS = 20  # rank 0 prints a progress line this often within an epoch
# "mixed_bfloat16" computes in bfloat16 (weights, outputs and loss stay float32): about twice
# as fast on CPUs with AMX-BF16 (Sapphire Rapids and later); with AVX512_BF16 alone it was
# 0.67x float32 on a Xeon and 1.4x on an AMD EPYC (see brainseg/hardware.py). "auto" picks
# it when /proc/cpuinfo lists amx_bf16, times both once with AVX512_BF16 alone (the choice
# recorded in ~/.cache/unet-horovod), and is float32 without bfloat16 in hardware.
PRECISION = "auto"  # "auto" | "float32" | "mixed_bfloat16"
# Stop when validation Dice has not improved for this many epochs; 0 never stops early (the
# epoch with the best validation Dice is exported either way). 0: with patience 5 a run of the
# realistic benchmark stopped before its learning rate had decayed, on a validation Dice of 4
# patients, and lost every region (README: "Every change measured").
EARLY_STOPPING_PATIENCE = 0
# A Horovod timeline (Chrome trace of every allreduce, chrome://tracing) is written to this
# file when set; "" writes none. It costs some speed: use it to diagnose, not in production.
TIMELINE = ""
# How often (ms) Horovod's background thread meets the other ranks to start allreduces.
# Every cycle costs CPU even when there is nothing to reduce, and a training step here sends
# one grouped allreduce per few hundred ms, so a longer cycle only delays it by half a cycle
# on average. Measured (bench/training.py machine): a step loop with Horovod initialized ran
# 2.5% slower than without at 1 ms (Horovod's default since 0.21, chosen for GPUs), 0.6% at
# 5 ms, and 17% slower at 0.1 ms; 2 ranks x 1 thread were the same at 1, 5 and 10 ms.
# An exported HOROVOD_CYCLE_TIME takes precedence.
HOROVOD_CYCLE_TIME_MS = 5.0
# A rank that makes no progress for this long (no training step, batch read, validation step
# or checkpoint finished) stops the whole job, naming the rank presumed stuck; a rank stopped
# or frozen (kill -STOP, a dead NFS mount) would otherwise hold every other rank in its
# allreduce forever. Horovod's stall check is set from it too: it stops the job after about
# half of it when it can name the missing rank (brainseg/watchdog.py). Generous, because the
# longest legitimate pauses count: the first step compiles the model (about 10 s here, more
# for larger models), every rank waits while rank 0 writes the checkpoint and the best model
# (tens of seconds on a slow shared filesystem), and a resumed run waits while rank 0 loads
# it. Keep it above twice the longest pause: each rank prints its longest at the end. 0 = off.
STALL_TIMEOUT_SECONDS = 300

# --- Threads --------------------------------------------------------------------------------
# 0 means: computed from the cores available to each rank (its CPU affinity under mpirun
# binding, else the node's cores divided by the ranks on the node). Maxing out intra-op
# threads on many-core nodes can exhaust memory; leave a few cores for the OS if it does.
NUM_INTRA_THREADS = 0
NUM_INTER_THREADS = 0
# OpenMP settings from the seed project. Stock TensorFlow runs oneDNN on its own thread pool,
# so these only matter for OpenMP builds of TensorFlow; they are exported to every rank.
KMP_BLOCKTIME = 0  # ms a thread spins after a parallel region before sleeping
KMP_AFFINITY = "granularity=fine,compact,1,0"

# --- Launch ---------------------------------------------------------------------------------
HOSTS_FILE = os.path.join(_HERE, "hosts.txt")  # one host per line: `name slots=N`
# How mpirun and the launcher's checks reach the other hosts (Open MPI's plm_rsh_agent): a
# command called as `AGENT HOST COMMAND...`, passwordless. The tests use scripts/netns_rsh.sh.
LAUNCH_AGENT = "ssh"
# The network the ranks and MPI's daemons talk over: interface names or subnets in CIDR
# notation, comma-separated (e.g. "eth0" or "10.1.0.0/16"); "" lets Open MPI use every one.
# Set it when nodes have several networks and only one connects them all.
NETWORK_INTERFACE = ""
# A host silent for about this long (its link down, the node powered off) is declared lost
# and the whole job stops: Open MPI's TCP keepalive on the daemons' connections.
HOST_TIMEOUT_SECONDS = 20

# --- Inference -----------------------------------------------------------------------------
CHECKPOINT = ""  # "": the best model of the training run, TRAIN_DIR/model.keras
INFERENCE_BATCH_SIZE = 64
# "auto": bfloat16 where it is faster: on a CPU with AMX, and where it has AVX512_BF16 alone
# if timing once says so (brainseg/runtime.py); float32 elsewhere.
INFERENCE_PRECISION = "auto"  # "auto" | "float32" | "mixed_bfloat16"
# What predicts: "openvino" (Intel's CPU inference runtime; the checkpoint is converted once
# and cached beside it, in <checkpoint>.openvino/), "tensorflow" (Keras), or "auto": OpenVINO
# when the openvino package is installed, TensorFlow otherwise.
INFERENCE_RUNTIME = "auto"  # "auto" | "openvino" | "tensorflow"
NUM_FIGURES = 0  # PNG montages of at most this many scored cases; 0: every scored case
# Average each slice's prediction with that of its left-right mirror image (2x the model's
# time). On the realistic benchmark: whole and enhancing tumor +0.002, tumor core unmoved
# (three seeds; README: "Every change measured").
TEST_TIME_FLIPS = False
# Post-processing of the predicted label map (brainseg/postprocessing.py); 0 turns a rule off.
# The largest gain on the realistic benchmark: the lower-grade cases, which have no enhancing
# tumor, no longer get a few false enhancing voxels (README: "Every change measured").
# Tumor components smaller than this (mm^3) are removed: 200 until 2026-11-29, when 500 (half
# a millilitre, a ball of 10 mm) raised the lesion-wise whole tumor as BraTS 2023 ranked it by
# 0.04-0.07 on 576 held-out cases (0.69-0.70 -> 0.74-0.77), its Dice unchanged within 0.0002.
MIN_LESION_MM3 = 500.0
MIN_ENHANCING_MM3 = 500.0  # a case with less enhancing tumor than this gets none (it becomes core)
# Components of the enhancing tumor smaller than this (mm^3) become core, and then components
# of the tumor core smaller than MIN_CORE_MM3 become edema: fragments scattered in the tumor,
# each a false-positive lesion for the lesion-wise scores BraTS ranks by. Together they raised
# the lesion-wise TC and ET Dice on three seeds, per-case Dice within 0.001
# (README: "Every change measured").
MIN_ENHANCING_LESION_MM3 = 150.0
MIN_CORE_MM3 = 200.0
# Components of the whole tumor without any core, farther than this (mm) from every component
# with core and from the largest, are removed: FLAIR-bright lesions centimetres away from the
# tumor (white-matter hyperintensities) are not tumor; a lower-grade tumor without a core is
# the largest component and stays. 0 keeps them. Chosen on the realistic benchmark's held-out
# cases 1-96 of three seeds, then checked on cases 97-192: whole tumor better on 56 of 288,
# worse on none, mean WT HD95 2.25 / 2.90 / 3.07 -> 2.16 / 1.96 / 1.87 mm (README: "Every
# change measured"). At 20 mm it cut the second, core-less focus of a lower-grade tumor.
FAR_LESION_MM = 30.0
# Lesion-wise Dice and HD95 beside the per-case figures (BraTS ranks by them since 2023), two
# ways: the official package's (brats-evaluation on panoptica: every lesion counts, however
# small) and BraTS 2023's ranking scripts' (lesions within 3 voxels are one, those of at most
# 50 mm^3 are not counted; metrics.ranking_lesion_wise). A few tenths of a second per case.
LESION_WISE = True
