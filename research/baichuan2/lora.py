"""LoRA adapters for Baichuan-family models: y = base(x) + (dropout(x) A^T B^T) * alpha / r.

A [r, in] starts kaiming-uniform, B [out, r] at zero, so a fresh adapter leaves the model unchanged.

Why not mindpet (MindSpore's parameter-efficient tuning library, installed with mindformers)? Its `LoRADense` has the
same maths and our [out, in] weight layout, but it accepts only float16/float32 compute (TypeError for bfloat16,
the compute dtype of our Baichuan2 Ascend recipes) and is an `nn.Dense` replacement that would need the base
weight copied in. `LoraLinear` below subclasses our own `Linear` instead, so the frozen base Parameter (and its name)
is reused as is and every compute dtype works.

Targets are projection names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, plus "W_pack", Baichuan's
fused QKV (what Baichuan's own fine-tune script adapts), which in our model means q_proj, k_proj and v_proj.

In the model, adapter parameters are named after the model path, e.g. `model.layers.0.self_attn.q_proj.lora_a`
(A, [r, in]) and `...q_proj.lora_b` (B, [out, r]). On disk an adapter is a directory in Hugging Face PEFT's layout
(adapter_config.json + adapter_model.safetensors, W_pack for Baichuan; see peft_adapter.py for the exact mapping),
so PEFT, vLLM and LLaMA-Factory load ours and ours loads theirs. A plain adapter file with our parameter names and
rank/alpha/targets in its safetensors metadata loads too.
"""
import json
import os

import numpy as np

from . import peft_adapter

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALIASES = {"W_pack": ("q_proj", "k_proj", "v_proj")}
LORA_A, LORA_B = "lora_a", "lora_b"
ADAPTER_FILE = "adapter_model.safetensors"


def resolve_targets(targets):
    """Projection names for a target list (a list or a comma-separated string); W_pack expands to q/k/v."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = []
    for target in targets or []:
        for name in ALIASES.get(target, (target,)):
            if name not in ATTENTION_TARGETS + MLP_TARGETS:
                raise ValueError(f"unknown LoRA target {target!r}; choose from W_pack (= q_proj, k_proj, v_proj), "
                                 f"{', '.join(ATTENTION_TARGETS + MLP_TARGETS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("LoRA needs at least one target projection (e.g. W_pack)")
    return names


def _target_cells(model, names):
    """(parent cell, attribute, Linear) for every targeted projection of every layer."""
    found = []
    for layer in model.model.layers:
        for name in names:
            parent = layer.self_attn if name in ATTENTION_TARGETS else layer.mlp
            found.append((parent, name, getattr(parent, name)))
    return found


def apply_lora(model, rank, alpha, dropout=0.0, targets=("W_pack",)):
    """Puts LoRA adapters on the targeted projections of `model` (in place) and freezes everything else.

    Afterwards `model.trainable_params()` are exactly the adapter matrices. Returns the model.
    """
    if has_lora(model):
        raise ValueError("this model already has LoRA adapters")
    if not model.backend.trainable:
        raise ValueError(f"LoRA adapters need a trainable backend; this model runs on {model.backend.name!r} "
                         "(built for inference): build it with BaichuanForCausalLM(config) or "
                         "from_pretrained(dir, backend='composed'), or merge the adapter (merge_lora.py) to serve")
    rank, alpha, dropout = int(rank), float(alpha), float(dropout)
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    names = resolve_targets(targets)
    lora_linear = _lora_linear_class()
    for parent, name, linear in _target_cells(model, names):
        setattr(parent, name, lora_linear(linear, rank, alpha, dropout))
    # Cells swapped in after construction only get their own prefix: give every parameter its full path again.
    for path, param in model.parameters_and_names():
        param.name = path
    for param in model.get_parameters():
        param.requires_grad = is_adapter_name(param.name)
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": names}
    return model


def _lora_linear_class():
    """Built lazily so importing this module needs no MindSpore (merge maths, parameter counts)."""
    import mindspore as ms
    from mindspore import Parameter, nn
    from mindspore.common.initializer import HeUniform, initializer
    from .modeling_baichuan import Linear, linear

    class LoraLinear(Linear):
        """Our Linear with a low-rank update; `weight` is the wrapped Linear's own (frozen) Parameter."""

        def __init__(self, base, rank, alpha, dropout):
            nn.Cell.__init__(self)  # Linear.__init__ would allocate a fresh weight
            self.compute_dtype = base.compute_dtype
            self.weight = base.weight
            out_features, in_features = base.weight.shape
            # Adapters (and so their AdamW moments) stay float32 even over a half-precision base: they are tiny.
            # HeUniform(sqrt(5)) is torch's nn.Linear default, what peft uses for A.
            self.lora_a = Parameter(initializer(HeUniform(negative_slope=5 ** 0.5), [rank, in_features], ms.float32),
                                    name=LORA_A)
            self.lora_b = Parameter(initializer("zeros", [out_features, rank], ms.float32), name=LORA_B)
            self.scaling = alpha / rank
            self.dropout = nn.Dropout(p=dropout)

        def construct(self, x):
            update = linear(linear(self.dropout(x), self.lora_a, self.compute_dtype), self.lora_b, self.compute_dtype)
            return linear(x, self.weight, self.compute_dtype) + update * self.scaling

    return LoraLinear


