"""The IDX file format (MNIST's): a checked reader that never trusts the header's sizes."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.errors import DatasetError

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str], max_bytes: int = 1 << 32) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped if its name ends in `.gz`.

    Checks the magic number, the dimensions and that the payload is exactly as long as they
    say; anything else raises DatasetError. At most `max_bytes` of payload are read.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise DatasetError(
                    f"{path} is not an IDX file (magic number {magic.hex() or 'missing'}); "
                    "replace it with an intact copy of the dataset"
                )
            ndim = magic[3]
            raw_dims = f.read(4 * ndim)
            if ndim == 0 or len(raw_dims) != 4 * ndim:
                raise DatasetError(f"{path}: IDX header truncated or has no dimensions")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            nbytes = math.prod(dims) * dtype.itemsize
            if nbytes > max_bytes:
                raise DatasetError(f"{path}: IDX header claims {nbytes} bytes (limit {max_bytes})")
            payload = _read_at_most(f, nbytes)
            got = len(payload)
            trailing = f.read(1)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(
            f"cannot read {path}: {e}; the file is corrupt or truncated, replace it"
        ) from e
    if got != nbytes:
        raise DatasetError(
            f"{path} is truncated: dimensions {dims} need {nbytes} bytes, found {got}; "
            "replace it with an intact copy"
        )
    if trailing:
        raise DatasetError(f"{path} has data past the {nbytes} bytes its dimensions {dims} need")
    return (
        np.frombuffer(payload, dtype=dtype)
        .astype(dtype.newbyteorder("="), copy=False)
        .reshape(dims)
    )


def _read_at_most(f: Any, n: int) -> bytearray:
    """Up to n bytes, in chunks: a lying header costs no more memory than the real data."""
    buf = bytearray()  # writable, so the array built on it is too
    while len(buf) < n:
        chunk = f.read(min(n - len(buf), 1 << 24))
        if not chunk:
            break
        buf += chunk
    return buf
