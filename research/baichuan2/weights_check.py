"""Damaged weights files -> one clear error naming the file and the problem (WeightsFileError).

A truncated, zeroed or missing safetensors file otherwise surfaces as a raw `SafetensorError: incomplete metadata`
(or worse, loads and serves garbage). These checks read only each file's header and size, so they cost nothing next
to the load itself:

    weight_files(path)           the safetensors files of a model directory (single or sharded) or one file
    check_safetensors(file)      the header parses, every tensor lies inside the file, nothing is missing at the end
    check_weights(path)          every weights file of a model directory or one file
    check_config(model_dir)      config.json is there and parses as a JSON object
    check_config_matches(...)    config.json's sizes agree with the weights' shapes (else config.json is named)
    check_model_dir(path)        all of the above: what every loader runs first

Loading itself (tensor by tensor, names and shapes checked) is weights_io.py. Corruption that keeps the structure
intact (flipped bits inside a tensor) is invisible to a header check: finetune checkpoints carry sha256 checksums for
that (training/checkpoint.py, manifest.json). Standard library only; copied into model directories
(model_dir.MODEL_CODE_FILES), where weights_io.py and so BaichuanForCausalLM.from_pretrained use it.
"""
import hashlib
import json
import os
import struct

# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class WeightsFileError(ValueError):
    """A weights (or config) file that is missing, truncated or damaged. str() is one line naming the file."""

    def __init__(self, path, problem):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


def check_safetensors(path):
    """Checks the structure of one safetensors file; returns its header (dict) or raises WeightsFileError."""
    if not os.path.exists(path):
        raise WeightsFileError(path, "file is missing")
    if not os.path.isfile(path):
        raise WeightsFileError(path, "is not a regular file")
    size = os.path.getsize(path)
    if size < 8:
        raise WeightsFileError(path, f"file is {size} bytes, too short to be safetensors (truncated or empty)")
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len == 0 or header_len > _MAX_HEADER:
                raise WeightsFileError(path, f"header length {header_len} is invalid (the file is zeroed or is not "
                                             "safetensors)")
            if 8 + header_len > size:
                raise WeightsFileError(path, f"file is {size} bytes but its header alone needs {8 + header_len} "
                                             "(truncated)")
            raw = f.read(header_len)
    except OSError as e:
        raise WeightsFileError(path, f"cannot be read ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsFileError(path, f"header is not valid JSON ({e}); the file is damaged") from e
    data_len = size - 8 - header_len
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsFileError(path, f"header entry of tensor {name!r} is malformed; the file is damaged") from e
        if not 0 <= begin <= stop:
            raise WeightsFileError(path, f"tensor {name!r} has invalid offsets {begin}..{stop}; the file is damaged")
        if stop > data_len:
            raise WeightsFileError(path, f"file is {size} bytes but tensor {name!r} ends at byte "
                                         f"{8 + header_len + stop} (truncated)")
        if dtype in _DTYPE_BYTES:
            count = 1
            for d in shape:
                count *= d
            if count * _DTYPE_BYTES[dtype] != stop - begin:
                raise WeightsFileError(path, f"tensor {name!r} ({dtype} {shape}) spans {stop - begin} bytes, "
                                             f"expected {count * _DTYPE_BYTES[dtype]}; the file is damaged")
        end = max(end, stop)
    if end != data_len:
        raise WeightsFileError(path, f"file is {size} bytes, its header describes {8 + header_len + end}; "
                                     "the file is damaged")
    return header


def weight_files(path):
    """The safetensors files of a model directory (model.safetensors, or the shards model.safetensors.index.json
    names) or [path] for a file; a missing directory, weights file or index, or a damaged index: WeightsFileError."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise WeightsFileError(path, "does not exist")
    index = os.path.join(path, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsFileError(index, f"cannot be read as a weights index ({type(e).__name__}: {e})") from e
        return [os.path.join(path, s) for s in shards]
    if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        return [os.path.join(path, WEIGHTS_NAME)]
    raise WeightsFileError(path, f"no weights in the directory: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} "
                                 "(convert a Hugging Face checkpoint with convert_weight.py first)")


def check_weights(path):
    """Checks every weights file of a model directory (or one .safetensors file); returns the list of files."""
    files = weight_files(path)
    for file in files:
        check_safetensors(file)
    return files


def read_json_file(path):
    """A JSON file's contents, or WeightsFileError saying it is missing or damaged."""
    if not os.path.isfile(path):
        raise WeightsFileError(path, "file is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsFileError(path, f"is not valid JSON ({e}); the file is damaged") from e
    except OSError as e:
        raise WeightsFileError(path, f"cannot be read ({e.strerror or e})") from e


def check_config(model_dir):
    """A model directory's config.json, parsed (a dict); WeightsFileError when the directory or file is missing or
    the file is damaged."""
    if not os.path.isdir(model_dir):
        raise WeightsFileError(model_dir, "model directory does not exist")
    path = os.path.join(model_dir, "config.json")
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise WeightsFileError(path, "is not a JSON object; the file is damaged")
    return data


def _rows(shapes, module):
    """Output rows of a stored module: its .weight's, or (int8/int4) its .qweight's first dimension."""
    for suffix in (".weight", ".qweight"):
        shape = shapes.get(module + suffix)
        if shape:
            return shape[0], f"{module}{suffix} {shape}"
    return None, None


def check_config_matches(config_path, config, shapes):
    """config.json's sizes against the tensor shapes ({name: shape}) of the weights beside it: a config that does not
    belong to the weights is one WeightsFileError naming config.json and each disagreement (not a list of every
    mis-shaped tensor when loading)."""
    found = []
    norm = shapes.get("model.norm.weight")
    if norm:
        found.append(("hidden_size", norm[-1], f"model.norm.weight {norm}"))
    layers = {int(n.split(".")[2]) for n in shapes if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    if layers:
        found.append(("num_hidden_layers", max(layers) + 1, f"layers 0..{max(layers)}"))
    for key, module in (("vocab_size", "model.embed_tokens"), ("intermediate_size", "model.layers.0.mlp.gate_proj")):
        rows, what = _rows(shapes, module)
        if rows is not None:
            found.append((key, rows, what))
    problems = [f"{key} is {config[key]} but the weights have {what}" for key, value, what in found
                if isinstance(config.get(key), int) and config[key] != value]
    if problems:
        raise WeightsFileError(config_path, f"disagrees with the weights beside it: {'; '.join(problems)}; this "
                                            "config.json does not belong to these weights (restore the one written "
                                            "with them)")


def check_model_dir(model_dir):
    """A model directory's config.json and weights files, checked, and config.json's sizes against the weights'
    shapes; returns the weights files or raises WeightsFileError naming the bad file."""
    config = check_config(model_dir)
    files = weight_files(model_dir)
    shapes = {}
    for file in files:
        shapes.update((name, [int(d) for d in info["shape"]]) for name, info in check_safetensors(file).items()
                      if name != "__metadata__")
    check_config_matches(os.path.join(model_dir, "config.json"), config, shapes)
    return files


def sha256_file(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
