"""Converts a Hugging Face Baichuan-family checkpoint into our MindSpore model directory, and back.

    python research/baichuan2/convert_weight.py --input_path <HF model dir> --output_path <model dir>
    python research/baichuan2/convert_weight.py --input_path <HF model dir> --output_path <dir> --dtype bfloat16
    python research/baichuan2/convert_weight.py --input_path <HF model dir> --output_path <dir> --quantize int4
    python research/baichuan2/convert_weight.py --reverse --input_path <model dir> --output_path <HF dir>
    python research/baichuan2/convert_weight.py --reverse --to llama --input_path <model dir> --output_path <dir>

Forward: reads config.json (Baichuan2-7B/13B, Baichuan-7B, XVERSE-7B or oppo-experiemental-7B), then the weights
shard by shard (safetensors, sharded with model.safetensors.index.json or single; `pytorch_model*.bin` only when
torch is installed, read with `weights_only=True`, never a general unpickle). `W_pack` ([3H, H], q/k/v stacked on
the output dim) is split into q_proj/k_proj/v_proj; every other name is kept. Each input shard becomes one output
shard, so a 7B conversion holds one shard in memory, never two copies of the model. Names and shapes are checked
against the config: every missing, unexpected or mis-shaped tensor is reported by name. The output is written to
a temporary directory and renamed at the end, so a failed run leaves nothing at --output_path.

Weight formats (config.json says which; layouts in quantization.py): float32 (the default and the reference;
bfloat16 sources are widened exactly), --dtype bfloat16 (the published weights as they are, no float32 detour),
--quantize int8|int4|int4_asym [--group_size 32] (weight-only, round-to-nearest, per-group float16 scales chosen by
--scale_method, an error-minimising search by default; int4_asym adds a float16 minimum per group, as llama.cpp's
q4_1, symmetric otherwise; every projection, the embedding and lm_head are quantised,
tensors that are not projections follow --dtype). A checkpoint with tied embeddings (tie_word_embeddings, no
lm_head needed) gets the embedding written out as its lm_head. Baichuan2's
NormHead rows are stored already L2-normalised in bfloat16 and quantised directories (normalised in float32, then
rounded). Safetensors input is streamed: tensors are read and written a block of rows at a time, each input shard
becoming one output shard, so memory stays at a few hundred MB whatever the model size.

The output directory is servable: config.json, weights, tokenizer files and model code, written by
model_dir.write_servable_dir like every other model directory.
--reverse packs q/k/v back into W_pack and writes the Hugging Face config.json; HF -> ours -> HF is bit-exact.
--input_path may also be one of our float32 / bfloat16 directories (e.g. a finetuned or merged model): the forward
conversion then re-stores it in --dtype / --quantize, keeping its chat settings (--variant auto).
--reverse refuses a quantised directory (exit status 2): the original weights cannot be recovered from it.
--reverse --to llama writes a native Hugging Face Llama directory instead (export_llama.py: NormHead folded into
lm_head, a fast tokenizer.json giving our ids, the chat template; no remote code); Baichuan2-13B (ALiBi) is refused.

Base vs Chat (--variant, Baichuan2 / oppo checkpoints only; the two variants share config.json and weights layout):
  chat   chat_format "baichuan2", role ids from the source's generation_config.json (else `<reserved_106>`/
         `<reserved_107>` looked up in its tokenizer), Baichuan2-Chat's sampling defaults in generation_config.json.
  base   chat_format null, no role ids, greedy plain-text defaults (chat.py refuses a base model).
  auto   (default) chat when the source's generation_config.json has `user_token_id` (what Baichuan2-*-Chat ships,
         Base ships none) or the directory name contains "chat" (case-insensitive); base otherwise.
Baichuan-7B is always base (no role tokens) and XVERSE keeps its text chat format: --variant does not apply.
"""
import argparse
import json
import os
import re
import shutil
import struct
import sys

import numpy as np

from baichuan2.runtime import setup_logs

