"""The full-finetune memory budget against hand computations for MindFormers' published Baichuan2 settings, the
docs showing the script's output (docs/ASCEND_TRAINING.md, docs/LORA.md)."""
import os

import pytest

from helpers import REPO, call_script
from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.memory_budget import GIB, budget, fits, normhead_bytes
from baichuan2.training.parallel import ParallelRecipeError

# Hand computation. Parameters of a Baichuan2 decoder: embedding and lm_head (2 x vocab x hidden), per layer q, k, v,
# o (4 h^2), gate, up, down (3 h i) and two RMSNorm weights (2 h), the final norm (h).
# Baichuan2-7B: h 4096, i 11008, vocab 125696, 32 layers.
P_7B = 2 * 125696 * 4096 + 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
NORMS_7B = (2 * 32 + 1) * 4096           # 8 KB each in float16: below the 64 KB sharding threshold
MATRICES_7B = P_7B - NORMS_7B
# Baichuan2-13B: h 5120, i 13696, 40 layers.
P_13B = 2 * 125696 * 5120 + 40 * (4 * 5120 ** 2 + 3 * 5120 * 13696 + 2 * 5120) + 5120
NORMS_13B = (2 * 40 + 1) * 5120
MATRICES_13B = P_13B - NORMS_13B

TOKENS = 4096                            # batch 1 x seq 4096
LOGITS = 2 * 4 * TOKENS * 125696         # float32 logits + log-softmax
LOSS_BACKWARD = 2 * 4 * TOKENS * 125696  # the log-softmax gradient's two float32 [S, V] temporaries
NORMHEAD = TOKENS * 125696 * 2           # the product x w [S, V] in float16, kept for the 1/|w| scaling
MASKS = 2 * TOKENS * TOKENS              # visible (bool) + the kernel's discard mask (uint8), [1, 1, S, S]


def softmax_stats(layers, heads):
    """FlashAttentionScore's softmax max and sum, [B, N, S, 8] float32 each, per layer."""
    return layers * 2 * heads * TOKENS * 8 * 4


def last_stage_extras(hidden):
    """Kept on the last stage beside the layers: the final norm's input and output, the NormHead product, masks."""
    return 2 * TOKENS * hidden * 2 + NORMHEAD + MASKS


def test_hand_parameter_counts_are_the_published_sizes():
    assert P_7B == 7_505_973_248 and P_13B == 13_896_668_160  # "7.51B" and "13.90B"
    assert BaichuanConfig.from_preset("baichuan2_7b").num_parameters() == P_7B
    assert BaichuanConfig.from_preset("baichuan2_13b").num_parameters() == P_13B


MF_7B = dict(parallel={"data_parallel": 8, "enable_parallel_optimizer": True}, seq_length=4096, batch_size=1,
             param_dtype="float16", compute_dtype="float16", moment_dtype="float32")


def test_mindformers_7b_dp8_parallel_optimizer_no_recompute():
    """dp 8, parallel optimizer level1, float16 weights, float32 moments, no recomputation."""
    stage, rows = budget(BaichuanConfig.from_preset("baichuan2_7b"), recompute={"recompute": False}, **MF_7B)
    weights = 2 * MATRICES_7B / 8 + 2 * NORMS_7B           # stored float16 shard; norms whole
    gathered = 2 * MATRICES_7B                              # all-gathered float16 matrices kept for backward
    grads = weights                                         # reduce-scattered as produced (no accumulation)
    moments = 2 * 4 * MATRICES_7B / 8 + 2 * 4 * NORMS_7B    # m and v in float32
    acts = 32 * 2 * TOKENS * (8 * 4096 + 4 * 11008) + LOGITS
    assert (weights, gathered, moments, acts) == (1_876_959_232, 15_011_414_016, 7_507_836_928, 24_251_465_728)
    assert stage == 0
    kept = {"attention softmax max/sum": softmax_stats(32, 32), "position masks": MASKS, "ALiBi shift": 0,
            "final norm in/out": 2 * TOKENS * 4096 * 2, "NormHead x w": NORMHEAD}
    transient = {"transient: loss backward": LOSS_BACKWARD, "transient: ALiBi build": 0}
    assert rows == dict({"weights": weights, "weights gathered/cast for compute": gathered, "gradients": grads,
                         "optimizer state": moments, "activations": acts}, **kept, **transient,
                        total=weights + gathered + grads + moments + acts + sum(kept.values()) + LOSS_BACKWARD)
    assert rows["total"] == 56_042_242_048  # 52.2 GiB: the new terms add 5.1 GiB to the old 47.05
    assert fits(rows["total"], 59) and not fits(rows["total"], 57)


