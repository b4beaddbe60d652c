"""One configuration for every Baichuan-family decoder.

The families differ only in a few fields (litgpt-style), never in code:

| family                 | position | W_pack in HF files | NormHead | vocab  | bos/eos/pad |
|------------------------|----------|--------------------|----------|--------|-------------|
| Baichuan2-7B (+ oppo)  | RoPE     | yes                | yes      | 125696 | 1/2/0       |
| Baichuan2-13B          | ALiBi    | yes                | yes      | 125696 | 1/2/0       |
| Baichuan-7B            | RoPE     | yes                | no       | 64000  | 1/2/0       |
| XVERSE-7B              | RoPE     | no (q/k/v)         | no       | 100534 | 2/3/1       |

This file imports nothing from the project so it can be copied into a model directory and loaded with
`trust_remote_code=True`.
"""
import json
import os
import re

try:  # before mindformers: keeps MindSpore 2.10's deprecation line off the console (mindspore_compat.py)
    from . import mindspore_compat  # noqa: F401  pylint: disable=unused-import
except ImportError:  # no MindSpore, or this file copied into a model directory without it
    pass
try:  # MindSpore side: a MindFormers config, registered for its pipelines
    from mindformers.models.configuration_utils import PretrainedConfig
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    _register = MindFormerRegister.register(MindFormerModuleType.CONFIG)
except ImportError:  # transformers alone: AutoTokenizer(dir, trust_remote_code=True) reads this config first
    from transformers import PretrainedConfig

    def _register(cls):
        return cls

_DTYPES = ("float32", "float16", "bfloat16")