setup_logs()  # before mindformers loads: its log folder and INFO lines stay out of the cwd and the console
from baichuan2.configuration_baichuan import BaichuanConfig, to_hf_config  # noqa: E402
from baichuan2.model_dir import atomic_dir, write_generation_config, write_model_card  # noqa: E402
from baichuan2.model_dir import write_servable_dir  # noqa: E402
from baichuan2.quantization import DEFAULT_GROUP_SIZE, bf16_bits, check_group_size, from_bf16_bits  # noqa: E402
from baichuan2.quantization import ASYMMETRIC_METHODS, SCALE_METHODS, check_scale_method  # noqa: E402
from baichuan2.quantization import l2_normalize_rows, quantize as quantize_rows  # noqa: E402
from baichuan2.safetensors_io import SafetensorsFile, SafetensorsWriter, save_tensors  # noqa: E402

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
                       "I64": np.int64, "I32": np.int32}
_WPACK = re.compile(r"^(model\.layers\.\d+\.self_attn\.)W_pack\.weight$")
_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)([qkv])_proj\.weight$")
# Weights stored quantised by --quantize: every projection, the embedding and lm_head.
_QUANTIZED = re.compile(r"^(model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj|model\.embed_tokens|lm_head)\.weight$")
_CHUNK_ELEMENTS = 16 * 1024 * 1024  # rows converted at a time: at most 64 MB of float32 per block
# Buffers some Baichuan-7B .bin checkpoints carry; recomputed by the model, so skipped.
_DERIVED = re.compile(r"rotary_emb\.inv_freq$")


