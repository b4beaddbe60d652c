"""Shared pytest set-up: MindSpore on CPU, float32, and helpers for tiny models."""
import os
import random
import socket
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
os.environ.setdefault("OPENMIND_HIDE_STACKTRACE", "FALSE")  # keep tracebacks visible when openmind is imported

import mindspore as ms  # noqa: E402

ms.set_device("CPU")


@pytest.fixture
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture
def graph():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(params=["pynative", "graph"])
def ms_mode(request):
    """Runs a test once in PyNative and once in GRAPH mode."""
    ms.set_context(mode=ms.PYNATIVE_MODE if request.param == "pynative" else ms.GRAPH_MODE)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


def run_module(path, *args):
    """argv for running one of the project's scripts with the test interpreter."""
    return [sys.executable, os.path.join(REPO, path), *map(str, args)]


def free_port():
    """A free TCP port on loopback (for msrun's scheduler), picked at random so parallel runs rarely collide."""
    for _ in range(50):
        port = random.randint(20000, 60000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")
