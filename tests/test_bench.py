"""Benchmark pieces that need no run: the FLOP count behind bench/training.py's GFLOP/s
figures and its random datasets, bench/allreduce.py's fit of the ring-allreduce cost model, and how
bench/converter.py forms its ratios."""
import os

import pytest

import model as unet
from bench.training import forward_flops_per_slice, make_dataset
from brainseg import checkpoints, dataset


def test_forward_flops_count_every_convolution():
    net = unet.build_unet(image_size=8, channels=2, num_classes=1, base_filters=4, depth=1)
    # down0: 8x8 grid, 3x3 kernels 2->4 and 4->4; bottleneck: 4x4, 4->8 and 8->8;
    # transposed 2x2 8->4 applied per 4x4 input pixel; up0: 8x8, (4+4)->4 and 4->4; 1x1 4->1.
    multiply_adds = (64 * 9 * (2 * 4 + 4 * 4) + 16 * 9 * (4 * 8 + 8 * 8) + 16 * 4 * 8 * 4
                     + 64 * 9 * (8 * 4 + 4 * 4) + 64 * 4)
    assert forward_flops_per_slice(net) == 2 * multiply_adds


def test_the_training_benchmark_data_opens_as_a_converted_dataset(tmp_path):
    """Training opens only arrays a manifest vouches for; the benchmark's random slices
    lacked one, and bench/training.py failed at its first measurement."""
    folder = make_dataset(str(tmp_path / "small"), num_train=40, image_size=16)
    imgs, msks = dataset.open_split(folder, "train", image_size=16, channels=4)
    assert imgs.shape == (40, 16, 16, 4) and msks.shape == (40, 16, 16, 3)
    assert ((msks[..., 2] <= msks[..., 1]) & (msks[..., 1] <= msks[..., 0])).all()  # nested
    assert 0.05 < msks[..., 0].mean() < 0.3
    description = checkpoints.describe(dataset.load_manifest(folder))
    assert description["regions"] == ["whole_tumor", "tumor_core", "enhancing_tumor"]


def test_ring_model_fit_recovers_latency_and_bandwidth():
    """bench/allreduce.py: from times made by the ring model itself, the least-squares fit
    returns its alpha and beta."""
    from bench.allreduce import fit_ring_model, ring_seconds
    alpha, beta = 2e-4, 1.1e8  # 0.2 ms per message, 0.88 Gbit/s
    points = [(n, size, ring_seconds(n, alpha, beta, size))
              for n in (2, 3) for size in (4, 500_000, 2_000_000, 7_800_000)]
    fitted_alpha, fitted_beta = fit_ring_model(points)
    assert abs(fitted_alpha - alpha) < 1e-9 and abs(fitted_beta / beta - 1) < 1e-9


def test_converter_ratios_are_medians_of_ratios_within_a_round():
    """Each ratio pairs runs of one round (a busy machine slows them alike), then takes the
    median over rounds: here 3.0, 2.0 and 4.0 for the seed approach against 2 workers."""
    import argparse

    from bench.converter import SEED, streaming, summarize
    seconds = {SEED: [30, 20, 40], streaming(1): [15, 15, 15], streaming(2): [10, 10, 10]}
    rows = [{"run": run, "cases": cases, "round": r + 1, "seconds": times[r] * cases / 8,
             "peak_rss_mib": 100.0 * (cases / 2 if run == SEED else 1.0 + cases / 800)}
            for run, times in seconds.items() for cases in (2, 8) for r in range(3)]
    args = argparse.Namespace(small=2, large=8, workers=2, skip_seed_style=False)
    summary = summarize(rows, args)
    assert summary["speedup_vs_seed_style"] == 3.0
    assert summary["speedup_vs_seed_style_serial"] == 2.0
    assert summary["parallel_speedup"] == 1.5
    assert summary["memory_ratio_2_workers"] == round(1.01 / 1.0025, 3)
    assert summary["seed_style_memory_ratio"] == 4.0


