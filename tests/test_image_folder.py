"""image_folder datasets (mid_tf/data/folders.py): folders and tars written here, the offline CIFAR-10 JPEG copy
when it is there, and class names of the named datasets (TFDS on mock data: no network)."""

import os
import pathlib
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from mid_tf.data import (DATASET_SHAPES, FOLDER_DATASETS, KNOWN_DATASETS, DataError, Split, class_names_for,
                         load_split, preflight)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10_jpeg"
CLASSES = ("ant", "cat", "dog")  # sorted folder order
VALUE = {"ant": 40, "cat": 120, "dog": 200}  # each class's images are one flat grey level: the label is visible


def _image(path, value, size=(8, 6), mode="RGB"):
    """A flat image of `value` (JPEG keeps a flat block exact to within a step or two)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, value, value)
    Image.new(mode, size, colour).save(path)


def _make_folder(root, per_class=4, classes=CLASSES, mode="RGB"):
    """root/{train,test}/<class>/ with PNGs and JPEGs alternating, plus hidden junk to be ignored."""
    for split in ("train", "test"):
        for c in classes:
            for i in range(per_class):
                _image(root / split / c / f"{i:04d}.{'png' if i % 2 else 'jpg'}", VALUE[c], mode=mode)
            (root / split / c / ".DS_Store").write_bytes(b"\x00\x01junk")
            (root / split / c / "._0000.jpg").write_bytes(b"AppleDouble junk")
    return root


def _tar_split(folder_root, tar_root, split):
    tar_root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_root / f"{split}.tar", "w") as tar:
        tar.add(folder_root / split, arcname=split)


def _labels_from_pixels(split):
    """The class each image's grey level says it is, as label indices in `split.class_names`."""
    means = split.images.reshape(len(split), -1).mean(axis=1)
    values = np.array([VALUE[c] for c in split.class_names])
    return np.abs(means[:, None] - values[None, :]).argmin(axis=1)


def test_folder_images_labels_and_class_names(tmp_path):
    root = _make_folder(tmp_path)
    split = load_split("image_folder", "train", str(root))
    assert split.class_names == CLASSES
    assert split.images.shape == (12, 6, 8, 3) and split.images.dtype == np.uint8
    assert split.labels.dtype == np.int64 and list(np.bincount(split.labels)) == [4, 4, 4]
    np.testing.assert_array_equal(_labels_from_pixels(split), split.labels)
    assert split.source == f"image_folder:{root / 'train'}"


def test_grayscale_only_folders_give_one_channel_and_mixed_give_rgb(tmp_path):
    gray = _make_folder(tmp_path / "gray", mode="L")
    split = load_split("image_folder", "test", str(gray))
    assert split.images.shape == (12, 6, 8, 1)
    np.testing.assert_array_equal(_labels_from_pixels(split), split.labels)
    _image(gray / "test" / "cat" / "colour.png", VALUE["cat"], mode="RGB")
    mixed = load_split("image_folder", "test", str(gray))
    assert mixed.images.shape == (13, 6, 8, 3)
    np.testing.assert_array_equal(_labels_from_pixels(mixed), mixed.labels)


def test_classes_txt_sets_the_label_order_and_must_match_the_folders(tmp_path):
    root = _make_folder(tmp_path)
    (root / "classes.txt").write_text("dog\ncat\n\nant\n")
    split = load_split("image_folder", "train", str(root))
    assert split.class_names == ("dog", "cat", "ant")
    np.testing.assert_array_equal(_labels_from_pixels(split), split.labels)
    (root / "classes.txt").write_text("dog\ncat\n")
    with pytest.raises(DataError, match=r"folders not listed \['ant'\]"):
        load_split("image_folder", "train", str(root))
    (root / "classes.txt").write_text("dog\ncat\nant\nbee\n")
    with pytest.raises(DataError, match=r"listed without a folder \['bee'\]"):
        load_split("image_folder", "train", str(root))
    (root / "classes.txt").write_text("dog\ncat\nant\ncat\n")
    with pytest.raises(DataError, match="repeated"):
        load_split("image_folder", "train", str(root))


def test_train_and_test_must_have_the_same_classes(tmp_path):
    root = _make_folder(tmp_path)
    _image(root / "train" / "eel" / "0.png", 10)
    with pytest.raises(DataError, match=r"only in train \['eel'\]"):
        load_split("image_folder", "test", str(root))


@pytest.mark.parametrize("name,content", [("0002.jpg", b"\xff\xd8\xff\xe0 truncated jpeg"),
                                          ("notes.txt", b"not an image")])
def test_corrupt_or_non_image_file_is_named(tmp_path, name, content):
    root = _make_folder(tmp_path)
    (root / "train" / "cat" / name).write_bytes(content)
    with pytest.raises(DataError, match="not a readable image") as e:
        load_split("image_folder", "train", str(root))
    assert str(root / "train" / "cat" / name) in str(e.value)


def test_mixed_sizes_name_the_odd_file_and_the_expected_size(tmp_path):
    root = _make_folder(tmp_path)
    _image(root / "test" / "dog" / "big.png", VALUE["dog"], size=(10, 6))
    with pytest.raises(DataError, match=r"big\.png is 6x10 \(HxW\) but the split's images are 6x8"):
        load_split("image_folder", "test", str(root))
    assert len(load_split("image_folder", "train", str(root))) == 12  # the other split is fine