def has_lora(model):
    return getattr(model, "lora_config", None) is not None


def is_adapter_name(name):
    return name.endswith("." + LORA_A) or name.endswith("." + LORA_B)


def adapter_params(model):
    return [p for p in model.get_parameters() if is_adapter_name(p.name)]


def lora_parameter_count(config, rank, targets):
    """r * (in + out) per adapted matrix, for every layer."""
    h, i = config.hidden_size, config.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    per_layer = sum(rank * sum(shapes[name]) for name in resolve_targets(targets))
    return config.num_hidden_layers * per_layer


def save_adapter(model, path, base_model_name_or_path=None, tensors=None):
    """Writes the adapter in PEFT's layout: adapter_config.json + adapter_model.safetensors in `path` (a directory,
    or the adapter_model.safetensors file inside one). base_model_name_or_path defaults to the base's Hugging Face
    name (config.source_model, from the converted checkpoint's `_name_or_path`), else the directory the model was
    loaded from. `tensors` (our names -> arrays): the adapter's values when the model's own parameters hold only
    this rank's slices (a sharded run's gathered copy)."""
    cfg = model.lora_config
    directory = os.path.dirname(path) if path.endswith(".safetensors") else path
    if tensors is None:
        tensors = {p.name: p.asnumpy() for p in adapter_params(model)}
    tensors = {name: np.asarray(a).astype(np.float32) for name, a in tensors.items()}
    fused = bool(getattr(model.config, "fused_qkv", True))
    peft_tensors, fields, metadata = peft_adapter.to_peft(tensors, cfg, fused, LORA_A, LORA_B)
    # the base's Hugging Face name when the converted checkpoint had one, else the directory it was loaded from
    base = (base_model_name_or_path or getattr(model.config, "source_model", None) or cfg.get("base_model")
            or getattr(model.config, "name_or_path", None))
    peft_adapter.write_peft_dir(directory, peft_tensors, peft_adapter.peft_config(fields, base, cfg["dropout"]),
                                metadata)


def read_adapter(path):
    """(tensors with our names, {"rank", "alpha", "targets", "dropout"}) of an adapter: a PEFT adapter directory
    (ours or one trained with PEFT / LLaMA-Factory), its adapter_model.safetensors, or a plain adapter file with our
    parameter names and rank/alpha/targets in its metadata."""
    from safetensors import safe_open
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if peft_adapter.is_peft_dir(directory):
        tensors, config, metadata = peft_adapter.read_peft_dir(directory)
        return peft_adapter.from_peft(tensors, config, metadata, LORA_A, LORA_B, where=directory)
    if os.path.isdir(path):
        path = os.path.join(path, ADAPTER_FILE)
    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if "lora_rank" not in meta or "lora_alpha" not in meta:
        raise ValueError(f"{path} is not a LoRA adapter file (no {peft_adapter.CONFIG_FILE} beside it and no "
                         f"lora_rank/lora_alpha metadata); finetune.py writes adapters in each LoRA checkpoint")
    return tensors, {"rank": int(meta["lora_rank"]), "alpha": float(meta["lora_alpha"]),
                     "targets": json.loads(meta.get("lora_targets", '["W_pack"]')), "dropout": 0.0}