def test_allreduce_share_unites_nested_timeline_activities(tmp_path):
    """bench/multihost.py reads a Horovod timeline as Horovod writes it (an unclosed JSON
    array, B/E activities nested per tensor track): two overlapping allreduces over 0-10
    and 5-20 us of a 0-40 us trace are busy half the time; negotiation does not count."""
    from bench.multihost import allreduce_share
    timeline = tmp_path / "timeline.json"
    timeline.write_text(
        '[\n{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "grad_a"}},\n'
        '{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 0, "pid": 1},'
        '{"ph": "E", "ts": 0, "pid": 1},'
        '{"ph": "B", "name": "ALLREDUCE", "ts": 0, "pid": 1},'
        '{"ph": "B", "name": "MPI_ALLREDUCE", "ts": 1, "pid": 1},{"ph": "E", "ts": 9, "pid": 1},'
        '{"ph": "E", "ts": 10, "pid": 1},'
        '{"ph": "B", "name": "ALLREDUCE", "ts": 5, "pid": 2},{"ph": "E", "ts": 20, "pid": 2},'
        '{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 30, "pid": 2},'
        '{"ph": "E", "ts": 40, "pid": 2},')
    assert allreduce_share(timeline) == 0.5


def test_accuracy_cache_keys_follow_the_settings_defaults(monkeypatch):
    """bench/accuracy.py reuses a trained model only for the same flags and the same
    settings.py defaults: a changed default (batch normalization) is a new training."""
    import settings
    from bench.accuracy import defaults_of, flags_key
    defaults = defaults_of("train_horovod.py")
    assert {"USE_BATCH_NORM", "EPOCHS", "BASE_FILTERS", "CONTEXT_SLICES"} <= set(defaults)
    assert "TRAIN_DIR" not in defaults and "IMAGE_SIZE" in defaults_of("converter.py")
    before = flags_key(["--context-slices", "1"], defaults)
    monkeypatch.setattr(settings, "USE_BATCH_NORM", not settings.USE_BATCH_NORM)
    after = flags_key(["--context-slices", "1"], defaults_of("train_horovod.py"))
    assert before != after


def test_accuracy_pairs_two_recipes_case_by_case():
    """bench/accuracy.py --against: the difference of two recipes on the same held-out cases,
    with a bootstrap interval over the cases and the count of cases that gained and lost."""
    from bench.accuracy import bootstrap, case_differences

    def paired_difference(reference, result, region):
        return bootstrap(case_differences(reference, result, region))

    def result(name, tumor_core_dice):
        return {"name": name, "per_case": [
            {"case": f"case{number}", "tumor_core_dice": dice}
            for number, dice in enumerate(tumor_core_dice)]}
    reference = result("reference", [0.2, 0.5, 0.7, 0.9])
    better = result("better", [0.3, 0.6, 0.8, 0.9])  # +0.1 on three cases, one unchanged
    mean, low, high, gained, lost = paired_difference(reference, better, "tumor_core")
    assert mean == pytest.approx(0.075) and (gained, lost) == (3, 0)
    assert 0 <= low <= mean <= high <= 0.1 + 1e-9
    assert paired_difference(reference, better, "tumor_core")[1:3] == (low, high)  # seeded
    mixed = result("mixed", [0.6, 0.1, 0.7, 0.9])  # +0.4 and -0.4: no gain, a wide interval
    mean, low, high, gained, lost = paired_difference(reference, mixed, "tumor_core")
    assert mean == pytest.approx(0) and (gained, lost) == (1, 1) and low < -0.05 < 0.05 < high
    other_cases = result("other", [0.2, 0.5, 0.7])
    with pytest.raises(ValueError, match="different held-out cases"):
        paired_difference(reference, other_cases, "tumor_core")


def test_step_profile_sorts_ops_by_the_layer_they_belong_to_and_finds_busy_time():
    from bench import step_profile

    kinds = {"down0_conv1": "convolutions", "down0_bn1": "batch normalization"}
    category = step_profile.category
    assert category("unet_1/down0_conv1_1/convolution", "_MklNativeConv2D", kinds) == \
        "convolutions"
    assert category("gradient_tape/unet_1/down0_bn1_1/FusedBatchNormGradV3",
                    "FusedBatchNormGradV3", kinds) == "batch normalization"
    # oneDNN fuses a convolution with its bias and ReLU, under the ReLU's name
    assert category("unet_1/down0_relu1_1/Relu", "_MklNativeFusedConv2D", kinds) == \
        "convolutions"
    assert category("adam/Sqrt_3", "Sqrt", kinds) == "optimizer (Adam)"
    assert category("gradient_tape/AddN_3", "AddN", kinds).startswith("gradient sums")
    assert category("", step_profile.XLA_EVENT, kinds) == "loss (XLA-compiled)"
    assert category("Cast_2", "Cast", kinds).startswith("Dice, casts")
    # ops at [0, 4) and [2, 6) overlap, [8, 9) is alone: busy 7 of 10 wall seconds
    events = [(None, None, start * 10**12, length * 10**12)
              for start, length in ((0, 4), (2, 4), (8, 1))]
    assert step_profile.busy_seconds(events) == pytest.approx(7.0)


