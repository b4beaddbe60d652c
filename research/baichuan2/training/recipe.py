"""The finetune recipe: a yaml file merged over DEFAULTS, then command-line overrides. Unknown keys are errors."""
import inspect
import os

import yaml

# Paths written in a recipe are relative to the repository root (research/baichuan2/training/ -> three levels up).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "finetune_tiny.yaml")

# Every key a recipe may hold, with its default. An unknown key is an error (a typo must not be silently ignored).
DEFAULTS = {
    "model": {"preset": "tiny", "overrides": {}, "load_checkpoint": None},
    "data": {"train_dataset": None, "seq_length": 128, "shuffle": True},
    "train": {"seed": 1234, "epochs": 1, "max_steps": None, "batch_size": 2, "grad_accum_steps": 1, "lr": 1e-3,
              "min_lr": 0.0, "warmup_ratio": 0.0, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
              "grad_clip": 1.0, "loss_scale": None},
    # rank 0 = full finetuning. targets: W_pack (= q/k/v) or any of q_proj k_proj v_proj o_proj gate/up/down_proj.
    # load_adapter: an adapter directory (ours or PEFT's) to continue from; its rank/alpha/targets then apply.
    "lora": {"rank": 0, "alpha": 16, "dropout": 0.0, "targets": ["W_pack"], "load_adapter": None},
    "output": {"output_dir": "output/finetune", "save_steps": 100, "keep_checkpoints": 3, "log_steps": 1,
               "tokenizer_dir": "dataset"},
}
_PATH_KEYS = (("model", "load_checkpoint"), ("data", "train_dataset"), ("output", "output_dir"),
              ("output", "tokenizer_dir"), ("lora", "load_adapter"))


class FinetuneError(Exception):
    """A problem with the user's input: reported as one clear message, exit status 2."""


def resolve_config_path(path):
    """The recipe path as given, else relative to the repository root (e.g. configs/... given from inside example/)."""
    if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)
    return os.path.abspath(path)


def load_recipe(path):
    """The yaml recipe merged over DEFAULTS; unknown sections or keys raise FinetuneError naming them."""
    if not os.path.isfile(path):
        raise FinetuneError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        user = yaml.safe_load(f) or {}
    require_mapping(user, path, "the recipe")
    recipe = {section: dict(values) for section, values in DEFAULTS.items()}
    for section, values in user.items():
        if section not in DEFAULTS:
            raise FinetuneError(f"{path}: unknown section {section!r}; valid sections: {sorted(DEFAULTS)}")
        require_mapping(values, path, f"section {section!r}")
        for key, value in (values or {}).items():
            if key not in DEFAULTS[section]:
                raise FinetuneError(f"{path}: unknown key {section}.{key}; valid keys in {section}: "
                                    f"{sorted(DEFAULTS[section])}")
            recipe[section][key] = value
    # BaichuanConfig swallows unknown kwargs, so model overrides are checked against its signature here.
    from baichuan2.configuration_baichuan import BaichuanConfig  # pylint: disable=import-outside-toplevel
    fields = set(inspect.signature(BaichuanConfig.__init__).parameters) - {"self", "kwargs"}
    require_mapping(recipe["model"]["overrides"], path, "model.overrides")
    for key in recipe["model"]["overrides"] or {}:
        if key not in fields:
            raise FinetuneError(f"{path}: unknown key model.overrides.{key}; it must be a BaichuanConfig field "
                                f"({', '.join(sorted(fields))})")
    for section, key in _PATH_KEYS:
        value = recipe[section][key]
        if value and not os.path.isabs(value):
            recipe[section][key] = os.path.join(REPO, value)
    return recipe


