"""LoRA adapters in Hugging Face PEFT's layout, mapped exactly to and from ours (numpy only, no MindSpore, no peft).

PEFT's layout (what PEFT, vLLM and LLaMA-Factory read and write): a directory with
- adapter_config.json: peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, lora_dropout, target_modules,
  base_model_name_or_path, bias "none", fan_in_fan_out false, ...;
- adapter_model.safetensors: `base_model.model.<module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r],
  module paths as in the Hugging Face model; the update is B A * lora_alpha / r (use_rslora: / sqrt(r)).

Our model keeps q/k/v separate, each with its own adapter (A [r, h], B [h, r]). The Hugging Face Baichuan models
fuse them into one `W_pack` Linear (q, k, v stacked on the output dim), so PEFT has one A [R, h] and one B [3h, R]
there; XVERSE has separate q_proj/k_proj/v_proj, named as ours. The mapping, exact both ways:
- PEFT W_pack -> ours: the same A for q, k and v, B split into its three [h, R] row blocks.
- ours -> PEFT W_pack: when q, k and v are adapted with one shared A (as a W_pack adapter loaded from PEFT is),
  A and B stacked [B_q; B_k; B_v] at rank r. Otherwise (our training gives each projection its own A) the adapted
  projections are packed block-wise: A = [A_q; A_k; A_v] (rank 3r, or r per adapted projection), B block-diagonal
  in the rows of its projection. B A then holds exactly B_q A_q, B_k A_k, B_v A_v.
PEFT has one rank for the file (rank_pattern aside), so modules of smaller rank are padded with zero rows of A and
zero columns of B to the largest; lora_alpha is scaled with the rank so alpha / r, the scaling, is unchanged. The
safetensors metadata records our own rank, alpha and packing, so reading our own export gives back the original
matrices; a foreign PEFT file (no such metadata) is read by the generic rule above at its own rank.

What cannot be expressed on either side is refused with a message: DoRA, trained biases (bias != "none"),
modules_to_save, fan_in_fan_out, adapters on embeddings or lm_head, W_pack together with q/k/v in one layer.
"""
import json
import math
import os
import re

import numpy as np

CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
METADATA_KEY = "baichuan2_lora"  # our rank/alpha/targets/packing, for an exact read-back of our own export
QKV = ("q_proj", "k_proj", "v_proj")
PROJECTIONS = QKV + ("o_proj", "gate_proj", "up_proj", "down_proj")
_PEFT_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)$")


def is_peft_dir(directory):
    return os.path.isfile(os.path.join(directory, CONFIG_FILE))


