"""Shared test setup: quiet TF, real MNIST offline, small real splits.

Tests never touch the network. Real MNIST comes from $MID_DATA_DIR, else the full offline copy at
../shared/data/mnist beside the repository when it is there, else the subset shipped in
tests/data/mnist_subset (the first 8,000 training and 1,000 test images), so a fresh clone passes anywhere.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FULL_MNIST = REPO.parent / "shared" / "data" / "mnist"
MNIST_SUBSET = REPO / "tests" / "data" / "mnist_subset"


def _has_idx(path) -> bool:
    return any(os.path.isfile(os.path.join(path, f"t10k-labels-idx1-ubyte{ext}")) for ext in (".gz", ""))


def mnist_dir() -> str:
    path = os.environ.get("MID_DATA_DIR")
    if path:
        if not _has_idx(path):
            raise RuntimeError(f"MID_DATA_DIR={path} holds no MNIST IDX files: unset it to use "
                               f"{FULL_MNIST} or the subset in {MNIST_SUBSET}")
        return path
    return str(FULL_MNIST if _has_idx(FULL_MNIST) else MNIST_SUBSET)


def full_mnist() -> bool:
    """Whether the tests read the whole of MNIST (60,000 + 10,000) or the shipped subset."""
    from mid_tf.data import load_split
    return len(load_split("mnist", "test", mnist_dir())) == 10000


@pytest.fixture(scope="session")
def mnist_data_dir() -> str:
    return mnist_dir()


@pytest.fixture(scope="session")
def mnist_small(mnist_data_dir):
    """(train, test) splits: the first 6,000 training and 1,000 test images of real MNIST."""
    from mid_tf.data import load_split
    return (load_split("mnist", "train", mnist_data_dir, limit=6000),
            load_split("mnist", "test", mnist_data_dir, limit=1000))
