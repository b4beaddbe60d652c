"""Tests import only the package: no test file imports or loads code from example/ (a static scan of tests/).

A test may run an example script as its command line does: in a subprocess, or in this process as __main__ with
its argv (helpers.call_script, runpy.run_path(..., run_name="__main__")). What it may not do is take names out of
a script: `import example...`, sys.path pointing into example/, importlib's file loaders or runpy.run_path without
run_name="__main__" on a path that names example/ (resolved through the file's module-level assignments), including
inside code strings run by a child interpreter."""
import ast
import glob
import os
import re

from helpers import REPO

TESTS = os.path.join(REPO, "tests")
# calls that load a file's code and hand back its names
LOADERS = ("spec_from_file_location", "SourceFileLoader", "SourcelessFileLoader", "import_module", "__import__",
           "run_path", "exec_module", "load_source")
QUALIFIED_LOADERS = ("run_module",)  # runpy.run_module; a bare run_module is helpers' argv builder for a subprocess
SYS_PATH_EDITS = ("insert", "append", "extend")


def _call_name(func):
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _module_assignments(tree):
    """{name: the source nodes assigned to it at module level or in a function}: what a path argument may name."""
    assigned = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)
    return assigned


def _names_example(node, assigned, seen=None):
    """Whether the expression `node` mentions example/ (a string with an 'example' path part, or a module name
    under `example.`), following names."""
    seen = set() if seen is None else seen
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            if re.search(r"(^|[/\\])example([/\\]|$)", sub.value) or re.match(r"example(\.|$)", sub.value):
                return True
        if isinstance(sub, ast.Name) and sub.id in assigned and sub.id not in seen:
            seen.add(sub.id)
            if any(_names_example(value, assigned, seen) for value in assigned[sub.id]):
                return True
    return False


def _runs_as_main(call):
    return any(k.arg == "run_name" and isinstance(k.value, ast.Constant) and k.value.value == "__main__"
               for k in call.keywords)


def example_loads(source, filename="<test>"):
    """(line, what) of each import or load of example/ code in the Python source `source`."""
    tree = ast.parse(source, filename)
    assigned = _module_assignments(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] == "example"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "example":
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            name = _call_name(node.func)
            if name in QUALIFIED_LOADERS and isinstance(node.func, ast.Attribute):
                name = "run_path"
            arguments = [*node.args, *(k.value for k in node.keywords)]
            is_sys_path = (name in SYS_PATH_EDITS and isinstance(node.func, ast.Attribute)
                           and ast.unparse(node.func.value) == "sys.path")
            if name in LOADERS and not (name == "run_path" and _runs_as_main(node)) or is_sys_path:
                if any(_names_example(a, assigned) for a in arguments):
                    found.append((node.lineno, ast.unparse(node)[:120]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" in node.value:
            try:  # a code string a test hands to `python -c`
                inner = example_loads(node.value, filename)
            except SyntaxError:
                continue
            found += [(node.lineno, f"in a code string: {what}") for _, what in inner]
    # a loader whose path comes from the command line of a child (`runpy.run_path(sys.argv[1])["main"]`) cannot
    # be followed: taking names out of any file that way is refused outright
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call) and \
                _call_name(node.value.func) == "run_path" and not _runs_as_main(node.value):
            found.append((node.lineno, f"names taken out of a file: {ast.unparse(node)[:120]}"))
    return sorted(set(found))


def test_no_test_imports_or_loads_example_code():
    offenders = []
    for path in sorted(glob.glob(os.path.join(TESTS, "**", "*.py"), recursive=True)):
        if os.path.samefile(path, __file__):
            continue  # this file's code strings are the scan's own bad examples
        with open(path, encoding="utf-8") as f:
            source = f.read()
        offenders += [f"{os.path.relpath(path, REPO)}:{line}: {what}" for line, what in example_loads(source, path)]
    assert not offenders, "tests import or load code from example/ (move it into the package):\n" + \
        "\n".join(offenders)


def test_the_scan_finds_each_way_of_loading_example_code():
    bad = {
        "import example.bench_generate\n": 1,
        "from example.lora_memory_budget import budget\n": 1,
        'import sys, os\nsys.path.insert(0, os.path.join(REPO, "example"))\n': 2,
        'import runpy, os\nSCRIPT = os.path.join(REPO, "example", "finetune.py")\n'
        'main = runpy.run_path(SCRIPT)["main"]\n': 3,
        'import runpy\nrunpy.run_module("example.demo")\n': 2,
        'import importlib.util, os\n'
        'spec = importlib.util.spec_from_file_location("b", os.path.join(REPO, "example", "bench_generate.py"))\n': 2,
        'CODE = """\nimport runpy, sys\nanswer = runpy.run_path(sys.argv[1])["answer"]\n"""\n': 1,
    }
    for source, line in bad.items():
        assert [at for at, _ in example_loads(source)][:1] == [line], source


def test_the_scan_lets_scripts_run_as_their_command_line():
    good = [
        'import subprocess, sys\nsubprocess.run([sys.executable, "example/inference.py", "--prompt", "hi"])\n',
        'import runpy, sys\nsys.argv = ["example/chat.py"]\nrunpy.run_path("example/chat.py", run_name="__main__")\n',
        'import importlib.util, os\n'
        'spec = importlib.util.spec_from_file_location("t", os.path.join(REPO, "dataset", "train_tokenizer.py"))\n',
        'call_script(os.path.join(REPO, "example", "serve.py"), ["--model_dir", "m"])\n',
        'subprocess.run(run_module("example/demo.py", "--output_dir", out))\n',
    ]
    for source in good:
        assert example_loads(source) == [], source
