"""The wheel holds every module and data file of research/baichuan2, and building it prints no setuptools warning."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "research", "baichuan2")
# warnings about the environment, not this project's configuration: the wheel package's bdist_wheel notice under the
# setuptools mindformers pins, and distutils' note when PYTHONDONTWRITEBYTECODE is set
ENVIRONMENT_NOTES = ("'wheel' package is no longer the canonical location", "byte-compiling is disabled")


def package_files(package):
    """Every file of the package as the wheel names it (baichuan2/...), caches left out."""
    found = set()
    for root, dirs, files in os.walk(package):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if not name.endswith(".pyc"):
                found.add("baichuan2/" + os.path.relpath(os.path.join(root, name), package).replace(os.sep, "/"))
    return found


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    """A copy of what the build reads, so the build's own folders (build/, *.egg-info) stay out of the checkout."""
    src = tmp_path_factory.mktemp("packaging") / "src"
    src.mkdir()
    shutil.copy(os.path.join(REPO, "pyproject.toml"), src)
    shutil.copytree(PACKAGE, src / "research" / "baichuan2", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # a C++ source beside the modules, as the custom kernels' source is: it must ship too
    (src / "research" / "baichuan2" / "packaging_probe.cc").write_text("// probe\n")
    return src


def build(source_tree, hook, out):
    """Runs one PEP 517 hook of setuptools (what pip calls, without network) and returns (wheel path, output)."""
    code = f"from setuptools import build_meta; print('WHEEL', build_meta.{hook}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=source_tree, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = proc.stdout.strip().splitlines()[-1].split()[-1]
    return os.path.join(out, name), proc.stdout + proc.stderr


def warnings_in(output):
    lines = [line.strip() for line in output.splitlines()]
    return [line for line in lines if "warn" in line.lower() and line != "warn("
            and not any(note in line for note in ENVIRONMENT_NOTES)]


def test_wheel_holds_every_module_and_data_file(source_tree, tmp_path):
    wheel, output = build(source_tree, "build_wheel", tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = {n for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")}
    expected = package_files(source_tree / "research" / "baichuan2")
    assert expected >= package_files(PACKAGE) | {"baichuan2/packaging_probe.cc"}
    assert {"baichuan2/evaluation/__init__.py", "baichuan2/training/run.py", "baichuan2/data/__init__.py",
            "baichuan2/static/chat.html"} <= expected
    assert sorted(expected - names) == [], "files of research/baichuan2 missing from the wheel"
    assert sorted(names - expected) == []
    assert warnings_in(output) == [], output[-3000:]


def test_editable_build_prints_no_warning(source_tree, tmp_path):
    # what scripts/setup_env.sh's `pip install -e .` runs: the 40-line baichuan2.static warning came from here
    _, output = build(source_tree, "build_editable", tmp_path)
    assert warnings_in(output) == [], output[-3000:]
