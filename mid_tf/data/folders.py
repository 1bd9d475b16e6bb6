"""Image-folder datasets: a team's own JPEG/PNG images, one folder per class, or the same inside tars.

Layout of `--data_dir` (per split, an extracted folder wins over the archive beside it):

    DIR/train/<class>/*  and  DIR/test/<class>/*      (extracted folders), or
    DIR/train.tar        and  DIR/test.tar            (members train/<class>/*, test/<class>/*)
    DIR/classes.txt                                   (optional: one class name per line = label order)

Why tars are read in place: the offline CIFAR-10 copy ships as two read-only tars of 60,000 JPEGs, and
extracting them is a step a user can get wrong; Python's tarfile reads members directly, and decoding all
50,000 training images this way takes seconds, so there is no decoded cache to keep in sync.

Labels follow the sorted class-folder names unless classes.txt gives the order; train and test must have
the same classes. Hidden files and folders (a leading ".", e.g. .DS_Store) are ignored; every other file in
a class folder must decode with Pillow, else `DataError` names it (`DIR/train.tar:train/cat/0001.jpg`).
Pillow is imported only when decoding, so `preflight` stays a few stat calls.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import tarfile

import numpy as np

from mid_tf.data.split import DataError, Split

SPLITS = ("train", "test")
CLASSES_FILE = "classes.txt"
ORDER_SEED = 0  # np.random.default_rng(ORDER_SEED) fixes the example order, see `load_folder_split`
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
_LAYOUT_HINT = ("Pass --data_dir=DIR (or set MID_DATA_DIR) with DIR/train/<class>/* and DIR/test/<class>/* "
                "image folders, or DIR/train.tar and DIR/test.tar whose members are train/<class>/*.jpg and "
                "test/<class>/*.jpg.")


def _hidden(parts) -> bool:
    return any(p.startswith(".") for p in parts)


def _split_source(data_dir: str, split: str) -> str | None:
    """The folder `DIR/<split>` if it exists, else the archive `DIR/<split>.tar`, else None."""
    folder = os.path.join(data_dir, split)
    if os.path.isdir(folder):
        return folder
    archive = folder + ".tar"
    return archive if os.path.isfile(archive) else None


def preflight(data_dir: str | None) -> None:
    """Fails in milliseconds (stat calls only) when `data_dir` cannot hold an image-folder dataset."""
    if data_dir is None:
        raise DataError(f"dataset 'image_folder' needs a data directory. {_LAYOUT_HINT}")
    missing = [s for s in SPLITS if _split_source(data_dir, s) is None]
    if missing:
        raise DataError(f"--data_dir={data_dir} holds no {' or '.join(missing)} data (neither "
                        f"{missing[0]}/ nor {missing[0]}.tar). {_LAYOUT_HINT}")


def _add_member(classes: dict, where: str, split: str, rel: str, is_dir: bool) -> str | None:
    """Files `<split>/<class>/...` go to `classes[<class>]` (returned normalised); a bare class folder adds
    an empty class. Hidden entries are skipped; anything outside a class folder is a layout error."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if _hidden(parts) or parts == [split]:
        return None
    if parts[0] != split or (len(parts) == 2 and not is_dir):
        raise DataError(f"{where}:{rel} is not inside a class folder {split}/<class>/. {_LAYOUT_HINT}")
    files = classes.setdefault(parts[1], [])
    if is_dir:
        return None
    files.append("/".join(parts))
    return files[-1]


@functools.lru_cache(maxsize=8)
def _list_tar(path: str, split: str, size: int, mtime_ns: int) -> tuple:
    """(class -> sorted member names, member name -> TarInfo), cached per archive version: listing reads
    every member header (seconds for CIFAR-10's 50,000), and loading either split needs both splits' classes."""
    del size, mtime_ns  # part of the cache key only: a rewritten archive is listed again
    classes: dict = {}
    members = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile() or m.isdir():
                    name = _add_member(classes, path, split, m.name, m.isdir())
                    if name is not None:
                        members[name] = m
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"cannot read the archive {path}: {e}. Replace it with a plain (uncompressed) tar "
                        f"of {split}/<class>/* files.") from e
    return {c: sorted(f) for c, f in classes.items()}, members


def _list_folder(folder: str, split: str) -> dict:
    root = os.path.dirname(folder)
    classes: dict = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in dirnames if rel_dir == split else ():
            _add_member(classes, root, split, f"{rel_dir}/{name}", is_dir=True)
        for name in filenames:
            _add_member(classes, root, split, f"{rel_dir}/{name}", is_dir=False)
    return {c: sorted(f) for c, f in classes.items()}


