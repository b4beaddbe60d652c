"""The ascend backend (backend_ascend.py), run on CPU through contract-enforcing emulators
(tests/ascend_emulators.py): it must give the composed branch's logits, within bfloat16 tolerance, for a RoPE and
an ALiBi family, in the training forward (also on packed rows), the cached prefill and the KV-cache decode, with left
padding.
What only a real device can confirm is listed in docs/ascend-first-run.md."""
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor
from safetensors.numpy import load_file

import ascend_emulators as emu
from baichuan2 import BaichuanForCausalLM
from baichuan2.backend_ascend import AscendBackend, LayoutError, varlen_indices
from baichuan2.configuration_baichuan import BaichuanConfig
from helpers import PARITY

FAMILIES = ["baichuan2_7b", "baichuan2_13b"]  # RoPE, ALiBi (6 heads: non-power-of-two slopes)
# attention runs in bfloat16 on the fused branch (8-bit mantissa): relative to the logits' spread
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def converted(parity_model_dir):
    out = {}
    for family in FAMILIES:
        model_dir = parity_model_dir(family)
        out[family] = (model_dir, load_file(os.path.join(PARITY, family, "reference.safetensors")))
    return out


@pytest.fixture
def models(converted, pynative, monkeypatch):
    """family -> (composed model, fused model with the emulators in place)."""
    def build(family):
        model_dir, ref = converted[family]
        composed = BaichuanForCausalLM.from_pretrained(model_dir, backend="composed")
        emu.install(monkeypatch)
        fused = BaichuanForCausalLM.from_pretrained(model_dir, backend="ascend")
        return composed, fused, ref
    return build


def assert_close(fused, composed, where):
    spread = float(np.abs(composed).max())
    diff = float(np.abs(fused - composed).max())
    assert np.isfinite(fused).all(), f"{where}: non-finite logits on the fused branch"
    assert diff <= TOLERANCE * spread, f"{where}: fused differs from composed by {diff:.4g} (logits up to {spread:.3g})"


