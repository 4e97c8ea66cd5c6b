"""tiny-shakespeare: the package's sha256-checked download, and where the test suite finds its copy."""

import hashlib
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanogpt.errors import NanoGPTError
from nanogpt.data.sources import TINYSHAKESPEARE_SHA256, download_tinyshakespeare, tinyshakespeare_path
from tests.conftest import REPO, find_shakespeare

CLOSED_PORT = "http://127.0.0.1:9/input.txt"  # nothing listens there: a download fails at once, as offline


@pytest.fixture
def serve(tmp_path):
    """serve(data) -> the URL of a local HTTP server (127.0.0.1) holding data as input.txt, and its request log."""
    servers, requests = [], []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            requests.append(self.path)

    def start(data: bytes):
        root = tmp_path / f"www{len(servers)}"
        root.mkdir()
        (root / "input.txt").write_bytes(data)
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/input.txt", requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_an_explicit_path_then_the_shared_copy_come_first(tmp_path, shakespeare_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_TINYSHAKESPEARE_URL", CLOSED_PORT)
    cache = str(tmp_path / "cache")
    assert find_shakespeare(str(shakespeare_path), tmp_path / "absent.txt", cache) == shakespeare_path
    assert find_shakespeare(None, shakespeare_path, cache) == shakespeare_path
    with pytest.raises(LookupError, match="NANOGPT_TEST_SHAKESPEARE=.*nope.txt is not a file"):
        find_shakespeare(str(tmp_path / "nope.txt"), shakespeare_path, cache)


def test_without_them_the_package_cache_is_used_as_the_package_finds_it(tmp_path, shakespeare_path, monkeypatch):
    # where the Quickstart's train command put it: $NANOGPT_CACHE (here; else ~/.cache/nanogpt)
    monkeypatch.setenv("NANOGPT_CACHE", str(tmp_path / "user_cache"))
    monkeypatch.setenv("NANOGPT_TINYSHAKESPEARE_URL", CLOSED_PORT)  # a hit needs no network
    cached = tinyshakespeare_path()
    cached.parent.mkdir(parents=True)
    shutil.copyfile(shakespeare_path, cached)
    assert find_shakespeare(None, tmp_path / "absent.txt") == cached


def test_else_it_is_downloaded_into_the_cache_and_checked(tmp_path, shakespeare_path, monkeypatch, serve):
    url, requests = serve(shakespeare_path.read_bytes())
    monkeypatch.setenv("NANOGPT_TINYSHAKESPEARE_URL", url)
    found = find_shakespeare(None, tmp_path / "absent.txt", str(tmp_path / "cache"))
    assert found == tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    assert hashlib.sha256(found.read_bytes()).hexdigest() == TINYSHAKESPEARE_SHA256
    assert requests == ["/input.txt"]
    assert find_shakespeare(None, tmp_path / "absent.txt", str(tmp_path / "cache")) == found
    assert requests == ["/input.txt"]  # downloaded once: the second lookup is a cache hit


def test_a_download_with_a_wrong_checksum_is_refused(tmp_path, monkeypatch, serve):
    url, _ = serve(b"not shakespeare")
    monkeypatch.setenv("NANOGPT_TINYSHAKESPEARE_URL", url)
    with pytest.raises(NanoGPTError, match="failed its sha256 check.*--data.source PATH"):
        download_tinyshakespeare(str(tmp_path / "cache"))
    with pytest.raises(LookupError, match="sha256"):
        find_shakespeare(None, tmp_path / "absent.txt", str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "tinyshakespeare" / "input.txt").exists()


def test_offline_with_no_copy_anywhere_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_TINYSHAKESPEARE_URL", CLOSED_PORT)
    with pytest.raises(NanoGPTError, match="could not download tiny-shakespeare.*--data.source PATH"):
        download_tinyshakespeare(str(tmp_path / "cache"))
    with pytest.raises(LookupError) as e:
        find_shakespeare(None, tmp_path / "shared" / "tinyshakespeare.txt", str(tmp_path / "cache"))
    message = str(e.value)
    assert "\n" not in message
    for where in (str(tmp_path / "shared" / "tinyshakespeare.txt"), str(tmp_path / "cache"),
                  "NANOGPT_TEST_SHAKESPEARE"):
        assert where in message, message


@pytest.mark.slow  # a pytest process of its own
def test_a_suite_that_cannot_find_the_corpus_stops_with_one_line(tmp_path):
    # the real fixture in a checkout with no ../shared beside it, an empty cache and no network
    checkout = tmp_path / "checkout"
    (checkout / "tests").mkdir(parents=True)
    shutil.copyfile(REPO / "tests" / "conftest.py", checkout / "tests" / "conftest.py")
    (checkout / "tests" / "test_one.py").write_text("def test_one(shakespeare_text):\n    pass\n", encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
           "NANOGPT_CACHE": str(tmp_path / "cache"), "NANOGPT_TINYSHAKESPEARE_URL": CLOSED_PORT}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                            cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "the tests need tiny-shakespeare" in line]
    assert len(lines) == 1 and str(tmp_path / "shared" / "data" / "tinyshakespeare.txt") in lines[0], result.stdout
    assert "1 passed" not in result.stdout
