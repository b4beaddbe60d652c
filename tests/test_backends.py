"""Every backend on the same inputs, compared with the composed one (the reference: stock MindSpore ops).

One model definition (modeling_baichuan.py) runs on several backends (backend_composed, backend_ascend through the
CPU emulators of tests/ascend_emulators.py, backend_cpu op by op and whole-stack). Whoever changes a primitive
(attention, norm, positions) runs this file: it names every backend and path that disagrees, not just the first.
Paths: the uncached forward of a left-padded batch (training / scoring), and a cached prefill followed by decode
steps (generation), for RoPE and ALiBi.
"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import ascend_emulators as emu
from baichuan2 import backend_cpu, kernels
from baichuan2.modeling_baichuan import BACKENDS
from baichuan2.random_model import WEIGHT_FORMATS, build_random_model

SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=352, vocab_size=300,
             max_position_embeddings=128, model_max_length=128)
PROMPTS = (5, 2, 7)  # a left-padded batch of three prompts
DECODE_STEPS = 3
# Relative to the reference's largest logit. The CPU kernels: float32 sums in another order. Ascend: its attention
# runs in bfloat16 (FlashAttentionScore takes no float32), 8 significant bits.
TOLERANCE = {"cpu-kernels": 1e-4, "cpu-stack": 1e-4, "ascend": 0.03}


def run_paths(model):
    """{path: logits} for the uncached forward and the cached prefill + decode steps of the same batch."""
    prompt, slots = max(PROMPTS), max(PROMPTS) + DECODE_STEPS
    tokens = (np.arange(10, 10 + len(PROMPTS) * slots, dtype=np.int32).reshape(len(PROMPTS), slots) * 7) % 290 + 3
    mask = np.zeros((len(PROMPTS), slots), np.int32)
    for row, length in enumerate(PROMPTS):
        mask[row, prompt - length:prompt] = 1
    out = {"forward": model(Tensor(tokens[:, :prompt]), attention_mask=Tensor(mask[:, :prompt])).asnumpy()[:, -1]}
    prefill, decode = model.cached_step_cells()
    k, v = model.empty_caches(len(PROMPTS), slots)
    logits, k, v = prefill.step(Tensor(tokens[:, :prompt]), Tensor(mask[:, :prompt].copy()), k, v)
    out["prefill"] = logits.asnumpy()
    for slot in range(prompt, slots):
        mask[:, slot] = 1
        logits, k, v = decode.step(Tensor(tokens[:, slot:slot + 1]), Tensor(mask.copy()), Tensor(slot, ms.int32), k, v)
        out[f"decode {slot - prompt + 1}"] = logits.asnumpy()
    return out


def disagreements(encoding, backends):
    """Lines naming each (backend, path) whose logits differ from the composed backend's beyond its tolerance."""
    shape = dict(SHAPE, position_encoding=encoding)
    want = run_paths(build_random_model(shape, "float32", backend="composed"))
    found = []
    for name in backends:
        got = run_paths(build_random_model(shape, "float32", backend=name))
        for path, reference in want.items():
            spread = float(np.abs(reference).max())
            diff = float(np.abs(got[path] - reference).max())
            if not np.isfinite(got[path]).all() or diff > TOLERANCE[name] * spread:
                found.append(f"{name} {path} ({encoding}): max |diff| {diff:.3g} against logits up to {spread:.3g}")
    return found


def cpu_backends():
    reason = backend_cpu.unavailable_reason(build_config())
    if reason:
        pytest.skip(f"the CPU kernel backends cannot run here: {reason}")
    return ["cpu-kernels", "cpu-stack"]


def build_config():
    from baichuan2 import BaichuanConfig  # pylint: disable=import-outside-toplevel
    return BaichuanConfig.from_preset("baichuan2_7b", **SHAPE)


def test_every_backend_is_compared():
    assert set(TOLERANCE) | {"composed"} == set(BACKENDS)


