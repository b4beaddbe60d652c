"""Logit parity with an independent implementation: transformers' PyTorch Llama with the Baichuan quirks applied.

The Hugging Face checkpoints and reference logits in tests/fixtures/parity/ were made by tools/parity/make_goldens.py
(run in its own torch venv; see its README). Here each checkpoint goes through convert_weight.py and our model must
reproduce the reference logits to 1e-4 in float32, in PyNative and GRAPH mode, with and without left padding.
"""
import os

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file

from baichuan2 import BaichuanForCausalLM
from helpers import PARITY

FAMILIES = ["baichuan2_7b", "baichuan_7b", "baichuan2_13b", "xverse_7b"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def converted(parity_model_dir):
    """family -> (our model directory made by convert_weight.py, reference tensors)."""
    out = {}
    for family in FAMILIES:
        out[family] = (parity_model_dir(family), load_file(os.path.join(PARITY, family, "reference.safetensors")))
    return out


def max_diff_on_tokens(ours, reference, mask):
    keep = mask.astype(bool)
    return float(np.abs(ours[keep] - reference[keep]).max())


def forward(model, ids, mask=None):
    mask = np.ones_like(ids) if mask is None else mask
    return model(ms.Tensor(ids.astype(np.int32)), attention_mask=ms.Tensor(mask.astype(np.int32))).asnumpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference(converted, family, ms_mode):
    model_dir, ref = converted[family]
    model = BaichuanForCausalLM.from_pretrained(model_dir)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    assert mask.min() == 0, "the reference batch must contain left padding"
    padded = forward(model, ids, mask)
    assert max_diff_on_tokens(padded, ref["logits"], mask) <= TOLERANCE
    alone = forward(model, ids[:1])
    assert float(np.abs(alone - ref["logits_nopad"]).max()) <= TOLERANCE


def test_alibi_beyond_training_length(converted, ms_mode):
    model_dir, ref = converted["baichuan2_13b"]
    model = BaichuanForCausalLM.from_pretrained(model_dir)
    ids = ref["long_input_ids"]
    assert ids.shape[1] > model.config.model_max_length
    assert float(np.abs(forward(model, ids) - ref["long_logits"]).max()) <= TOLERANCE


@pytest.mark.parametrize("family", ["baichuan2_7b", "baichuan2_13b"])
def test_parity_catches_a_missing_norm_head(converted, family, pynative):
    model_dir, ref = converted[family]
    model = BaichuanForCausalLM.from_pretrained(model_dir, norm_head=False)
    assert float(np.abs(forward(model, ref["input_ids"][:1]) - ref["logits_nopad"]).max()) > 100 * TOLERANCE


def test_parity_catches_a_wrong_qkv_split(converted, pynative):
    model_dir, ref = converted["baichuan2_7b"]
    model = BaichuanForCausalLM.from_pretrained(model_dir)
    attn = model.model.layers[0].self_attn
    q, k = attn.q_proj.weight.value().copy(), attn.k_proj.weight.value().copy()
    attn.q_proj.weight.set_data(k)
    attn.k_proj.weight.set_data(q)
    assert float(np.abs(forward(model, ref["input_ids"][:1]) - ref["logits_nopad"]).max()) > 100 * TOLERANCE
