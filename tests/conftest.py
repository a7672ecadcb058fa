"""Shared fixtures: a few small synthetic BraTS cases, converted once per test session.

Small volumes (48x48x24) and 32x32 slices keep the suite fast; the code paths are the ones
the full-size demo runs.
"""
import os
import sys

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import converter  # noqa: E402
import synthetic_brats  # noqa: E402

SMALL_SHAPE = (48, 48, 24)
SMALL_IMAGE_SIZE = 32
SMALL_CROP_SIZE = 48
NUM_CASES = 6


def convert(raw_dir, out_dir, *extra):
    converter.main(["--raw-dir", str(raw_dir), "--out-dir", str(out_dir),
                    "--image-size", str(SMALL_IMAGE_SIZE), "--crop-size", str(SMALL_CROP_SIZE),
                    *extra])


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synthetic_brats.write_dataset(str(root), NUM_CASES, seed=7, shape=SMALL_SHAPE)
    return root


@pytest.fixture(scope="session")
def converted_dir(raw_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("converted")
    convert(raw_dir, out_dir)
    return out_dir
