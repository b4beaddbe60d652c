"""Every family's finetune recipe (configs/finetune_<family>.yaml) runs a couple of real training steps on CPU.

The recipe is used as written except for what cannot run on a CPU test machine: the model shape is shrunk to the
family's tiny parity checkpoint (converted with convert_weight.py and loaded as the starting weights), the rows are
32 tokens from the bundled BELLE sample (tokenised with the family's tokenizer and chat layout) and the run stops
after 2 optimizer steps of batch 2, and the `parallel:` section (the parallel optimizer and pipeline stages are
Ascend-only: CPU refuses them) is dropped. Everything else (preset switches, parameter dtype, optimizer and its
float32 state, schedule, loss scaling, clipping, recomputation, output layout) comes from the yaml.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import yaml

import baichuan2.data as bp
from baichuan2 import BaichuanConfig, BaichuanForCausalLM
from helpers import PYTHON, REPO

FINETUNE = os.path.join(REPO, "example", "finetune.py")
SEQ = 32
# family preset -> (parity checkpoint used for its tiny shape, tokenizer file for its rows)
FAMILIES = {
    "baichuan2_7b": ("baichuan2_7b", "dataset/tokenizer.model"),
    "oppo_experiemental_7b": ("baichuan2_7b", "dataset/tokenizer.model"),
    "baichuan2_13b": ("baichuan2_13b", "dataset/tokenizer.model"),
    "baichuan_7b": ("baichuan_7b", "dataset/tokenizer.model"),
    "xverse_7b": ("xverse_7b", "dataset/xverse/tokenizer.json"),
}
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "model_max_length")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """tokenizer file -> MindRecord of the bundled sample (the layout follows the tokenizer: .json -> XVERSE)."""
    out = {}
    for tokenizer in sorted({t for _, t in FAMILIES.values()}):
        path = tmp_path_factory.mktemp("rows") / "belle.mindrecord"
        code = bp.main(["--input_glob", os.path.join(REPO, "dataset", "belle_sample.json"), "--model_file",
                        os.path.join(REPO, tokenizer), "--output_file", str(path), "--seq_length", str(SEQ),
                        "--quiet"])
        assert code == 0
        out[tokenizer] = str(path)
    return out


@pytest.fixture(scope="module")
def checkpoints(parity_model_dir):
    return {parity: parity_model_dir(parity) for parity in sorted({p for p, _ in FAMILIES.values()})}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recipe_matches_its_family(family):
    with open(os.path.join(REPO, "configs", f"finetune_{family}.yaml"), encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    assert recipe["model"]["preset"] == family
    config = BaichuanConfig.from_preset(family, **recipe["model"]["overrides"])
    assert recipe["data"]["seq_length"] <= config.max_context
    tokenizer_dir = os.path.join(REPO, recipe["output"]["tokenizer_dir"])
    wanted = "tokenizer.json" if config.chat_format == "xverse" else "tokenizer.model"
    assert os.path.isfile(os.path.join(tokenizer_dir, wanted))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_finetune_steps(family, rows, checkpoints, tmp_path):
    parity, tokenizer = FAMILIES[family]
    with open(os.path.join(REPO, "configs", f"finetune_{family}.yaml"), encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    start = BaichuanConfig.from_hf_config(checkpoints[parity])
    recipe["model"]["overrides"].update({k: getattr(start, k) for k in SHAPE_FIELDS})
    recipe["model"]["load_checkpoint"] = checkpoints[parity]
    recipe["data"].update(train_dataset=rows[tokenizer], seq_length=SEQ)
    recipe["train"].update(max_steps=2, batch_size=2, lr=1e-3)
    recipe["output"].update(output_dir=str(tmp_path / "out"), save_steps=2)
    recipe.pop("parallel", None)  # Ascend-only layout; one CPU process trains with plain data parallelism
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))

    result = subprocess.run([PYTHON, FINETUNE, "--config", str(recipe_path)], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"training {family}" in result.stdout
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)

    # the servable model directory holds the family's switches and tokenizer, and the trained weights moved
    model_dir = tmp_path / "out" / "model"
    trained = BaichuanConfig.from_hf_config(str(model_dir))
    for field in ("position_encoding", "norm_head", "fused_qkv", "chat_format", "eos_token_id", "pad_token_id"):
        assert getattr(trained, field) == getattr(BaichuanConfig.from_preset(family), field), field
    assert os.path.isfile(model_dir / os.path.basename(tokenizer))
    model = BaichuanForCausalLM.from_pretrained(str(model_dir))
    before = BaichuanForCausalLM.from_pretrained(checkpoints[parity])
    delta = np.abs(model.lm_head.weight.asnumpy() - before.lm_head.weight.asnumpy()).max()
    assert 0 < delta < 1
