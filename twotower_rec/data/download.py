"""Fetch an official MovieLens archive, check it against its published MD5, unpack it.

GroupLens publishes ``<archive>.zip.md5`` beside each archive; the download is refused
when the digest differs. Set ``TWOTOWER_MOVIELENS_URL`` to use a mirror (the tests point it
at a server on 127.0.0.1). Without a network the first request fails at once with a message
that says how to fetch the archive by hand.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from twotower_rec.data.sources import DataError

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"
ARCHIVES = {
    "movielens-100k": "ml-100k",
    "movielens-1m": "ml-1m",
    "movielens-latest-small": "ml-latest-small",
    "movielens-20m": "ml-20m",
    "movielens-25m": "ml-25m",
    "movielens-32m": "ml-32m",
}


def _open(url: str, timeout: float):
    try:
        return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (https or a configured mirror)
    except urllib.error.HTTPError as err:
        raise DataError(f"download failed: {url} answered HTTP {err.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(f"cannot download {url} ({reason}): without a network, fetch the archive by hand, "
                        f"unpack it and pass its folder to `prepare --data-dir`") from None


def _published_md5(text: bytes, url: str) -> str:
    """The digest a ``.md5`` file publishes (its first word); anything but 32 hex digits is refused."""
    words = text.decode("ascii", "replace").split()
    if not words or not re.fullmatch(r"[0-9a-fA-F]{32}", words[0]):
        shown = repr(words[0][:40]) if words else "nothing"
        raise DataError(f"{url}: the published checksum is {shown}, not an MD5 digest (32 hex digits); the archive "
                        "is not fetched unchecked: try again later, or fetch and check it by hand")
    return words[0].lower()


def download(dataset: str, data_dir: str | Path, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download and unpack ``dataset`` under ``data_dir``; returns the unpacked folder.

    Args:
        dataset: a key of :data:`ARCHIVES` (``movielens-100k``, ``movielens-1m``, ...).
        data_dir: the folder the archive is downloaded to and unpacked under, as
            ``data_dir/<archive name>`` (e.g. ``ml-1m``); created if missing. When that folder exists
            and is not empty it is returned as it is, without a download.
        timeout: seconds each HTTP request (the checksum, the archive) may wait for the server.
        progress: whether to show a progress bar of the download on stderr.
    """
    if dataset not in ARCHIVES:
        raise DataError(f"unknown dataset '{dataset}': choose one of {sorted(ARCHIVES)}")
    name = ARCHIVES[dataset]
    base = os.environ.get("TWOTOWER_MOVIELENS_URL", DEFAULT_BASE_URL).rstrip("/")
    data_dir = Path(data_dir)
    target = data_dir / name
    if target.is_dir() and any(target.iterdir()):
        print(f"download: {target} already exists; nothing to do", file=sys.stderr)
        return target
    data_dir.mkdir(parents=True, exist_ok=True)

    with _open(f"{base}/{name}.zip.md5", timeout) as response:
        expected = _published_md5(response.read(), f"{base}/{name}.zip.md5")
    archive = data_dir / f"{name}.zip"
    partial = data_dir / f"{name}.zip.part"
    digest = hashlib.md5()  # noqa: S324 (the published checksum is MD5)
    with _open(f"{base}/{name}.zip", timeout) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}.zip", disable=not progress,
                  file=sys.stderr) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != expected:
        partial.unlink()
        raise DataError(f"{name}.zip: MD5 {digest.hexdigest()} differs from the published {expected}; "
                        f"the download was corrupted or tampered with: try again")
    partial.replace(archive)
    try:
        with zipfile.ZipFile(archive) as zipped:
            unpack = data_dir / f"{name}.unpack"
            shutil.rmtree(unpack, ignore_errors=True)
            zipped.extractall(unpack)
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive}: not a zip archive ({err})") from None
    inner = unpack / name if (unpack / name).is_dir() else unpack
    shutil.rmtree(target, ignore_errors=True)
    inner.replace(target)
    shutil.rmtree(unpack, ignore_errors=True)
    print(f"download: {dataset} checked (MD5 {expected}) and unpacked to {target}", file=sys.stderr)
    return target