def test_mindformers_13b_dp8_parallel_optimizer_full_recompute():
    config = BaichuanConfig.from_preset("baichuan2_13b")
    _, rows = budget(config, recompute={"recompute": True}, **MF_7B)
    weights = 2 * MATRICES_13B / 8 + 2 * NORMS_13B
    gathered = 2 * MATRICES_13B
    moments = 8 * MATRICES_13B / 8 + 8 * NORMS_13B
    # each of 40 layers keeps its input; one layer's working set (8 h + 4 i per token) at a time; logits
    acts = 40 * 2 * TOKENS * 5120 + 2 * TOKENS * (8 * 5120 + 4 * 13696) + LOGITS
    assert acts == 6_580_862_976
    assert rows["weights"] == rows["gradients"] == weights == 3_474_892_800
    assert (rows["weights gathered/cast for compute"], rows["optimizer state"], rows["activations"]) == (
        gathered, moments, acts)
    alibi = 40 * TOKENS * TOKENS * 2                   # the float16 shift handed to FlashAttentionScore
    assert (rows["ALiBi shift"], rows["transient: ALiBi build"]) == (alibi, 2 * 2 * alibi)
    kept = acts + softmax_stats(1, 40) + alibi + last_stage_extras(5120)
    static = 2 * weights + gathered + moments
    # the ALiBi build (5 GiB) comes before any activation; the loss backward (3.75 GiB) after all of them
    assert rows["total"] == static + max(kept + LOSS_BACKWARD, 2 * 2 * alibi) == 61_841_338_368  # 57.6 GiB
    assert not fits(rows["total"], 59)  # over 90% of 59 GiB: configs/finetune_baichuan2_13b.yaml uses level3
    level3 = dict(MF_7B, parallel=dict(MF_7B["parallel"], optimizer_level="level3"))
    _, rows3 = budget(config, recompute={"recompute": True}, **level3)
    assert rows3["weights gathered/cast for compute"] == 125696 * 5120 * 2  # the largest unit: one vocab matrix
    assert fits(rows3["total"], 59)
    # without recomputation 13B does not fit: that is why MindFormers recomputes it
    _, no_rc = budget(config, recompute={"recompute": False}, **MF_7B)
    assert no_rc["activations"] == 40 * 2 * TOKENS * (8 * 5120 + 4 * 13696) + LOGITS
    assert not fits(no_rc["total"], 59)


def test_mindformers_7b_two_nodes_worst_stage_is_the_first():
    """pp 2, 8 micro batches: stage 0 holds the embedding, 16 layers and 2 micro batches in flight (1F1B); gradients
    are accumulated over micro batches, so level1 keeps them whole."""
    two_nodes = dict(MF_7B, parallel=dict(MF_7B["parallel"], pipeline_stage=2, micro_batch_num=8))
    stage, rows = budget(BaichuanConfig.from_preset("baichuan2_7b"), recompute=None, **two_nodes)
    matrices = 16 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 125696 * 4096
    norms = 2 * 16 * 4096
    acts = 16 * 2 * 2 * TOKENS * (8 * 4096 + 4 * 11008)  # no logits on the first stage
    assert stage == 0
    assert rows["weights"] == 2 * matrices / 8 + 2 * norms
    assert rows["gradients"] == 2 * (matrices + norms)
    assert rows["optimizer state"] == matrices + 8 * norms
    assert rows["activations"] == acts
    assert rows["total"] == (rows["weights"] + rows["gradients"] + rows["optimizer state"] + 2 * matrices + acts
                             + softmax_stats(16 * 2, 32) + 2 * MASKS)  # no final norm, lm_head or loss here
    assert rows["total"] == 40_172_257_280  # 37.4 GiB
    level2 = dict(two_nodes, parallel=dict(two_nodes["parallel"], optimizer_level="level2"))
    _, sharded_grads = budget(BaichuanConfig.from_preset("baichuan2_7b"), recompute=None, **level2)
    assert sharded_grads["gradients"] == rows["weights"]


def test_unsharded_float32_recipe_counts_sixteen_bytes_a_parameter_and_a_cast_copy():
    config = BaichuanConfig.from_preset("baichuan2_7b")
    _, rows = budget(config, {"data_parallel": 8}, None, 4096, 1, "float32", "bfloat16")
    assert rows["weights"] + rows["gradients"] + rows["optimizer state"] == 16 * P_7B
    assert rows["weights gathered/cast for compute"] == 2 * MATRICES_7B
    assert not fits(rows["total"], 59)


def test_layouts_that_do_not_split_the_model_are_refused():
    with pytest.raises(ParallelRecipeError, match="model_parallel 3 does not divide"):
        budget(BaichuanConfig.from_preset("baichuan2_13b"), {"model_parallel": 3}, None, 4096, 1, "float16",
               "float16")


def script_output(module_name, argv):
    """(exit code, stdout, stderr) of example/<module_name>.py run with `argv`."""
    return call_script(os.path.join(REPO, "example", f"{module_name}.py"), argv)