@pytest.mark.parametrize("encoding", ["rope", "alibi"])
def test_backends_agree_with_composed(encoding, pynative, monkeypatch):
    """PyNative (the Ascend emulators check their contracts on concrete shapes): every backend, every path."""
    names = cpu_backends()
    found = disagreements(encoding, names)
    emu.install(monkeypatch)
    found += disagreements(encoding, ["ascend"])
    assert emu.CALLS["FlashAttentionScore"] > 0 and emu.CALLS["RmsNorm"] > 0, "the ascend backend did not run"
    assert not found, "backends disagree with composed:\n" + "\n".join(found)


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["rope", "alibi"])
def test_composed_and_cpu_kernels_agree_in_graph_mode(encoding, graph):
    """The same in GRAPH mode (how generation runs): composed against cpu-kernels (cpu-stack against cpu-kernels in
    GRAPH mode: test_cpu_stack_matches_cpu_kernels below)."""
    cpu_backends()
    found = disagreements(encoding, ["cpu-kernels"])
    assert not found, "backends disagree with composed:\n" + "\n".join(found)


def test_kernel_backends_refuse_training():
    """The kernels have no gradients: a model built to train on them is refused when it is built, with the way out."""
    from baichuan2 import BaichuanForCausalLM  # pylint: disable=import-outside-toplevel
    cpu_backends()
    with pytest.raises(ValueError, match="has no gradients.*'composed'"):
        BaichuanForCausalLM(build_config(), backend="cpu-kernels")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        BaichuanForCausalLM(build_config(), backend="gpu")


# ---------------------------------------------------------------------------------------------- the CPU backends
# Every stored weight format, cpu-kernels against composed and cpu-stack against cpu-kernels (GRAPH mode).
def random_model(weights, backend, encoding="rope"):
    return build_random_model(dict(SHAPE, position_encoding=encoding), weights, backend=backend)


@pytest.mark.parametrize("weights", WEIGHT_FORMATS)
def test_cpu_kernels_match_composed_in_every_format(weights, graph):
    """Every projection and the lm_head through the kernels (q/k/v and gate/up in one call each) gives the composed
    backend's logits for a 12-token forward (the prefill path). float32 / bfloat16 where x is not rounded: float32
    accumulation in another order only (1e-4 of the largest logit); int8 / int4: the kernels quantise x to int8 per
    32 inputs (half a step of 1/127 of the chunk's largest |x| at most; ~0.5% of the largest output a projection,
    exact otherwise: see tests/test_kernels.py), which through this random model's layers moved the logits by up to
    2.3% (int8) and 0.6% (int4) of the largest; bfloat16 on a path with a bfloat16 dot rounds x to 8 significant bits
    (2^-9 relative), smaller still: 5e-2 for all three, far below what a wrong row, block or scale does (O(1))."""
    cpu_backends()
    ids = Tensor(np.arange(3, 15, dtype=np.int32).reshape(1, 12))
    fast = random_model(weights, "cpu-kernels")
    attn, mlp = fast.model.layers[0].self_attn, fast.model.layers[0].mlp
    assert attn.qkv_op is not None and mlp.gate_up_op is not None and fast.lm_head.kernel is not None
    stock = random_model(weights, "composed")
    assert stock.model.layers[0].self_attn.qkv_op is None and stock.lm_head.kernel is None
    tolerance = 5e-2 if kernels.rounds_x(weights) else 1e-4
    want, got = stock(ids).asnumpy(), fast(ids).asnumpy()
    assert np.max(np.abs(got - want)) <= tolerance * np.max(np.abs(want)), np.max(np.abs(got - want)) / np.max(np.abs(want))


def cached_decode_logits(model, steps=4):
    """Logits of a left-padded batch of 3 (prompts of 5, 2 and 7 tokens): the prefill, then `steps` decode steps
    through the model's own cells; also every layer's key cache after the last step, [layers, B, N, L, D] (the
    in-place ones when they are)."""
    prefill, decode = model.cached_step_cells()
    prompt, slots = 7, 7 + steps
    tokens = np.arange(10, 10 + 3 * slots, dtype=np.int32).reshape(3, slots) % 290 + 3
    mask = np.zeros((3, slots), np.int32)
    for row, length in enumerate((5, 2, 7)):
        mask[row, prompt - length:prompt] = 1
    k, v = model.empty_caches(3, slots)
    logits, k, v = prefill.step(Tensor(tokens[:, :prompt]), Tensor(mask), k, v)
    out = [logits.asnumpy()]
    for slot in range(prompt, slots):
        mask[:, slot] = 1
        logits, k, v = decode.step(Tensor(tokens[:, slot:slot + 1]), Tensor(mask), Tensor(slot, ms.int32), k, v)
        out.append(logits.asnumpy())
    keys = k.asnumpy() if isinstance(k, Tensor) else np.stack([layer.asnumpy() for layer in k])
    return np.stack(out), keys


