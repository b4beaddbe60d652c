"""LoRA finetuning on the tiny model: adapter-only training, the parameter-count formula, merging, resume, and the
merged directory served through the openmind pipeline.

One single-process finetune run (12 steps, checkpoints every 4) is shared by most tests; a resume from its step-8
checkpoint must reproduce its final adapter."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import REPO, assert_same_weights, call_script, free_port, msrun, wait, write_rows

FINETUNE = os.path.join(REPO, "example", "finetune.py")
MERGE = os.path.join(REPO, "research", "baichuan2", "merge_lora.py")
SEQ, ROWS, STEPS = 32, 48, 12
RANK, TARGETS = 8, ["W_pack", "down_proj"]  # set on the command line over the tiny recipe's rank 4 / [W_pack]
OVERRIDES = {"max_position_embeddings": 64, "model_max_length": 64}


def tiny_config():
    from baichuan2.configuration_baichuan import BaichuanConfig
    return BaichuanConfig.from_preset("tiny", **OVERRIDES)


def finetune_args(workdir, output_dir, *extra):
    return [FINETUNE, "--config", str(workdir / "recipe.yaml"),
            "--train_dataset", str(workdir / "rows.mindrecord"), "--load_checkpoint", str(workdir / "base"),
            "--output_dir", str(output_dir), "--max_steps", str(STEPS), "--save_steps", "4",
            "--lora_rank", str(RANK), "--lora_alpha", "16", "--lora_dropout", "0", "--lora_targets", ",".join(TARGETS),
            *extra]


def run_finetune(workdir, output_dir, *extra):
    cmd = [sys.executable, *finetune_args(workdir, output_dir, *extra)]
    env = dict(os.environ, BAICHUAN_FINETUNE_DEBUG="1")
    proc = subprocess.run(cmd, cwd=str(workdir), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A random tiny base model directory (with tokenizer) and a learnable MindRecord matching its context."""
    import mindspore as ms
    from baichuan2.model_dir import write_servable_dir
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    d = tmp_path_factory.mktemp("lora")
    write_rows(str(d / "rows.mindrecord"), ROWS, SEQ)
    # The tiny LoRA recipe with a shorter context (the rest, its lora section included, as shipped)
    import yaml
    with open(os.path.join(REPO, "configs", "finetune_tiny_lora.yaml"), encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    recipe["model"]["overrides"].update(OVERRIDES)
    recipe["data"]["seq_length"] = SEQ
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    ms.set_seed(3)
    config = tiny_config()
    write_servable_dir(str(d / "base"), config, model=BaichuanForCausalLM(config),
                       tokenizer_dir=os.path.join(REPO, "dataset"))
    return d


@pytest.fixture(scope="module")
def lora_run(workdir):
    out = workdir / "run"
    stdout = run_finetune(workdir, out)
    return out, stdout


def loaded_model(base_dir, adapter_dir=None):
    """Tiny model in PyNative eval mode: base weights, plus the adapter from a LoRA checkpoint dir when given."""
    import mindspore as ms
    from baichuan2.lora import ADAPTER_FILE, apply_lora, load_adapter, read_adapter
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.weights_io import load_safetensors_into
    from baichuan2.configuration_baichuan import BaichuanConfig
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = BaichuanForCausalLM(BaichuanConfig.from_hf_config(str(base_dir)))
    load_safetensors_into(model, str(base_dir))
    if adapter_dir is not None:
        _, lora = read_adapter(os.path.join(adapter_dir, ADAPTER_FILE))
        apply_lora(model, lora["rank"], lora["alpha"], 0.0, lora["targets"])
        load_adapter(model, os.path.join(adapter_dir, ADAPTER_FILE))
    model.set_train(False)
    return model


def logits(model, ids):
    import mindspore as ms
    return model(ms.Tensor(ids)).asnumpy()


IDS = np.random.default_rng(1).integers(5, 1000, (2, 24)).astype(np.int32)


# ---------------------------------------------------------------------------------------------- fast checks
def test_targets_and_parameter_formula(pynative):
    import mindspore as ms
    from baichuan2.lora import apply_lora, lora_parameter_count, resolve_targets
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    assert resolve_targets("W_pack") == ["q_proj", "k_proj", "v_proj"]
    assert resolve_targets(["W_pack", "q_proj", "o_proj"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        resolve_targets(["qkv"])
    config = tiny_config()
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    for rank, targets, per_layer in ((4, ["W_pack"], 3 * 4 * (h + h)),
                                     (2, ["o_proj", "gate_proj", "down_proj"], 2 * ((h + h) + 2 * (h + i)))):
        ms.set_seed(0)
        model = apply_lora(BaichuanForCausalLM(config), rank, 2 * rank, 0.0, targets)
        trainable = model.trainable_params()
        assert all(p.name.endswith((".lora_a", ".lora_b")) for p in trainable)
        assert sum(p.size for p in trainable) == layers * per_layer == lora_parameter_count(config, rank, targets)


def test_zero_adapter_leaves_logits_unchanged(workdir):
    from baichuan2.lora import adapter_params, apply_lora
    model = loaded_model(workdir / "base")
    before = logits(model, IDS)
    apply_lora(model, 4, 8, 0.1, ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"])  # dropout: eval mode
    model.set_train(False)
    assert all(np.any(p.asnumpy() != 0) == p.name.endswith("lora_a") for p in adapter_params(model))  # B = 0
    np.testing.assert_array_equal(logits(model, IDS), before)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_only_adapters_train_and_are_saved(workdir, lora_run):
    out, stdout = lora_run
    config = tiny_config()
    from baichuan2.lora import lora_parameter_count
    count = lora_parameter_count(config, RANK, TARGETS)
    assert f"{count} trainable parameters" in stdout
    base = load_file(str(workdir / "base" / "model.safetensors"))
    final = load_file(str(out / "debug" / "weights_rank0.safetensors"))
    adapters = {n: a for n, a in final.items() if n.endswith((".lora_a", ".lora_b"))}
    assert sum(a.size for a in adapters.values()) == count
    for name, array in base.items():  # frozen: bit-identical
        assert np.array_equal(final[name], array), name
    assert all(np.any(a != 0) for n, a in adapters.items() if n.endswith("lora_b"))  # B left zero: it trained
    # checkpoints and the final adapter dir hold the adapters only, with an optimizer state for them only
    step = out / "checkpoints" / f"step_{STEPS:06d}"
    from baichuan2.lora import read_adapter
    for directory in (step, out / "adapter"):  # PEFT's layout (tests/test_peft_adapter.py), read back exactly
        adapter_config = json.loads((directory / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == "LORA"
        assert adapter_config["base_model_name_or_path"] == str(workdir / "base")  # --load_checkpoint
        saved, lora = read_adapter(str(directory))
        assert sorted(saved) == sorted(adapters) and (lora["rank"], lora["alpha"]) == (RANK, 16.0)
        assert not (directory / "model.safetensors").exists()
    for name, array in read_adapter(str(out / "adapter"))[0].items():
        np.testing.assert_array_equal(array, adapters[name], err_msg=name)
    optimizer = load_file(str(step / "optimizer.safetensors"))
    moments = [n for n in optimizer if n.startswith(("adam_m", "adam_v"))]
    assert moments and all(n.endswith((".lora_a", ".lora_b")) for n in moments)
    assert not (out / "model").exists()
    assert (out / "loss_curve.png").is_file() and (out / "tensorboard").is_dir()


@pytest.mark.slow
def test_data_parallel_lora_under_msrun(workdir):
    """The same LoRA run launched as full finetuning is: msrun.sh, 2 workers. Both ranks end with the same
    adapters, the base stays bit-identical, and the ranks trained on disjoint rows."""
    out = workdir / "dp"
    logs = workdir / "dp_logs"
    proc = msrun([" ".join(finetune_args(workdir, out)), 2, free_port(), logs], workdir, logs)
    assert wait(proc, 300) == 0, open(str(logs) + ".out").read()[-3000:]
    assert_same_weights(out / "debug" / "weights_rank0.safetensors", out / "debug" / "weights_rank1.safetensors",
                        atol=0)
    final = load_file(str(out / "debug" / "weights_rank0.safetensors"))
    for name, array in load_file(str(workdir / "base" / "model.safetensors")).items():
        assert np.array_equal(final[name], array), name
    seen = []
    for rank in range(2):
        with open(out / "debug" / f"samples_rank{rank}.jsonl") as f:
            seen.append([i for r in map(json.loads, f) for i in r["indices"]])
    assert sorted(seen[0][:ROWS // 2] + seen[1][:ROWS // 2]) == list(range(ROWS))  # first epoch: split, whole
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss_curve.png").is_file()


@pytest.mark.slow
def test_loss_falls(lora_run):
    out, _ = lora_run
    with open(out / "train_log.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == STEPS
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses


@pytest.mark.slow
def test_resume_reproduces_adapter(workdir, lora_run):
    out, _ = lora_run
    resumed = workdir / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:06d}")
    shutil.rmtree(resumed / "adapter")
    stdout = run_finetune(workdir, resumed, "--resume")
    assert "resuming from" in stdout and "step_000008" in stdout
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------- merge + serve
@pytest.fixture(scope="module")
def merged_dir(workdir, lora_run):
    out, _ = lora_run
    merged = workdir / "merged"
    proc = subprocess.run([sys.executable, MERGE, "--base", str(workdir / "base"), "--adapter", str(out / "adapter"),
                           "--output_path", str(merged)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return merged


@pytest.mark.slow
def test_merged_logits_match_adapter_model(workdir, lora_run, merged_dir):
    out, _ = lora_run
    with_adapter = logits(loaded_model(workdir / "base", out / "adapter"), IDS)
    merged = logits(loaded_model(merged_dir), IDS)
    base = logits(loaded_model(workdir / "base"), IDS)
    assert np.abs(with_adapter - base).max() > 1e-3  # the adapter does something
    np.testing.assert_allclose(merged, with_adapter, rtol=0, atol=1e-5)
    for name in ("tokenizer.model", "tokenizer_config.json", "modeling_baichuan.py", "generation_config.json"):
        assert (merged_dir / name).is_file(), name


@pytest.mark.slow
def test_merge_errors(workdir, tmp_path):
    proc = subprocess.run([sys.executable, MERGE, "--base", str(workdir / "base"), "--adapter", str(tmp_path),
                           "--output_path", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no LoRA adapter" in proc.stderr


@pytest.mark.slow
def test_merged_dir_serves_through_openmind(workdir, lora_run, merged_dir, tmp_path):
    """The model card's call on the merged directory; its greedy tokens are those of base + adapter."""
    from baichuan2 import openmind_compat
    if not openmind_compat.is_installed():
        pytest.fail("openmind compatibility hook not installed (run scripts/setup_env.sh)")
    script = f"""
import json
from openmind import pipeline
p = pipeline(task="text_generation", model={str(merged_dir)!r}, framework='ms', trust_remote_code=True)
result = p("<reserved_106>你是谁?<reserved_107>", do_sample=False)
prompt_ids = p.pipeline.tokenizer.encode("<reserved_106>你是谁?<reserved_107>")
ids = p.pipeline.network.generate([prompt_ids], do_sample=False, max_new_tokens=4)[0]
print("RESULT " + json.dumps({{"result": result, "prompt_ids": prompt_ids, "ids": ids}}, ensure_ascii=False))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads(lines[-1][len("RESULT "):])
    text = check["result"][0]["text_generation_text"][0]
    prompt = "<reserved_106>你是谁?<reserved_107>"
    assert text.startswith(prompt) and len(text) > len(prompt), text
    # greedy continuation of the unmerged model (no cache, one forward per token)
    out, _ = lora_run
    model = loaded_model(workdir / "base", out / "adapter")
    ids = list(check["prompt_ids"])
    for _ in range(4):
        ids.append(int(logits(model, np.array([ids], np.int32))[0, -1].argmax()))
    assert check["ids"] == ids


def test_memory_budget_table():
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.memory_budget import describe_lora, lora_budget
    config = BaichuanConfig.from_preset("baichuan2_7b")
    out = "\n".join(describe_lora("baichuan2_7b", config, 16, ["W_pack"]))
    rows = lora_budget(config, 3 * 16 * 2 * 4096 * 32, 4096, 1)
    assert rows["optimizer states (AdamW m, v)"][0] == 8 * config.num_parameters()
    assert rows["weights"][1] == 2 * config.num_parameters() + 4 * 3 * 16 * 2 * 4096 * 32
    assert "12.58M trainable" in out and "| fits (<= 90%), no recomputation   |            no |      yes |" in out


def test_documented_budget_is_the_scripts_output():
    """The budget table in docs/LORA.md is what the script prints, not numbers typed by hand."""
    code, out, err = call_script(os.path.join(REPO, "example", "lora_memory_budget.py"), [])
    assert code == 0, err
    printed = out[out.index("baichuan2_7b:"):].strip()  # mindformers may log a line before the table
    doc = os.path.join("docs", "LORA.md")
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        assert f"```\n{printed}\n```" in f.read(), f"{doc}: rerun example/lora_memory_budget.py and paste its table"