def load_adapter(model, path, dropout=None):
    """Loads an adapter (any layout read_adapter reads) into `model` and returns the model.

    A model without adapters first gets them (apply_lora with the adapter's rank, alpha and targets; dropout from
    the argument, else the adapter's config): what finetune continuation from a PEFT adapter calls. A model with
    adapters must have the same ones (names and shapes checked)."""
    from mindspore import Tensor
    tensors, lora = read_adapter(path)
    if not has_lora(model):
        apply_lora(model, lora["rank"], lora["alpha"], lora["dropout"] if dropout is None else dropout,
                   lora["targets"])
    params = {p.name: p for p in adapter_params(model)}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    wrong = [f"{n}: expected {tuple(params[n].shape)}, found {tensors[n].shape}" for n in set(params) & set(tensors)
             if tuple(params[n].shape) != tuple(tensors[n].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"adapter {path} does not match the model's adapters: missing {missing}, unexpected "
                         f"{unexpected}, mis-shaped {wrong}")
    for name, array in tensors.items():
        params[name].set_data(Tensor(array).astype(params[name].dtype))
    return model


def merge_into_weights(weights, adapter, lora):
    """Base weights dict (name -> array) with W + B A * alpha/r added for every adapted projection (new dict)."""
    scaling = lora["alpha"] / lora["rank"]
    merged = dict(weights)
    pairs = sorted({name[:-len(LORA_A) - 1] for name in adapter if name.endswith("." + LORA_A)})
    if not pairs:
        raise ValueError("the adapter holds no LoRA matrices")
    for prefix in pairs:
        a, b = adapter.get(f"{prefix}.{LORA_A}"), adapter.get(f"{prefix}.{LORA_B}")
        weight_name = f"{prefix}.weight"
        if b is None or weight_name not in weights:
            raise ValueError(f"adapter entry {prefix}: missing its B matrix or the base weight {weight_name}")
        base = weights[weight_name]
        delta = b.astype(np.float64) @ a.astype(np.float64) * scaling
        if delta.shape != base.shape:
            raise ValueError(f"{prefix}: B A has shape {delta.shape}, the base weight {base.shape}")
        merged[weight_name] = (base.astype(np.float64) + delta).astype(base.dtype)
    return merged


EXPORT_LAYOUTS = ("llama", "baichuan")


def export_adapter(adapter_path, output_path, to="llama", base_model_name_or_path=None):
    """Re-writes an adapter (any layout read_adapter reads) in PEFT's layout for another base:
    to="llama": q_proj / k_proj / v_proj targets at the trained rank, for the Llama directory of
    `convert_weight.py --reverse --to llama` (PEFT loads it there); to="baichuan": Baichuan's fused W_pack (PEFT's
    rank is then 3 x the trained rank when q, k and v have their own A: see peft_adapter.py).
    base_model_name_or_path: adapter_config.json's base (default: the source adapter's). Returns output_path."""
    if to not in EXPORT_LAYOUTS:
        raise ValueError(f"--to must be one of {EXPORT_LAYOUTS}, got {to!r}")
    if os.path.exists(output_path):
        raise FileExistsError(f"--output_path {output_path} already exists; choose a new directory")
    tensors, lora = read_adapter(adapter_path)
    if base_model_name_or_path is None:
        directory = adapter_path if os.path.isdir(adapter_path) else os.path.dirname(adapter_path)
        if peft_adapter.is_peft_dir(directory):
            with open(os.path.join(directory, peft_adapter.CONFIG_FILE), encoding="utf-8") as f:
                base_model_name_or_path = json.load(f).get("base_model_name_or_path")
    peft_tensors, fields, metadata = peft_adapter.to_peft(tensors, lora, to == "baichuan", LORA_A, LORA_B)
    peft_adapter.write_peft_dir(output_path, peft_tensors,
                                peft_adapter.peft_config(fields, base_model_name_or_path, lora["dropout"]), metadata)
    return output_path


def main(argv=None):
    """python -m baichuan2.lora export --to llama --adapter DIR --output_path OUT [--base_model NAME]"""
    import argparse  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    parser = argparse.ArgumentParser(prog="python -m baichuan2.lora", description="LoRA adapter tools")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="re-write an adapter for another layout of its base model")
    export.add_argument("--adapter", required=True, help="adapter directory (PEFT layout) or its safetensors file")
    export.add_argument("--output_path", required=True, help="new adapter directory to create")
    export.add_argument("--to", default="llama", choices=EXPORT_LAYOUTS,
                        help="llama: q/k/v targets at the trained rank, for convert_weight.py --reverse --to llama "
                             "output; baichuan: the fused W_pack layout")
    export.add_argument("--base_model", default=None,
                        help="adapter_config.json's base_model_name_or_path (default: the source adapter's)")
    args = parser.parse_args(argv)
    try:
        out = export_adapter(args.adapter, args.output_path, args.to, args.base_model)
    except (OSError, ValueError) as e:
        print(f"baichuan2.lora export: error: {e}", file=sys.stderr)
        return 2
    print(f"adapter written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