def apply_overrides(recipe, args):
    """Command-line flags (an argparse namespace of example/finetune.py) over the recipe; returns the recipe."""
    for section, key in (("data", "train_dataset"), ("model", "load_checkpoint"), ("output", "output_dir"),
                         ("train", "max_steps"), ("train", "epochs"), ("train", "lr"), ("train", "batch_size"),
                         ("train", "seed"), ("output", "save_steps"), ("data", "seq_length"),
                         ("lora", "load_adapter")):
        value = getattr(args, key, None)
        if value is not None:
            if (section, key) in _PATH_KEYS:
                value = os.path.abspath(value)  # command-line paths are relative to the current directory
            recipe[section][key] = value
    for key in ("rank", "alpha", "dropout", "targets"):
        value = getattr(args, f"lora_{key}")
        if value is not None:
            recipe["lora"][key] = value.split(",") if key == "targets" else value
    if args.epochs is not None and args.max_steps is None:
        recipe["train"]["max_steps"] = None  # --epochs on the command line beats a max_steps in the yaml
    for item in getattr(args, "set", None) or []:  # last, in the order given: the general override wins
        apply_set(recipe, item)
    return recipe


def require_mapping(value, path, where):
    """A recipe section must be `key: value` lines (or absent); a plain value there is a one-line error."""
    if value is not None and not isinstance(value, dict):
        raise FinetuneError(f"{path}: {where} must be a mapping of keys (indented `key: value` lines or "
                            f"{{key: value}}), got the plain value {value!r}; e.g. write `model: {{preset: "
                            f"baichuan2_7b}}`, not `model: baichuan2_7b`")


# ---------------------------------------------------------------------------------------------- --set
def _config_defaults():
    """BaichuanConfig's fields and defaults: the types of model.overrides.<field>."""
    from baichuan2.configuration_baichuan import BaichuanConfig  # pylint: disable=import-outside-toplevel
    params = inspect.signature(BaichuanConfig.__init__).parameters
    return {name: p.default for name, p in params.items() if name not in ("self", "kwargs")}


def _type_name(default):
    if default is None:
        return "any yaml value"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(default), type(default).__name__)


def typed_value(where, default, text):
    """`text` (a --set value) converted to the type of `default`; FinetuneError when it does not fit.

    null/none clears keys whose default is None; lists may be written `a,b` or `[a, b]`."""
    if default is None:  # no type to follow (paths, max_steps, loss_scale): read it as yaml
        return None if text.strip().lower() in ("none", "null", "") else yaml.safe_load(text)
    if isinstance(default, str):
        return text
    if isinstance(default, list):
        value = yaml.safe_load(text) if text.strip().startswith("[") else [t.strip() for t in text.split(",")]
        if not isinstance(value, list) or not all(value):
            raise FinetuneError(f"--set {where}={text}: expected a list, e.g. {where}=a,b or {where}=[a, b]")
        return value
    word = text.strip()
    try:
        if isinstance(default, bool):
            value = {"true": True, "yes": True, "on": True, "1": True,
                     "false": False, "no": False, "off": False, "0": False}[word.lower()]
        elif isinstance(default, int):
            value = int(word)
        elif isinstance(default, float):
            value = float(word)  # 2e-5 included (yaml would read it as a string)
        else:
            value = yaml.safe_load(word)
            if not isinstance(value, type(default)):
                raise ValueError(word)
    except (KeyError, ValueError) as e:
        raise FinetuneError(f"--set {where}={text}: {where} takes {_type_name(default)} "
                            f"(default {default!r})") from e
    return value


def apply_set(recipe, item):
    """One `--set section.key=value` (or model.overrides.<field>=value) applied to `recipe`, typed by DEFAULTS."""
    where, eq, text = item.partition("=")
    where = where.strip()
    if not eq or "." not in where:
        raise FinetuneError(f"--set {item}: expected section.key=value, e.g. --set train.lr=2e-5")
    section, key = where.split(".", 1)
    if section not in DEFAULTS:
        raise FinetuneError(f"--set {item}: unknown section {section!r}; valid sections: {sorted(DEFAULTS)}")
    if section == "model" and key.startswith("overrides."):
        field = key[len("overrides."):]
        fields = _config_defaults()
        if field not in fields:
            raise FinetuneError(f"--set {item}: unknown key model.overrides.{field}; it must be a BaichuanConfig "
                                f"field ({', '.join(sorted(fields))})")
        overrides = dict(recipe["model"]["overrides"] or {})
        overrides[field] = None if text.strip().lower() in ("none", "null") else typed_value(where, fields[field],
                                                                                                 text)
        recipe["model"]["overrides"] = overrides
        return recipe
    if key not in DEFAULTS[section]:
        raise FinetuneError(f"--set {item}: unknown key {section}.{key}; valid keys in {section}: "
                            f"{sorted(DEFAULTS[section])}")
    value = typed_value(where, DEFAULTS[section][key], text)
    if (section, key) in _PATH_KEYS and value:
        value = os.path.abspath(str(value))  # command-line paths are relative to the current directory
    recipe[section][key] = value
    return recipe


