"""Quantisation quality on real weights: perplexity of a model directory over a text, and llama.cpp's q4_0 / q8_0
rules simulated on the same weights (weight-only, float activations) for comparison.

- `perplexity(model, ids, chunk, first=0)`: exp of the mean next-token loss over consecutive chunks of `chunk`
  tokens, each scored on its own (no context carried over), as llama.cpp's perplexity tool scores its chunks,
  except that every token after a chunk's first is scored (llama.cpp scores the second half only: `first=chunk // 2`
  does the same, each chunk's first half then serving as context).
- `q4_0_rule(w)` / `q8_0_rule(w)`: the dequantised weight llama.cpp's q4_0 / q8_0 blocks of 32 hold (facts from
  its ggml-quants.c: q4_0 d = the block's signed extreme / -8, q = min(15, trunc(x / d + 8.5)) - 8, so all 16 levels
  are used; q8_0 d = absmax / 127, q = round(x / d) half away from zero; d stored as float16).
- `simulated_dir(float_dir, out_dir, rule)`: a copy of a float32 model directory whose quantised tensors (the same
  ones `--quantize` stores: projections, embedding, lm_head) are replaced by `rule(w)`, still float32.
"""
import os
import shutil

import numpy as np

from baichuan2.safetensors_io import SafetensorsFile, save_tensors

_QUANTIZED_SUFFIXES = ("_proj.weight", "embed_tokens.weight", "lm_head.weight")


def _blocks(w, size=32):
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    if cols % size:
        raise ValueError(f"llama.cpp's rules need rows that are whole blocks of {size}; got {cols} columns")
    return w.reshape(rows, cols // size, size)


def q4_0_rule(w):
    """w [out, in] -> the float32 values q4_0 blocks of 32 store for it (see the module docstring)."""
    x = _blocks(w)
    pick = np.abs(x).argmax(axis=2)[..., None]
    d = np.take_along_axis(x, pick, axis=2) / -8.0
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1.0), 0.0).astype(np.float32)
    q = np.minimum(15.0, np.trunc(x * inv + 8.5)) - 8.0
    return (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def q8_0_rule(w):
    """w [out, in] -> the float32 values q8_0 blocks of 32 store for it."""
    x = _blocks(w)
    d = np.abs(x).max(axis=2, keepdims=True) / 127.0
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1.0), 0.0).astype(np.float32)
    v = x * inv
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)  # roundf: half away from zero
    return (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


RULES = {"q4_0": q4_0_rule, "q8_0": q8_0_rule}


def simulated_dir(float_dir, out_dir, rule):
    """Copies the float32 model directory `float_dir` to `out_dir` with `rule` applied to its quantised tensors."""
    shutil.copytree(float_dir, out_dir)
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(out_dir, name)
        reader = SafetensorsFile(path)
        tensors = {}
        for key in reader.keys():
            array = reader.read(key)
            if reader.dtype(key) != "F32":
                raise ValueError(f"{float_dir} is not a float32 model directory ({key} is {reader.dtype(key)})")
            tensors[key] = rule(array).astype(np.float32) if key.endswith(_QUANTIZED_SUFFIXES) else array
        del reader
        save_tensors(path + ".tmp", tensors, {"format": "np"})
        os.replace(path + ".tmp", path)


def perplexity(model, ids, chunk, first=0):
    """exp(mean next-token loss) of `model` (a loaded BaichuanForCausalLM) over len(ids) // chunk chunks, scoring
    in each chunk the tokens after position `first` (0: all but the chunk's first token)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    ids = np.asarray(ids, np.int32)
    chunks = len(ids) // chunk
    if chunks == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of {chunk}")
    total, count = 0.0, 0
    for c in range(chunks):
        piece = ids[c * chunk:(c + 1) * chunk][None]
        logits = model(ms.Tensor(piece), attention_mask=ms.Tensor(np.ones_like(piece))).asnumpy()[0]
        logits = logits[first:-1].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        total += float((log_norm - logits[np.arange(chunk - 1 - first), piece[0, first + 1:]]).sum())
        count += chunk - 1 - first
    return float(np.exp(total / count))
