"""Downloading a dataset file: streamed, size-capped, MD5-checked, written atomically."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from splitexit.errors import DatasetError

log = logging.getLogger(__name__)

_MAX_DOWNLOAD_BYTES = 64 << 20  # the largest Fashion-MNIST file is 26 MB


def download_file(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Stream `url` to `dest` atomically, checking size and MD5 on the way."""
    import httpx
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    log.info("downloading %s to %s", url, dest)
    try:
        with httpx.stream(
            "GET", url, follow_redirects=True, timeout=httpx.Timeout(timeout, connect=10.0)
        ) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with (
                open(tmp, "wb") as f,
                tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar,
            ):
                for chunk in response.iter_bytes(1 << 16):
                    size += len(chunk)
                    if size > _MAX_DOWNLOAD_BYTES:
                        raise DatasetError(f"{url} is larger than {_MAX_DOWNLOAD_BYTES} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise DatasetError(
                f"{url} has MD5 {digest.hexdigest()}, expected {md5}: the download is corrupt "
                "or the mirror serves other files"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
