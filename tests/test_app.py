"""The web demo: the real app.py served on loopback, called over HTTP with gradio_client."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from nanogpt.app import generate_text, main
from nanogpt.generate import load_checkpoint, sample
from tests.conftest import REPO, assert_user_error, run_main

MAX_LENGTH = 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(random_checkpoint, tmp_path_factory):
    """A running `python app.py` on a free loopback port; yields (client, log path)."""
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    # no network: analytics off, the hub offline, one thread (see tests/test_generate.py::_one_thread)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_SERVER_NAME", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--ckpt", str(random_checkpoint), "--port", str(port),
             "--max_length", str(MAX_LENGTH), "--device", "cpu"],
            cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "app did not come up in 180 s:\n" + log.read_text()
                time.sleep(0.5)
        yield Client(url, verbose=False), log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_app_streams_the_same_text_as_the_python_api(app, random_checkpoint):
    client, log = app
    job = client.submit("ROMEO:", 60, 0.8, 20, 0.9, 7, api_name="/generate")
    updates = list(job)
    model, tok = load_checkpoint(str(random_checkpoint))
    expected = sample(model, tok, "ROMEO:", max_new_tokens=60, temperature=0.8, top_k=20, top_p=0.9, seed=7)[0]
    assert job.result() == updates[-1] == expected
    assert len(updates) > 10  # streamed as it was generated, each update extending the last
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:]))
    assert "127.0.0.1" in log.read_text()  # bound to loopback by default


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
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # restored after the test
    assert_user_error(run_main(main, capsys, "--ckpt", tmp_path / "none.ckpt"), "does not exist")
    assert_user_error(run_main(main, capsys, "--ckpt", tmp_path / "none.ckpt", "--max_length", "0"), "--max_length")