def cached_logits(model, prompts, continuation, slots):
    """Logits [B, V] of the prefill, then of each decode step fed `continuation` (one token per row per step)."""
    prefill, decode = model.cached_step_cells()
    prompt_len = max(len(p) for p in prompts)
    batch = len(prompts)
    tokens = np.zeros((batch, slots), np.int32)
    mask = np.zeros((batch, slots), np.int32)
    for row, prompt in enumerate(prompts):  # left padding
        tokens[row, prompt_len - len(prompt):prompt_len] = prompt
        mask[row, prompt_len - len(prompt):prompt_len] = 1
    k, v = model.empty_caches(batch, slots)
    logits, k, v = prefill.step(Tensor(tokens[:, :prompt_len]), Tensor(mask.copy()), k, v)
    out = [logits.asnumpy()]
    for step, column in enumerate(continuation):
        slot = prompt_len + step
        tokens[:, slot] = column
        mask[:, slot] = 1
        logits, k, v = decode.step(Tensor(tokens[:, slot:slot + 1]), Tensor(mask.copy()), Tensor(slot, ms.int32),
                                   k, v)
        out.append(logits.asnumpy())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_branch_matches_composed_in_the_training_forward(models, family):
    composed, fused, ref = models(family)
    ids, mask = Tensor(ref["input_ids"].astype(np.int32)), Tensor(ref["attention_mask"].astype(np.int32))
    assert ref["attention_mask"].min() == 0, "the batch must contain left padding"
    want = composed(ids, attention_mask=mask).asnumpy()
    emu.CALLS.clear()
    got = fused(ids, attention_mask=mask).asnumpy()
    layers = fused.config.num_hidden_layers
    assert emu.CALLS["FlashAttentionScore"] == layers and emu.CALLS["RmsNorm"] == 2 * layers + 1
    if fused.config.position_encoding == "rope":
        assert emu.CALLS["RotaryPositionEmbedding"] == 2 * layers
    real = ref["attention_mask"].astype(bool)
    assert_close(got[real], want[real], "training forward")
    # the loss goes through the same path
    labels = Tensor(ref["input_ids"].astype(np.int32))
    assert abs(float(fused(ids, labels, mask).asnumpy()) - float(composed(ids, labels, mask).asnumpy())) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_branch_matches_composed_on_packed_rows(models, monkeypatch, family):
    """Packed rows (seq_ends = the actual_seq_len column, padded by repeating the last end): a RoPE model's reach
    FlashAttentionScore as TND with the ends (varlen), an ALiBi model's as a block-diagonal mask."""
    composed, fused, ref = models(family)
    ids = ref["input_ids"].astype(np.int32)
    batch, length = ids.shape
    # two conversations + a tail, and the column's padding (a repeated end: a zero-length segment)
    ends = Tensor(np.array([[length // 3, length - 2, length, length]] * batch, np.int32))
    want = composed(Tensor(ids), seq_ends=ends).asnumpy()
    layouts = []
    real = emu.flash_attention_score

    def spy(*args, **kwargs):
        layouts.append(kwargs["input_layout"])
        return real(*args, **kwargs)

    monkeypatch.setattr(emu, "flash_attention_score", spy)
    got = fused(Tensor(ids), seq_ends=ends).asnumpy()
    assert set(layouts) == ({"TND"} if fused.config.position_encoding == "rope" else {"BNSD"})
    assert_close(got, want, "packed training forward")
    # the second conversation's logits are those of the conversation alone (positions restart, nothing leaks)
    alone = composed(Tensor(ids[:, length // 3:length - 2])).asnumpy()
    assert np.abs(want[:, length // 3:length - 2] - alone).max() < 1e-4
    labels = Tensor(ids)
    assert abs(float(fused(Tensor(ids), labels, None, ends).asnumpy()) -
               float(composed(Tensor(ids), labels, None, ends).asnumpy())) < 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_branch_matches_composed_in_cached_prefill_and_decode(models, family):
    composed, fused, ref = models(family)
    prompts = [ref["greedy_prompt_0"].tolist(), ref["greedy_prompt_1"].tolist(), ref["greedy_prompt_1"][-3:].tolist()]
    assert len({len(p) for p in prompts}) == 3, "prompts of three lengths: two rows are left-padded"
    continuation = np.stack([ref["greedy_out_0"][:6], ref["greedy_out_1"][:6], ref["greedy_out_0"][6:12]], 1)
    # 3 rows x 4 heads at decode (S = 1): B*N > 8*S, where the fused rotary is documented as not callable
    assert len(prompts) * fused.config.num_attention_heads > 8
    want = cached_logits(composed, prompts, continuation, slots=24)
    emu.CALLS.clear()
    got = cached_logits(fused, prompts, continuation, slots=24)
    assert emu.CALLS["FlashAttentionScore"] == fused.config.num_hidden_layers * (1 + len(continuation))
    for step, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, "prefill" if step == 0 else f"decode step {step}")


# ---------------------------------------------------------------------------------------------- the emulators
def _t(shape, dtype=ms.float32, seed=0):
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)


def test_flash_attention_emulator_enforces_its_contract():
    q = _t((2, 4, 3, 16), ms.bfloat16)
    fa = emu.flash_attention_score
    with pytest.raises(emu.KernelContractError, match="float16 or bfloat16"):
        fa(q.astype(ms.float32), q.astype(ms.float32), q.astype(ms.float32), 4, input_layout="BNSD")
    causal = Tensor(np.triu(np.ones((3, 3), np.uint8), 1))
    with pytest.raises(emu.KernelContractError, match="real_shift must be"):
        fa(q, q, q, 4, real_shift=_t((2, 1, 3, 3), ms.bfloat16), input_layout="BNSD")  # a mask-shaped shift
    with pytest.raises(emu.KernelContractError, match="real_shift must have"):
        fa(q, q, q, 4, real_shift=_t((1, 4, 3, 3)), input_layout="BNSD")
    with pytest.raises(emu.KernelContractError, match="head size"):
        fa(_t((2, 4, 3, 8), ms.bfloat16), _t((2, 4, 3, 8), ms.bfloat16), _t((2, 4, 3, 8), ms.bfloat16), 4,
           input_layout="BNSD")
    with pytest.raises(emu.KernelContractError, match="attn_mask must be bool"):
        fa(q, q, q, 4, attn_mask=causal.astype(ms.float32), input_layout="BNSD")
    # documented math: softmax(scale * (shift + q k^T)) with 1 = discard; fully discarded rows are undefined (NaN)
    shift = _t((1, 4, 3, 3), ms.bfloat16, seed=1)
    out = fa(q, q, q, 4, real_shift=shift, attn_mask=causal, scalar_value=0.25, input_layout="BNSD")
    q32 = q.astype(ms.float32).asnumpy()
    scores = 0.25 * (shift.astype(ms.float32).asnumpy() + q32 @ q32.swapaxes(-1, -2))
    scores = np.where(causal.asnumpy().astype(bool), -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)) @ q32
    assert np.abs(out.astype(ms.float32).asnumpy() - want).max() < 0.05
    all_hidden = Tensor(np.ones((3, 3), np.uint8))
    assert np.isnan(fa(q, q, q, 4, attn_mask=all_hidden, input_layout="BNSD").astype(ms.float32).asnumpy()).all()


def test_rms_norm_and_rotary_emulators_enforce_their_contracts():
    x = _t((2, 3, 16), ms.bfloat16)
    with pytest.raises(emu.KernelContractError, match="share a dtype"):
        emu.rms_norm(x, _t((16,)), 1e-6)
    y, _ = emu.rms_norm(x.astype(ms.float32), _t((16,), seed=2), 1e-6)
    x32 = x.astype(ms.float32).asnumpy()
    want = x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-6) * _t((16,), seed=2).asnumpy()
    assert np.abs(y.asnumpy() - want).max() < 1e-5
    q = _t((2, 8, 1, 16))  # a decode step: B*N = 16 > 8*S = 8
    cos, sin = _t((2, 1, 1, 16), seed=3), _t((2, 1, 1, 16), seed=4)
    with pytest.raises(emu.KernelContractError, match="not callable"):
        emu.rotary_position_embedding(q, cos, sin, 0)
    q = _t((1, 2, 4, 16))
    cos, sin = _t((1, 1, 4, 16), seed=3), _t((1, 1, 4, 16), seed=4)
    with pytest.raises(emu.KernelContractError, match="x's dtype"):
        emu.rotary_position_embedding(q, cos.astype(ms.bfloat16), sin.astype(ms.bfloat16), 0)
    with pytest.raises(emu.KernelContractError, match="11SD, B1SD or BNSD"):
        emu.rotary_position_embedding(q, _t((1, 4, 1, 16)), _t((1, 4, 1, 16)), 0)  # a BSND table
    got = emu.rotary_position_embedding(q, cos, sin, 0).asnumpy()
    x, c, s_ = q.asnumpy(), cos.asnumpy(), sin.asnumpy()
    assert np.abs(got - (x * c + np.concatenate([-x[..., 8:], x[..., :8]], -1) * s_)).max() < 1e-5


def test_fused_kernels_take_the_recipes_dtypes(pynative, monkeypatch):
    """The 7B/13B recipes run float16/bfloat16 activations with float32 norm weights; the tiny and demo recipes
    compute in float32, which FlashAttentionScore does not take: the fused kernels must adapt both."""
    from baichuan2 import backend_ascend as ascend  # pylint: disable=import-outside-toplevel
    from baichuan2 import backend_composed as composed  # pylint: disable=import-outside-toplevel
    emu.install(monkeypatch)
    x, w = _t((2, 3, 16), ms.float16), _t((16,), seed=5)
    y = ascend.fused_rms_norm(x, w, 1e-6)
    x32 = x.astype(ms.float32).asnumpy()
    want = x32 / np.sqrt((x32 ** 2).mean(-1, keepdims=True) + 1e-6) * w.asnumpy()
    assert y.dtype == ms.float16 and np.abs(y.astype(ms.float32).asnumpy() - want).max() < 1e-2
    q = _t((1, 4, 3, 16))
    visible = Tensor(np.tril(np.ones((3, 3), bool)).reshape(1, 1, 3, 3))
    backend = ascend.AscendBackend(BaichuanConfig.from_preset("tiny", num_attention_heads=4))  # head_dim 16
    out = backend.attention_core(q, q, q, backend.attention_inputs(visible, None, 0.25, ms.float32, 4), 0.25)
    want = composed.attend(q, q, q, composed.attention_bias(visible, None, 4), 0.25).asnumpy()
    assert out.dtype == ms.float32 and np.abs(out.asnumpy() - want).max() < 0.05
    assert emu.CALLS["RmsNorm"] == 1 and emu.CALLS["FlashAttentionScore"] == 1


def test_sparse_causal_mode_contract():
    """sparse_mode 2/3 take only the compressed causal mask, the lower-triangle ALiBi shift form, and modes 6-8 are
    documented as not implemented."""
    q = _t((1, 2, 3, 16), ms.bfloat16)
    fa = emu.flash_attention_score
    compressed = Tensor(np.triu(np.ones((2048, 2048), np.uint8), 1))
    with pytest.raises(emu.KernelContractError, match=r"requires the compressed attn_mask \[2048, 2048\], got None"):
        fa(q, q, q, 2, input_layout="BNSD", sparse_mode=2)
    with pytest.raises(emu.KernelContractError, match=r"got \(3, 3\)"):
        fa(q, q, q, 2, attn_mask=Tensor(np.triu(np.ones((3, 3), np.uint8), 1)), input_layout="BNSD", sparse_mode=2)
    with pytest.raises(emu.KernelContractError, match="exactly above the diagonal"):
        fa(q, q, q, 2, attn_mask=Tensor(np.triu(np.ones((2048, 2048), np.uint8), 2)), input_layout="BNSD",
           sparse_mode=3)
    for mode, why in ((6, "not implemented"), (7, "not implemented"), (1, "not emulated"), (4, "not emulated")):
        with pytest.raises(emu.KernelContractError, match=why):
            fa(q, q, q, 2, attn_mask=compressed, input_layout="BNSD", sparse_mode=mode)
    # a shift of the sparse causal mode: up to 1024 rows it is whole; it must follow the ALiBi rule
    slopes = np.array([0.5, 0.25], np.float32).reshape(1, 2, 1, 1)
    alibi = slopes * (np.arange(3)[None, :] - np.arange(3)[:, None]).astype(np.float32)
    broken = alibi.copy()
    broken[0, 0, 1, 0] += 1.0  # one visible entry off the slope x (key - query) line
    with pytest.raises(emu.KernelContractError, match="ALiBi rule"):
        fa(q, q, q, 2, real_shift=Tensor(broken).astype(ms.bfloat16), attn_mask=compressed, input_layout="BNSD",
           sparse_mode=2)
    # the sparse causal mode computes what the dense causal mask gives
    dense = Tensor(np.triu(np.ones((3, 3), np.uint8), 1))
    shift = Tensor(alibi).astype(ms.bfloat16)
    got = fa(q, q, q, 2, real_shift=shift, attn_mask=compressed, scalar_value=0.25, input_layout="BNSD",
             sparse_mode=2)
    want = fa(q, q, q, 2, real_shift=shift, attn_mask=dense, scalar_value=0.25, input_layout="BNSD")
    np.testing.assert_allclose(got.astype(ms.float32).asnumpy(), want.astype(ms.float32).asnumpy(), atol=1e-2)


def test_sparse_causal_shift_beyond_1024_rows_is_its_last_rows():
    """S1 > 1024: the shift is its last 1024 rows [1, N, 1024, S2]; the full S1 rows are refused."""
    s = 1040
    q = _t((1, 1, s, 16), ms.bfloat16)
    compressed = Tensor(np.triu(np.ones((2048, 2048), np.uint8), 1))
    alibi = (0.01 * (np.arange(s)[None, :] - np.arange(s)[:, None])).astype(np.float32).reshape(1, 1, s, s)
    fa = emu.flash_attention_score
    with pytest.raises(emu.KernelContractError, match=r"\[1\|1, 1, 1024, 1040\]"):
        fa(q, q, q, 1, real_shift=Tensor(alibi).astype(ms.bfloat16), attn_mask=compressed, input_layout="BNSD",
           sparse_mode=2)
    got = fa(q, q, q, 1, real_shift=Tensor(alibi[:, :, -1024:]).astype(ms.bfloat16), attn_mask=compressed,
             scalar_value=0.25, input_layout="BNSD", sparse_mode=2)
    want = fa(q, q, q, 1, real_shift=Tensor(alibi).astype(ms.bfloat16),
              attn_mask=Tensor(np.triu(np.ones((s, s), np.uint8), 1)), scalar_value=0.25, input_layout="BNSD")
    np.testing.assert_allclose(got.astype(ms.float32).asnumpy(), want.astype(ms.float32).asnumpy(), atol=2e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_causal_backend_matches_composed_on_training_rows(converted, pynative, monkeypatch, family):
    """AscendBackend(causal_rows=True), what training/run.py builds on Ascend for unpacked data: sparse_mode 2 with
    the compressed mask (and the ALiBi shift's last rows) gives the composed logits on whole causal rows."""
    from baichuan2.backend_ascend import AscendBackend  # pylint: disable=import-outside-toplevel
    model_dir, ref = converted[family]
    composed = BaichuanForCausalLM.from_pretrained(model_dir, backend="composed")
    emu.install(monkeypatch)
    modes = []
    real = emu.flash_attention_score

    def spy(*args, **kwargs):
        modes.append(kwargs.get("sparse_mode", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(emu, "flash_attention_score", spy)
    fused = BaichuanForCausalLM.from_pretrained(model_dir, backend=AscendBackend(composed.config, causal_rows=True))
    ids = Tensor(ref["input_ids"].astype(np.int32))
    assert_close(fused(ids).asnumpy(), composed(ids).asnumpy(), f"{family} sparse causal")
    assert modes and set(modes) == {2}


# ---------------------------------------------------------------------------------------------- packed rows: varlen
def test_varlen_attention_matches_the_block_diagonal_mask(pynative, monkeypatch):
    """The TND path with the ends (a dummy token after every segment, so none is empty) gives what the dense
    block-diagonal mask gives, also for a row filled exactly, a repeated end and a tail after the last end."""
    from baichuan2 import backend_composed as composed  # pylint: disable=import-outside-toplevel
    from baichuan2.modeling_baichuan import segments_from_ends  # pylint: disable=import-outside-toplevel
    emu.install(monkeypatch)
    backend = AscendBackend(BaichuanConfig.from_preset("tiny", num_attention_heads=2))  # head_dim 32
    q, k, v = (_t((2, 2, 7, 32), seed=s) for s in (1, 2, 3))
    ends = Tensor(np.array([[3, 7, 7], [2, 5, 5]], np.int32))  # row 0 full (then padding), row 1 with a tail
    gather_in, gather_out, cumulative = varlen_indices(ends, 2, 7)
    assert cumulative.asnumpy().tolist() == [4, 9, 10, 11, 14, 18, 19, 22]  # strictly increasing: no empty sequence
    assert gather_in.shape == (22,) and gather_out.shape == (14,)
    segments = segments_from_ends(ends, 7)
    visible = (segments.reshape(2, 1, 1, 7) == segments.reshape(2, 1, 7, 1)) & \
        Tensor(np.tril(np.ones((7, 7), bool))).reshape(1, 1, 7, 7)
    emu.CALLS.clear()
    got = backend.attention_core(q, k, v, backend.packed_attention_inputs(visible, ends, 32 ** -0.5, ms.float32, 2),
                                 32 ** -0.5)
    assert emu.CALLS["FlashAttentionScore"] == 1
    want = composed.attend(q, k, v, composed.attention_bias(visible, None, 2), 32 ** -0.5)
    assert got.shape == q.shape and np.abs(got.asnumpy() - want.asnumpy()).max() < 0.05


def test_varlen_contract():
    """TND as documented: the lists required, non-decreasing, ending at T, no empty key sequence, sparse_mode 2/3
    with the compressed mask, next_tokens 0."""
    fa = emu.flash_attention_score
    q = _t((6, 2, 16), ms.bfloat16)
    compressed = Tensor(np.triu(np.ones((2048, 2048), np.uint8), 1))
    ok = dict(attn_mask=compressed, input_layout="TND", sparse_mode=3, next_tokens=0)
    lists = lambda *ends: dict(actual_seq_qlen=Tensor(np.array(ends, np.int64)),  # noqa: E731
                               actual_seq_kvlen=Tensor(np.array(ends, np.int64)))
    with pytest.raises(emu.KernelContractError, match="requires actual_seq_qlen"):
        fa(q, q, q, 2, **ok)
    with pytest.raises(emu.KernelContractError, match="zero-length"):
        fa(q, q, q, 2, **ok, **lists(2, 2, 6))
    with pytest.raises(emu.KernelContractError, match="must equal T"):
        fa(q, q, q, 2, **ok, **lists(2, 5))
    with pytest.raises(emu.KernelContractError, match="non-decreasing"):
        fa(q, q, q, 2, **ok, **lists(4, 2, 6))
    with pytest.raises(emu.KernelContractError, match="next_tokens 0"):
        fa(q, q, q, 2, **dict(ok, next_tokens=2147483647), **lists(2, 6))
    with pytest.raises(emu.KernelContractError, match="sparse_mode 2 or 3"):
        fa(q, q, q, 2, **dict(ok, sparse_mode=0), **lists(2, 6))
    with pytest.raises(emu.KernelContractError, match="compressed"):
        fa(q, q, q, 2, **dict(ok, attn_mask=None), **lists(2, 6))
    # the math: each sequence causal on its own
    out = fa(q, q, q, 2, scalar_value=0.25, **ok, **lists(2, 6)).astype(ms.float32).asnumpy()
    q32 = q.astype(ms.float32).asnumpy()
    for start, stop in ((0, 2), (2, 6)):
        seq = q32[start:stop].transpose(1, 0, 2)
        scores = 0.25 * seq @ seq.transpose(0, 2, 1)
        scores = np.where(np.tril(np.ones((stop - start,) * 2, bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        want = ((probs / probs.sum(-1, keepdims=True)) @ seq).transpose(1, 0, 2)
        assert np.abs(out[start:stop] - want).max() < 0.05


# ---------------------------------------------------------------------------------------------- shard strategies
@pytest.mark.parametrize("preset,dp,mp", [("baichuan2_7b", 8, 1), ("baichuan2_13b", 8, 1), ("baichuan2_7b", 2, 4),
                                          ("baichuan2_13b", 4, 2)])
def test_shard_strategies_follow_the_layout(preset, dp, mp):
    """The strategies the backend puts on its primitives for the recipes' dp 8 x mp 1 and for model parallelism:
    q/k/v over batch (TND: tokens) and heads, masks and shifts as their shapes allow, the table builders and the
    NormHead as MindFormers splits them. Whether MindSpore accepts them needs a semi-auto compile (Ascend dry run)."""
    config = BaichuanConfig.from_preset(preset)
    backend = AscendBackend(config, causal_rows=True)
    backend.shard(dp, mp)
    alibi = config.position_encoding == "alibi"
    shift_dense, shift_causal = ((dp, mp, 1, 1),), ((1, mp, 1, 1),)
    bnsd = ((dp, mp, 1, 1),) * 3
    assert backend.fa_causal.in_strategy == bnsd + (shift_causal if alibi else ()) + ((1, 1),)
    assert backend.fa_dense.in_strategy == bnsd + (shift_dense if alibi else ()) + ((dp, 1, 1, 1),)
    if alibi:  # packed ALiBi rows take the dense path: the varlen primitive is never called nor sharded
        assert "in_strategy" not in backend.fa_varlen.attrs
    else:
        assert backend.fa_varlen.in_strategy == ((dp, mp, 1),) * 3 + ((1, 1), (dp,), (dp,))
    assert backend.rope_gather.in_strategy == ((1, 1), (dp, 1))
    assert backend.alibi_mul.in_strategy == ((1, mp, 1, 1), (dp, 1, 1, 1))
    assert backend.alibi_rel_mul.in_strategy == backend.causal_shift_scale.in_strategy[:1] + ((1, 1, 1, 1),)
    assert backend.head_matmul.in_strategy == ((1, 1), (dp * mp, 1))
    assert backend.head_scale.in_strategy == ((1, dp * mp), (dp * mp,))
    # every strategy tuple has one entry per dimension of the input it splits, and each split divides it
    heads, batch = config.num_attention_heads, dp
    q_shape = (batch, heads, 4096, config.head_dim)
    for dims, size in zip(backend.fa_causal.in_strategy[0], q_shape):
        assert size % dims == 0
    assert config.vocab_size % (dp * mp) == 0


def test_model_parallel_must_divide_the_heads():
    config = BaichuanConfig.from_preset("baichuan2_13b")  # 40 heads
    with pytest.raises(LayoutError, match="model_parallel 3 does not divide the 40 attention heads"):
        AscendBackend(config).shard(1, 3)


def test_sharded_norm_head_computes_the_composed_norm_head(pynative):
    """The NormHead in training through the backend's shardable primitives: the composed numbers."""
    from baichuan2.backend_composed import ComposedBackend  # pylint: disable=import-outside-toplevel
    backend = AscendBackend(BaichuanConfig.from_preset("tiny"))
    x, w = _t((2, 3, 64), seed=6), _t((1000, 64), seed=7)
    got = backend.norm_head(x, w, ms.float32).asnumpy()
    want = ComposedBackend().norm_head(x, w, ms.float32).asnumpy()
    assert got.shape == (2, 3, 1000)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    w_np = w.asnumpy()
    np.testing.assert_allclose(want, x.asnumpy() @ (w_np / np.linalg.norm(w_np, axis=1, keepdims=True)).T,
                               rtol=1e-4, atol=1e-4)