class _SplitFiles:
    """One split's files: `classes` (class -> sorted names like train/cat/1.jpg), `read(name)` -> bytes
    and `describe(name)` for messages; a context manager so a tar is opened once for all reads."""

    def __init__(self, data_dir: str, split: str):
        self.data_dir = data_dir
        self.source = _split_source(data_dir, split)
        if self.source is None:
            preflight(data_dir)  # raises, naming --data_dir
        self.is_tar = not os.path.isdir(self.source)
        self._tar = None
        if self.is_tar:
            st = os.stat(self.source)
            self.classes, self._members = _list_tar(self.source, split, st.st_size, st.st_mtime_ns)
        else:
            self.classes = _list_folder(self.source, split)

    def __enter__(self):
        self._tar = tarfile.open(self.source, "r:") if self.is_tar else None
        return self

    def __exit__(self, *exc):
        if self._tar is not None:
            self._tar.close()

    def read(self, name: str) -> bytes:
        if self.is_tar:
            return self._tar.extractfile(self._members[name]).read()
        with open(os.path.join(self.data_dir, name), "rb") as f:
            return f.read()

    def describe(self, name: str) -> str:
        return f"{self.source}:{name}" if self.is_tar else os.path.join(self.data_dir, name)


def _read_classes_file(data_dir: str) -> list | None:
    path = os.path.join(data_dir, CLASSES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    dupes = sorted(n for n, k in collections.Counter(names).items() if k > 1)
    if dupes or not names:
        raise DataError(f"{path} must list each class once, one per line; "
                        f"{'repeated: ' + str(dupes) if dupes else 'it is empty'}")
    return names


def class_order(data_dir: str, split_classes: dict) -> tuple:
    """The label order: classes.txt if present, else sorted folder names; checks train/test agree.

    `split_classes` maps split -> set of class folder names (every split in SPLITS)."""
    train, test = (set(split_classes[s]) for s in SPLITS)
    if train != test:
        raise DataError(f"train and test must have the same class folders in {data_dir}: only in train "
                        f"{sorted(train - test)}, only in test {sorted(test - train)}")
    listed = _read_classes_file(data_dir)
    if listed is None:
        return tuple(sorted(train))
    if set(listed) != train:
        raise DataError(f"{os.path.join(data_dir, CLASSES_FILE)} must list exactly the class folders: "
                        f"folders not listed {sorted(train - set(listed))}, listed without a folder "
                        f"{sorted(set(listed) - train)}. Fix the file or the folders.")
    return tuple(listed)


def _decode(data: bytes, where: str) -> np.ndarray:
    """uint8 [H, W] for grayscale images, [H, W, 3] for everything else (alpha and palettes resolved)."""
    from PIL import Image, UnidentifiedImageError  # lazy: preflight must not pay for it

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if im.mode in _GRAY_MODES else "RGB")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{where} is not a readable image ({e}). Delete or replace the file "
                        "(hidden files, e.g. .DS_Store, are skipped).") from e


def _stack(arrays: list, names: list) -> np.ndarray:
    """[N, H, W, C]: C=1 only when every image is grayscale, else grayscale images are repeated to RGB.
    Every image must share H and W; the error names the first file off the most common size."""
    sizes = collections.Counter(a.shape[:2] for a in arrays)
    expected = sizes.most_common(1)[0][0]
    for a, name in zip(arrays, names):
        if a.shape[:2] != expected:
            raise DataError(f"{name} is {a.shape[0]}x{a.shape[1]} (HxW) but the split's images are "
                            f"{expected[0]}x{expected[1]}; resize it or remove it so that all images "
                            "share one size")
    channels = 3 if any(a.ndim == 3 for a in arrays) else 1
    out = np.empty((len(arrays), *expected, channels), np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a[..., None] if a.ndim == 2 else a
    return out


def load_folder_split(data_dir: str, split: str, limit: int | None = None) -> Split:
    """Reads `split` of the image-folder dataset in `data_dir`: uint8 [N, H, W, C], int64 labels.

    Examples come in a fixed pseudo-random order, `np.random.default_rng(0).permutation` of the files
    sorted by (label, path), so the first `limit` examples are a class-mixed subset that is the same on
    every run and machine, and only those `limit` files are decoded.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; use 'train' or 'test'")
    preflight(data_dir)
    listed = {s: _SplitFiles(data_dir, s) for s in SPLITS}
    files = listed[split]
    names = class_order(data_dir, {s: listed[s].classes for s in SPLITS})
    if not names:
        raise DataError(f"{files.source} holds no class folders. {_LAYOUT_HINT}")
    empty = [c for c in names if not files.classes[c]]
    if empty:
        raise DataError(f"class folder(s) {empty} in {files.source} hold no images; add images or remove the "
                        "folder (from both splits and classes.txt)")
    entries = [(label, f) for label, c in enumerate(names) for f in files.classes[c]]
    picked = [entries[i] for i in np.random.default_rng(ORDER_SEED).permutation(len(entries))[:limit]]
    with files:
        arrays = [_decode(files.read(f), files.describe(f)) for _, f in picked]
    images = _stack(arrays, [files.describe(f) for _, f in picked])
    labels = np.array([label for label, _ in picked], np.int64)
    return Split(images, labels, source=f"image_folder:{files.source}", class_names=names)