def test_accuracy_reports_the_tumor_core_of_lower_grade_cases_apart(tmp_path):
    """bench/accuracy.py finds the held-out cases whose ground truth has no enhancing tumor
    (read from their NIfTI label maps) and splits the tumor core's mean Dice by them."""
    import nibabel as nib
    import numpy as np

    from bench.accuracy import core_by_grade, format_core_by_grade, lower_grade_cases
    from brainseg import synthetic
    folders = [synthetic.write_case(str(tmp_path), index, seed=index, shape=(48, 48, 24))
               for index in (1, 2, 3)]
    seg_path = os.path.join(folders[1], f"{os.path.basename(folders[1])}_seg.nii.gz")
    seg = nib.load(seg_path)
    labels = np.asarray(seg.dataobj)
    assert (labels == 4).any()
    nib.save(nib.Nifti1Image(np.where(labels == 4, 1, labels).astype(labels.dtype), seg.affine),
             seg_path)  # case 2 becomes lower-grade: its enhancing rim is core now
    lower = lower_grade_cases(str(tmp_path))
    assert lower == [os.path.basename(folders[1])]
    result = {"lower_grade_cases": lower, "per_case": [
        {"case": os.path.basename(folder), "tumor_core_dice": dice}
        for folder, dice in zip(folders, (0.9, 0.2, 0.7))]}
    split = core_by_grade(result)
    assert split["high_grade"] == (2, pytest.approx(0.8))
    assert split["lower_grade"] == (1, pytest.approx(0.2))
    assert format_core_by_grade(result) == "0.800 (2) / 0.200 (1)"
    assert core_by_grade({"per_case": result["per_case"]}) is None


def test_accuracy_pairs_each_seed_with_its_reference_and_pools_the_seeds():
    """--against with one reference per seed: each result against its own seed's, then one row
    pooling a recipe's seeds (their held-out cases are distinct patients)."""
    from bench.accuracy import paired_table

    def result(name, seed, dice):
        return {"name": name, "seed": seed, "test_cases": len(dice), "per_case": [
            {"case": f"case{number}", **{f"{region}_dice": value for region in
                                         ("whole_tumor", "tumor_core", "enhancing_tumor")}}
            for number, value in enumerate(dice)]}
    references = [result("defaults", 1, [0.5, 0.5]), result("defaults", 2, [0.9, 0.9])]
    recipes = [result("new", 2, [0.9, 0.8]), result("new", 1, [0.7, 0.7])]
    lines = paired_table(references, recipes).splitlines()
    assert lines[3].startswith("| new | 2 | -0.050 [-0.100, +0.000] (0 / 1) |")
    assert lines[4].startswith("| new | 1 | +0.200 [+0.200, +0.200] (2 / 0) |")
    # Pooled: -0.1, 0, +0.2, +0.2 over the four cases.
    assert lines[5].startswith("| new, pooled | 2 + 1 | +0.075 [")
    assert lines[5].endswith("(2 / 1) |")
    with pytest.raises(ValueError, match="no reference for new"):
        paired_table(references[:1], recipes)


def test_accuracy_pairs_only_held_out_cases_drawn_alike():
    """Held-out cases drawn with a phenomenon changed (--held-out-phenomenon) are other
    images of the same patients: a result on them pairs with a reference on them, never with
    one on the default cases."""
    from bench.accuracy import paired_table

    def result(name, dice, phenomena=None):
        found = {"name": name, "seed": 1, "test_cases": len(dice), "per_case": [
            {"case": f"case{number}", **{f"{region}_dice": value for region in
                                         ("whole_tumor", "tumor_core", "enhancing_tumor")}}
            for number, value in enumerate(dice)]}
        if phenomena is not None:
            found["held_out_phenomena"] = phenomena
        return found
    references = [result("defaults", [0.9, 0.9]),
                  result("defaults", [0.5, 0.5], ["bias_field_strength=0.3"])]
    strong = result("new", [0.7, 0.7], ["bias_field_strength=0.3"])
    assert paired_table(references, [strong]).splitlines()[3].startswith(
        "| new | 1 | +0.200 [+0.200, +0.200] (2 / 0) |")
    assert paired_table(references, [result("new", [0.7, 0.7])]).splitlines()[3].startswith(
        "| new | 1 | -0.200 [")
    with pytest.raises(ValueError, match="bias_field_strength=0.3"):
        paired_table(references[:1], [strong])
