"""What the client reads from local disk: the inputs to send, and an export's model card.

Like the client, it imports nothing from the rest of mid_tf (an export is read as files), and TensorFlow
only to decode or encode images. Every problem is a ValueError naming the fix, which the CLI prints as
one `error:` line.
"""

from __future__ import annotations

import os

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INPUT_SUFFIXES = (".npy", *IMAGE_SUFFIXES)
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG: what classify_encoded accepts

def _list_files(paths) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(INPUT_SUFFIXES))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"--inputs: {path} does not exist")
    if not files:
        raise ValueError(f"--inputs {' '.join(paths)} holds no .npy, .png or .jpg files")
    return files


def _npy_images(path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a NumPy .npy array ({e}); save images with numpy.save") from None
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{path}: expected a numeric .npy array [N, H, W, C] or [N, H, W] (an .npz archive or "
                         "object array will not do)")
    if arr.ndim == 3:  # [N, H, W] grayscale
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"{path}: expected an array [N, H, W, C] or [N, H, W], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)


def load_inputs(paths, signature: str, channels: int = 0) -> tuple[list[str], object]:
    """Returns (names, batch): float32 [N, H, W, C] in [0, 1] for image signatures, a list of bytes for
    classify_encoded. Images decode at their own size; the server checks the shape."""
    encoded = signature == "classify_encoded"
    names, arrays, blobs = [], [], []
    for path in _list_files(paths):
        if path.lower().endswith(".npy"):
            arr = _npy_images(path)
            names += [f"{os.path.basename(path)}[{i}]" for i in range(len(arr))]
            if encoded:
                blobs += [_encode_png(img) for img in arr]
            else:
                arrays.append(arr)
        elif path.lower().endswith(IMAGE_SUFFIXES):
            names.append(os.path.basename(path))
            data = _read_image_file(path)
            if encoded:
                blobs.append(data)
            else:
                arrays.append(_decode_image(data, channels, path)[None])
        else:
            raise ValueError(f"--inputs: {path} is neither .npy nor an image (.png, .jpg)")
    if encoded:
        return names, blobs
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"inputs have different sizes {sorted(shapes)}: resize them, or use "
                         "--signature=classify_encoded, which resizes on the server")
    return names, np.concatenate(arrays, axis=0)


def _read_image_file(path) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(IMAGE_SIGNATURES):
        raise ValueError(f"{path} is not a PNG or JPEG image (it starts with {data[:8]!r}); pass PNG/JPEG files, "
                         ".npy arrays, or directories of them")
    return data


def _decode_image(data: bytes, channels: int, path: str = "image") -> np.ndarray:
    import tensorflow as tf
    try:
        return tf.io.decode_image(data, channels=channels, dtype=tf.float32, expand_animations=False).numpy()
    except (tf.errors.OpError, ValueError) as e:
        message = " ".join(str(getattr(e, "message", e)).split())[:200]
        raise ValueError(f"{path} could not be decoded as an image ({message}); is the file complete?") from None


def _encode_png(image01: np.ndarray) -> bytes:
    import tensorflow as tf
    return tf.io.encode_png(np.round(np.clip(image01, 0, 1) * 255).astype(np.uint8)).numpy()


def version_dir(export_dir: str, version: int | None = None) -> str:
    """The SavedModel directory: `export_dir` itself, or its version `version` (default: the newest)."""
    if not os.path.isdir(export_dir):
        raise ValueError(f"--export_dir {export_dir} does not exist; pass the --export_base that mid-export wrote")
    if os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        return export_dir
    versions = sorted(int(n) for n in os.listdir(export_dir)
                      if n.isdigit() and os.path.isdir(os.path.join(export_dir, n)))
    if not versions:
        raise ValueError(f"--export_dir {export_dir} holds no SavedModel (no saved_model.pb, no <version>/ "
                         "directory): pass the --export_base that mid-export wrote, or one version directory")
    if version is not None and version not in versions:
        raise ValueError(f"--model_version {version} is not in {export_dir} (versions there: {versions})")
    return os.path.join(export_dir, str(versions[-1] if version is None else version))


def model_card_text(export_dir: str, version: int | None = None) -> str:
    """The export's model card (assets.extra/model_card.md), headed by the version it belongs to."""
    path = version_dir(export_dir, version)
    card = os.path.join(path, "assets.extra", "model_card.md")
    if not os.path.isfile(card):
        raise ValueError(f"{path} has no model card (assets.extra/model_card.md): it was exported before model "
                         "cards existed; export the model again with mid-export")
    with open(card) as f:
        return f"{path}\n\n{f.read().rstrip()}"
