"""`download` against a server on 127.0.0.1: checksum checked, archive unpacked, failures clear."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import time
import zipfile

import pytest

from twotower_rec.data.download import download
from twotower_rec.errors import DataError


@pytest.fixture()
def mirror(tmp_path, monkeypatch):
    """Serve tmp_path/www on 127.0.0.1 and point TWOTOWER_MOVIELENS_URL at it."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args, **kwargs: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TWOTOWER_MOVIELENS_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield www
    server.shutdown()
    server.server_close()


def _publish(www, payload: bytes = b"1\t10\t4\t881250949\n", md5: str | None = None) -> str:
    archive = www / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ml-100k/u.data", payload)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    (www / "ml-100k.zip.md5").write_text(f"{md5 or digest}  ml-100k.zip\n")
    return digest


def test_download_checks_md5_and_unpacks(mirror, tmp_path):
    _publish(mirror)
    folder = download("movielens-100k", tmp_path / "data", progress=False)
    assert folder == tmp_path / "data" / "ml-100k"
    assert (folder / "u.data").read_bytes() == b"1\t10\t4\t881250949\n"
    # A second call finds the folder and does not fetch again.
    (mirror / "ml-100k.zip").unlink()
    assert download("movielens-100k", tmp_path / "data", progress=False) == folder


def test_download_refuses_a_checksum_mismatch(mirror, tmp_path):
    _publish(mirror, md5="0" * 32)
    with pytest.raises(DataError, match="MD5 .* differs from the published 0{32}"):
        download("movielens-100k", tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "ml-100k").exists()
    assert not list((tmp_path / "data").glob("*.part"))


def test_download_without_a_server_fails_at_once(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("TWOTOWER_MOVIELENS_URL", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(DataError, match="cannot download .*fetch the archive by hand"):
        download("movielens-1m", tmp_path / "data", timeout=5, progress=False)
    assert time.perf_counter() - started < 5


def test_download_rejects_an_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'movielens-7m'"):
        download("movielens-7m", tmp_path)


@pytest.mark.parametrize("published", ["", "\n", "not-a-digest  ml-100k.zip\n", "abc"])
def test_an_empty_or_malformed_md5_file_is_one_error(mirror, tmp_path, published):
    """An empty .md5 was an IndexError traceback; a digest that is not 32 hex digits skipped nothing
    but could never match."""
    _publish(mirror)
    (mirror / "ml-100k.zip.md5").write_text(published)
    with pytest.raises(DataError) as err:
        download("movielens-100k", tmp_path / "data", progress=False)
    assert "ml-100k.zip.md5" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "data" / "ml-100k").exists()
