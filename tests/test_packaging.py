"""The wheel holds every module and data file of research/baichuan2, and building it prints no setuptools warning."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO

PACKAGE = os.path.join(REPO, "research", "baichuan2")
# warnings about the environment, not this project's configuration: the wheel package's bdist_wheel notice under the
# setuptools mindformers pins, and distutils' note when PYTHONDONTWRITEBYTECODE is set
COMMANDS = ("baichuan2-preprocess", "baichuan2-finetune", "baichuan2-convert", "baichuan2-chat", "baichuan2-serve",
            "baichuan2-eval", "baichuan2-merge-lora")
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


def test_wheel_declares_its_dependencies_and_commands(source_tree, tmp_path):
    """Requires-Dist names what the package imports (tqdm: baichuan2.evaluation; the server's stack; MindSpore), each
    range satisfied by the version installed from requirements.txt; the commands are console scripts."""
    from importlib.metadata import version

    from packaging.requirements import Requirement
    wheel, _ = build(source_tree, "build_wheel", tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        info = next(n.split("/")[0] for n in zf.namelist() if n.split("/")[0].endswith(".dist-info"))
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    requires = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    names = {r.name.lower() for r in requires}
    assert {"mindspore", "mindformers", "openmind", "tqdm", "fastapi", "uvicorn", "sentencepiece", "tokenizers",
            "safetensors", "numpy", "pyyaml"} <= names
    unmet = [f"{r} (installed {version(r.name)})" for r in requires if not r.specifier.contains(version(r.name))]
    assert unmet == []
    for command in COMMANDS:
        assert f"{command} = " in entry_points


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_with_working_commands(source_tree, tmp_path):
    """The wheel into a new venv: its commands run, `import baichuan2.evaluation` works, from the installed copy, in
    an empty directory that stays empty. The dependencies come from the project venv's site-packages (a path line,
    so the checkout's editable install there is not seen): installing MindSpore afresh takes minutes and 3 GB; that
    the wheel declares them is checked above."""
    import sysconfig
    wheel, _ = build(source_tree, "build_wheel", tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, bin_dir = str(venv / "bin" / "python"), venv / "bin"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check",
                    wheel], check=True, timeout=300)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "project_dependencies.pth"), "w", encoding="utf-8") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    cwd = tmp_path / "empty"
    cwd.mkdir()
    for argv in ([str(bin_dir / "baichuan2-serve"), "--help"], [str(bin_dir / "baichuan2-finetune"), "--help"],
                 [py, "-c", "import baichuan2, baichuan2.evaluation; print(baichuan2.__file__)"]):
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        assert " INFO " not in proc.stdout + proc.stderr
    assert proc.stdout.strip().startswith(site), proc.stdout  # the installed copy, not the checkout
    assert {f"baichuan2-{c}" for c in ("chat", "eval", "convert", "merge-lora", "preprocess")} <= set(
        os.listdir(bin_dir))
    assert os.listdir(cwd) == []
