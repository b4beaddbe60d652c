"""Baichuan-family LLMs on MindSpore: one config-driven decoder registered with MindFormers.

The model classes load on first use: `baichuan2.data` and `baichuan2.chat_format` must stay importable without
MindSpore/MindFormers (slow to import, and MindFormers creates ./output in the working directory on import), and
`baichuan2.runtime` sets up logging before mindformers loads.
"""
import importlib
import os as _os

from . import openmind_compat as _openmind_compat
from . import runtime as _runtime

# The user's umask, read before MindSpore loads: MindSpore sets the process umask to 077 whenever it creates a
# directory of its own (mindspore.log._make_directory), after which every file would be 0600. model_dir.atomic_dir
# gives what it publishes the modes this umask gives (0644 / 0755 under 022).
USER_UMASK = _os.umask(0o022)
_os.umask(USER_UMASK)

# Every import path, not only the entry points: mindformers, imported by the model code, would otherwise print INFO
# lines and create ./output/log in the caller's current directory (environment settings already made still win).
_runtime.setup_logs()
# openmind 1.0.0's adaptation (openmind_compat.py) for every program that imports the package, the installed
# commands included; scripts/setup_env.sh also puts it in a .pth file for programs that import only openmind.
_openmind_compat.activate()

_LAZY = {"PRESETS": "configuration_baichuan", "BaichuanConfig": "configuration_baichuan",
         "BaichuanForCausalLM": "modeling_baichuan"}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