# Every format with RoPE (the op binds each format's weights), ALiBi once (positions do not depend on the format).
# float32 + RoPE in the quick tier, the rest (~8 s each: two models compiled) in the slow one.
CACHED_STACK_CASES = [("float32", "rope")] + [pytest.param(w, e, marks=pytest.mark.slow) for w, e in
                                              [(w, "rope") for w in WEIGHT_FORMATS[1:]] + [("float32", "alibi")]]


@pytest.mark.parametrize("weights,encoding", CACHED_STACK_CASES)
def test_cpu_stack_matches_cpu_kernels(weights, encoding, graph):
    """Prefill and decode steps on cpu-stack (CachedStackLogits: one op for all layers and the lm_head, caches
    written in place; and CachedStack, the lm_head's own kernel after it) give the logits and caches of cpu-kernels
    (projections, layout ops, DecodeAttention, composed attention at prefill). Float32 weights: float32 rounding only
    (1e-4 of the largest value). The other formats' decode projections round x (bfloat16: to 8 bits; int8 / int4: to
    int8 per 32 inputs), so a last-bit difference upstream (the op's own SiLU and RMSNorm against MindSpore's) can
    flip a rounding: 1e-2 there, still far below what a wrong position, slot or head does (the ALiBi sign reversed:
    76%). The caches the caller passed in hold the new rows afterwards (the op writes into the caller's buffers)."""
    cpu_backends()
    fused = random_model(weights, "cpu-stack", encoding)
    assert fused.caches_in_place() and fused.head_stack_op is not None
    layers = fused.config.num_hidden_layers
    per_weight = 3 if weights == "int4_asym" else 2 if weights.startswith("int") else 1
    assert len(fused.model.stack_inputs) == layers * (2 + 7 * per_weight)
    split = random_model(weights, "cpu-kernels", encoding)
    assert not split.caches_in_place()
    got, got_k = cached_decode_logits(fused)
    want, want_k = cached_decode_logits(split)
    assert np.abs(got_k).min(axis=(1, 2, 4))[:, -1].min() > 0  # every layer holds the last step's row
    tolerance = 1e-4 if weights == "float32" else 1e-2
    assert np.max(np.abs(got_k - want_k)) <= tolerance * np.max(np.abs(want_k))
    assert np.max(np.abs(got - want)) <= tolerance * np.max(np.abs(want))
    # CachedStack, the stack without the lm_head (what a head without a kernel gets): new step cells trace it
    fused.head_stack_op = None
    alone = cached_decode_logits(fused)[0]
    assert np.max(np.abs(alone - want)) <= tolerance * np.max(np.abs(want))


@pytest.mark.slow
def test_cpu_stack_on_every_isa_path(forced_isa, graph):
    """CachedStack's attention and SiLU loops are compiled per instruction-set path like the projections: on each,
    prefill and decode logits equal cpu-kernels' (float32 weights, RoPE; see the test above)."""
    got = cached_decode_logits(random_model("float32", "cpu-stack"))[0]
    want = cached_decode_logits(random_model("float32", "cpu-kernels"))[0]
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_lora_needs_a_trainable_backend(graph):
    """A LoRA wrapper computes more than its weight, which the kernel backends' fused calls and whole-stack op would
    skip: apply_lora refuses them, and on composed (what from_pretrained(dir, backend="composed") gives) the adapted
    q/k/v run through the wrappers."""
    from baichuan2.lora import apply_lora, adapter_params  # pylint: disable=import-outside-toplevel
    cpu_backends()
    with pytest.raises(ValueError, match="trainable backend.*'cpu-stack'"):
        apply_lora(random_model("float32", "cpu-stack"), rank=2, alpha=4, targets=("W_pack",))
    ids = Tensor(np.arange(3, 9, dtype=np.int32).reshape(1, 6))
    before = random_model("float32", "composed")(ids).asnumpy()
    model = random_model("float32", "composed")  # the same weights; not called before its adapters go in
    apply_lora(model, rank=2, alpha=4, targets=("W_pack",))
    for p in adapter_params(model):
        p.set_data(Tensor(np.full(p.shape, 0.05, np.float32)))
    assert np.abs(model(ids).asnumpy() - before).max() > 1e-3  # the adapters take part