# ---------------------------------------------------------------------------------------------- the model's config
# What a recipe may set over a model directory's config.json: how weights are held and computed, the training
# context (within the model's positions), the chat layout to learn (a base model has none). Every other field
# describes the trained network (shapes, positions, norms, special tokens): there the directory is the authority,
# and a recipe value that differs is a contradiction. (Dropout is a training setting: lora.dropout.)
ADJUSTABLE_FIELDS = ("compute_dtype", "param_dtype", "model_max_length", "initializer_range", "user_token_id",
                     "assistant_token_id", "chat_format")


def model_dir_config(load_checkpoint):
    """<load_checkpoint>/config.json when load_checkpoint is a model directory, else None (a bare .safetensors file
    or nothing: the preset supplies the architecture)."""
    if load_checkpoint and os.path.isdir(load_checkpoint):
        path = os.path.join(load_checkpoint, "config.json")
        if os.path.isfile(path):
            return path
    return None


def model_config(model_section, device="CPU"):
    """(BaichuanConfig, note or None) of a run: the load_checkpoint directory's config.json when there is one (then
    model.overrides may only change ADJUSTABLE_FIELDS; a different value of any other field is one FinetuneError),
    else model.preset with model.overrides. On CPU the compute dtype is float32 (no half-precision MatMul there)."""
    from baichuan2.configuration_baichuan import PRESETS, BaichuanConfig  # pylint: disable=import-outside-toplevel
    overrides = dict(model_section["overrides"] or {})
    source = model_dir_config(model_section["load_checkpoint"])
    notes = []
    try:
        if source is None:
            config = BaichuanConfig.from_preset(model_section["preset"], **overrides)
        else:
            try:
                base = BaichuanConfig.from_hf_config(source)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise FinetuneError(f"model.load_checkpoint: cannot read {source}: {e}") from e
            fields = {name: getattr(base, name) for name in _config_defaults()}
            clashes = [f"{k}: {v!r} (config.json: {fields[k]!r})" for k, v in overrides.items()
                       if k not in ADJUSTABLE_FIELDS and k in fields and v != fields[k]]
            if clashes:
                raise FinetuneError(f"model.overrides contradict {source}, which sets the architecture: "
                                    f"{'; '.join(clashes)}. Remove them (over a model directory only "
                                    f"{', '.join(ADJUSTABLE_FIELDS)} may differ)")
            # The preset still names the model (family) when, with the overrides, it describes this architecture.
            named = dict(PRESETS.get(model_section["preset"], {}), **overrides)
            shape = [k for k in named if k in fields and k != "family" and k not in ADJUSTABLE_FIELDS]
            if "family" in named and all(fields[k] == named[k] for k in shape):
                fields["family"] = named["family"]
            else:
                notes.append(f"model.preset {model_section['preset']!r} is not used: the architecture comes from "
                             f"{source} ({base.family})")
            fields.update(overrides)
            config = BaichuanConfig(**fields)
    except (ValueError, TypeError) as e:
        raise FinetuneError(f"model config (preset {model_section['preset']!r}, overrides {overrides}): {e}") from e
    if device == "CPU" and config.compute_dtype != "float32":
        notes.append(f"compute_dtype {config.compute_dtype} has no CPU kernels; training in float32")
        config.compute_dtype = "float32"
    return config, "; ".join(notes) or None


def dataset_hint(path):
    """A one-line FinetuneError for training data given as the raw records (belle_preprocess.py's input)."""
    if path and path.lower().endswith((".json", ".jsonl")):
        raise FinetuneError(f"train dataset {path} is a JSON file of records; finetune.py reads MindRecord token rows: "
                            "make them first with example/dataset/belle_preprocess.py --input_glob FILE --model_file "
                            "tokenizer.model --output_file rows.mindrecord --seq_length N, then pass that .mindrecord")