def test_normhead_term_from_the_shapes():
    """Dividing the weight in float32 kept 3 x V x H x 4 bytes (the issue's 5.75 GiB at 7B, 7.2 at 13B); the
    logits scaling keeps the [S, V] product instead."""
    b7, b13 = BaichuanConfig.from_preset("baichuan2_7b"), BaichuanConfig.from_preset("baichuan2_13b")
    assert normhead_bytes(b7, TOKENS, 2, division=True) == 3 * 125696 * 4096 * 4
    assert round(normhead_bytes(b7, TOKENS, 2, division=True) / GIB, 2) == 5.75
    assert round(normhead_bytes(b13, TOKENS, 2, division=True) / GIB, 1) == 7.2
    assert normhead_bytes(b7, TOKENS, 2) == NORMHEAD == TOKENS * b7.vocab_size * 2
    assert normhead_bytes(b7, TOKENS, 2, model_parallel=2) == NORMHEAD // 2
    assert normhead_bytes(BaichuanConfig.from_preset("baichuan_7b"), TOKENS, 2) == 0  # plain lm_head
    _, rows = budget(b13, recompute={"recompute": True}, **MF_7B)
    assert rows["NormHead x w"] == TOKENS * b13.vocab_size * 2


def test_shipped_recipes_fit_with_every_term_printed():
    code, out, _ = script_output("memory_budget", [])
    assert code == 0
    blocks = ["configs/" + b for b in out.strip().split("\n\nconfigs/")]
    blocks[0] = blocks[0][len("configs/"):]
    assert [b.split(":")[0] for b in blocks] == [f"configs/finetune_baichuan2_{n}.yaml" for n in (
        "7b", "7b_2nodes", "13b", "13b_2nodes")]
    for block in blocks:
        for term in ("NormHead x w", "transient: loss backward", "transient: ALiBi build", "ALiBi shift",
                     "attention softmax max/sum", "final norm in/out", "position masks"):
            assert f"| {term}" in block
        total = float(block.rsplit("| total (peak: transients not at once)", 1)[1].split("|")[1])
        assert total <= 0.9 * 59, block


def test_ascend_doc_shows_the_scripts_tables():
    code, out, _ = script_output("memory_budget", [])
    assert code == 0
    printed = out[out.index("configs/finetune_baichuan2_7b.yaml:"):].strip()
    assert "fits: 45.3 GiB" in printed and "fits: 32.9 GiB" in printed
    doc = os.path.join("docs", "ASCEND_TRAINING.md")
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        assert f"```\n{printed}\n```" in f.read(), f"{doc}: rerun example/memory_budget.py and paste its tables"


def test_lora_table_unchanged():
    """The LoRA script counts activations with baichuan2.memory_budget's activation_bytes: its documented table is
    what that count gives."""
    code, out, _ = script_output("lora_memory_budget", [])
    assert code == 0
    printed = out[out.index("baichuan2_7b:"):].strip()
    assert "| activations, no recomputation     |          22.6 |     22.6 |" in printed
    assert "| total, full recomputation         |         131.3 |     19.4 |" in printed
    with open(os.path.join(REPO, "docs", "LORA.md"), encoding="utf-8") as f:
        assert f"```\n{printed}\n```" in f.read(), "docs/LORA.md"


def test_bad_options_exit_2():
    code, _, err = script_output("memory_budget", ["--preset", "baichuan2_13b", "--data_parallel", "3",
                                                   "--model_parallel", "3"])
    assert code == 2
    assert "model_parallel 3 does not divide the model's num_attention_heads 40" in err


def test_master_copy_adds_four_bytes_a_parameter_sharded_like_the_moments():
    """train.master_weights (training/optim.py's float32 master copy): the shipped 7B recipe's setting."""
    config = BaichuanConfig.from_preset("baichuan2_7b")
    _, plain = budget(config, recompute={"recompute": False}, **MF_7B)
    _, master = budget(config, recompute={"recompute": False}, master_weights=True, **MF_7B)
    assert master["optimizer state"] == 12 * MATRICES_7B / 8 + 12 * NORMS_7B
    assert master["total"] - plain["total"] == 4 * MATRICES_7B / 8 + 4 * NORMS_7B
    assert not fits(master["total"], 59)  # 55.8 GiB: over 90% of 59, so the shipped 7B recipe adds select recompute
    _, select = budget(config, recompute={"select_recompute": True}, master_weights=True, **MF_7B)
    assert master["activations"] - select["activations"] == 32 * 2 * TOKENS * 4 * 11008 - 2 * TOKENS * 4 * 11008
    assert fits(select["total"], 59)
    _, fp32 = budget(config, {"data_parallel": 8}, None, 4096, 1, "float32", "bfloat16", master_weights=True)
    assert fp32["optimizer state"] == 8 * P_7B  # float32 parameters are their own master: no copy
