"""Running llama.cpp's own tools beside ours: files for them and their figures read back.

llama.cpp itself is built outside the project by scripts/build_llama_cpp.sh (never by `make test`); these helpers
take the bin directory it prints.
- `tool(bin_dir, name)`: the path of one tool, or a LlamaCppError saying how to build it.
- `float_gguf(src, dst)`: a copy of a GGUF file whose tensors are all dequantised to float32 (metadata kept, the
  file type set to all-F32), so llama-quantize can make its q4_0 / q8_0 from exactly the values our float32
  conversion of the same file holds (gguf_checkpoint.py dequantises the same way).
- `quantize(bin_dir, src, dst, qtype)`: `llama-quantize --pure` (every tensor in `qtype`, the embedding included).
- `perplexity(bin_dir, model, text_file, chunk, chunks, threads)`: `llama-perplexity`'s final estimate.
Files are written beside their destination and renamed when complete.
"""
import os
import re
import subprocess

import numpy as np


class LlamaCppError(RuntimeError):
    pass


def tool(bin_dir, name):
    path = os.path.join(bin_dir, name)
    if not os.access(path, os.X_OK):
        raise LlamaCppError(f"{path} is not an executable: pass the bin directory scripts/build_llama_cpp.sh "
                            "printed (build it with that script)")
    return path


def float_gguf(src, dst):
    """Writes `dst`: the GGUF `src` with every tensor dequantised to float32, metadata unchanged but the file type."""
    # pylint: disable=import-outside-toplevel
    import gguf
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = dst + ".partial"
    writer = gguf.GGUFWriter(tmp, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # the header's own fields, written by the writer
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # numpy order: ggml's ne reversed
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        writer.write_tensor_data(np.ascontiguousarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape))
    for fout in writer.fout:
        fout.flush()
        os.fsync(fout.fileno())
    writer.close()
    os.replace(tmp, dst)


def quantize(bin_dir, src, dst, qtype, threads=None):
    """`llama-quantize --pure src dst qtype` (one type for every tensor)."""
    tmp = dst + ".partial"
    argv = [tool(bin_dir, "llama-quantize"), "--pure", src, tmp, qtype] + ([str(threads)] if threads else [])
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not os.path.isfile(tmp):
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LlamaCppError(f"llama-quantize to {qtype} failed (exit {done.returncode}): {last[0]}")
    os.replace(tmp, dst)


_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


def parse_perplexity(output):
    """(perplexity, its +/- estimate, chunks scored, n_ctx) from llama-perplexity's log."""
    final, chunks = _FINAL.search(output), _CHUNKS.search(output)
    if not final or not chunks:
        raise LlamaCppError("llama-perplexity printed no final estimate; its last lines: "
                            + " | ".join(output.strip().splitlines()[-3:]))
    return float(final.group(1)), float(final.group(2)), int(chunks.group(1)), int(chunks.group(2))


def perplexity(bin_dir, model, text_file, chunk, chunks, threads=2):
    """llama-perplexity over the first `chunks` chunks of `chunk` tokens of the text: (ppl, +/-, chunks, n_ctx).

    As llama.cpp scores: each chunk on its own, only its second half's tokens counted (the first half is context),
    the first token replaced by BOS when the vocabulary adds one."""
    argv = [tool(bin_dir, "llama-perplexity"), "-m", model, "-f", text_file, "-c", str(chunk), "-b", str(chunk),
            "--chunks", str(chunks), "-t", str(threads)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LlamaCppError(f"llama-perplexity on {model} failed (exit {done.returncode}): {last[0]}")
    return parse_perplexity(done.stdout + done.stderr)
