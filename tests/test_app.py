"""The web demo: the real app.py served on loopback, called over HTTP with gradio_client."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from nanogpt.app import generate_text, main
from nanogpt.generate import sample
from nanogpt.io import load_checkpoint
from tests.conftest import REPO, assert_user_error, run_main

MAX_LENGTH = 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConnectionRecorder:
    """A TCP listener that records every connection made to it: the proxy the demo is given for the internet,
    so any request it sends out (Gradio's analytics, a version check) shows up here instead of leaving the machine."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.connections.append(conn.recv(200))  # e.g. b"CONNECT api.gradio.app:443 ..."
                except OSError:
                    self.connections.append(b"")


def _up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def serve(ckpt, port: int, *args: str, env: Optional[dict] = None, url_host: str = "127.0.0.1"):
    """`python app.py --ckpt ckpt --port port *args` running until its page answers on url_host; yields its log.

    GRADIO_* settings of this process are not passed on, so the app's own defaults are what is tested; the hub is
    offline and decoding single-threaded (see tests/test_generate.py::_one_thread).
    """
    log = Path(tempfile.mkdtemp()) / "app.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")}
    env = {**base, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--ckpt", str(ckpt), "--port", str(port), "--device", "cpu",
             *args], cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while not _up(f"http://{url_host}:{port}/"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "app did not come up in 180 s:\n" + log.read_text()
            time.sleep(0.5)
        yield log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def recorder():
    return ConnectionRecorder()


@pytest.fixture(scope="module")
def app(random_checkpoint, recorder):
    """A running `python app.py` on a free loopback port, with GRADIO_ANALYTICS_ENABLED unset and every outside
    request sent to the recorder; yields (client, log path)."""
    port = free_port()
    proxy = {"HTTP_PROXY": recorder.url, "HTTPS_PROXY": recorder.url, "ALL_PROXY": recorder.url,
             "http_proxy": recorder.url, "https_proxy": recorder.url, "all_proxy": recorder.url,
             "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with serve(random_checkpoint, port, "--max_length", str(MAX_LENGTH), env=proxy) as log:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), log


def test_app_streams_the_same_text_as_the_python_api(app, random_checkpoint):
    client, log = app
    job = client.submit("ROMEO:", 60, 0.8, 20, 0.9, 7, api_name="/generate")
    updates = list(job)
    model, tok = load_checkpoint(str(random_checkpoint))
    expected = sample(model, tok, "ROMEO:", max_new_tokens=60, temperature=0.8, top_k=20, top_p=0.9, seed=7)[0]
    assert job.result() == updates[-1] == expected
    assert len(updates) > 10  # streamed as it was generated, each update extending the last
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:]))



def test_app_caps_the_length_and_reports_unknown_characters(app):
    client, _ = app
    assert len(client.predict("A", MAX_LENGTH, 1.0, 65, 1.0, 1, api_name="/generate")) == 1 + MAX_LENGTH
    with pytest.raises(AppError, match="maximum"):  # the slider's range is checked by the server
        client.predict("A", MAX_LENGTH * 10, 1.0, 65, 1.0, 1, api_name="/generate")
    with pytest.raises(AppError, match="vocabulary"):
        client.predict("Hello 😀", 10, 0.8, 20, 1.0, 1, api_name="/generate")
    # the message did not take the app down
    assert client.predict("KING", 5, 0.0, 20, 1.0, 1, api_name="/generate").startswith("KING")


def test_generate_text_caps_the_length_itself(random_checkpoint):
    model, tok = load_checkpoint(str(random_checkpoint))
    texts = list(generate_text(model, tok, "A", 10**9, 1.0, 65, 1.0, 1, max_length=12))
    assert len(texts[-1]) == 13 and texts[-1].startswith("A")


def test_app_bad_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)  # restored after the test
    assert_user_error(run_main(main, capsys, "--ckpt", tmp_path / "none.ckpt"), "does not exist")
    assert_user_error(run_main(main, capsys, "--ckpt", tmp_path / "none.ckpt", "--max_length", "0"), "--max_length")
    assert_user_error(run_main(main, capsys, "--ckpt", tmp_path / "none.ckpt", "--port", "70000"), "--port")
    assert_user_error(run_main(main, capsys, "--device", "gpu"), "--device", "'gpu'")
    # set before gradio is imported, whatever the environment said: Gradio reads it at import
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_app_binds_to_loopback_by_default(app):
    client, _ = app
    port = urllib.parse.urlparse(client.src).port
    assert _up(f"http://127.0.0.1:{port}/") and not _up(f"http://127.0.0.2:{port}/")


def test_analytics_stay_off(app, recorder):
    client, log = app
    assert client.predict("KING", 5, 0.0, 20, 1.0, 1, api_name="/generate").startswith("KING")
    time.sleep(2)  # Gradio sends its analytics from background threads
    assert recorder.connections == [], recorder.connections


@pytest.mark.slow  # starts two more demo servers
def test_host_and_gradio_server_name_choose_the_bind_address(random_checkpoint):
    # (the default, loopback only: test_app_binds_to_loopback_by_default)
    port = free_port()
    with serve(random_checkpoint, port, env={"GRADIO_SERVER_NAME": "127.0.0.2"}, url_host="127.0.0.2"):
        assert not _up(f"http://127.0.0.1:{port}/")  # only where it was told
    port = free_port()
    with serve(random_checkpoint, port, "--host", "127.0.0.3", env={"GRADIO_SERVER_NAME": "127.0.0.2"},
               url_host="127.0.0.3"):  # the flag wins over the environment
        assert not _up(f"http://127.0.0.2:{port}/")


@pytest.mark.slow  # starts a demo server
def test_a_busy_port_is_one_line(random_checkpoint, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")}
        result = subprocess.run([sys.executable, str(REPO / "app.py"), "--ckpt", str(random_checkpoint), "--port",
                                 str(port), "--device", "cpu"], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                                capture_output=True, text=True, timeout=300)
    assert_user_error(result, f"127.0.0.1:{port}", "--port")
