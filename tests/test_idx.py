"""The IDX reader: round trips, and every malformed file gives a clear error."""

import gzip
import os

import numpy as np
import pytest

from mid_tf.data import DataError, load_split
from mid_tf.data.idx import IdxError, parse_idx, read_idx, write_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path, suffix):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = str(tmp_path / f"x-idx3-ubyte{suffix}")
    write_idx(path, arr)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_big_endian_int32(tmp_path):
    arr = np.arange(-3, 9, dtype=np.int32).reshape(3, 4)
    write_idx(str(tmp_path / "a"), arr)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a")), arr)


def test_truncated_body_names_the_problem(tmp_path):
    path = tmp_path / "t"
    write_idx(str(path), np.zeros((10, 4, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(IdxError, match="truncated or corrupt"):
        read_idx(str(path))


def test_bad_magic(tmp_path):
    path = tmp_path / "m"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 12)
    with pytest.raises(IdxError, match="bad IDX magic"):
        read_idx(str(path))


def test_short_header():
    with pytest.raises(IdxError, match="too short"):
        parse_idx(b"\x00\x00")
    with pytest.raises(IdxError, match="truncated header"):
        parse_idx(b"\x00\x00\x08\x03\x00\x00")


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "c.gz"
    raw = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04abcd")
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IdxError, match="cannot read IDX file"):
        read_idx(str(path))


def _write_mnist_dir(d, n_train=12, n_test=6, labels=None):
    rng = np.random.default_rng(1)
    write_idx(os.path.join(d, "train-images-idx3-ubyte.gz"), rng.integers(0, 256, (n_train, 28, 28), np.uint8))
    write_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"),
              labels if labels is not None else rng.integers(0, 10, n_train).astype(np.uint8))
    write_idx(os.path.join(d, "t10k-images-idx3-ubyte"), rng.integers(0, 256, (n_test, 28, 28), np.uint8))
    write_idx(os.path.join(d, "t10k-labels-idx1-ubyte"), rng.integers(0, 10, n_test).astype(np.uint8))


def test_load_split_from_generated_dir_gz_and_raw(tmp_path):
    _write_mnist_dir(str(tmp_path))
    train = load_split("mnist", "train", str(tmp_path))
    test = load_split("mnist", "test", str(tmp_path), limit=4)
    assert train.images.shape == (12, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (4, 28, 28, 1) and test.labels.dtype == np.int64


def test_partial_dir_is_an_error(tmp_path):
    _write_mnist_dir(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="missing.*t10k-labels"):
        load_split("mnist", "test", str(tmp_path))


def test_mismatched_counts_and_bad_labels(tmp_path):
    _write_mnist_dir(str(tmp_path), labels=np.full(11, 3, np.uint8))
    with pytest.raises(DataError, match="do not form an image/label pair"):
        load_split("mnist", "train", str(tmp_path))
    _write_mnist_dir(str(tmp_path), labels=np.full(12, 42, np.uint8))
    with pytest.raises(DataError, match="labels outside"):
        load_split("mnist", "train", str(tmp_path))


def test_truncated_file_in_dir_names_data_dir(tmp_path):
    _write_mnist_dir(str(tmp_path))
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match="--data_dir"):
        load_split("mnist", "test", str(tmp_path))
