"""Reading and writing safetensors files tensor by tensor (and row range by row range), bfloat16 included.

The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw data.
Our own reader and writer because (1) numpy has no bfloat16, so BF16 tensors travel as uint16 bit patterns, and
(2) streaming: a tensor's rows can be read without reading the whole tensor, and a file can be written tensor by
tensor (the header is known up front from the shapes), so nothing needs a whole shard in memory.

Pure numpy; copied into model directories with modeling_baichuan.py, which uses it to load weights.
"""
import json
import os
import struct

import numpy as np

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
                "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Header of one safetensors file; tensors are read on demand (plain reads, no memory map, so only what is
    asked for becomes resident)."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise ValueError(f"{path} is not a safetensors file (header length {length})")
            header = json.loads(f.read(length))
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + length
        self.entries = header
        for name, info in header.items():
            if info["dtype"] not in NUMPY_DTYPES:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")

    def keys(self):
        """Tensor names in file order."""
        return sorted(self.entries, key=lambda n: self.entries[n]["data_offsets"][0])

    def dtype(self, name):
        """The safetensors dtype string ("F32", "BF16", "I8", ...)."""
        return self.entries[name]["dtype"]

    def shape(self, name):
        return tuple(self.entries[name]["shape"])

    def read(self, name):
        """The whole tensor as numpy in its stored dtype (BF16 as uint16 bits)."""
        shape = self.shape(name)
        return self.read_rows(name, 0, shape[0]) if shape else self._read(name, 0, 1).reshape(())

    def read_rows(self, name, start, stop):
        """Rows [start, stop) of the tensor (first dimension)."""
        shape = self.shape(name)
        row = int(np.prod(shape[1:], dtype=np.int64))
        return self._read(name, start * row, (stop - start) * row).reshape((stop - start,) + shape[1:])

    def _read(self, name, first, count):
        info = self.entries[name]
        dtype = np.dtype(NUMPY_DTYPES[info["dtype"]])
        begin = self.base + info["data_offsets"][0] + first * dtype.itemsize
        out = np.empty(count, dtype)
        with open(self.path, "rb") as f:
            f.seek(begin)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise ValueError(f"{self.path}: tensor {name} is truncated")
        return out


def dtype_name(array_dtype, bf16=False):
    """safetensors dtype string of a numpy dtype (uint16 means BF16 when `bf16`)."""
    if bf16 and np.dtype(array_dtype) == np.uint16:
        return "BF16"
    for name, dtype in NUMPY_DTYPES.items():
        if name != "BF16" and np.dtype(dtype) == np.dtype(array_dtype):
            return name
    raise ValueError(f"no safetensors dtype for numpy {array_dtype}")


class SafetensorsWriter:
    """Writes one file from a declared list of (name, dtype string, shape); data is then appended in that order,
    in as many pieces as wanted. `close()` checks every byte arrived, flushes and fsyncs."""

    def __init__(self, path, entries, metadata=None):
        self.path, self.entries = path, list(entries)
        header, offset = {}, 0
        for name, dtype, shape in self.entries:
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.total = offset
        self.written = 0
        self.file = open(path, "wb")  # pylint: disable=consider-using-with
        self.file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, array):
        data = np.ascontiguousarray(array)
        self.file.write(memoryview(data).cast("B"))
        self.written += data.nbytes

    def close(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.written != self.total:
            raise ValueError(f"{self.path}: wrote {self.written} bytes of tensor data, the header declares "
                             f"{self.total}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.file.close()


def save_tensors(path, tensors, metadata=None, bf16_names=()):
    """Writes a dict name -> numpy array (uint16 arrays named in `bf16_names` are stored as BF16)."""
    entries = [(n, dtype_name(a.dtype, bf16=n in bf16_names), a.shape) for n, a in tensors.items()]
    with SafetensorsWriter(path, entries, metadata) as writer:
        for array in tensors.values():
            writer.write(array)
