"""download_broden against a local HTTP server (never the internet)."""
import shutil
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from netdissect_fast.broden import Broden
from netdissect_fast.download import DownloadError, download_broden


@pytest.fixture(scope="module")
def broden_zip(small_broden, tmp_path_factory):
    """The small dataset zipped as the published archive is: broden1_224/..."""
    path = tmp_path_factory.mktemp("zip") / "broden1_224.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(small_broden.path.rglob("*")):
            rel = f.relative_to(small_broden.path)
            if f.is_file() and ".ndf_cache" not in rel.parts:
                z.write(f, f"broden1_224/{rel}")
    return path


class Server:
    """Serves one file with Range support. ``cut_first``: the first response stops
    mid-body and closes the connection; ``cut_always``: every one does;
    ``ranges=False``: Range is ignored (always 200 + whole file)."""

    def __init__(self, data: bytes, cut_first=False, cut_always=False, ranges=True):
        self.data, self.requests = data, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append(rng)
                start = int(rng[len("bytes="):].split("-")[0]) if rng and ranges else 0
                body = server.data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut_always or (cut_first and len(server.requests) == 1):
                    self.wfile.write(body[:len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/broden1_224.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_interrupted_download_resumes(broden_zip, tmp_path, small_broden):
    data = broden_zip.read_bytes()
    with Server(data, cut_first=True) as server:
        root = download_broden(tmp_path, "224", url=server.url, progress=False)
    assert server.requests[0] is None and server.requests[1] == f"bytes={len(data) // 2}-"
    assert root == tmp_path / "broden1_224" and (tmp_path / "broden1_224.zip").read_bytes() == data
    assert not (tmp_path / "broden1_224.zip.part").exists()
    assert list((root / ".ndf_cache").glob("labels-*.h5"))          # packed
    with Broden(root) as ds:
        want = Broden(small_broden, store=None).label_batch(np.arange(40))
        got = ds.label_batch(np.arange(40))
        assert np.array_equal(got.pixel_sets, want.pixel_sets)
        assert np.array_equal(got.set_labels, want.set_labels)
    # Already there: nothing is fetched again.
    assert download_broden(tmp_path, "224", url="http://127.0.0.1:9/unused.zip", progress=False) == root


def test_server_without_range_support_restarts(broden_zip, tmp_path):
    data = broden_zip.read_bytes()
    with Server(data, cut_first=True, ranges=False) as server:
        root = download_broden(tmp_path, url=server.url, progress=False, validate=False, pack=False)
    assert len(server.requests) == 2 and (root / "index.csv").exists()


def test_truncated_download_fails_and_keeps_the_part(broden_zip, tmp_path):
    with Server(broden_zip.read_bytes(), cut_always=True) as server:
        with pytest.raises(DownloadError, match="incomplete"):
            download_broden(tmp_path, url=server.url, progress=False, retries=2)
    assert len(server.requests) == 3 and (tmp_path / "broden1_224.zip.part").exists()


def test_local_zip_and_corrupt_zip(broden_zip, tmp_path):
    root = download_broden(tmp_path / "a", url=str(broden_zip), progress=False, pack=False)
    assert len(Broden(root, store=None)) == 40
    data = bytearray(broden_zip.read_bytes())
    with zipfile.ZipFile(broden_zip) as z:
        offset = z.getinfo("broden1_224/index.csv").header_offset
    name_len, extra_len = np.frombuffer(data[offset + 26:offset + 30], "<u2")
    start = offset + 30 + int(name_len) + int(extra_len)            # stored bytes of index.csv
    data[start + 100] ^= 0xFF
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="CRC error in broden1_224/index.csv"):
        download_broden(tmp_path / "b", url=str(bad), progress=False)
    bad.write_bytes(b"PK not really a zip")
    with pytest.raises(DownloadError, match="not a valid zip"):
        download_broden(tmp_path / "c", url=str(bad), progress=False)
    with pytest.raises(ValueError, match="variant"):
        download_broden(tmp_path, variant="256")
    with pytest.raises(FileNotFoundError):
        download_broden(tmp_path / "d", url=str(tmp_path / "missing.zip"))
    shutil.rmtree(tmp_path / "a")
