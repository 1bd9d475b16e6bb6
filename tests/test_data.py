"""Datasets and pipelines: real MNIST offline, TFDS by name on mock data, the fast missing-data error."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mid_tf.data import DataError, eval_dataset, load_split, train_stream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_real_mnist_is_the_real_thing(mnist_data_dir):
    train = load_split("mnist", "train", mnist_data_dir)
    test = load_split("mnist", "test", mnist_data_dir)
    assert list(train.labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    if (len(train), len(test)) == (60000, 10000):  # the full copy
        assert list(np.bincount(test.labels)) == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    else:  # the subset in tests/data: the first images of the same files
        assert (len(train), len(test)) == (8000, 1000)
        assert list(np.bincount(test.labels)) == [85, 126, 116, 107, 110, 87, 87, 99, 89, 94]


def test_shipped_subset_is_the_head_of_real_mnist(mnist_data_dir):
    """tests/data/mnist_subset is a prefix of the real files (so results on it are real MNIST results)."""
    from conftest import MNIST_SUBSET
    sub = load_split("mnist", "test", str(MNIST_SUBSET))
    assert len(sub) == 1000
    full = load_split("mnist", "test", mnist_data_dir, limit=1000)
    np.testing.assert_array_equal(sub.images, full.images)
    np.testing.assert_array_equal(sub.labels, full.labels)


def test_env_var_is_used(mnist_data_dir, monkeypatch):
    monkeypatch.setenv("MID_DATA_DIR", mnist_data_dir)
    assert len(load_split("mnist", "test", None, limit=7)) == 7


def test_pipelines_float_range_and_shapes(mnist_small):
    train, test = mnist_small
    x, y = next(iter(train_stream(train, 32, seed=0)))
    assert x.dtype == tf.float32 and x.shape == (32, 28, 28, 1) and y.dtype == tf.int64
    assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 1.0 and float(tf.reduce_max(x)) > 0.5
    batches = list(eval_dataset(test, 300))
    assert [int(b[0].shape[0]) for b in batches] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches]), test.labels)


def test_train_stream_is_seeded_and_skip_resumes_exactly(mnist_small):
    train, _ = mnist_small
    full = [y.numpy() for _, y in train_stream(train, 100, seed=3).take(130)]  # crosses the epoch boundary
    again = [y.numpy() for _, y in train_stream(train, 100, seed=3).take(130)]
    resumed = [y.numpy() for _, y in train_stream(train, 100, seed=3, start_batch=57).take(73)]
    other = [y.numpy() for _, y in train_stream(train, 100, seed=4).take(5)]
    np.testing.assert_array_equal(np.stack(full), np.stack(again))
    np.testing.assert_array_equal(np.stack(full[57:]), np.stack(resumed))
    assert not np.array_equal(np.stack(full[:5]), np.stack(other))
    # Epoch 2 is a different permutation of the same examples.
    assert not np.array_equal(full[0], full[60])


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3)), ("svhn_cropped", (32, 32, 3))])
def test_tfds_by_name_with_mock_data(name, shape, tmp_path, monkeypatch):
    # mock_data replaces download_and_prepare/as_dataset; the reachability probe is faked so the
    # download branch (what a user with network gets) is the one exercised. No network is touched.
    from mid_tf.data import datasets
    monkeypatch.setattr(datasets, "_network_reachable", lambda timeout=3.0: True)
    with tfds.testing.mock_data(num_examples=6):
        split = load_split(name, "test", str(tmp_path), download=True, limit=4)
    assert split.images.shape == (4, *shape) and split.images.dtype == np.uint8
    assert split.labels.shape == (4,) and split.source == f"tfds:{name}"


def test_missing_tfds_data_fails_fast_in_process(tmp_path):
    t0 = time.time()
    with pytest.raises(DataError, match="--data_dir"):
        load_split("cifar10", "train", str(tmp_path))
    assert time.time() - t0 < 5


def test_unknown_dataset_and_bad_dir(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_split("imagenet", "train", None)
    with pytest.raises(DataError, match="not a directory"):
        load_split("mnist", "train", str(tmp_path / "nope"))


@pytest.mark.parametrize("reachable", [False, True])
def test_missing_data_downloads_only_when_the_host_answers(tmp_path, monkeypatch, reachable):
    """The default: a dataset that is not on disk is downloaded by TFDS when the download host answers
    (mocked here), and refused at once, naming --data_dir, when it does not."""
    from mid_tf.config import DataConfig
    from mid_tf.data import datasets
    assert DataConfig().download  # no data flag needed on a machine with network
    monkeypatch.delenv("MID_DATA_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(datasets, "_network_reachable", lambda timeout=3.0: reachable)
    if reachable:
        datasets.preflight("mnist", None, download=True)  # goes on to TFDS's download
    else:
        with pytest.raises(DataError, match="--data_dir"):
            datasets.preflight("mnist", None, download=True)
    with pytest.raises(DataError, match="--download is off"):
        datasets.preflight("mnist", None, download=False)


def test_train_py_without_data_exits_fast_naming_data_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MID_DATA_DIR"}
    env["HOME"] = str(tmp_path)  # TFDS default dir ~/tensorflow_datasets is empty here
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "train.py", "--flagfile=configs/mnist.flags",
                           f"--model_dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert "--data_dir" in proc.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_idx_split_carries_class_names_through_limit(mnist_data_dir):
    split = load_split("mnist", "test", mnist_data_dir, limit=3)
    assert split.class_names == tuple("0123456789") and len(split) == 3 and split.source.startswith("idx:")


def test_tfds_splits_carry_each_datasets_class_names(tmp_path, monkeypatch):
    """TFDS's label names under mock data; CIFAR-10's placeholder "0".."9" there is replaced by its real names."""
    from mid_tf.data import class_names_for, datasets
    monkeypatch.setattr(datasets, "_network_reachable", lambda timeout=3.0: True)  # no network is touched
    with tfds.testing.mock_data(num_examples=2):
        names = {n: load_split(n, "test", str(tmp_path), download=True).class_names
                 for n in ("mnist", "fashion_mnist", "cifar10", "svhn_cropped")}
    assert names == {n: class_names_for(n) for n in names}
    assert names["fashion_mnist"][0] == "T-shirt/top" and names["cifar10"][-1] == "truck"
