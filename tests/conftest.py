"""Shared pytest set-up: MindSpore on CPU, the execution-mode fixtures and the converted parity model directories.
Plain helpers (paths, script runners, row writers) are in helpers.py."""
import os

import pytest

from baichuan2 import kernels
from baichuan2.runtime import setup_logs
from helpers import PARITY, oppo_checkpoint

os.environ.setdefault("OPENMIND_HIDE_STACKTRACE", "FALSE")  # keep tracebacks visible when openmind is imported
setup_logs()  # as every entry point does: mindformers' log folder outside the directory pytest runs in

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


@pytest.fixture(params=["pynative", pytest.param("graph", marks=pytest.mark.slow)])
def ms_mode(request):
    """Runs a test once in PyNative and once in GRAPH mode (compiling: the slow tier)."""
    ms.set_context(mode=ms.PYNATIVE_MODE if request.param == "pynative" else ms.GRAPH_MODE)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="session")
def parity_model_dir(tmp_path_factory):
    """parity_model_dir(family, variant="auto") -> our model directory converted (convert_weight.py) from
    tests/fixtures/parity/<family>; oppo_experiemental_7b is OPPO's config.json on baichuan2_7b's weights.
    Each is converted once per session and shared by every test that asks: read it, copy it before changing it."""
    from baichuan2.convert_weight import convert
    root = tmp_path_factory.mktemp("parity_model_dirs")
    made = {}

    def get(family, variant="auto"):
        if (family, variant) not in made:
            if family == "oppo_experiemental_7b":
                source = oppo_checkpoint(str(root / "oppo_hf"))
            else:
                source = os.path.join(PARITY, family)
            out = str(root / (family if variant == "auto" else f"{family}_{variant}"))
            convert(source, out, show_progress=False, variant=variant)
            made[family, variant] = out
        return made[family, variant]
    return get


@pytest.fixture(params=kernels.ISA_PATHS)
def forced_isa(request, monkeypatch):
    """Runs a test once per instruction-set path of the CPU kernels (BAICHUAN_KERNEL_ISA); the paths this CPU
    lacks are skipped, saying which it has."""
    if request.param not in kernels.available_isas():
        pytest.skip(f"this CPU cannot run the {request.param} path (it has {', '.join(kernels.available_isas())})")
    monkeypatch.setenv("BAICHUAN_KERNEL_ISA", request.param)
    assert kernels.isa() == request.param
    return request.param
