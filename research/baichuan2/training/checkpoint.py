"""What a training run writes and reads back.

    checkpoints/step_XXXXXX/   config.json + model.safetensors (or adapter_model.safetensors under LoRA),
                               optimizer.safetensors, trainer_state.json (step, data position)
    model/                     the final weights as a servable model directory
    adapter/                   the final LoRA adapters (config.json + adapter_model.safetensors)
Every directory is written through model_dir.atomic_dir: a crash leaves a `.tmp_*` directory, never a partial one.
"""
import json
import os
import shutil

from baichuan2.model_dir import atomic_dir, finish_model_dir

from .recipe import FinetuneError

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def checkpoint_dirs(output_dir):
    """Complete checkpoints, oldest first. Only renamed dirs with a state file count (temp dirs never do)."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("step_") and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(name[len("step_"):]), path))
    return [p for _, p in sorted(found)]


def remove_partial_checkpoints(output_dir):
    """Removes the temp directories a crash mid-save left under checkpoints/."""
    root = checkpoint_root(output_dir)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".tmp_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def train_cell_state(train_cell, model):
    """Everything the train cell holds besides the model weights: AdamW moments, global_step, loss scale.
    The learning-rate table is left out: it is rebuilt from the recipe (a resumed run may extend max_steps)."""
    weight_names = {p.name for p in model.get_parameters()} | {"learning_rate"}
    return {p.name: p for p in train_cell.get_parameters() if p.name not in weight_names}


def save_weights(model, directory):
    """config.json + the trainable weights: model.safetensors, or only the adapters under LoRA."""
    from baichuan2.lora import ADAPTER_FILE, has_lora, save_adapter  # pylint: disable=import-outside-toplevel
    if not has_lora(model):
        model.save_pretrained(directory)
        return
    os.makedirs(directory, exist_ok=True)
    model.config.to_json_file(os.path.join(directory, "config.json"))
    save_adapter(model, os.path.join(directory, ADAPTER_FILE))


def save_checkpoint(output_dir, model, train_cell, state, keep):
    """Writes checkpoints/step_XXXXXX atomically and keeps only the newest `keep`."""
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    final = os.path.join(checkpoint_root(output_dir), f"step_{state['step']:06d}")
    if os.path.isdir(final):
        return final
    with atomic_dir(final) as tmp:
        save_weights(model, tmp)
        opt = {name: p.asnumpy() for name, p in train_cell_state(train_cell, model).items()}
        save_file(opt, os.path.join(tmp, OPTIMIZER_FILE), metadata={"format": "np"})
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
    for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore_checkpoint(path, model, train_cell):
    """Loads a checkpoint's weights (or adapters) and optimizer state; returns its trainer_state.json."""
    # pylint: disable=import-outside-toplevel
    from mindspore import Tensor
    from safetensors.numpy import load_file
    from baichuan2.lora import ADAPTER_FILE, has_lora, load_adapter
    from baichuan2.modeling_baichuan import load_safetensors_into
    if has_lora(model):  # the frozen base came from load_checkpoint; the checkpoint holds the adapters
        if not os.path.isfile(os.path.join(path, ADAPTER_FILE)):
            raise ValueError(f"{path} holds no {ADAPTER_FILE}: it is not a LoRA checkpoint")
        load_adapter(model, os.path.join(path, ADAPTER_FILE))
    else:
        load_safetensors_into(model, os.path.join(path, WEIGHTS_FILE))
    saved = load_file(os.path.join(path, OPTIMIZER_FILE))
    params = train_cell_state(train_cell, model)
    if set(saved) != set(params):
        raise FinetuneError(f"optimizer state in {path} does not match this run: missing "
                            f"{sorted(set(params) - set(saved))}, unexpected {sorted(set(saved) - set(params))}")
    for name, array in saved.items():
        if tuple(array.shape) != tuple(params[name].shape):
            raise FinetuneError(f"optimizer tensor {name} in {path} has shape {array.shape}, expected "
                                f"{tuple(params[name].shape)}")
        params[name].set_data(Tensor(array).astype(params[name].dtype))
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def write_adapter_dir(output_dir, model):
    """<output_dir>/adapter: config.json + adapter_model.safetensors (replaced atomically)."""
    final = os.path.join(output_dir, "adapter")
    with atomic_dir(final, replace=True) as tmp:
        save_weights(model, tmp)
    return final


def write_servable_dir(path, model, config, tokenizer_dir, replace=False):
    """The model's weights as a servable model directory at `path` (save_pretrained + finish_model_dir)."""
    with atomic_dir(path, replace=replace) as tmp:
        model.save_pretrained(tmp)
        finish_model_dir(tmp, config, tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else None)
    return path


def write_model_dir(output_dir, model, config, tokenizer_dir):
    """<output_dir>/model: the final weights as a servable model directory (replaced atomically)."""
    return write_servable_dir(os.path.join(output_dir, "model"), model, config, tokenizer_dir, replace=True)


def export_checkpoint(checkpoint, output_path, tokenizer_dir):
    """A full-finetuning checkpoint directory -> a new servable model directory at `output_path`.

    The checkpoint's config.json and model.safetensors are checked by loading them into the model (names and
    shapes), then written exactly like the <output_dir>/model/ directory a run ends with.
    """
    # pylint: disable=import-outside-toplevel
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.modeling_baichuan import BaichuanForCausalLM, load_safetensors_into
    for name in ("config.json", WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(checkpoint, name)):
            raise FinetuneError(f"{checkpoint} is not a finetune checkpoint: {name} is missing (expected a "
                                "<output_dir>/checkpoints/step_XXXXXX directory)")
    if os.path.exists(output_path):
        raise FinetuneError(f"--output_path {output_path} already exists; choose a new directory")
    config = BaichuanConfig.from_hf_config(checkpoint)
    model = BaichuanForCausalLM(config)
    try:
        load_safetensors_into(model, os.path.join(checkpoint, WEIGHTS_FILE))
    except ValueError as e:
        raise FinetuneError(str(e)) from e
    return write_servable_dir(output_path, model, config, tokenizer_dir)