def test_tars_read_like_the_folders_and_name_bad_members(tmp_path):
    folders = _make_folder(tmp_path / "folders")
    tars = tmp_path / "tars"
    for split in ("train", "test"):
        _tar_split(folders, tars, split)
    from_folders = load_split("image_folder", "train", str(folders))
    from_tars = load_split("image_folder", "train", str(tars))
    np.testing.assert_array_equal(from_tars.images, from_folders.images)
    np.testing.assert_array_equal(from_tars.labels, from_folders.labels)
    assert from_tars.class_names == CLASSES and from_tars.source == f"image_folder:{tars / 'train.tar'}"
    (folders / "train" / "cat" / "0001.jpg").write_bytes(b"garbage")
    os.remove(tars / "train.tar")
    _tar_split(folders, tars, "train")
    with pytest.raises(DataError, match="not a readable image") as e:
        load_split("image_folder", "train", str(tars))
    assert f"{tars / 'train.tar'}:train/cat/0001.jpg" in str(e.value)


def test_tar_members_outside_a_class_folder_are_a_layout_error(tmp_path):
    _image(tmp_path / "src" / "cat" / "0.png", 1)
    with tarfile.open(tmp_path / "train.tar", "w") as tar:  # made from inside train/: no train/ prefix
        tar.add(tmp_path / "src" / "cat" / "0.png", arcname="cat/0.png")
    with tarfile.open(tmp_path / "test.tar", "w") as tar:
        tar.add(tmp_path / "src" / "cat" / "0.png", arcname="test/cat/0.png")
    with pytest.raises(DataError, match=r"train\.tar:cat/0\.png is not inside a class folder train/<class>/"):
        load_split("image_folder", "train", str(tmp_path))


def test_limit_is_a_fixed_class_mixed_prefix(tmp_path):
    root = _make_folder(tmp_path)
    full = load_split("image_folder", "train", str(root))
    # np.random.default_rng(0).permutation(12) over files sorted by (label, name): pinned, so a change of
    # order (which would change every `limit` subset users have results for) fails here.
    assert list(full.labels) == [2, 0, 1, 1, 1, 2, 0, 0, 1, 2, 2, 0]
    head = load_split("image_folder", "train", str(root), limit=5)
    np.testing.assert_array_equal(head.images, full.images[:5])
    np.testing.assert_array_equal(head.labels, full.labels[:5])
    assert len(set(head.labels.tolist())) == 3 and head.class_names == CLASSES
    np.testing.assert_array_equal(load_split("image_folder", "train", str(root), limit=5).images, head.images)


def test_preflight_fails_fast_naming_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MID_DATA_DIR", raising=False)
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    t0 = time.time()
    for data_dir in (None, str(tmp_path), str(tmp_path / "only_train")):
        with pytest.raises(DataError, match="--data_dir"):
            preflight("image_folder", data_dir)
    with pytest.raises(DataError, match="no test data"):
        preflight("image_folder", str(tmp_path / "only_train"))
    assert time.time() - t0 < 0.5
    with pytest.raises(DataError, match="--data_dir"):
        load_split("image_folder", "train", str(tmp_path))
    preflight("image_folder", str(_make_folder(tmp_path / "ok", per_class=1)))  # passes


def test_dataset_names_and_class_names():
    assert FOLDER_DATASETS == ("image_folder",) and "image_folder" not in DATASET_SHAPES
    assert KNOWN_DATASETS == ("cifar10", "fashion_mnist", "image_folder", "mnist", "svhn_cropped")
    assert class_names_for("mnist") == class_names_for("svhn_cropped") == tuple("0123456789")
    assert class_names_for("fashion_mnist")[0] == "T-shirt/top" and class_names_for("fashion_mnist")[9] == "Ankle boot"
    assert class_names_for("cifar10") == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                          "ship", "truck")
    assert class_names_for("image_folder") is None
    with pytest.raises(DataError, match="unknown dataset"):
        class_names_for("imagenet")


def test_split_positional_construction_still_works():
    split = Split(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64), "test")
    assert split.class_names is None and len(split) == 2


def test_tfds_cifar10_has_class_names_under_mock_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from mid_tf.data import datasets
    monkeypatch.setattr(datasets, "_network_reachable", lambda timeout=3.0: True)  # no network is touched
    with tfds.testing.mock_data(num_examples=5):
        split = load_split("cifar10", "test", str(tmp_path), download=True, limit=3)
    assert split.images.shape == (3, 32, 32, 3) and split.class_names == class_names_for("cifar10")


def test_data_modules_import_without_tensorflow():
    code = ("import sys, mid_tf.data.datasets, mid_tf.data.folders; "
            "assert 'tensorflow' not in sys.modules and 'PIL' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason=f"no offline CIFAR-10 JPEG copy at {SHARED_CIFAR}")
def test_shared_cifar10_jpeg_tars():
    split = load_split("image_folder", "test", str(SHARED_CIFAR), limit=200)
    assert split.class_names == class_names_for("cifar10")  # sorted folders = CIFAR-10's label order
    assert split.images.shape == (200, 32, 32, 3) and len(set(split.labels.tolist())) == 10
    first = [split.class_names[i] for i in split.labels[:5]]
    assert first == ["cat", "ship", "automobile", "airplane", "deer"]
