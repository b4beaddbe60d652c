"""Damaged weights files -> one clear error naming the file and the problem (WeightsFileError).

A truncated, zeroed or missing safetensors file otherwise surfaces as a raw `SafetensorError: incomplete metadata`
(or worse, loads and serves garbage). These checks read only each file's header and size, so they cost nothing next
to the load itself:

    check_safetensors(file)      the header parses, every tensor lies inside the file, nothing is missing at the end
    check_weights(path)          every weights file of a model directory (single or sharded) or one file
    check_model_dir(path)        config.json parses + check_weights
    load_weights_checked(model, path)   check_weights, then modeling_baichuan.load_safetensors_into

Corruption that keeps the structure intact (flipped bits inside a tensor) is invisible to a header check: finetune
checkpoints carry sha256 checksums for that (training/checkpoint.py, manifest.json). This module is not copied into
model directories; the model code (modeling_baichuan.py) does not import it.
"""
import hashlib
import json
import os
import struct

# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


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


def weights_files_of(path):
    """The safetensors files of a model directory or weights file (modeling_baichuan.weight_files), with a missing
    or unreadable index or weights file turned into WeightsFileError."""
    from .modeling_baichuan import weight_files  # pylint: disable=import-outside-toplevel
    if not os.path.exists(path):
        raise WeightsFileError(path, "does not exist")
    try:
        return weight_files(path)
    except FileNotFoundError as e:
        raise WeightsFileError(path, str(e).replace(f"{path!r}", "the directory")) from e
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged model.safetensors.index.json
        index = [n for n in os.listdir(path) if n.endswith(".index.json")] if os.path.isdir(path) else []
        where = os.path.join(path, index[0]) if index else path
        raise WeightsFileError(where, f"cannot be read as a weights index ({type(e).__name__}: {e})") from e


def check_weights(path):
    """Checks every weights file of a model directory (or one .safetensors file); returns the list of files."""
    files = weights_files_of(path)
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


def check_model_dir(model_dir):
    """A model directory's config.json and weights files, checked; raises WeightsFileError naming the bad file."""
    if not os.path.isdir(model_dir):
        raise WeightsFileError(model_dir, "model directory does not exist")
    if not isinstance(read_json_file(os.path.join(model_dir, "config.json")), dict):
        raise WeightsFileError(os.path.join(model_dir, "config.json"), "is not a JSON object; the file is damaged")
    return check_weights(model_dir)


def load_weights_checked(model, path, strict=True):
    """check_weights(path), then load_safetensors_into(model, path): a damaged file raises WeightsFileError (one
    line); mismatched names or shapes still raise load_safetensors_into's ValueError."""
    from .modeling_baichuan import load_safetensors_into  # pylint: disable=import-outside-toplevel
    from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
    files = check_weights(path)
    try:
        load_safetensors_into(model, path, strict=strict)
    except (OSError, SafetensorError) as e:  # damage the header check cannot see, or a read failing mid-way
        raise WeightsFileError(files[0] if len(files) == 1 else path, f"cannot be read ({e})") from e
    return model


def sha256_file(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
