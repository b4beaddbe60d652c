"""One writer and one loader of model directories.

Writer: model_dir.write_servable_dir makes every model directory (convert_weight.py, finetune's <output_dir>/model,
a sharded run's copy of its last checkpoint, export_model.py, merge_lora.py): each writes the same set of files with
the same config.json, generation_config.json and tokenizer files.
Loader: runtime.load_model_dir, BaichuanForCausalLM.from_pretrained and the openmind pipeline (which reaches
from_pretrained through mindformers' trust_remote_code) refuse a damaged directory with the same one line naming the
file. The model code's relative imports are checked against what mindformers' trust_remote_code copies.
"""
import json
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import REPO

TOKENIZER = os.path.join(REPO, "dataset", "tokenizer.model")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """convert_weight.py's output for a tiny Hugging Face Baichuan2 checkpoint (one weights file, a tokenizer)."""
    from baichuan2.configuration_baichuan import BaichuanConfig, to_hf_config
    from baichuan2.convert_weight import convert, expected_shapes
    root = tmp_path_factory.mktemp("model_dir_io")
    config = BaichuanConfig.from_preset("tiny")
    rng = np.random.default_rng(0)
    hf = root / "hf_chat"
    hf.mkdir()
    save_file({n: rng.standard_normal(s).astype(np.float32) for n, s in expected_shapes(config, True).items()},
              str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(to_hf_config(config)))
    shutil.copy(TOKENIZER, hf / "tokenizer.model")
    convert(str(hf), str(root / "converted"), show_progress=False)
    return str(root / "converted")