class ConversionError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- reading
def read_safetensors(path):
    """Yields (name, array) from a safetensors file one tensor at a time. bfloat16 (which numpy lacks) is widened
    to float32 exactly."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            f.seek(base + start)
            array = np.frombuffer(f.read(end - start), dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            if info["dtype"] == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            yield name, array.reshape(info["shape"])


def read_torch_bin(path):
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise ConversionError(
            f"{path} is a PyTorch .bin checkpoint and torch is not installed. Either install a CPU torch "
            "(pip install torch) or convert the checkpoint to safetensors first") from exc
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no arbitrary unpickling
    for name, tensor in state.items():
        yield name, tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def checkpoint_shards(model_dir):
    """The weight files of a Hugging Face (or our) model directory, in order, with their reader."""
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", read_torch_bin)):
        index = os.path.join(model_dir, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return [(os.path.join(model_dir, name), reader) for name in files]
    for name, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", read_torch_bin)):
        if os.path.isfile(os.path.join(model_dir, name)):
            return [(os.path.join(model_dir, name), reader)]
    raise ConversionError(f"no weights found in {model_dir}: expected model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")


# ---------------------------------------------------------------------------------------------- layouts
def expected_shapes(config, hf_layout):
    """Name -> shape of every tensor: our layout (separate q/k/v) or the Hugging Face one (W_pack when fused)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        if hf_layout and config.fused_qkv:
            shapes[p + "self_attn.W_pack.weight"] = (3 * h, h)
        else:
            shapes.update({p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkv"})
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes.update({p + f"mlp.{x}_proj.weight": (i, h) for x in ("gate", "up")})
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


class _Checker:
    """Collects every naming/shape problem so the user sees them all at once."""

    def __init__(self, expected, source):
        self.expected, self.source = expected, source
        self.seen, self.problems = set(), []

    def check(self, name, shape):
        shape = tuple(shape)
        if name not in self.expected:
            self.problems.append(f"unexpected tensor {name} {shape}")
        elif shape != self.expected[name]:
            self.problems.append(f"mis-shaped tensor {name}: expected {self.expected[name]}, found {shape}")
        self.seen.add(name)

    def finish(self):
        missing = [f"missing tensor {n} {self.expected[n]}" for n in self.expected if n not in self.seen]
        problems = self.problems + missing
        if problems:
            raise ConversionError(f"{self.source} does not match its config.json:\n  " + "\n  ".join(problems))


def hf_to_ours(name, array, config):
    """One Hugging Face tensor -> list of (our name, array)."""
    match = _WPACK.match(name)
    if match:
        h = config.hidden_size
        if array.shape != (3 * h, h):
            return [(name, array)]  # reported as mis-shaped by the checker
        return [(match.group(1) + f"{x}_proj.weight", array[j * h:(j + 1) * h]) for j, x in enumerate("qkv")]
    return [(name, array)]


# ---------------------------------------------------------------------------------------------- conversion
def _cast(array, dtype):
    if dtype == "keep":
        return np.ascontiguousarray(array)
    if dtype == "bfloat16":
        return bf16_bits(array)
    return np.ascontiguousarray(array.astype(dtype))


VARIANTS = ("auto", "chat", "base")
REVERSE_LAYOUTS = ("baichuan", "llama")  # --reverse --to
DTYPES = ("keep", "float32", "float16", "bfloat16")
QUANTIZE = ("int8", "int4", "int4_asym")  # int4_asym: a float16 minimum per group beside the scale (as q4_1)
METHODS = tuple(dict.fromkeys(SCALE_METHODS + ASYMMETRIC_METHODS))
_NUMPY = {"F32": np.float32, "F16": np.float16}


class _ArraySource:
    """Tensors already in memory (a torch .bin shard) behind SafetensorsFile's reading interface."""

    def __init__(self, pairs):
        self.arrays = dict(pairs)

    def keys(self):
        return list(self.arrays)

    def shape(self, name):
        return tuple(self.arrays[name].shape)

    def dtype(self, name):
        return {np.dtype(np.float16): "F16"}.get(self.arrays[name].dtype, "F32")

    def read_rows(self, name, start, stop):
        array = self.arrays[name]
        return array[start:stop] if array.dtype in (np.float16, np.float32) else array[start:stop].astype(np.float32)


class _OutputFormat:
    """What each output tensor becomes: a float dtype (--dtype), or qweight + scales (--quantize)."""

    def __init__(self, dtype, quantize, group_size, config, scale_method=SCALE_METHODS[0]):
        if dtype not in DTYPES:
            raise ConversionError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if quantize not in (None,) + QUANTIZE:
            raise ConversionError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        self.dtype, self.bits, self.group_size, self.config = dtype, None, group_size, config
        self.scale_method = scale_method
        self.symmetric = quantize != "int4_asym"
        self.tied = config.tie_word_embeddings  # as the source says (describe() unties the output's config)
        if quantize:
            self.bits = 8 if quantize == "int8" else 4
            try:
                check_group_size(self.bits, group_size)
                check_scale_method(scale_method, self.symmetric)
            except ValueError as exc:
                raise ConversionError(f"--group_size / --scale_method: {exc}") from exc

    def quantized(self, name, shape):
        return self.bits is not None and len(shape) == 2 and _QUANTIZED.match(name) is not None

    def float_dtype(self, stored):
        if self.dtype == "keep":
            return stored if stored in _NUMPY else "F32"  # bfloat16 sources are widened to float32 exactly
        return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[self.dtype]

    def normalized(self, name):
        """Baichuan2's lm_head rows are stored L2-normalised in bfloat16 and quantised directories."""
        return (name == "lm_head.weight" and self.config.norm_head
                and (self.bits is not None or self.dtype == "bfloat16"))

    def entries(self, name, stored, shape):
        if self.quantized(name, shape):
            from baichuan2.quantization import qweight_shape, scales_shape  # pylint: disable=import-outside-toplevel
            prefix = name[:-len(".weight")]
            return [(prefix + ".qweight", "I8" if self.bits == 8 else "U8", qweight_shape(*shape, self.bits)),
                    (prefix + ".scales", "F16", scales_shape(*shape, self.group_size))] + \
                ([] if self.symmetric else [(prefix + ".mins", "F16", scales_shape(*shape, self.group_size))])
        return [(name, self.float_dtype(stored), shape)]

    def write(self, writer, name, source, source_name, start, stop):
        """Streams rows [start, stop) of `source_name` into `writer` as the tensor(s) of `name`."""
        stored, shape = source.dtype(source_name), (stop - start,) + source.shape(source_name)[1:]
        quantized, normalized = self.quantized(name, shape), self.normalized(name)
        out = self.float_dtype(stored)
        step = max(1, _CHUNK_ELEMENTS // max(1, int(np.prod(shape[1:], dtype=np.int64))))
        scales, mins = [], []
        for first in range(start, stop, step):
            block = source.read_rows(source_name, first, min(stop, first + step))
            if stored == out and not quantized and not normalized:
                writer.write(block)  # same dtype: bytes copied as they are (bfloat16 never goes through float32)
                continue
            block = from_bf16_bits(block) if stored == "BF16" else block.astype(np.float32)
            if normalized:
                block = l2_normalize_rows(block)
            if quantized:
                qweight, *block_scales = quantize_rows(block, self.bits, self.group_size, self.scale_method,
                                                       symmetric=self.symmetric)
                writer.write(qweight)
                scales.append(block_scales[0])
                mins.extend(block_scales[1:])
            else:
                writer.write(bf16_bits(block) if out == "BF16" else block.astype(_NUMPY[out]))
        for parts in ([scales] + ([mins] if not self.symmetric else [])) if quantized else ():
            writer.write(np.concatenate(parts) if parts else np.zeros((0,), np.float16))

    def describe(self, config):
        """Sets the config fields that tell the model how its weights are stored."""
        config.torch_dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(self.dtype, "float32")
        config.tie_word_embeddings = False  # a tied source's head is written out as lm_head (_forward_shard)
        config.quantization_config = None if self.bits is None else {
            "quant_method": "rtn", "bits": self.bits, "group_size": self.group_size, "sym": self.symmetric,
            "scale_method": self.scale_method, "embed_tokens": True, "lm_head": True}


def _forward_shard(shard_path, reader, target, config, checker, out_format):
    """One Hugging Face shard -> one output shard, tensor by tensor and block by block; returns the names written."""
    source = SafetensorsFile(shard_path) if reader is read_safetensors else _ArraySource(reader(shard_path))
    h, jobs = config.hidden_size, []  # (our name, source name, first row, end row)
    tied = out_format.tied  # the head is the embedding: written out from it, any stored copy ignored
    for name in source.keys():
        if _DERIVED.search(name) or (tied and name == "lm_head.weight"):
            continue
        shape = source.shape(name)
        checker.check(name, shape)  # input names against the input layout
        match = _WPACK.match(name)
        if match and shape == (3 * h, h):
            jobs += [(match.group(1) + f"{x}_proj.weight", name, j * h, (j + 1) * h) for j, x in enumerate("qkv")]
        elif shape:
            jobs.append((name, name, 0, shape[0]))
            if tied and name == "model.embed_tokens.weight":
                checker.check("lm_head.weight", shape)
                jobs.append(("lm_head.weight", name, 0, shape[0]))
    entries = []
    for out_name, name, first, end in jobs:
        entries += out_format.entries(out_name, source.dtype(name), (end - first,) + source.shape(name)[1:])
    if not entries:
        return []
    with SafetensorsWriter(target, entries, {"format": "np"}) as writer:
        for out_name, name, first, end in jobs:
            out_format.write(writer, out_name, source, name, first, end)
    return [entry[0] for entry in entries]


def _reverse_shard(shard_path, reader, target, config, checker, pending_qkv, dtype):
    out_tensors = {}
    for name, array in reader(shard_path):
        if _DERIVED.search(name):
            continue
        checker.check(name, array.shape)  # input names against the input layout
        for out_name, out_array in _ours_to_hf(name, array, config, pending_qkv):
            out_tensors[out_name] = _cast(out_array, dtype)
    if out_tensors:
        save_tensors(target, out_tensors, {"format": "pt"}, bf16_names=out_tensors if dtype == "bfloat16" else ())
    return list(out_tensors)


def convert(input_path, output_path, reverse=False, dtype="keep", overwrite=False, show_progress=True,
            variant="auto", quantize=None, group_size=DEFAULT_GROUP_SIZE, to="baichuan",
            scale_method=SCALE_METHODS[0]):
    """Converts a checkpoint directory; returns the config. See the module docstring."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    if to not in REVERSE_LAYOUTS:
        raise ConversionError(f"--to must be one of {REVERSE_LAYOUTS}, got {to!r}")
    if to == "llama" and not reverse:
        raise ConversionError("--to llama applies to --reverse (one of our directories -> a Llama directory)")

    if not os.path.isfile(os.path.join(input_path, "config.json")):
        raise ConversionError(f"{input_path} has no config.json: pass the checkpoint directory as --input_path")
    if os.path.exists(output_path) and not overwrite:
        raise ConversionError(f"{output_path} already exists; pass --overwrite to replace it")
    if variant not in VARIANTS:
        raise ConversionError(f"variant must be one of {VARIANTS}, got {variant!r}")
    config = BaichuanConfig.from_hf_config(input_path)
    if config.quantization_config is not None:
        raise ConversionError(f"{input_path} holds quantised weights ({config.weight_format()}); the original "
                              "weights cannot be recovered from it: convert from the Hugging Face checkpoint instead")
    if reverse and quantize:
        raise ConversionError("--quantize applies to the forward conversion only, not with --reverse")
    if to == "llama":  # export_llama.py: the whole --reverse --to llama path
        from baichuan2.export_llama import export_llama  # pylint: disable=import-outside-toplevel
        try:
            return export_llama(input_path, output_path, dtype=dtype, overwrite=overwrite,
                                show_progress=show_progress)
        except ValueError as exc:  # its ConversionError is baichuan2.convert_weight's, not this file's as __main__
            raise ConversionError(str(exc)) from exc
    out_format = _OutputFormat(dtype, quantize, group_size, config, scale_method)
    ours = is_our_model_dir(input_path)  # forward from one of ours: q/k/v already split, chat settings kept
    if not reverse and (not ours or variant != "auto"):
        _apply_variant(config, input_path, variant)
    shards = checkpoint_shards(input_path)
    checker = _Checker(expected_shapes(config, hf_layout=not reverse and not ours), input_path)

    def write_weights(directory):
        """Each input shard as one output shard in `directory` (with an index when there are several)."""
        weight_map, pending_qkv = {}, {}
        for number, (shard_path, reader) in enumerate(
                tqdm(shards, desc="converting shards", unit="shard", disable=not show_progress), start=1):
            file_name = ("model.safetensors" if len(shards) == 1
                         else f"model-{number:05d}-of-{len(shards):05d}.safetensors")
            target = os.path.join(directory, file_name)
            if reverse:
                written = _reverse_shard(shard_path, reader, target, config, checker, pending_qkv, dtype)
            else:
                written = _forward_shard(shard_path, reader, target, config, checker, out_format)
            weight_map.update({name: file_name for name in written})
        if pending_qkv:
            checker.problems += [f"incomplete q/k/v for {p}: only {sorted(v)}" for p, v in pending_qkv.items()]
        checker.finish()
        if len(shards) > 1:
            total = sum(os.path.getsize(os.path.join(directory, f)) for f in set(weight_map.values()))
            with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                          indent=2)

    if not reverse:
        out_format.describe(config)
        write_servable_dir(output_path, config, weights=write_weights, tokenizer_dir=input_path, replace=overwrite)
        return config
    with atomic_dir(output_path, replace=overwrite) as tmp_dir:  # a Hugging Face checkpoint, not one of ours
        write_weights(tmp_dir)
        hf_config = to_hf_config(config)
        if dtype in ("bfloat16", "float16"):
            hf_config["torch_dtype"] = dtype
        with open(os.path.join(tmp_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
        if config.user_token_id is not None:  # a Chat model: its generation_config.json, as Chat ships it
            write_generation_config(tmp_dir, config)
        _copy_tokenizer(input_path, tmp_dir)
        write_model_card(tmp_dir, config, layout="baichuan", source=input_path,
                         dtype=dtype if dtype in ("bfloat16", "float16") else "float32")
    return config


def is_our_model_dir(model_dir):
    """True for a model directory this suite wrote (its config.json names the family), False for a Hugging Face
    checkpoint."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return "family" in json.load(f)


def _source_generation_config(model_dir):
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def chat_variant(model_dir):
    """True when a Baichuan2 checkpoint directory is a Chat model (see the module docstring, "auto")."""
    if "user_token_id" in _source_generation_config(model_dir):
        return True
    return "chat" in os.path.basename(os.path.normpath(os.path.abspath(model_dir))).lower()


def _apply_variant(config, model_dir, variant):
    """Sets chat_format and role ids for Baichuan2 Base / Chat; other families keep their preset's."""
    if config.chat_format != "baichuan2":
        return
    if variant == "base" or (variant == "auto" and not chat_variant(model_dir)):
        config.chat_format, config.user_token_id, config.assistant_token_id = None, None, None
        return
    _read_role_tokens(config, model_dir)


def _read_role_tokens(config, model_dir):
    """Chat role ids are not in a Hugging Face config.json: Baichuan2-Chat keeps them in generation_config.json;
    otherwise look `<reserved_106>`/`<reserved_107>` up in the checkpoint's tokenizer."""
    generation = _source_generation_config(model_dir)
    if "user_token_id" in generation:
        config.user_token_id = generation["user_token_id"]
        config.assistant_token_id = generation["assistant_token_id"]
        return
    sp_file = os.path.join(model_dir, "tokenizer.model")
    if config.chat_format == "baichuan2" and os.path.isfile(sp_file):
        import sentencepiece  # pylint: disable=import-outside-toplevel
        sp = sentencepiece.SentencePieceProcessor(model_file=sp_file)
        ids = [sp.piece_to_id(p) for p in ("<reserved_106>", "<reserved_107>")]
        if sp.unk_id() not in ids:
            config.user_token_id, config.assistant_token_id = ids


def _ours_to_hf(name, array, config, pending):
    """One of our tensors -> list of (HF name, array); q/k/v are held back until all three are there."""
    match = _QKV.match(name)
    if not (match and config.fused_qkv):
        return [(name, array)]
    parts = pending.setdefault(match.group(1), {})
    parts[match.group(2)] = array
    if len(parts) < 3:
        return []
    del pending[match.group(1)]
    return [(match.group(1) + "W_pack.weight", np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0))]


def _copy_tokenizer(src, dst):
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    # the module tokenizer_config.json's auto_map names comes along (it runs on transformers alone), so
    # AutoTokenizer.from_pretrained(dst, trust_remote_code=True) finds what it is told to load
    path = os.path.join(dst, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            auto = (json.load(f).get("auto_map") or {}).get("AutoTokenizer") or []
        here = os.path.dirname(os.path.abspath(__file__))
        for module in {entry.split(".")[0] for entry in auto if entry}:
            if os.path.isfile(os.path.join(here, module + ".py")):
                shutil.copy2(os.path.join(here, module + ".py"), os.path.join(dst, module + ".py"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_path", required=True, help="checkpoint directory to read")
    parser.add_argument("--output_path", required=True, help="directory to create")
    parser.add_argument("--reverse", "--reversed", action="store_true", dest="reverse",
                        help="our model directory -> Hugging Face layout (--reversed: MindFormers' spelling)")
    parser.add_argument("--to", default="baichuan", choices=REVERSE_LAYOUTS,
                        help="with --reverse: baichuan (the Hugging Face Baichuan/XVERSE layout, default) or llama "
                             "(a native LlamaForCausalLM directory, NormHead folded; not Baichuan2-13B)")
    parser.add_argument("--dtype", default="keep", choices=DTYPES,
                        help="weight dtype to write (keep: as the source, bfloat16 sources widened to float32)")
    parser.add_argument("--quantize", choices=QUANTIZE, default=None,
                        help="weight-only round-to-nearest quantisation of projections, embedding and lm_head "
                             "(int4_asym: 4 bits with a minimum per group beside the scale; 0.5 bit a weight more)")
    parser.add_argument("--group_size", type=int, default=DEFAULT_GROUP_SIZE,
                        help="input elements sharing one scale with --quantize (int4: a multiple of 32)")
    parser.add_argument("--scale_method", choices=METHODS, default=SCALE_METHODS[0],
                        help="--quantize's per-group scales: search (least squared error, the default); the plain "
                             "rules absmax (absmax / qmax; int8, int4) and minmax (int4_asym)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_path")
    parser.add_argument("--variant", default="auto", choices=VARIANTS,
                        help="Baichuan2 Chat or Base defaults (auto: chat when the source's generation_config.json "
                             "has user_token_id or its directory name contains 'chat')")
    args = parser.parse_args(argv)
    try:
        config = convert(args.input_path, args.output_path, reverse=args.reverse, dtype=args.dtype,
                         overwrite=args.overwrite, variant=args.variant, quantize=args.quantize,
                         group_size=args.group_size, to=args.to, scale_method=args.scale_method)
    except (ConversionError, FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
        print(f"convert_weight.py: error: {exc}", file=sys.stderr)
        return 2
    kind = "" if args.reverse else (", chat" if config.chat_format else ", base")
    print(f"wrote {args.output_path} ({config.family}{kind}, {config.num_parameters():,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
