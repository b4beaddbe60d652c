"""A model's parameters <-> safetensors files, one tensor at a time: the one loader and the one writer of weights.

    load_weights_checked(model, path)   weights_check.check_weights, then load_safetensors_into: what every loader
                                        runs (BaichuanForCausalLM.load_weights / from_pretrained, so the openmind
                                        pipeline, runtime.load_model_dir, merge_lora, finetune's --load_checkpoint)
    load_safetensors_into(model, path)  copies each stored tensor into its parameter, names, shapes and dtypes
                                        checked; a file that fails mid-read: WeightsFileError naming it
    save_parameters(model, file)        every parameter into one safetensors file in its stored format (bfloat16
                                        bits, int8 / int4 codes), one tensor in memory at a time

Each tensor is read in its stored dtype and handed to its parameter as it is: bfloat16 weights go into bfloat16
parameters bit for bit, and no float32 copy of bfloat16 / int8 / int4 weights is made.

Copied into model directories (model_dir.MODEL_CODE_FILES): modeling_baichuan.py imports it, and it imports only
flat modules that never import modeling_baichuan (mindformers' trust_remote_code copier loops on an import cycle).
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindspore.common import np_dtype

from .quantization import bf16_bits, from_bf16_bits
from .safetensors_io import SafetensorsFile, SafetensorsWriter
from .weights_check import WeightsFileError, check_weights, weight_files

# The safetensors dtype each parameter dtype is stored as; uint16 parameters hold bfloat16 bits (Embedding).
SAFETENSORS_DTYPE = {ms.float32: "F32", ms.float16: "F16", ms.bfloat16: "BF16", ms.uint16: "BF16",
                     ms.int8: "I8", ms.uint8: "U8"}


def parameter_tensor(array, stored, param):
    """A numpy tensor read from a file (dtype `stored`, BF16 as uint16 bits) as a Tensor of `param`'s dtype, or
    None when it cannot be (an int8/int4 tensor needs exactly the parameter's integer dtype)."""
    if param.dtype in (ms.bfloat16, ms.uint16):  # bfloat16 bits, exactly as stored when stored as BF16
        bits = array if stored == "BF16" else bf16_bits(array.astype(np.float32))
        return Tensor(bits.view(np_dtype.bfloat16)) if param.dtype == ms.bfloat16 else Tensor(bits)
    if param.dtype in (ms.int8, ms.uint8):
        return Tensor(array) if SAFETENSORS_DTYPE[param.dtype] == stored else None
    if stored == "BF16":
        array = from_bf16_bits(array)
    return Tensor(array).astype(param.dtype)


def _unreadable(file, error):
    """A read that failed after the header check passed (the file changed, or an I/O error) as WeightsFileError."""
    problem = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    if problem.startswith(f"{file}: "):
        problem = problem[len(file) + 2:]
    return WeightsFileError(file, f"cannot be read ({problem})")


def load_safetensors_into(model, path, strict=True, files=None):
    """Copies the safetensors tensors of `path` (a model directory or one file; `files`: its weight files when the
    caller has them already) into the model's parameters one by one, checking names, shapes and (for quantised
    weights) dtypes. bfloat16 tensors go into bfloat16 parameters bit for bit.

    Raises ValueError listing every missing, unexpected or mis-shaped tensor (with expected and found shapes), and
    WeightsFileError naming a file that cannot be read.
    """
    params = {p.name: p for p in model.get_parameters()}
    seen, unexpected, wrong_shape = set(), [], []
    for file in files or weight_files(path):
        try:
            reader = SafetensorsFile(file)
            names = reader.keys()
        except (OSError, ValueError) as e:
            raise _unreadable(file, e) from e
        for name in names:
            if name not in params:
                unexpected.append(name)
                continue
            param = params[name]
            if reader.shape(name) != tuple(param.shape):
                wrong_shape.append(f"{name}: expected {tuple(param.shape)}, found {reader.shape(name)}")
                continue
            try:
                array = reader.read(name)
            except (OSError, ValueError) as e:
                raise _unreadable(file, e) from e
            tensor = parameter_tensor(array, reader.dtype(name), param)
            if tensor is None:
                wrong_shape.append(f"{name}: expected dtype {SAFETENSORS_DTYPE[param.dtype]}, found "
                                   f"{reader.dtype(name)} (is config.json's quantization_config the one the "
                                   "weights were made with?)")
                continue
            param.set_data(tensor)
            seen.add(name)
    missing = sorted(set(params) - seen - {w.split(":")[0] for w in wrong_shape})
    problems = []
    if wrong_shape:
        problems.append("mis-shaped tensors:\n  " + "\n  ".join(wrong_shape))
    if missing and strict:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected and strict:
        problems.append("unexpected tensors: " + ", ".join(sorted(unexpected)))
    if problems:
        raise ValueError(f"weights in {path!r} do not match the model "
                         f"({model.config.family}, hidden {model.config.hidden_size}):\n" + "\n".join(problems))
    return model


def load_weights_checked(model, path, strict=True):
    """check_weights(path), then load_safetensors_into(model, path): a missing or damaged file raises
    WeightsFileError (one line naming it); mismatched names or shapes raise load_safetensors_into's ValueError."""
    return load_safetensors_into(model, path, strict=strict, files=check_weights(path))


def save_parameters(model, path, metadata=None):
    """Every parameter of `model` into the safetensors file `path` under its name, in its own dtype (bfloat16 as
    BF16, int8 / int4 codes as I8 / U8), one tensor in memory at a time; the file is fsynced when closed."""
    params = list(model.get_parameters())
    entries = [(p.name, SAFETENSORS_DTYPE[p.dtype], tuple(p.shape)) for p in params]
    with SafetensorsWriter(path, entries, metadata or {"format": "np"}) as writer:
        for p in params:
            array = p.asnumpy()
            writer.write(array.view(np.uint16) if p.dtype == ms.bfloat16 else array)
    return path
