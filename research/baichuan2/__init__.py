"""Baichuan-family LLMs on MindSpore: one config-driven decoder registered with MindFormers.

The classes are imported on first use, so that `baichuan2.runtime` can set up logging before mindformers loads.
"""
__all__ = ["PRESETS", "BaichuanConfig", "BaichuanForCausalLM"]


def __getattr__(name):
    # pylint: disable=import-outside-toplevel
    if name in ("PRESETS", "BaichuanConfig"):
        from . import configuration_baichuan
        return getattr(configuration_baichuan, name)
    if name == "BaichuanForCausalLM":
        from .modeling_baichuan import BaichuanForCausalLM
        return BaichuanForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
