"""Baichuan-family LLMs on MindSpore: one config-driven decoder registered with MindFormers."""
from .configuration_baichuan import PRESETS, BaichuanConfig
from .modeling_baichuan import BaichuanForCausalLM

__all__ = ["PRESETS", "BaichuanConfig", "BaichuanForCausalLM"]
