"""A BaichuanForCausalLM with random weights, built directly in a stored weight format (float32, bfloat16, int8,
int4 or int4_asym): for benchmarks (example/bench_generate.py) and tests of the kernels, where only the shapes and
the format matter.

The parameters are created uninitialised (MindSpore's `no_init_parameters`, as `from_pretrained` does) and each is
filled in its stored dtype, block by block: no float32 copy of a bfloat16 / int8 / int4 model ever exists, so a
7B-shaped model costs what its stored weights cost. int8 / int4 use quantization.py's layout with its default group
size.
"""
from .kernels import FORMATS
from .quantization import DEFAULT_GROUP_SIZE

WEIGHT_FORMATS = FORMATS + ("int4_asym",)  # the kernels' formats; int4_asym: int4 with a minimum per group


def stored_format_fields(weights, group_size=DEFAULT_GROUP_SIZE):
    """The config fields that declare weights stored in format `weights` (as convert_weight.py writes them)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights == "bfloat16":
        return {"torch_dtype": "bfloat16"}
    if weights in ("int8", "int4", "int4_asym"):
        return {"quantization_config": {"quant_method": "rtn", "bits": 8 if weights == "int8" else 4,
                                        "group_size": group_size, "sym": weights != "int4_asym",
                                        "scale_method": "search"}}
    return {}


def random_array(param, rng, block_rows=8192):
    """Random values in `param`'s stored dtype and shape, made block by block (no float32 copy of a big tensor):
    float32 ~ N(0, 0.02) (norm weights 1); bfloat16 bit patterns of +-[2^-8, 2^-4); int8 q in [-127, 127];
    int4 packed bytes (any value is valid); float16 scales that give the dequantised weights ~0.02 magnitude (and
    int4_asym's minimums, -8 times such a scale)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    shape = tuple(param.shape)
    if param.dtype == ms.float32:
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= 0.02
        return out
    if param.dtype in (ms.bfloat16, ms.uint16):
        out = np.empty(shape, np.uint16)
        for start in range(0, shape[0], block_rows):
            part = out[start:start + block_rows]
            part[...] = rng.integers(0, 2, part.shape, dtype=np.uint16) << 15  # sign
            part |= rng.integers(119, 123, part.shape, dtype=np.uint16) << 7  # exponent: 2^-8 .. 2^-5
            part |= rng.integers(0, 128, part.shape, dtype=np.uint16)  # mantissa
        return out
    if param.dtype == ms.int8:
        return rng.integers(-127, 128, shape, dtype=np.int8)
    if param.dtype == ms.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if param.dtype == ms.float16:  # int8 q ~ 73 rms, int4 q ~ 4.6: either way weights of ~0.02 are fine
        values = rng.random(shape, dtype=np.float32) * 2e-3 + 1e-4
        return (values * (-8.0 if param.name.endswith("mins") else 1.0)).astype(np.float16)
    raise TypeError(f"no random fill for parameter {param.name} of dtype {param.dtype}")


def build_random_model(fields, weights, compute_dtype="float32", seed=0, group_size=DEFAULT_GROUP_SIZE,
                       backend="auto", preset="baichuan2_7b"):
    """BaichuanForCausalLM of `preset` with the config fields `fields` (its shape: hidden_size,
    num_hidden_layers, ...), random weights stored in format `weights`, built for inference on `backend`
    (modeling_baichuan.select_backend)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore.common import np_dtype  # pylint: disable=import-outside-toplevel
    from mindspore.nn.utils import no_init_parameters  # pylint: disable=import-outside-toplevel
    from .configuration_baichuan import BaichuanConfig  # pylint: disable=import-outside-toplevel
    from .modeling_baichuan import BaichuanForCausalLM  # pylint: disable=import-outside-toplevel

    config = BaichuanConfig.from_preset(preset, compute_dtype=compute_dtype, **fields,
                                        **stored_format_fields(weights, group_size))
    with no_init_parameters():
        model = BaichuanForCausalLM(config, backend=backend, inference=True)
    rng = np.random.default_rng(seed)
    for param in model.get_parameters():
        array = random_array(param, rng)
        tensor = ms.Tensor(array.view(np_dtype.bfloat16)) if param.dtype == ms.bfloat16 else ms.Tensor(array)
        param.set_data(tensor)
        del array, tensor
    model.weights_changed()
    return model
