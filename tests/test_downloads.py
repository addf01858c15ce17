"""Downloads: checksums, atomicity (no partial files), locking. Network-free: file:// URLs and
an HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time

import pytest

from fedjax_exp.datasets import downloads

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB, several read blocks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        type(self).hits[self.path] = type(self).hits.get(self.path, 0) + 1
        if self.path == "/missing.bin":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path == "/short.bin":
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])  # then the connection drops
            return
        if self.path == "/slow.bin":
            for i in range(0, len(PAYLOAD), len(PAYLOAD) // 8):
                self.wfile.write(PAYLOAD[i : i + len(PAYLOAD) // 8])
                time.sleep(0.02)
            return
        self.wfile.write(PAYLOAD)


@pytest.fixture()
def server():
    _Handler.hits = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


def test_file_url_download_with_known_checksum(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    path = downloads.maybe_download(
        (src / "data.bin").as_uri(), cache, sha256=PAYLOAD_SHA, progress=False
    )
    assert path == cache / "data.bin"
    assert path.read_bytes() == PAYLOAD
    # A known checksum needs no sidecar record.
    assert _leftovers(cache) == ["data.bin"]


def test_checksum_mismatch_leaves_nothing(tmp_path):
    (tmp_path / "data.bin").write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    with pytest.raises(downloads.ChecksumError, match="sha256 mismatch"):
        downloads.maybe_download(
            (tmp_path / "data.bin").as_uri(), cache, sha256="0" * 64, progress=False
        )
    assert _leftovers(cache) == []


def test_unknown_checksum_is_recorded_and_enforced(tmp_path):
    src = tmp_path / "data.bin"
    src.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    path = downloads.maybe_download(src.as_uri(), cache, progress=False)
    record = cache / "data.bin.sha256"
    assert record.read_text().split() == [PAYLOAD_SHA, "data.bin"]
    # A second call reuses the cached file without reading the source.
    src.unlink()
    assert downloads.maybe_download(src.as_uri(), cache, progress=False) == path
    # Re-downloading different bytes under the same name must match the recorded digest.
    path.unlink()
    src.write_bytes(PAYLOAD[::-1])
    with pytest.raises(downloads.ChecksumError):
        downloads.maybe_download(src.as_uri(), cache, progress=False)
    assert _leftovers(cache) == ["data.bin.sha256"]


def test_http_download(server, tmp_path):
    path = downloads.maybe_download(f"{server}/ok.bin", tmp_path, sha256=PAYLOAD_SHA)
    assert path.read_bytes() == PAYLOAD
    downloads.verify_file(path, PAYLOAD_SHA)
    with pytest.raises(downloads.ChecksumError):
        downloads.verify_file(path, "f" * 64)


def test_http_errors_leave_nothing(server, tmp_path):
    with pytest.raises(downloads.DownloadError, match="404"):
        downloads.maybe_download(f"{server}/missing.bin", tmp_path, progress=False)
    with pytest.raises(downloads.DownloadError, match=r"incomplete download|interrupted"):
        downloads.maybe_download(f"{server}/short.bin", tmp_path, progress=False)
    assert _leftovers(tmp_path) == []


def test_unreachable_host(tmp_path):
    # Port 9 on loopback: nothing listens there; the connection is refused at once.
    with pytest.raises(downloads.DownloadError, match="cannot download"):
        downloads.maybe_download("http://127.0.0.1:9/x.bin", tmp_path, timeout=5, progress=False)
    assert _leftovers(tmp_path) == []


def test_interrupt_mid_download_removes_partial(server, tmp_path, monkeypatch):
    real_urlopen = downloads.urllib.request.urlopen

    class Interrupting:
        def __init__(self, response):
            self._response, self.headers, self._reads = response, response.headers, 0

        def read(self, n):
            self._reads += 1
            if self._reads == 2:
                raise KeyboardInterrupt
            return self._response.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._response.close()

    monkeypatch.setattr(
        downloads.urllib.request, "urlopen", lambda url, timeout: Interrupting(real_urlopen(url))
    )
    with pytest.raises(KeyboardInterrupt):
        downloads.maybe_download(f"{server}/ok.bin", tmp_path, progress=False)
    assert _leftovers(tmp_path) == []


def test_concurrent_downloads_fetch_once(server, tmp_path):
    results, errors = [], []

    def fetch():
        try:
            results.append(downloads.maybe_download(f"{server}/slow.bin", tmp_path, progress=False))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 3 and len(set(results)) == 1
    assert results[0].read_bytes() == PAYLOAD
    assert _Handler.hits["/slow.bin"] == 1
    assert _leftovers(tmp_path) == ["slow.bin", "slow.bin.sha256"]


def test_default_cache_dir_is_fedjax_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert downloads.default_cache_dir() == tmp_path / ".cache" / "fedjax"