def test_every_writer_writes_the_same_files(converted, tmp_path, pynative):
    import mindspore as ms
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.lora import adapter_params, apply_lora, save_adapter
    from baichuan2.merge_lora import merge
    from baichuan2.model_dir import MODEL_CODE_FILES
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.training.checkpoint import export_checkpoint, write_model_dir, write_outputs_from_checkpoint
    from baichuan2.weights_check import check_model_dir

    config = BaichuanConfig.from_hf_config(converted)
    model = BaichuanForCausalLM(config).load_weights(converted)
    made = {
        "export_model.py": export_checkpoint(converted, str(tmp_path / "exported"), converted),
        "finetune model/": write_model_dir(str(tmp_path / "run"), model, config, converted),
        "sharded run model/": write_outputs_from_checkpoint(str(tmp_path / "run_sharded"), converted, config,
                                                            converted, lora=False),
    }
    apply_lora(model, 2, 4.0, 0.0, ["W_pack"])
    rng = np.random.default_rng(1)
    for p in adapter_params(model):
        p.set_data(ms.Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
    save_adapter(model, str(tmp_path / "adapter"))
    made["merge_lora.py"] = merge(converted, str(tmp_path / "adapter"), str(tmp_path / "merged"))

    files = sorted(os.listdir(converted))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
            "tokenizer_config.json"} | set(MODEL_CODE_FILES) <= set(files), files
    same = {}
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        with open(os.path.join(converted, name), "rb") as f:
            same[name] = f.read()
    for writer, directory in made.items():
        assert sorted(os.listdir(directory)) == files, writer
        assert check_model_dir(directory) == [os.path.join(directory, "model.safetensors")], writer
        for name, content in same.items():
            with open(os.path.join(directory, name), "rb") as f:
                assert f.read() == content, (writer, name)
    assert json.loads(same["config.json"])["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_baichuan.BaichuanForCausalLM"


def test_writer_refuses_an_existing_path_and_leaves_nothing_on_failure(converted, tmp_path):
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.model_dir import write_servable_dir
    config = BaichuanConfig.from_hf_config(converted)
    copy = lambda d: shutil.copy(os.path.join(converted, "model.safetensors"), d)  # noqa: E731
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        write_servable_dir(str(tmp_path / "taken"), config, weights=copy)
    assert os.listdir(tmp_path / "taken") == []

    def truncated(directory):  # a writer that leaves a short weights file: the check refuses to publish it
        copy(directory)
        with open(os.path.join(directory, "model.safetensors"), "r+b") as f:
            f.truncate(100)
    from baichuan2.weights_check import WeightsFileError
    with pytest.raises(WeightsFileError):
        write_servable_dir(str(tmp_path / "new"), config, weights=truncated)
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    written = write_servable_dir(str(tmp_path / "taken"), config, weights=copy, replace=True)
    assert "model.safetensors" in os.listdir(written)


# ---------------------------------------------------------------------------------------------- one loader
def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def zero(path):
    with open(path, "r+b") as f:
        f.write(b"\0" * os.path.getsize(path))


DAMAGE = [("truncated", "model.safetensors"), ("zeroed", "model.safetensors"), ("deleted", "model.safetensors"),
          ("truncated", "config.json"), ("zeroed", "config.json")]
FAULTS = {"truncated": truncate, "zeroed": zero, "deleted": os.remove}


def damaged_copy(converted, directory, fault, name):
    shutil.copytree(converted, directory)
    FAULTS[fault](os.path.join(directory, name))
    return str(directory)


def load_model_dir_error(model_dir):
    from baichuan2.runtime import load_model_dir
    from baichuan2.weights_check import WeightsFileError
    with pytest.raises(WeightsFileError) as exc:
        load_model_dir(model_dir)
    return str(exc.value)


@pytest.mark.parametrize("fault,name", DAMAGE)
def test_every_loader_gives_the_same_line(converted, tmp_path, fault, name, pynative):
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.weights_check import WeightsFileError
    model_dir = damaged_copy(converted, tmp_path / "model", fault, name)
    expected = load_model_dir_error(model_dir)
    assert model_dir in expected and "\n" not in expected, expected
    assert name in expected or (fault == "deleted" and "no weights" in expected), expected
    with pytest.raises(WeightsFileError) as exc:
        BaichuanForCausalLM.from_pretrained(model_dir)
    assert str(exc.value) == expected
    if name != "config.json":  # mindformers reads config.json itself before the pipeline reaches the model class
        with pytest.raises(WeightsFileError) as exc:
            BaichuanForCausalLM.from_pretrained_experimental_mode(
                model_dir, config=BaichuanConfig.from_hf_config(converted))
        assert str(exc.value) == expected


PIPELINE = """
import sys
from openmind import pipeline
pipeline(task="text_generation", model=sys.argv[1], framework="ms", trust_remote_code=True)
"""


@pytest.mark.slow
def test_openmind_pipeline_names_the_damaged_file(converted, tmp_path):
    """The model card's call on a truncated model.safetensors: from_pretrained, run from the model directory's own
    copy of the code, raises load_model_dir's line (mindformers re-raises it as the cause of a RuntimeError)."""
    model_dir = damaged_copy(converted, tmp_path / f"model_{uuid.uuid4().hex[:8]}", "truncated", "model.safetensors")
    expected = load_model_dir_error(model_dir)
    env = dict(os.environ, OM_MODULES_CACHE=str(tmp_path / "modules"))  # a fresh module cache: no stale copies
    done = subprocess.run([sys.executable, "-c", PIPELINE, model_dir], capture_output=True, text=True,
                          cwd=str(tmp_path), env=env, timeout=600)
    assert done.returncode != 0
    assert f"WeightsFileError: {expected}\n" in done.stderr, done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- model code files
def test_model_code_imports_are_what_trust_remote_code_copies():
    """mindformers copies into its module cache only the files an auto_map module imports itself (`from .x import`,
    at any indentation), then reads every file those import in turn from the cache, looping forever on a cycle.
    So each module reachable from an auto_map module must be a model code file imported by it directly, and the
    imports must not form a cycle."""
    from mindformers.tools.hub.dynamic_module_utils import get_relative_imports
    from baichuan2.model_dir import AUTO_MAP, MODEL_CODE_FILES
    here = os.path.join(REPO, "research", "baichuan2")
    shipped = {name[:-3] for name in MODEL_CODE_FILES if name.endswith(".py")}
    imports = {name: set(get_relative_imports(os.path.join(here, f"{name}.py"))) for name in shipped}
    for module, targets in imports.items():
        assert targets <= shipped, f"{module}.py imports {sorted(targets - shipped)}, not in MODEL_CODE_FILES"

    def visit(module, path):
        assert module not in path, f"relative import cycle: {' -> '.join(path + [module])}"
        found = set()
        for target in imports[module]:
            found |= {target} | visit(target, path + [module])
        return found

    entry_points = {ref.split(".")[0] for refs in AUTO_MAP.values()
                    for ref in (refs if isinstance(refs, list) else [refs]) if ref} | {"tokenization_xverse"}
    for entry in sorted(entry_points):
        reachable = visit(entry, [])
        assert reachable <= imports[entry] | {entry}, (
            f"{entry}.py must import {sorted(reachable - imports[entry] - {entry})} itself (trust_remote_code copies "
            "only its direct imports)")
