"""A servable model directory: what `trust_remote_code=True` loaders (openmind, mindformers) need.

    config.json              our BaichuanConfig fields + auto_map + tokenizer_class
    model*.safetensors       weights under our parameter names
    tokenizer.model          + tokenizer_config.json (SentencePiece families)
    generation_config.json   defaults for the variant (chat or base)
    configuration_baichuan.py, modeling_baichuan.py, tokenization_baichuan.py   the model code itself
"""
import json
import os
import shutil

from .configuration_baichuan import BaichuanConfig

MODEL_CODE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")
AUTO_MAP = {
    "AutoConfig": "configuration_baichuan.BaichuanConfig",
    "AutoModel": "modeling_baichuan.BaichuanForCausalLM",
    "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
    "AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None],
}
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def write_config(model_dir, config: BaichuanConfig):
    data = config.to_dict()
    data.update(auto_map=AUTO_MAP, tokenizer_class="BaichuanTokenizer", architectures=["BaichuanForCausalLM"],
                model_type="baichuan")
    with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)


def finish_model_dir(model_dir, config, tokenizer_dir=None):
    """Adds everything but the weights to `model_dir`."""
    write_config(model_dir, config)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in MODEL_CODE_FILES:
        if os.path.isfile(os.path.join(here, name)):
            shutil.copy2(os.path.join(here, name), os.path.join(model_dir, name))
    if tokenizer_dir:
        for name in _TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(model_dir, name))
