"""Shared test setup: quiet TF, the offline MNIST copy, small real splits.

Tests never touch the network. Real MNIST comes from $MID_DATA_DIR, defaulting to the team's
offline copy at ../shared/data/mnist beside the repository (present on dev machines and CI).
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"


def mnist_dir() -> str:
    path = os.environ.get("MID_DATA_DIR") or str(DEFAULT_MNIST)
    if not os.path.isfile(os.path.join(path, "t10k-labels-idx1-ubyte.gz")) and not os.path.isfile(
            os.path.join(path, "t10k-labels-idx1-ubyte")):
        raise RuntimeError(f"real MNIST IDX files not found in {path}: set MID_DATA_DIR to the directory "
                           "holding them (../shared/data/mnist on dev machines and CI)")
    return path


@pytest.fixture(scope="session")
def mnist_data_dir() -> str:
    return mnist_dir()


@pytest.fixture(scope="session")
def mnist_small(mnist_data_dir):
    """(train, test) splits: the first 6,000 training and 1,000 test images of real MNIST."""
    from mid_tf.data import load_split
    return (load_split("mnist", "train", mnist_data_dir, limit=6000),
            load_split("mnist", "test", mnist_data_dir, limit=1000))
