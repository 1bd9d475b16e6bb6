"""Reader for the IDX format of the original MNIST files (raw or gzip).

Why our own reader: the offline MNIST copy on development machines was recompressed, so TFDS's
registered checksums reject it; IDX is a 4-byte magic number, big-endian dimensions, then raw bytes.
Every way a file can be wrong (missing, truncated, bad magic, wrong dtype) raises `IdxError` with
the path and what was expected.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

# Third byte of the magic number -> numpy dtype (big-endian where it matters).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxError(ValueError):
    """A malformed, truncated or missing IDX file."""


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise IdxError(f"IDX file not found: {path}")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or corrupt gzip stream
        raise IdxError(f"cannot read IDX file {path}: {e} (is the download complete?)") from e


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parses IDX bytes into an ndarray with the file's shape and dtype."""
    if len(data) < 4:
        raise IdxError(f"{name}: {len(data)} bytes is too short for an IDX header")
    zero1, zero2, type_code, ndim = struct.unpack(">BBBB", data[:4])
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IdxError(
            f"{name}: bad IDX magic number {data[:4].hex()} (expected 0000 <type> <ndim>, "
            "e.g. 00000803 for images); is this an MNIST IDX file?")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxError(f"{name}: truncated header ({len(data)} < {header_len} bytes)")
    shape = struct.unpack(">" + "I" * ndim, data[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(data) - header_len
    if body != expected:
        raise IdxError(
            f"{name}: header says shape {tuple(shape)} ({expected} bytes of data) but the file has "
            f"{body}; the file is truncated or corrupt")
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (`.gz` or raw)."""
    return parse_idx(_read_bytes(path), name=path)


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes `array` as IDX (gzip if the path ends in .gz). Used by tests and tools."""
    array = np.asarray(array)
    codes = {v: k for k, v in _IDX_DTYPES.items()}
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = codes.get(np.dtype(dtype))
    if code is None:
        raise IdxError(f"dtype {array.dtype} has no IDX type code")
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.astype(dtype).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
