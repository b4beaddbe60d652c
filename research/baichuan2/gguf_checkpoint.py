"""A Llama-architecture GGUF file (llama.cpp's format) -> an XVERSE-layout Hugging Face checkpoint directory, which
convert_weight.py then turns into one of our model directories (float32, bfloat16, int8 or int4).

What it undoes or fills in:
- every tensor is dequantised to float32 with the `gguf` package (numpy only; quantised GGUF weights are what the
  file holds, so "float32" here means the file's values exactly);
- llama.cpp's converter permutes the rows of q and k per head (RoPE's two halves interleaved); they are put back;
- grouped key/value heads are repeated to one per query head (our XVERSE layout has no grouped attention), the
  way Hugging Face's repeat_kv does (each key/value head serves that many consecutive query heads);
- a file without `output.weight` has tied embeddings: config.json says so and the converter takes the embedding;
- the GPT-2 style byte-level BPE vocabulary becomes a `tokenizer.json` (HF tokenizers) with an XverseTokenizer
  tokenizer_config.json naming the file's special tokens.

Used by example/quant_quality.py and the real-weights test; needs `gguf` (requirements.txt).
"""
import json
import os

import numpy as np

from baichuan2.safetensors_io import save_tensors

_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


class GGUFError(ValueError):
    pass


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def unpermute_rows(w, heads):
    """Inverse of llama.cpp's q/k permutation: rows [heads, 2, half, in] were stored as [heads, half, 2, in]."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tokenizer(reader):
    """The file's byte-level BPE vocabulary as a `tokenizers` Tokenizer (digits split one by one, as SmolLM's)."""
    # pylint: disable-next=import-outside-toplevel
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if _field(reader, "tokenizer.ggml.model") != "gpt2" or tokens is None or merges is None:
        raise GGUFError("only GGUF files with a GPT-2 style BPE vocabulary (tokenizer.ggml.model = gpt2) are read")
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type") or []
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(types) if kind == 3])  # 3: control tokens
    return tokenizer


def _write_tokenizer(reader, output_dir):
    """tokenizer.json and an XverseTokenizer tokenizer_config.json naming the file's own special tokens."""
    from baichuan2.tokenization_xverse import write_tokenizer_files  # pylint: disable=import-outside-toplevel
    tokenizer_file = os.path.join(output_dir, "tokenizer.json")
    _tokenizer(reader).save(tokenizer_file)
    config = write_tokenizer_files(output_dir, tokenizer_file)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[f"{name}_token"] = tokens[token_id]
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def gguf_to_checkpoint(gguf_path, output_dir):
    """Writes config.json, model.safetensors and tokenizer.json of an XVERSE-layout checkpoint; returns config."""
    from gguf import GGUFReader  # pylint: disable=import-outside-toplevel
    from gguf.quants import dequantize  # pylint: disable=import-outside-toplevel

    reader = GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{gguf_path}: architecture {arch!r}; only 'llama' GGUF files can be read")
    heads, kv_heads = _field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")
    kv_heads = kv_heads or heads
    hidden = _field(reader, "llama.embedding_length")
    weights = {}
    for tensor in reader.tensors:
        array = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        name = tensor.name
        if name == "token_embd.weight":
            weights["model.embed_tokens.weight"] = array
        elif name == "output_norm.weight":
            weights["model.norm.weight"] = array
        elif name == "output.weight":
            weights["lm_head.weight"] = array
        elif name.startswith("blk."):
            _, layer, kind, _ = name.split(".")
            if kind not in _LAYER_NAMES:
                raise GGUFError(f"{gguf_path}: unexpected tensor {name}")
            if kind == "attn_q":
                array = unpermute_rows(array, heads)
            elif kind == "attn_k":
                array = unpermute_rows(array, kv_heads)
            if kind in ("attn_k", "attn_v"):
                array = np.repeat(array.reshape(kv_heads, -1, hidden), heads // kv_heads, axis=0).reshape(-1, hidden)
            weights[f"model.layers.{layer}.{_LAYER_NAMES[kind]}.weight"] = np.ascontiguousarray(array)
        elif not name.startswith("rope_"):
            raise GGUFError(f"{gguf_path}: unexpected tensor {name}")
    vocab, _ = weights["model.embed_tokens.weight"].shape
    config = {
        "architectures": ["XverseForCausalLM"], "model_type": "xverse", "hidden_size": hidden,
        "intermediate_size": _field(reader, "llama.feed_forward_length"), "num_attention_heads": heads,
        "num_hidden_layers": _field(reader, "llama.block_count"), "vocab_size": vocab,
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": _field(reader, "llama.context_length"), "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": "lm_head.weight" not in weights, "torch_dtype": "float32"}
    os.makedirs(output_dir, exist_ok=True)
    save_tensors(os.path.join(output_dir, "model.safetensors"), weights, {"format": "pt"})
    _write_tokenizer(reader, output_dir)
    with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return config