# ---------------------------------------------------------------------------------------------- ours -> PEFT
def to_peft(tensors, lora, fused_qkv, a_suffix, b_suffix):
    """(PEFT-named tensors, config fields r/lora_alpha/target_modules, metadata) for our adapter.

    tensors: our names (`model.layers.N.self_attn.q_proj.<a_suffix>`); lora: {"rank", "alpha", "targets"};
    fused_qkv: the Hugging Face model has W_pack (Baichuan) rather than separate q/k/v (XVERSE)."""
    rank = int(lora["rank"])
    modules = _our_modules(tensors, a_suffix, b_suffix)  # module path -> (A, B)
    packing = None
    out = {path: ab for path, ab in modules.items()  # HF module path -> (A, B) at its own rank
           if not (fused_qkv and _split_module(path)[2] in QKV)}
    if fused_qkv:
        layers = sorted({_split_module(p)[0] for p in modules if _split_module(p)[2] in QKV})
        shared = all(_shared_a([modules.get(f"model.layers.{n}.self_attn.{p}") for p in QKV]) for n in layers)
        packing = ("shared_a" if shared else "blocks") if layers else None
        for n in layers:
            parts = [modules.get(f"model.layers.{n}.self_attn.{p}") for p in QKV]
            out[f"model.layers.{n}.self_attn.W_pack"] = _pack_qkv(parts, rank, shared)
    width = max(a.shape[0] for a, _ in out.values())
    peft = {}
    for path, (a, b) in out.items():
        a = np.concatenate([a, np.zeros((width - a.shape[0], a.shape[1]), a.dtype)])
        b = np.concatenate([b, np.zeros((b.shape[0], width - b.shape[1]), b.dtype)], axis=1)
        peft[f"{PEFT_PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(a)
        peft[f"{PEFT_PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(b)
    targets = sorted({_split_module(p)[2] for p in out})
    fields = {"r": width, "lora_alpha": float(lora["alpha"]) * width / rank, "target_modules": targets}
    metadata = {METADATA_KEY: json.dumps({"rank": rank, "alpha": float(lora["alpha"]),
                                          "targets": list(lora["targets"]), "qkv_packing": packing})}
    return peft, fields, metadata


def _our_modules(tensors, a_suffix, b_suffix):
    modules = {}
    for name, a in tensors.items():
        if name.endswith("." + a_suffix):
            path = name[:-len(a_suffix) - 1]
            b = tensors.get(f"{path}.{b_suffix}")
            if b is None:
                raise ValueError(f"adapter entry {path} has A but no B")
            _split_module(path)
            modules[path] = (a, b)
    if not modules:
        raise ValueError("the adapter holds no LoRA matrices")
    return modules


def _shared_a(parts):
    return all(p is not None for p in parts) and all(np.array_equal(parts[0][0], p[0]) for p in parts[1:])


def _pack_qkv(parts, rank, shared):
    """One W_pack (A, B) from the (A, B) of q, k, v (None where not adapted)."""
    h = next(p[1].shape[0] for p in parts if p is not None)
    if shared:
        return parts[0][0], np.concatenate([b for _, b in parts])
    adapted = [(i, p) for i, p in enumerate(parts) if p is not None]
    a = np.concatenate([p[0] for _, p in adapted])
    b = np.zeros((3 * h, rank * len(adapted)), adapted[0][1][1].dtype)
    for j, (i, (_, b_i)) in enumerate(adapted):
        b[i * h:(i + 1) * h, j * rank:(j + 1) * rank] = b_i
    return a, b


def peft_config(fields, base_model_name_or_path, dropout):
    """adapter_config.json as PEFT writes it for a plain LoRA on a causal LM."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or "",
            "revision": None, "inference_mode": True, "r": fields["r"], "lora_alpha": fields["lora_alpha"],
            "lora_dropout": float(dropout), "target_modules": fields["target_modules"], "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}}


def write_peft_dir(directory, tensors, config, metadata):
    """adapter_config.json + adapter_model.safetensors, each flushed to a temp name then renamed into place."""
    from safetensors.numpy import save_file
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, "adapter_model.safetensors")
    tmp = f"{weights}.tmp_{os.getpid()}"
    save_file(tensors, tmp, metadata={"format": "pt", **metadata})
    os.replace(tmp, weights)
    path = os.path.join(directory, CONFIG_FILE)
    with open(f"{path}.tmp_{os.getpid()}", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp_{os.getpid()}", path)


# ---------------------------------------------------------------------------------------------- PEFT -> ours
def read_peft_dir(directory):
    """(PEFT-named tensors, adapter_config dict, safetensors metadata) of a PEFT adapter directory."""
    from safetensors import safe_open
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
        config = json.load(f)
    weights = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        hint = " (adapter_model.bin: save it again with safe_serialization=True)" if os.path.isfile(
            os.path.join(directory, "adapter_model.bin")) else ""
        raise ValueError(f"{directory} has {CONFIG_FILE} but no adapter_model.safetensors{hint}")
    with safe_open(weights, framework="np") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return tensors, config, metadata


def from_peft(tensors, config, metadata, a_suffix, b_suffix, where="adapter"):
    """(our tensors, {"rank", "alpha", "targets", "dropout"}) from a PEFT LoRA adapter, exactly."""
    _check_expressible(config, where)
    modules = {}  # HF module path -> {"A": ..., "B": ...}
    for name, array in tensors.items():
        match = _PEFT_NAME.match(name)
        if not match:
            raise ValueError(f"{where}: tensor {name!r} is not a LoRA A/B matrix of a projection (expected "
                             f"{PEFT_PREFIX}model.layers.N.<self_attn|mlp>.<projection>.lora_A.weight); embeddings, "
                             f"lm_head and other PEFT methods cannot be loaded here")
        modules.setdefault(match["module"], {})[match["ab"]] = array.astype(np.float32)
    if not modules:
        raise ValueError(f"{where}: the adapter holds no LoRA matrices")
    for path, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: {path} has lora_{'B' if 'A' in ab else 'A'} missing")
        _split_module(path, where=where)
    ours = json.loads(metadata.get(METADATA_KEY, "null"))
    if ours is not None:
        return _from_our_export(modules, ours, a_suffix, b_suffix), {
            "rank": ours["rank"], "alpha": ours["alpha"], "targets": ours["targets"],
            "dropout": float(config.get("lora_dropout") or 0.0)}
    return _from_foreign(modules, config, a_suffix, b_suffix, where)


def _check_expressible(config, where):
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters load here")
    refusals = [(config.get("use_dora"), "use_dora (DoRA's magnitude vector has no place in our LoRA)"),
                (config.get("bias", "none") != "none", f"bias {config.get('bias')!r} (trained biases; ours have none)"),
                (config.get("modules_to_save"), f"modules_to_save {config.get('modules_to_save')} (fully trained "
                                                 f"modules besides the adapters)"),
                (config.get("fan_in_fan_out"), "fan_in_fan_out (transposed Conv1D weights; ours are [out, in])"),
                (config.get("layer_replication"), "layer_replication")]
    for bad, what in refusals:
        if bad:
            raise ValueError(f"{where}: {what} cannot be expressed by this suite's LoRA")


def _scale(config, path):
    """alpha / r (or alpha / sqrt(r) with rsLoRA) of one module, honouring rank_pattern / alpha_pattern."""
    def pattern(key, default):
        for pat, value in (config.get(key) or {}).items():
            if re.match(rf"(.*\.)?({pat})$", path):
                return value
        return default
    r = pattern("rank_pattern", config["r"])
    alpha = pattern("alpha_pattern", config.get("lora_alpha", 8))
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _from_foreign(modules, config, a_suffix, b_suffix, where):
    """A PEFT adapter trained elsewhere: W_pack's A goes to q, k and v alike, its B splits into three row blocks.
    Every module is padded to the largest rank; a module whose scaling differs from the first one's gets the ratio
    folded into its B (same update)."""
    split = {}  # our module path -> (A, B, scaling)
    layers = {}
    for path, ab in modules.items():
        layer, _, proj = _split_module(path, where=where)
        layers.setdefault(layer, set()).add(proj)
        scaling = _scale(config, path)
        if proj == "W_pack":
            if ab["B"].shape[0] % 3:
                raise ValueError(f"{where}: {path}.lora_B has {ab['B'].shape[0]} rows, not 3 x hidden")
            for name, b in zip(QKV, np.split(ab["B"], 3)):
                split[f"model.layers.{layer}.self_attn.{name}"] = (ab["A"], b, scaling)
        else:
            split[path] = (ab["A"], ab["B"], scaling)
    both = [n for n, projs in layers.items() if "W_pack" in projs and projs & set(QKV)]
    if both:
        raise ValueError(f"{where}: layer {both[0]} adapts W_pack and q/k/v separately; one of the two only")
    rank = max(a.shape[0] for a, _, _ in split.values())
    scaling = next(iter(split.values()))[2]
    names = sorted({_split_module(p)[2] for p in split}, key=PROJECTIONS.index)
    shapes = {}  # projection -> (A shape, B shape) at the common rank, to fill layers it does not adapt
    out = {}
    for path, (a, b, s) in split.items():
        a = np.concatenate([a, np.zeros((rank - a.shape[0], a.shape[1]), np.float32)])
        b = np.concatenate([b * (s / scaling), np.zeros((b.shape[0], rank - b.shape[1]), np.float32)], axis=1)
        out[f"{path}.{a_suffix}"], out[f"{path}.{b_suffix}"] = a, b.astype(np.float32)
        shapes[_split_module(path)[2]] = (a.shape, b.shape)
    for layer in layers:  # our LoRA adapts the same projections in every layer: zeros where PEFT has none
        for name in names:
            path = f"model.layers.{layer}.{'self_attn' if name in QKV + ('o_proj',) else 'mlp'}.{name}"
            if f"{path}.{a_suffix}" not in out:
                out[f"{path}.{a_suffix}"] = np.zeros(shapes[name][0], np.float32)
                out[f"{path}.{b_suffix}"] = np.zeros(shapes[name][1], np.float32)
    lora = {"rank": rank, "alpha": scaling * rank, "targets": names, "dropout": float(config.get("lora_dropout")
                                                                                      or 0.0)}
    return out, lora


def _from_our_export(modules, ours, a_suffix, b_suffix):
    """Undo to_peft exactly: strip the padding, unpack W_pack by the recorded packing."""
    rank, targets = int(ours["rank"]), ours["targets"]
    out = {}
    for path, ab in modules.items():
        layer, _, proj = _split_module(path)
        a, b = ab["A"], ab["B"]
        if proj != "W_pack":
            out[f"{path}.{a_suffix}"], out[f"{path}.{b_suffix}"] = a[:rank], b[:, :rank]
            continue
        h = b.shape[0] // 3
        adapted = [i for i, name in enumerate(QKV) if name in targets]
        for j, i in enumerate(adapted):
            cols = slice(0, rank) if ours["qkv_packing"] == "shared_a" else slice(j * rank, (j + 1) * rank)
            prefix = f"model.layers.{layer}.self_attn.{QKV[i]}"
            out[f"{prefix}.{a_suffix}"] = np.ascontiguousarray(a[cols])
            out[f"{prefix}.{b_suffix}"] = np.ascontiguousarray(b[i * h:(i + 1) * h, cols])
    return out


def _split_module(path, where="adapter"):
    """(layer, block, projection) of `model.layers.N.<self_attn|mlp>.<projection>`; ValueError otherwise."""
    match = _MODULE.match(path)
    attention = ("W_pack",) + QKV + ("o_proj",)
    if not match or match["proj"] not in PROJECTIONS + ("W_pack",) or (
            (match["block"] == "self_attn") != (match["proj"] in attention)):
        raise ValueError(f"{where}: module {path!r} cannot be adapted here: our LoRA covers only "
                         f"model.layers.N.self_attn.{{W_pack,q_proj,k_proj,v_proj,o_proj}} and "
                         f"model.layers.N.mlp.{{gate_proj,up_proj,down_proj}}")
    return int(match["layer"]), match["block"], match["proj"]
