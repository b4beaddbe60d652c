"""The one place where openmind 1.0.0 is adapted to this stack (mindspore 2.7.2, mindformers 1.6.0, CPU).

What openmind 1.0.0 does, and what we change (only when its modules are imported, nothing else is touched):

1. `import openmind` sets `sys.tracebacklimit = 0` unless OPENMIND_HIDE_STACKTRACE=FALSE, which hides every
   traceback of the user's program. We default the variable to FALSE (a value the user set is kept).
2. Its MindSpore pipelines check at run time for mindspore==2.4.0 and mindformers==1.3.0 (`requirement_dependency`
   on the pipeline classes), versions that pip cannot install beside the rest of this stack (requirements.txt pins
   what it installs). We drop those two pins from the check; every other requirement is still checked.
3. The Baichuan2 model card calls `pipeline(task="text_generation", ...)`, but openmind only knows
   "text-generation" (KeyError 'Task text_generation has no config'). We map underscore spellings of known tasks.
   mindformers turns any error of the model's from_pretrained into RuntimeError("... experimental mode ... yaml
   file"), which misleads: a damaged or inconsistent model directory (the model code's WeightsFileError, one line
   naming the file) is raised as itself instead.
4. Generation itself needs no patch: mindformers' generator calls `mint.argmax` (no CPU kernel), so
   BaichuanForCausalLM.generate routes the pipeline to our generator (generation.py).

Activation needs no user code: `python -m baichuan2.openmind_compat --install` (run by scripts/setup_env.sh) writes
a one-line .pth file into the environment's site-packages, which loads THIS file by path at interpreter start (no
mindspore import, a few microseconds) and registers an import hook. The hook patches openmind's modules right after
they are imported. `activate()` may also be called by hand; it is idempotent.

This module imports only the standard library at top level.
"""
import importlib.abc
import importlib.util
import os
import sys
import sysconfig

PTH_NAME = "baichuan2_openmind_compat.pth"
_MARKER = "_baichuan2_openmind_compat"
# pins openmind checks that this stack does not meet (mindspore 2.7.x, mindformers 1.6.0 are what installs beside it)
_RELAXED_PACKAGES = ("mindspore", "mindformers")
TASK_ALIASES = {"text_generation": "text-generation"}


def _requirement_name(requirement):
    for sep in ("==", ">=", "<=", "~=", "!=", ">", "<"):
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower()


# ---------------------------------------------------------------------------------------------- patches
def _patch_base(module):
    """Pipeline dependency check without the mindspore/mindformers pins."""
    original = module.BasePipeline.check_dependency
    if getattr(original, _MARKER, False):
        return
    require_version = module.require_version

    def check_dependency(self):
        for dep in self._requirement_dependency:  # pylint: disable=protected-access
            if _requirement_name(dep) not in _RELAXED_PACKAGES:
                require_version(dep)

    setattr(check_dependency, _MARKER, True)
    module.BasePipeline.check_dependency = check_dependency


def _patch_interface(module):
    """`pipeline(task="text_generation")` -> "text-generation"."""
    original = module.build_pipeline
    if getattr(original, _MARKER, False):
        return

    def build_pipeline(task=None, *args, **kwargs):
        _check_our_model_dir(args[0] if args else kwargs.get("model"))
        try:
            return original(TASK_ALIASES.get(task, task), *args, **kwargs)
        except RuntimeError as e:
            ours = _model_dir_error(e)
            if ours is None:
                raise
            raise ours from None  # our line, not mindformers' fallback message

    setattr(build_pipeline, _MARKER, True)
    module.build_pipeline = build_pipeline


def _check_our_model_dir(model):
    """A model directory of ours (it holds our model code) is checked before mindformers reads it: a damaged or
    missing config.json or weights file, or a config.json that disagrees with the weights, is our one line."""
    if not (isinstance(model, str) and os.path.isfile(os.path.join(model, "modeling_baichuan.py"))):
        return
    try:
        from baichuan2.weights_check import check_model_dir  # pylint: disable=import-outside-toplevel
    except ImportError:  # the package is not importable here: the model code checks when it loads
        return
    check_model_dir(model)


def _model_dir_error(error):
    """The model code's WeightsFileError behind `error` (its __cause__ chain), or None. Matched by class name: the
    model code runs from the model directory's copy (trust_remote_code), not from this package."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ == "WeightsFileError":
            return error
        error = error.__cause__ or error.__context__
    return None


_PATCHES = {
    "openmind.archived.pipelines.base": _patch_base,
    "openmind.archived.pipelines.interface": _patch_interface,
}


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then our patch for that module."""

    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)


class _PatchFinder(importlib.abc.MetaPathFinder):
    """Finds the modules in _PATCHES through the other finders and wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


setattr(_PatchFinder, _MARKER, True)


def activate():
    """Installs the import hook (once per interpreter) and patches openmind modules already imported."""
    os.environ.setdefault("OPENMIND_HIDE_STACKTRACE", "FALSE")
    if not any(getattr(f, _MARKER, False) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchFinder())
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])


# ---------------------------------------------------------------------------------------------- installation
def pth_line(source=None):
    """The .pth line: loads this file by path (not the baichuan2 package, which imports mindspore) and activates.
    A missing file (moved checkout) is skipped silently rather than breaking every Python start."""
    source = os.path.abspath(source or __file__)
    return ("import os, importlib.util as u; p = %r; s = os.path.isfile(p) and "
            "u.spec_from_file_location('baichuan2_openmind_compat', p); m = s and u.module_from_spec(s); "
            "s and (s.loader.exec_module(m), m.activate())\n" % source)


def install_pth(site_packages=None):
    """Writes the .pth file into `site_packages` (default: this interpreter's purelib); returns its path."""
    site_packages = site_packages or sysconfig.get_paths()["purelib"]
    path = os.path.join(site_packages, PTH_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(pth_line())
    return path


def is_installed(site_packages=None):
    site_packages = site_packages or sysconfig.get_paths()["purelib"]
    return os.path.isfile(os.path.join(site_packages, PTH_NAME))


def main(argv=None):
    import argparse  # pylint: disable=import-outside-toplevel
    parser = argparse.ArgumentParser(description="openmind 1.0.0 compatibility for this suite")
    parser.add_argument("--install", action="store_true",
                        help=f"write {PTH_NAME} into site-packages (activates the adaptation at every start)")
    parser.add_argument("--site_packages", default=None, help="target directory (default: this venv's)")
    args = parser.parse_args(argv)
    if args.install:
        print(f"installed {install_pth(args.site_packages)}")
    else:
        state = "installed" if is_installed(args.site_packages) else "NOT installed (run with --install)"
        print(f"openmind compatibility hook: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
