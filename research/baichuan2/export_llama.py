"""One of our model directories -> a native Hugging Face Llama directory (`convert_weight.py --reverse --to llama`).

Baichuan2-7B, Baichuan-7B, XVERSE-7B and oppo-experiemental-7B compute exactly what transformers'
`LlamaForCausalLM` computes (RMSNorm, half-rotation RoPE, SwiGLU, multi-head attention), except Baichuan2's NormHead,
which divides each lm_head row by its L2 norm at run time: a fixed function of the weights, applied here once. The
result loads with no remote code anywhere (transformers, vLLM, SGLang, llama.cpp's converter, MLX):

    config.json             model_type "llama", LlamaForCausalLM, no auto_map
    model*.safetensors      Llama names (q/k/v separate, as ours), NormHead folded into lm_head; float32 or bfloat16
    tokenizer.json          fast tokenizer giving our ids (made from tokenizer.model by fast_tokenizer.py; XVERSE's
                            own tokenizer.json), tokenizer.model kept beside it for SentencePiece families
    tokenizer_config.json   PreTrainedTokenizerFast, no BOS/EOS added, the family's chat_template
    generation_config.json  as in the source directory
    README.md               the model card

Baichuan2-13B is refused: its ALiBi attention biases have no Llama equivalent. Quantised directories are refused by
convert_weight.py before this runs (their original weights are gone).
"""
import json
import os
import shutil

import numpy as np

ALIBI_REFUSAL = ("--to llama: Baichuan2-13B uses ALiBi position biases, which Llama (RoPE) cannot express; "
                 "export it with --to baichuan instead")
DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def llama_config(config, dtype):
    """config.json of the Llama directory for our BaichuanConfig `config`."""
    heads = config.num_attention_heads
    data = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": config.hidden_size // heads,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": bool(config.tie_word_embeddings and not config.norm_head),
        "use_cache": True,
        "torch_dtype": dtype,
    }
    source = getattr(config, "source_model", None)
    if source:
        data["_name_or_path"] = source
    return data


def _source_dtype(config):
    return "bfloat16" if config.torch_dtype == "bfloat16" else "float32"


def _store(array, dtype):
    """(array as written, stored as bfloat16?)"""
    from .quantization import bf16_bits  # pylint: disable=import-outside-toplevel
    if dtype == "bfloat16":
        return bf16_bits(array), True
    return np.ascontiguousarray(array.astype(dtype)), False


def export_llama(input_path, output_path, dtype="keep", overwrite=False, show_progress=True):
    """Writes the Llama directory for our model directory `input_path`; returns our BaichuanConfig.
    Raises ConversionError (convert_weight.py) for what cannot be exported, before anything is written."""
    # pylint: disable=import-outside-toplevel
    from tqdm import tqdm
    from . import chat_format
    from .configuration_baichuan import BaichuanConfig
    from .convert_weight import ConversionError, checkpoint_shards, expected_shapes, is_our_model_dir
    from .convert_weight import read_safetensors
    from .fast_tokenizer import write_fast_tokenizer
    from .model_dir import atomic_dir, write_model_card
    from .quantization import l2_normalize_rows
    from .safetensors_io import save_tensors

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype for --to llama must be one of {tuple(DTYPES)}, got {dtype!r}")
    if not is_our_model_dir(input_path):
        raise ConversionError(f"--to llama reads one of our model directories; {input_path} is a Hugging Face "
                              "checkpoint: convert it forward first (without --reverse)")
    config = BaichuanConfig.from_hf_config(input_path)
    if config.position_encoding != "rope":
        raise ConversionError(ALIBI_REFUSAL)
    out_dtype = DTYPES[dtype] or _source_dtype(config)
    expected = expected_shapes(config, hf_layout=False)
    tied = llama_config(config, out_dtype)["tie_word_embeddings"]
    if tied:
        expected.pop("lm_head.weight")
    shards = checkpoint_shards(input_path)
    with atomic_dir(output_path, replace=overwrite) as tmp:
        weight_map, seen = {}, set()
        for number, (shard_path, reader) in enumerate(
                tqdm(shards, desc="exporting shards", unit="shard", disable=not show_progress), start=1):
            if reader is not read_safetensors:
                raise ConversionError(f"{shard_path}: our model directories hold safetensors weights only")
            name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors, bf16 = {}, []
            for key, array in read_safetensors(shard_path):  # bfloat16 arrives widened to float32, exactly
                if key not in expected or tuple(array.shape) != tuple(expected[key]):
                    raise ConversionError(f"{shard_path}: tensor {key} {tuple(array.shape)} is not one of a "
                                          f"{config.family} model directory's")
                if key == "lm_head.weight" and config.norm_head:
                    array = l2_normalize_rows(array)  # NormHead, folded once
                tensors[key], is_bf16 = _store(array, out_dtype)
                if is_bf16:
                    bf16.append(key)
                seen.add(key)
            if tensors:
                save_tensors(os.path.join(tmp, name), tensors, {"format": "pt"}, bf16_names=bf16)
                weight_map.update({key: name for key in tensors})
        missing = sorted(set(expected) - seen)
        if missing:
            raise ConversionError(f"{input_path} lacks tensors: {', '.join(missing[:5])}")
        if len(set(weight_map.values())) > 1:
            total = sum(os.path.getsize(os.path.join(tmp, f)) for f in set(weight_map.values()))
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                          indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(llama_config(config, out_dtype), f, indent=2)
            f.write("\n")
        if os.path.isfile(os.path.join(input_path, "generation_config.json")):
            shutil.copyfile(os.path.join(input_path, "generation_config.json"),
                            os.path.join(tmp, "generation_config.json"))
        _write_tokenizer(input_path, tmp, config, chat_format.get(config.chat_format).chat_template(),
                         write_fast_tokenizer)
        write_model_card(tmp, config, layout="llama", source=input_path, dtype=out_dtype)
    return config


def _write_tokenizer(src, dst, config, template, write_fast_tokenizer):
    from .convert_weight import ConversionError  # pylint: disable=import-outside-toplevel
    special = {}
    path = os.path.join(src, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            ours = json.load(f)
        special = {k: ours[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token") if isinstance(
            ours.get(k), str)}
    sources = [("model_file", os.path.join(src, "tokenizer.model")),
               ("tokenizer_file", os.path.join(src, "tokenizer.json"))]
    found = [(kind, file) for kind, file in sources if os.path.isfile(file)]
    if not found:
        raise ConversionError(f"{src} has no tokenizer (tokenizer.model or tokenizer.json): a Llama directory "
                              "without one cannot be served; copy the tokenizer into it and run this again")
    kind, file = found[0]
    try:
        write_fast_tokenizer(dst, **{kind: file}, special_tokens=special, model_max_length=config.model_max_length,
                             chat_template=template)
    except Exception as exc:  # pylint: disable=broad-except  # protobuf / tokenizers errors of a damaged file
        raise ConversionError(f"{file} cannot be written as tokenizer.json: {exc}") from exc
