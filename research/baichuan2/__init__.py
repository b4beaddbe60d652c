"""Baichuan-family LLMs on MindSpore: one config-driven decoder registered with MindFormers.

The model classes load on first use: `baichuan2.data` and `baichuan2.chat_format` must stay importable without
MindSpore/MindFormers (slow to import, and MindFormers creates ./output in the working directory on import), and
`baichuan2.runtime` sets up logging before mindformers loads.
"""
import importlib

_LAZY = {"PRESETS": "configuration_baichuan", "BaichuanConfig": "configuration_baichuan",
         "BaichuanForCausalLM": "modeling_baichuan"}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