@_register
class BaichuanConfig(PretrainedConfig):
    """Shape and family switches of a Baichuan-family causal LM.

    Args:
        family: preset name the config came from (informational: "baichuan2_7b", "xverse_7b", ...).
        position_encoding: "rope" (7B models) or "alibi" (Baichuan2-13B).
        fused_qkv: the Hugging Face checkpoint stores q/k/v stacked in `W_pack` (Baichuan) rather than
            separate `q_proj/k_proj/v_proj` (XVERSE). Our model always keeps them separate; this only steers
            weight conversion.
        norm_head: L2-normalise each lm_head row before the output matmul (Baichuan2).
        max_position_embeddings: RoPE table length; None for ALiBi, which has no position limit.
        model_max_length: context length used for training and chat history building.
        user_token_id / assistant_token_id: chat role tokens (`<reserved_106>`/`<reserved_107>` in Baichuan2).
        chat_format: "baichuan2" (reserved role tokens), "xverse" ("Human: ...\\n\\nAssistant: ") or None (base model).
        compute_dtype / param_dtype: "float32" | "float16" | "bfloat16". CPU has no bf16 MatMul: keep float32 there.
        torch_dtype: how the weights of a model directory are stored (Hugging Face's field): "float32" (default,
            parameters in param_dtype) or "bfloat16" (projections, embedding and lm_head kept in bfloat16 in memory).
        quantization_config: None, or weight-only round-to-nearest quantisation in the Hugging Face style,
            {"quant_method": "rtn", "bits": 8 | 4, "group_size": 32, "sym": true, "embed_tokens": true,
            "lm_head": true} (see quantization.py); modules not quantised stay bfloat16.
    """

    model_type = "baichuan"

    def __init__(self,
                 family="custom",
                 vocab_size=125696,
                 hidden_size=4096,
                 intermediate_size=11008,
                 num_hidden_layers=32,
                 num_attention_heads=32,
                 rms_norm_eps=1e-6,
                 max_position_embeddings=4096,
                 model_max_length=4096,
                 position_encoding="rope",
                 rope_theta=10000.0,
                 fused_qkv=True,
                 norm_head=True,
                 hidden_act="silu",
                 initializer_range=0.02,
                 bos_token_id=1,
                 eos_token_id=2,
                 pad_token_id=0,
                 user_token_id=195,
                 assistant_token_id=196,
                 chat_format="baichuan2",
                 compute_dtype="float32",
                 param_dtype="float32",
                 tie_word_embeddings=False,
                 torch_dtype="float32",
                 quantization_config=None,
                 **kwargs):
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         **kwargs)
        self.family = family
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.rms_norm_eps = float(rms_norm_eps)
        self.max_position_embeddings = None if max_position_embeddings is None else int(max_position_embeddings)
        self.model_max_length = int(model_max_length)
        self.position_encoding = position_encoding
        self.rope_theta = float(rope_theta)
        self.fused_qkv = bool(fused_qkv)
        self.norm_head = bool(norm_head)
        self.hidden_act = hidden_act
        self.initializer_range = float(initializer_range)
        self.user_token_id = user_token_id
        self.assistant_token_id = assistant_token_id
        self.chat_format = chat_format
        self.compute_dtype = compute_dtype
        self.param_dtype = param_dtype
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.torch_dtype = str(torch_dtype).replace("torch.", "")
        self.quantization_config = None if quantization_config is None else dict(quantization_config)
        self.validate()

    def validate(self):
        """Raise ValueError naming the bad field and what would be valid."""
        if self.position_encoding not in ("rope", "alibi"):
            raise ValueError(f"position_encoding must be 'rope' or 'alibi', got {self.position_encoding!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.position_encoding == "rope":
            if not self.max_position_embeddings:
                raise ValueError("RoPE models need max_position_embeddings (the rotary table length)")
            if (self.hidden_size // self.num_attention_heads) % 2:
                raise ValueError("RoPE needs an even head dimension")
        if self.hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' (SwiGLU) is used by this family, got {self.hidden_act!r}")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if self.chat_format not in ("baichuan2", "xverse", None):
            raise ValueError(f"chat_format must be 'baichuan2', 'xverse' or null, got {self.chat_format!r}")
        if self.torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype must be one of {_DTYPES}, got {self.torch_dtype!r}")
        quant = self.quantization_config
        if quant is not None:
            sym = quant.get("sym", True)
            if quant.get("quant_method") != "rtn" or quant.get("bits") not in (8, 4) or sym not in (True, False) \
                    or (not sym and quant["bits"] != 4):
                raise ValueError("quantization_config must be {'quant_method': 'rtn', 'bits': 8 or 4, "
                                 "'group_size': N, 'sym': true (or false with 4 bits)} (as convert_weight.py "
                                 f"--quantize writes it), got {quant!r}")
            methods = ("search", "absmax") if sym else ("search", "minmax")
            if quant.get("scale_method", "absmax" if sym else None) not in methods:
                raise ValueError(f"quantization_config scale_method must be one of {methods} with sym {sym} "
                                 f"(absent with sym true: absmax, as directories written before it say nothing), "
                                 f"got {quant.get('scale_method')!r}")
            group = quant.get("group_size")
            if not isinstance(group, int) or group <= 0 or (quant["bits"] == 4 and group % 32):
                raise ValueError(f"quantization_config group_size must be a positive integer (a multiple of 32 for "
                                 f"4 bits), got {group!r}")

    def weight_format(self, module="linear"):
        """Storage format of one kind of module ("linear", "embed_tokens" or "lm_head"): "dense" (param_dtype,
        trainable), "bfloat16", "int8" or "int4"."""
        quant = self.quantization_config
        if quant is not None:
            return f"int{quant['bits']}" if module == "linear" or quant.get(module, True) else "bfloat16"
        return "bfloat16" if self.torch_dtype == "bfloat16" else "dense"

    @property
    def asymmetric(self):
        """Whether int4 weights carry a float16 minimum per group beside the scale (quantization_config sym false)."""
        return self.quantization_config is not None and not self.quantization_config.get("sym", True)

    @property
    def group_size(self):
        return None if self.quantization_config is None else self.quantization_config["group_size"]

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def max_context(self):
        """Longest sequence the model can take: the RoPE table length, or model_max_length for ALiBi."""
        if self.position_encoding == "rope":
            return self.max_position_embeddings
        return self.model_max_length

    def num_parameters(self):
        """Parameter count from the shapes alone (no weights allocated)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o + gate, up, down + two RMSNorm weights
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * per_layer + h + head

    # ------------------------------------------------------------------ presets and Hugging Face configs
    @classmethod
    def from_preset(cls, name, **overrides):
        """A named family preset (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_config(cls, config):
        """Reads a Hugging Face Baichuan / Baichuan2 / XVERSE `config.json` (path, directory or dict).

        Our own saved configs (which carry `position_encoding`) are read back unchanged.
        """
        if isinstance(config, (str, os.PathLike)):
            path = os.path.join(config, "config.json") if os.path.isdir(config) else config
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        config = dict(config)
        if "position_encoding" in config:  # one of ours
            for key in ("auto_map", "architectures", "model_type", "transformers_version", "mindformers_version"):
                config.pop(key, None)
            return cls(**config)

        arch = (config.get("architectures") or [""])[0]
        model_type = config.get("model_type", "")
        is_xverse = model_type == "xverse" or arch.startswith("Xverse")
        # Baichuan2 (7B and 13B) names its class BaichuanForCausalLM; Baichuan-7B spells it BaiChuanForCausalLM.
        is_baichuan2 = arch == "BaichuanForCausalLM"
        # Baichuan2-13B has no max_position_embeddings: it uses ALiBi.
        alibi = not is_xverse and "max_position_embeddings" not in config
        max_pos = config.get("max_position_embeddings")
        model_max_length = config.get("model_max_length") or max_pos or 4096
        if is_xverse:
            family, chat = "xverse_7b", "xverse"
        elif alibi:
            family, chat = "baichuan2_13b", "baichuan2"
        elif is_baichuan2:
            family, chat = "baichuan2_7b", "baichuan2"
        else:
            family, chat = "baichuan_7b", None
        defaults = PRESETS[family]
        return cls(
            family=family,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=None if alibi else (max_pos or 4096),
            model_max_length=model_max_length,
            position_encoding="alibi" if alibi else "rope",
            rope_theta=config.get("rope_theta", 10000.0),
            fused_qkv=not is_xverse,
            norm_head=is_baichuan2,
            hidden_act=config.get("hidden_act", "silu"),
            initializer_range=config.get("initializer_range", 0.02),
            bos_token_id=config.get("bos_token_id", defaults["bos_token_id"]),
            eos_token_id=config.get("eos_token_id", defaults["eos_token_id"]),
            pad_token_id=config.get("pad_token_id", defaults["pad_token_id"]),
            user_token_id=config.get("user_token_id", defaults["user_token_id"]),
            assistant_token_id=config.get("assistant_token_id", defaults["assistant_token_id"]),
            chat_format=chat,
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            **({"source_model": config["_name_or_path"]} if _hub_name(config.get("_name_or_path")) else {}),
        )


def _hub_name(name):
    """Whether a config's `_name_or_path` is a Hugging Face name ("baichuan-inc/Baichuan2-7B-Chat"), kept as
    `source_model` (the base named by exported adapters and model cards), rather than a local path."""
    return isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not os.path.exists(name)


_BAICHUAN2_7B = dict(
    family="baichuan2_7b", vocab_size=125696, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=4096, model_max_length=4096,
    position_encoding="rope", rope_theta=10000.0, fused_qkv=True, norm_head=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, user_token_id=195, assistant_token_id=196,
    chat_format="baichuan2")

PRESETS = {
    "baichuan2_7b": _BAICHUAN2_7B,
    # Continued pretraining of Baichuan2-7B: same architecture.
    "oppo_experiemental_7b": dict(_BAICHUAN2_7B, family="oppo_experiemental_7b"),
    "baichuan2_13b": dict(_BAICHUAN2_7B, family="baichuan2_13b", hidden_size=5120, intermediate_size=13696,
                          num_hidden_layers=40, num_attention_heads=40, position_encoding="alibi",
                          max_position_embeddings=None),
    "baichuan_7b": dict(_BAICHUAN2_7B, family="baichuan_7b", vocab_size=64000, norm_head=False,
                        user_token_id=None, assistant_token_id=None, chat_format=None),
    "xverse_7b": dict(_BAICHUAN2_7B, family="xverse_7b", vocab_size=100534, max_position_embeddings=8192,
                      model_max_length=8192, fused_qkv=False, norm_head=False, bos_token_id=2, eos_token_id=3,
                      pad_token_id=1, user_token_id=None, assistant_token_id=None, chat_format="xverse"),
    # Tiny Baichuan2-7B architecture for tests and the demo; matches the bundled tokenizer (vocab 1000, role
    # tokens <reserved_106>=3, <reserved_107>=4).
    "tiny": dict(_BAICHUAN2_7B, family="tiny", vocab_size=1000, hidden_size=64, intermediate_size=176,
                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, model_max_length=64,
                 user_token_id=3, assistant_token_id=4),
}


def to_hf_config(config):
    """The Hugging Face `config.json` dict of the family `config` belongs to (for `convert_weight.py --reverse`)."""
    is_xverse = config.chat_format == "xverse" or not config.fused_qkv
    if is_xverse:
        arch, model_type = "XverseForCausalLM", "xverse"
    elif config.norm_head:
        arch, model_type = "BaichuanForCausalLM", "baichuan"
    else:
        arch, model_type = "BaiChuanForCausalLM", "baichuan"
    hf = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "initializer_range": config.initializer_range,
        "model_max_length": config.model_max_length,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": "float32",
    }
    if config.position_encoding == "rope":  # Baichuan2-13B (ALiBi) has no max_position_embeddings key
        hf["max_position_embeddings"] = config.max_position_embeddings
    return hf
