"""A servable model directory: what `trust_remote_code=True` loaders (openmind, mindformers) need.

    config.json              our BaichuanConfig fields + auto_map + tokenizer_class
    model*.safetensors       weights under our parameter names
    tokenizer.model          + tokenizer_config.json (SentencePiece families; with the chat_template of chat models)
    tokenizer.json           + tokenizer_config.json, tokenization_xverse.py (XVERSE: XverseTokenizer; chat_template)
    generation_config.json   defaults for the variant (chat or base)
    README.md                the model card (model_card: family, source, format, how it was made and loaded)
    configuration_baichuan.py, modeling_baichuan.py, backend_composed.py, backend_ascend.py, backend_cpu.py,
    tokenization_baichuan.py, generation.py, generation_settings.py, chat_format.py, quantization.py,
    safetensors_io.py, weights_check.py, weights_io.py, kernels.py, csrc/ (the kernels' C++),
    mindspore_compat.py      the model code (MODEL_CODE_FILES)

write_servable_dir writes all of it, atomically: every command that makes a model directory (convert_weight.py,
merge_lora.py, finetune's <output_dir>/model, export_model.py) goes through it.

mindformers' `trust_remote_code` loading imports the `auto_map` modules from the directory and copies the files
those modules import relatively themselves (not the imports of those files in turn: modeling_baichuan names generation,
generation_settings, chat_format, engine, kv_pool and sampling for `model.generate`), so all of them must be there.
Without tokenizer_config.json mindformers falls back to a fast tokenizer that splits `<reserved_106>`: it is written
whenever tokenizer.model is present.
"""
import contextlib
import json
import os
import secrets
import shutil
import sys

from . import chat_format
from .configuration_baichuan import BaichuanConfig
from .generation_settings import family_defaults

MODEL_CODE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py", "generation.py",
                    "generation_settings.py", "chat_format.py", "engine.py", "kv_pool.py", "sampling.py",
                    "tokenization_xverse.py", "quantization.py", "safetensors_io.py", "weights_check.py",
                    "weights_io.py", "backend_composed.py", "backend_ascend.py", "backend_cpu.py",
                    "kernels.py", "csrc",
                    "mindspore_compat.py")  # csrc: a folder, copied whole
AUTO_MAP = {
    "AutoConfig": "configuration_baichuan.BaichuanConfig",
    "AutoModel": "modeling_baichuan.BaichuanForCausalLM",
    "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
    "AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None],
}
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def load_tokenizer(model_dir):
    """The model directory's own tokenizer: SentencePiece tokenizer.model (Baichuan) or tokenizer.json (XVERSE)."""
    # pylint: disable=import-outside-toplevel
    if os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
        from .tokenization_baichuan import BaichuanTokenizer
        return BaichuanTokenizer.from_pretrained(model_dir)
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        from .tokenization_xverse import XverseTokenizer
        return XverseTokenizer.from_pretrained(model_dir)
    raise FileNotFoundError(f"no tokenizer in model directory {model_dir!r}: expected tokenizer.model "
                            "(Baichuan, SentencePiece) or tokenizer.json (XVERSE)")


def generation_config(config: BaichuanConfig):
    """generation_config.json contents for the variant: the family's defaults (generation_settings.family_defaults,
    from chat_format.py; greedy for a base model, whose chat_format convert_weight.py --variant sets null)."""
    data = dict(family_defaults(config))
    data.update(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                pad_token_id=config.pad_token_id)
    if config.user_token_id is not None:
        data.update(user_token_id=config.user_token_id, assistant_token_id=config.assistant_token_id)
    return data


def write_generation_config(model_dir, config: BaichuanConfig):
    with open(os.path.join(model_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config(config), f, indent=2)


def write_config(model_dir, config: BaichuanConfig):
    data = config.to_dict()
    auto_map, tokenizer_class = AUTO_MAP, "BaichuanTokenizer"
    if config.chat_format == "xverse":  # XVERSE ships a tokenizer.json, not a SentencePiece model
        auto_map = dict(AUTO_MAP, AutoTokenizer=["tokenization_xverse.XverseTokenizer", None])
        tokenizer_class = "XverseTokenizer"
    data.update(auto_map=auto_map, tokenizer_class=tokenizer_class, architectures=["BaichuanForCausalLM"],
                model_type="baichuan")
    with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)


