"""Datasets by name: MNIST-style IDX files from a local directory, any TFDS dataset, or image folders.

`image_folder` (FOLDER_DATASETS) is a team's own images under `data_dir` (`mid_tf/data/folders.py`:
DIR/train/<class>/*, DIR/test/<class>/*, or the same as DIR/train.tar, DIR/test.tar); it has no fixed
shape, so it is not in DATASET_SHAPES and `load_split` returns whatever shape the images have.

Resolution order for a named dataset, `load_split(name, split, data_dir)`:
  1. `data_dir` (the `--data_dir` flag, else the `MID_DATA_DIR` environment variable) holding the
     four IDX files (`train-images-idx3-ubyte[.gz]`, ...) -> read them directly (MNIST, Fashion-MNIST).
  2. A prepared TFDS dataset in `data_dir` (or TFDS's default directory when no `data_dir` is given).
  3. A TFDS download, only if `download=True` and the download host answers within a few seconds.
Anything else raises `DataError` at once with a message naming `--data_dir`: TFDS itself would retry
for minutes on a machine without network.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import socket

import numpy as np

from mid_tf.data import folders, idx
from mid_tf.data.split import DataError, Split

DATA_DIR_ENV = "MID_DATA_DIR"

# Name -> (height, width, channels, num_classes). Datasets mid_tf has model families for.
DATASET_SHAPES = {
    "mnist": (28, 28, 1, 10),
    "fashion_mnist": (28, 28, 1, 10),
    "cifar10": (32, 32, 3, 10),
    "svhn_cropped": (32, 32, 3, 10),
}
FOLDER_DATASETS = ("image_folder",)
KNOWN_DATASETS = tuple(sorted((*DATASET_SHAPES, *FOLDER_DATASETS)))
_DIGITS = tuple(str(d) for d in range(10))
# Label order of each named dataset (TFDS's ClassLabel names; kept here so IDX files and configs need no TFDS).
_CLASS_NAMES = {
    "mnist": _DIGITS,
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "svhn_cropped": _DIGITS,
}
_IDX_DATASETS = ("mnist", "fashion_mnist")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DOWNLOAD_PROBE = ("storage.googleapis.com", 443)


def _check_name(name: str) -> None:
    if name not in KNOWN_DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of {list(KNOWN_DATASETS)}")


def class_names_for(name: str) -> tuple | None:
    """The class names of a named dataset in label order; None for image_folder, whose names come from
    its folders (`load_split(...).class_names`)."""
    _check_name(name)
    return _CLASS_NAMES.get(name)


def resolve_data_dir(data_dir: str | None) -> str | None:
    """`--data_dir` if given, else `$MID_DATA_DIR`, else None (TFDS default directory)."""
    if data_dir:
        return os.path.expanduser(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    return os.path.expanduser(env) if env else None


def _checked_data_dir(data_dir: str | None) -> str | None:
    data_dir = resolve_data_dir(data_dir)
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir / {DATA_DIR_ENV} = {data_dir} is not a directory. Point it at the "
                        "directory holding the dataset.")
    return data_dir


def _find_idx(data_dir: str, stem: str) -> str | None:
    for candidate in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _load_idx_split(name: str, data_dir: str, split: str) -> Split | None:
    stems = _IDX_FILES[split]
    paths = [_find_idx(data_dir, s) for s in stems]
    if not any(paths):
        return None
    if not all(paths):
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise DataError(f"{data_dir} has only part of the IDX files: missing {missing}[.gz]. "
                        "Point --data_dir (or MID_DATA_DIR) at a directory with all four files.")
    try:
        images, labels = idx.read_idx(paths[0]), idx.read_idx(paths[1])
    except idx.IdxError as e:
        raise DataError(f"{e}. Replace the file or point --data_dir at a good copy.") from e
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[0]} / {paths[1]}: shapes {images.shape} and {labels.shape} do not "
                        "form an image/label pair")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{paths[1]}: labels outside 0..9")
    return Split(images[..., None].astype(np.uint8), labels.astype(np.int64), source=f"idx:{data_dir}",
                 class_names=_CLASS_NAMES[name])


def _network_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(_DOWNLOAD_PROBE, timeout=timeout):
            return True
    except OSError:
        return False


def _missing_data_message(name: str, data_dir: str | None, why: str) -> str:
    where = data_dir or "TFDS's default directory (~/tensorflow_datasets)"
    hint = (" For MNIST, put the four IDX files (train-images-idx3-ubyte.gz, ...) in a directory and pass"
            " it." if name in _IDX_DATASETS else "")
    return (f"Dataset '{name}' not found in {where} and {why}. Pass --data_dir=DIR (or set {DATA_DIR_ENV}) "
            f"pointing at a directory with the data (IDX files or a prepared TFDS dataset), or run once with "
            f"network access and --download.{hint}")


def _load_tfds_split(name: str, split: str, data_dir: str | None, download: bool) -> Split:
    import tensorflow_datasets as tfds  # imported lazily: slow import, only needed here

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name, bad directory
        raise DataError(f"TFDS cannot build dataset '{name}': {e}") from e
    if not builder.is_prepared():
        if not download:
            raise DataError(_missing_data_message(name, data_dir, "--download is off"))
        if not _network_reachable():
            raise DataError(_missing_data_message(name, data_dir, "the download host cannot be reached"))
        builder.download_and_prepare()
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False).batch(4096)
    images, labels = [], []
    for x, y in tfds.as_numpy(ds):
        images.append(x)
        labels.append(y)
    if not images:
        raise DataError(f"TFDS dataset '{name}' split '{split}' is empty in {data_dir or 'the default directory'}")
    return Split(np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int64),
                 source=f"tfds:{name}", class_names=_tfds_class_names(name, builder))


def _tfds_class_names(name: str, builder) -> tuple | None:
    """TFDS's own label names (ClassLabel). CIFAR-10's builder knows only "0".."9" until its download step
    reads batches.meta.txt (so under tfds.testing.mock_data too): placeholder names fall back to ours."""
    try:
        names = tuple(builder.info.features["label"].names)
    except (KeyError, AttributeError):
        names = ()
    if names == tuple(str(i) for i in range(len(names))):
        return _CLASS_NAMES.get(name, names or None)
    return names


def _tfds_default_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def preflight(name: str, data_dir: str | None = None, download: bool = False) -> None:
    """Fails in milliseconds, before TensorFlow is even imported, when the data cannot be found.

    Checks only for presence (IDX files, a prepared TFDS dataset's dataset_info.json, or image_folder's
    train/ + test/ folders or tars); reading and validating happens in `load_split`.
    """
    _check_name(name)
    data_dir = _checked_data_dir(data_dir)
    if name in FOLDER_DATASETS:
        folders.preflight(data_dir)
        return
    if data_dir is not None and name in _IDX_DATASETS and any(
            _find_idx(data_dir, s) for stems in _IDX_FILES.values() for s in stems):
        return
    root = data_dir or _tfds_default_dir()
    prepared = glob.glob(os.path.join(root, name, "*", "dataset_info.json")) + glob.glob(
        os.path.join(root, name, "*", "*", "dataset_info.json"))
    if prepared:
        return
    if not download:
        raise DataError(_missing_data_message(name, data_dir, "--download is off"))
    if not _network_reachable():
        raise DataError(_missing_data_message(name, data_dir, "the download host cannot be reached"))


def load_split(name: str, split: str, data_dir: str | None = None, *, download: bool = False,
               limit: int | None = None) -> Split:
    """Loads `split` ('train' or 'test') of dataset `name`, optionally only the first `limit` examples.

    For image_folder the examples come in a fixed pseudo-random order (np.random.default_rng(0)), so the
    first `limit` are a class-mixed subset, the same on every run; `download` does not apply to it.
    """
    _check_name(name)
    if split not in _IDX_FILES:
        raise DataError(f"unknown split '{split}'; use 'train' or 'test'")
    if limit is not None and limit <= 0:
        raise DataError(f"example limit must be positive, got {limit}")
    data_dir = _checked_data_dir(data_dir)
    if name in FOLDER_DATASETS:
        return folders.load_folder_split(data_dir, split, limit)
    result = None
    if data_dir is not None and name in _IDX_DATASETS:
        result = _load_idx_split(name, data_dir, split)
    if result is None:
        result = _load_tfds_split(name, split, data_dir, download)
    h, w, c, _ = DATASET_SHAPES[name]
    if result.images.shape[1:] != (h, w, c):
        raise DataError(f"{result.source}: images have shape {result.images.shape[1:]}, expected {(h, w, c)} "
                        f"for '{name}'")
    if limit is not None:
        result = dataclasses.replace(result, images=result.images[:limit], labels=result.labels[:limit])
    return result