def set_chat_template(model_dir, template):
    """Writes `template` as the chat_template of model_dir's tokenizer_config.json (if there is one); None (a
    base model) leaves the file as it is. Ours replaces any other: chat.py and the server build prompts from it."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    if template is None or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("chat_template") == template:
        return
    data["chat_template"] = template
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


_FAMILY_NAMES = {"baichuan2_7b": "Baichuan2-7B", "baichuan2_13b": "Baichuan2-13B", "baichuan_7b": "Baichuan-7B",
                 "xverse_7b": "XVERSE-7B", "oppo_experiemental_7b": "oppo-experiemental-7B"}


def _format_line(config):
    fmt = config.weight_format()
    if fmt in ("int8", "int4"):
        return (f"{fmt} weight-only (round-to-nearest, symmetric, one float16 scale per {config.group_size} inputs; "
                f"embedding and lm_head too), other tensors bfloat16")
    return "bfloat16" if fmt == "bfloat16" else "float32"


def model_card(config, layout="ours", source=None, command=None, dtype=None):
    """README.md text of a model directory: family, source, format, how it was made, how to load it.
    layout: "ours" (MindSpore, this suite's code inside), "llama" (native Hugging Face Llama) or "baichuan" (the
    Hugging Face Baichuan / XVERSE layout); dtype: the stored dtype of an exported layout (default the config's)."""
    family = _FAMILY_NAMES.get(config.family, config.family)
    variant = "chat" if config.chat_format else "base"
    made = command or "python " + " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    fmt = _format_line(config) if layout == "ours" else dtype or config.torch_dtype
    lines = ["---", f"library_name: {'mindspore' if layout == 'ours' else 'transformers'}"]
    origin = getattr(config, "source_model", None)
    if origin:
        lines.append(f"base_model: {origin}")
    lines += ["---", "", f"# {family} ({variant})", "",
              f"- Family: {family} (preset `{config.family}`), {variant} model, "
              f"{config.num_parameters():,} parameters",
              f"- Source: {origin or (os.path.abspath(source) if source else 'trained with this suite')}",
              f"- Format: {fmt}; layout: {_LAYOUTS[layout]}",
              f"- Made by: `{made}` (baichuan-mindspore-suite)", ""]
    if layout == "ours":
        lines += ["## Load it here (MindSpore)", "", "```python",
                  "from openmind import pipeline",
                  "p = pipeline(task=\"text_generation\", model=\"THIS_DIR\", framework=\"ms\", "
                  "trust_remote_code=True)",
                  "```", "", "Or `baichuan2-chat --model_dir THIS_DIR`, `baichuan2-serve --model_dir THIS_DIR`.", "",
                  "## Elsewhere", "",
                  "The tokenizer loads with transformers alone (`AutoTokenizer.from_pretrained(THIS_DIR, "
                  "trust_remote_code=True)`, `apply_chat_template`). For PyTorch tools (transformers, vLLM, SGLang, "
                  "llama.cpp, MLX) export a native Llama directory: `baichuan2-convert --reverse --to llama "
                  "--input_path THIS_DIR --output_path LLAMA_DIR`" + (
                      " (not for Baichuan2-13B: ALiBi)." if config.position_encoding == "alibi" else ".")]
    elif layout == "llama":
        lines += ["## Load it", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(\"THIS_DIR\")   # no trust_remote_code",
                  "tokenizer = AutoTokenizer.from_pretrained(\"THIS_DIR\")",
                  "```", "", "vLLM: `vllm serve THIS_DIR`; llama.cpp: `convert_hf_to_gguf.py THIS_DIR`. "
                  "Baichuan2's NormHead is folded into lm_head, so it is a plain Llama."]
    else:
        lines += ["## Load it", "", "The Hugging Face layout of this family (fused `W_pack` for Baichuan). Convert "
                  "it back with `baichuan2-convert --input_path THIS_DIR --output_path MS_DIR`."]
    if config.chat_format:
        lines += ["", "`tokenizer_config.json` holds the chat template: `apply_chat_template(messages, "
                  "add_generation_prompt=True)` gives the prompt ids the model was trained on."]
    return "\n".join(lines) + "\n"


_LAYOUTS = {"ours": "this suite's MindSpore model directory (config.json auto_map, model code inside)",
            "llama": "native Hugging Face Llama (LlamaForCausalLM, no remote code)",
            "baichuan": "Hugging Face Baichuan / XVERSE checkpoint"}


def write_model_card(model_dir, config, layout="ours", source=None, command=None, dtype=None):
    with open(os.path.join(model_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(config, layout, source, command, dtype))


def finish_model_dir(model_dir, config, tokenizer_dir=None):
    """Adds everything but the weights to `model_dir`."""
    write_config(model_dir, config)
    write_model_card(model_dir, config, source=tokenizer_dir)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in MODEL_CODE_FILES:
        if os.path.isdir(os.path.join(here, name)):
            shutil.copytree(os.path.join(here, name), os.path.join(model_dir, name), dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        elif os.path.isfile(os.path.join(here, name)):
            shutil.copy2(os.path.join(here, name), os.path.join(model_dir, name))
    write_generation_config(model_dir, config)
    template = chat_format.get(config.chat_format).chat_template()
    if tokenizer_dir:
        for name in _TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(model_dir, name))
    sp_model = os.path.join(model_dir, "tokenizer.model")
    if os.path.isfile(sp_model) and not os.path.isfile(os.path.join(model_dir, "tokenizer_config.json")):
        from .tokenization_baichuan import write_tokenizer_files  # pylint: disable=import-outside-toplevel
        write_tokenizer_files(model_dir, sp_model, model_max_length=config.model_max_length, chat_template=template)
    hf_tokenizer = os.path.join(model_dir, "tokenizer.json")
    if (config.chat_format == "xverse" and os.path.isfile(hf_tokenizer)
            and not os.path.isfile(os.path.join(model_dir, "tokenizer_config.json"))):
        # pylint: disable-next=import-outside-toplevel
        from .tokenization_xverse import write_tokenizer_files as write_xverse
        write_xverse(model_dir, hf_tokenizer, model_max_length=config.model_max_length, chat_template=template)
    set_chat_template(model_dir, template)  # a tokenizer_config.json copied from tokenizer_dir gets it too


def write_servable_dir(path, config, model=None, weights=None, tokenizer_dir=None, replace=False):
    """Writes a complete servable model directory at `path`: the weights, config.json with auto_map, tokenizer
    files, generation_config.json and the model code (finish_model_dir). Returns `path`.

    The weights come from exactly one of
      model     a model: each parameter in its stored format into model.safetensors, one tensor at a time
                (weights_io.save_parameters)
      weights   a function weights(directory) writing the weights file(s) into `directory` (model.safetensors,
                or shards with model.safetensors.index.json; convert_weight.py streams its conversion this way)
    tokenizer_dir: where tokenizer.model / tokenizer.json and their config files are copied from (None, or a
    directory that does not exist: none are). Everything is written into a temp directory beside `path`, checked
    as every loader checks it (weights_check.check_model_dir: config.json parses, each weights file's header and
    size agree), fsynced and renamed into place (atomic_dir): readers see no directory, or the whole new one.
    replace=False: an existing `path` raises FileExistsError; replace=True: it is swapped out.
    """
    # pylint: disable=import-outside-toplevel
    from .weights_check import WEIGHTS_NAME, check_model_dir
    if (model is None) == (weights is None):
        raise TypeError("write_servable_dir takes exactly one of model= and weights=")
    with atomic_dir(path, replace=replace) as tmp:
        if model is not None:
            from .weights_io import save_parameters
            save_parameters(model, os.path.join(tmp, WEIGHTS_NAME))
        else:
            weights(tmp)
        finish_model_dir(tmp, config, tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else None)
        check_model_dir(tmp)
    return path


@contextlib.contextmanager
def atomic_dir(target, replace=False):
    """Yields an empty temp directory beside `target` to write into; on a clean exit its files and directories
    are fsynced and it is renamed to `target`, so readers see either nothing (or the old directory) or the whole
    new one. On an error the temp directory is removed and `target` is untouched.

    replace=False: FileExistsError if `target` exists at the end (callers check earlier for a clearer message).
    replace=True: an existing `target` is swapped out and removed after the new one is in place.
    """
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp_{name}_{os.getpid()}_{secrets.token_hex(3)}")
    os.mkdir(tmp)  # mkdir, not mkdtemp: the result gets the usual umask permissions, not 0700
    old = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if os.path.exists(target):
            if not replace:
                raise FileExistsError(f"{target} already exists")
            old = tmp + ".old"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if old:  # put the previous directory back rather than lose it
                os.rename(old, target)
                old = None
            raise
        _fsync_path(parent)
    finally:
        for leftover in (tmp, old):
            if leftover and os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root):
    """Flushes every file, then every directory, under `root` (data on disk before the rename publishes it), giving
    each the mode the user's umask gives (MindSpore may have changed the process umask since: see __init__)."""
    from . import USER_UMASK  # pylint: disable=import-outside-toplevel
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            os.chmod(path, (0o777 if os.access(path, os.X_OK) else 0o666) & ~USER_UMASK)
            _fsync_path(path)
        os.chmod(directory, 0o777 & ~USER_UMASK)
        _fsync_path(directory)
