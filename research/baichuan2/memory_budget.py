"""Training memory per device for a full finetune (or the frozen-base part of LoRA), from the model shape and the
recipe's precision, parallel and recompute settings.

Everything is counted from tensor shapes; nothing is allocated. The model is the Baichuan-family decoder of
configuration_baichuan (q/k/v/o + gate/up/down per layer, two RMSNorm weights per layer, embedding, final norm and
an untied lm_head). Assumptions, each a choice that could be made differently:

Precision
- Weights are stored in `param_dtype`; gradients have the parameter's dtype (as MindSpore produces them).
- AdamW keeps two moments, m and v, in `moment_dtype`: float32 is MindFormers' FP32StateAdamWeightDecay (half
  weights, float32 moments, no separate float32 master copy: the update is computed in float32 and cast back).
  `master_weights` adds training/optim.py's float32 master copy of half-precision weights (4 bytes a parameter,
  sharded like the moments), counted in the optimizer state.
- A weight used in `compute_dtype` != `param_dtype` is cast per use and the cast copy is kept for the backward pass:
  every matrix counts a compute-dtype copy (the RMSNorm weights are applied in float32 and are not copied).

Parallelism (MindSpore semi-auto parallel, as MindFormers' recipes use it)
- model_parallel (mp) splits every matrix (q/k/v/gate/up by rows, o/down by columns, embedding and lm_head by
  vocabulary rows); the norms are replicated.
- pipeline_stage (pp) puts num_hidden_layers / pp consecutive layers on each stage, the embedding on the first and
  the final norm + lm_head (and the logits) on the last. The table reports the stage with the largest total.
- The parallel optimizer (enable_parallel_optimizer) shards over data_parallel (dp), per MindSpore's levels:
  level1 the stored weights and the optimizer state; level2 also the gradients; level3 also drops the weights
  gathered for the forward pass and gathers them again for the backward pass. A tensor smaller than
  parallel_optimizer_threshold KB (the norms) is not sharded. The stored shard is all-gathered before use and the
  gathered copy (in compute dtype) is kept for the backward pass (level1/2); at level3 only the largest gathered
  unit (one decoder layer, the embedding or the lm_head) is held at a time.
- Gradients: without accumulation each gradient is reduce-scattered to its shard as it is produced, so the
  parallel optimizer holds 1/dp of them at any level (full gradients of one fusion bucket are transient, not
  counted). With accumulation (pipeline micro batches or train.grad_accum_steps > 1) the accumulated gradients are
  whole at level1 and 1/dp at level2/3 (MindSpore's gradient_accumulation_shard). Without the parallel optimizer
  they are whole.

Activations (compute dtype, per micro batch of batch_size x seq_length tokens)
- Fused (flash) attention, as the model uses on Ascend: no [S, S] scores are stored (its per-row softmax
  statistics are a row of their own, below).
- Kept per layer without recomputation: the attention norm input and output, the MLP norm input and output
  (4 x hidden, whole under mp: no sequence parallelism), q, k, v and the attention output (4 x hidden / mp), gate,
  up, silu(gate) and their product (4 x intermediate / mp).
- Full recomputation (recompute: true): each layer keeps only its input, plus one layer's working set at a time.
  Select recomputation (select_recompute: true, our MLP-block recompute): each layer drops its 4 MLP tensors,
  plus one MLP's working set at a time.
- Logits in float32 and their log-softmax (2 x 4 bytes x vocabulary / mp per token), last stage only.
- Pipeline (1F1B schedule): stage s holds min(pp - s, micro_batch_num) micro batches of activations in flight.

The rest of the training graph, op by op (modeling_baichuan.py, backend_ascend.py), printed as rows of their own
(extra_terms):
- FlashAttentionScore keeps its softmax max and sum, [B, N, S, 8] float32 each, per layer for the backward pass
  (only the recomputed layer's under full recomputation).
- Position masks, per call: `visible` (bool) and the kernel's discard mask (uint8), B x S x S bytes each.
- ALiBi (13B): the shift handed to FlashAttentionScore, [B, N, S, S] in the compute dtype, kept for every layer's
  backward; building it takes two float32 [B, N, S, S] temporaries (slope x distance, then / scale).
- The final norm's input and output (2 x hidden per token), last stage.
- NormHead: training computes x (w / |w|) as (x w) / |w| (the backends' norm_head), so it keeps the product x w,
  [S, V] in the compute dtype, and no V x H tensor beyond the compute-dtype copy counted with the weights. (Dividing
  the weight in float32, as before, kept 3 x V x H x 4 bytes: the float32 weight, the broadcast norms and the
  quotient; normhead_bytes(division=True) gives that figure for comparison.)
- The loss backward's temporaries: the log-softmax gradient makes two float32 [S, V] tensors at the start of the
  backward pass, while every kept activation is still alive (last stage).
Transient tensors do not all live at once: the total is the static memory (weights, gathered copies, gradients,
optimizer state) plus the larger of (kept activations + the loss backward's temporaries) and (the kept activations
of the other micro batches in flight + the ALiBi build's temporaries).

Not counted: framework workspace, communication buffers, fragmentation, the data pipeline, the dynamic loss scale's
overflow buffers. The verdict leaves `headroom` (10%) of the device limit for them. The device limit is
MindSpore's max_device_memory, which reads "59GB" as 59 GiB.

LoRA against a full finetune on one device (lora_budget, describe_lora; example/lora_memory_budget.py prints it):
batch_size x seq_length tokens, no model or optimizer sharding, bf16 compute.
- full: fp32 master weights + a bf16 compute copy, fp32 gradients, AdamW m and v in fp32.
- LoRA: the frozen base in bf16 (no gradients, no optimizer state), fp32 adapters with fp32 gradients and moments.
- activations as above (bf16, fused attention, float32 logits and their log-softmax), without or with full
  recomputation. LoRA keeps the same set (counted conservatively: a frozen projection's input is not needed for a
  weight gradient, but the autodiff keeps most of them anyway).
"""
from .training.parallel import check_model_split, parallel_settings, recompute_settings

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _dtype_bytes(name, field):
    if name not in DTYPE_BYTES:
        raise ValueError(f"{field} must be one of {sorted(DTYPE_BYTES)}, got {name!r}")
    return DTYPE_BYTES[name]


def stage_tensors(config, parallel, stage):
    """(kind, count, elements per device) of the parameters stage `stage` holds; kind groups one gathered unit."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    mp, pp = parallel["model_parallel"], parallel["pipeline_stage"]
    layers = config.num_hidden_layers // pp
    tensors = [("layer", 4 * layers, h * h // mp), ("layer", 3 * layers, h * i // mp), ("norm", 2 * layers, h)]
    if stage == 0:
        tensors.append(("embedding", 1, v * h // mp))
    if stage == pp - 1:
        tensors.append(("norm", 1, h))
        if not config.tie_word_embeddings:
            tensors.append(("lm_head", 1, v * h // mp))
    return tensors


def activation_bytes(config, tokens, compute_bytes, model_parallel=1, layers=None, in_flight=1, mode="none",
                     logits=True):
    """Activations kept for the backward pass: `layers` decoder layers with `in_flight` micro batches of `tokens`
    tokens each; mode "none" | "full" | "select" recomputation; `logits`: this device computes the loss."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layers = config.num_hidden_layers if layers is None else layers
    whole = 4 * h                       # norm inputs and outputs of attention and MLP
    split = (4 * h + 4 * i) // model_parallel  # q, k, v, attention output + gate, up, silu(gate), product
    mlp = 4 * i // model_parallel
    per_layer = compute_bytes * tokens * (whole + split)
    if mode == "none":
        kept = layers * in_flight * per_layer
    elif mode == "full":
        kept = layers * in_flight * compute_bytes * tokens * h + per_layer
    elif mode == "select":
        kept = layers * in_flight * (per_layer - compute_bytes * tokens * mlp) + compute_bytes * tokens * mlp
    else:
        raise ValueError(f"recomputation mode must be none, full or select, got {mode!r}")
    if logits:
        kept += 2 * 4 * tokens * v // model_parallel
    return kept


def normhead_bytes(config, tokens, compute_bytes, model_parallel=1, division=False):
    """What the NormHead keeps for the backward pass beyond its weights: the [S, V] product x w in the compute dtype
    (our construction), or with division=True the float32 V x H tensors of dividing the weight by its row norms."""
    v, h = config.vocab_size, config.hidden_size
    if not config.norm_head:
        return 0
    if division:
        return 3 * v * h * 4 // model_parallel
    return tokens * v * compute_bytes // model_parallel


def extra_terms(config, batch_size, seq_length, compute_bytes, model_parallel=1, layers=None, in_flight=1,
                mode="none", last_stage=True):
    """{row: bytes} of the graph's other tensors (the module docstring's list): kept ones, and the two transient
    sets under names starting with "transient"."""
    layers = config.num_hidden_layers if layers is None else layers
    tokens, heads, v = batch_size * seq_length, config.num_attention_heads // model_parallel, config.vocab_size
    stats_layers = 1 if mode == "full" else layers * in_flight
    square = batch_size * heads * seq_length * seq_length  # one [B, N/mp, S, S] tensor's elements
    alibi = config.position_encoding == "alibi"
    rows = {
        "attention softmax max/sum": stats_layers * 2 * batch_size * heads * seq_length * 8 * 4,
        "position masks": in_flight * 2 * batch_size * seq_length * seq_length,
        "ALiBi shift": in_flight * square * compute_bytes if alibi else 0,
        "final norm in/out": 2 * tokens * config.hidden_size * compute_bytes if last_stage else 0,
        "NormHead x w": normhead_bytes(config, tokens, compute_bytes, model_parallel) if last_stage else 0,
        "transient: loss backward": 2 * 4 * tokens * v // model_parallel if last_stage else 0,
        "transient: ALiBi build": 2 * 4 * square if alibi else 0,
    }
    return rows


def recompute_mode(recompute):
    r = recompute_settings(recompute)
    return "full" if r["recompute"] else "select" if r["select_recompute"] else "none"


def stage_budget(config, parallel, recompute, seq_length, batch_size, param_dtype, compute_dtype,
                 moment_dtype="float32", grad_accum_steps=1, stage=0, master_weights=False):
    """{row: bytes} for one device of pipeline stage `stage`; rows as in ROWS, plus "total"."""
    p = parallel_settings(parallel)
    bp = _dtype_bytes(param_dtype, "param_dtype")
    bc = _dtype_bytes(compute_dtype, "compute_dtype")
    bm = _dtype_bytes(moment_dtype, "moment_dtype")
    state_bytes = 2 * bm + (4 if master_weights and param_dtype != "float32" else 0)  # m, v (+ float32 master)
    dp, pp = p["data_parallel"], p["pipeline_stage"]
    shard = p["enable_parallel_optimizer"]
    level = p["optimizer_level"]
    accumulating = pp > 1 or grad_accum_steps > 1
    threshold = p["parallel_optimizer_threshold"] * 1024

    stored = gathered = grads = moments = 0
    units = {}
    for kind, count, n in stage_tensors(config, p, stage):
        sharded = shard and n * bp >= threshold
        div = dp if sharded else 1
        stored += count * n * bp / div
        moments += count * n * state_bytes / div
        grad_div = dp if sharded and (not accumulating or level != "level1") else 1
        grads += count * n * bp / grad_div
        if kind != "norm" and (sharded or compute_dtype != param_dtype):
            gathered += count * n * bc
            per_unit = count * n * bc if kind != "layer" else count * n * bc / (config.num_hidden_layers // pp)
            units[kind] = units.get(kind, 0) + per_unit
    if shard and level == "level3":
        gathered = max(units.values(), default=0)

    in_flight = min(pp - stage, p["micro_batch_num"]) if pp > 1 else 1
    layers, mode = config.num_hidden_layers // pp, recompute_mode(recompute)
    act = activation_bytes(config, batch_size * seq_length, bc, p["model_parallel"], layers, in_flight, mode,
                           logits=stage == pp - 1)
    rows = {"weights": stored, "weights gathered/cast for compute": gathered, "gradients": grads,
            "optimizer state": moments, "activations": act}
    rows.update(extra_terms(config, batch_size, seq_length, bc, p["model_parallel"], layers, in_flight, mode,
                            last_stage=stage == pp - 1))
    static = stored + gathered + grads + moments
    kept = sum(value for row, value in rows.items() if row not in ("weights", "weights gathered/cast for compute",
                                                                   "gradients", "optimizer state")
               and not row.startswith("transient"))
    # the ALiBi build runs before this micro batch's activations exist; the loss backward after all of them
    alibi_peak = kept * (in_flight - 1) / in_flight + rows["transient: ALiBi build"]
    rows["total"] = static + max(kept + rows["transient: loss backward"], alibi_peak)
    return rows


def budget(config, parallel, recompute, seq_length, batch_size, param_dtype, compute_dtype, moment_dtype="float32",
           grad_accum_steps=1, master_weights=False):
    """(worst stage, its rows): the pipeline stage with the largest total. Raises ParallelRecipeError (a ValueError)
    when the layout does not split this model."""
    check_model_split(parallel_settings(parallel), config)
    stages = parallel_settings(parallel)["pipeline_stage"]
    per_stage = [stage_budget(config, parallel, recompute, seq_length, batch_size, param_dtype, compute_dtype,
                              moment_dtype, grad_accum_steps, s, master_weights) for s in range(stages)]
    worst = max(range(stages), key=lambda s: per_stage[s]["total"])
    return worst, per_stage[worst]


def fits(total_bytes, limit_gib, headroom=0.10):
    return total_bytes / GIB <= (1 - headroom) * limit_gib


def describe(name, config, parallel, recompute, seq_length, batch_size, param_dtype, compute_dtype,
             moment_dtype="float32", grad_accum_steps=1, limit_gib=59.0, headroom=0.10, master_weights=False):
    """The printed table of one recipe, as lines."""
    p = parallel_settings(parallel)
    stage, rows = budget(config, p, recompute, seq_length, batch_size, param_dtype, compute_dtype, moment_dtype,
                         grad_accum_steps, master_weights)
    master = master_weights and param_dtype != "float32"
    dp, mp, pp = p["data_parallel"], p["model_parallel"], p["pipeline_stage"]
    if p["enable_parallel_optimizer"]:
        optimizer = f"parallel optimizer {p['optimizer_level']} over dp {dp}"
    else:
        optimizer = "no parallel optimizer"
    pipeline = f", {p['micro_batch_num']} micro batches" if pp > 1 else ""
    accum = f", grad_accum_steps {grad_accum_steps}" if grad_accum_steps > 1 else ""
    mode = {"none": "no recomputation", "full": "full recomputation", "select": "select (MLP) recomputation"}[
        recompute_mode(recompute)]
    shard = f", 1/{dp}" if p["enable_parallel_optimizer"] else ""
    grad_shard = shard if not (pp > 1 or grad_accum_steps > 1) or p["optimizer_level"] != "level1" else ""
    in_flight = min(pp - stage, p["micro_batch_num"]) if pp > 1 else 1
    labels = {
        "weights": f"weights ({param_dtype}{shard})",
        "weights gathered/cast for compute": f"weights gathered/cast ({compute_dtype})",
        "gradients": f"gradients ({param_dtype}{grad_shard})",
        "optimizer state": f"AdamW m, v{', master' if master else ''} ({moment_dtype}{shard})",
        "activations": f"activations ({in_flight} micro batch{'es' if in_flight > 1 else ''})",
        "attention softmax max/sum": "attention softmax max/sum (float32)",
        "position masks": "position masks (bool, uint8)",
        "ALiBi shift": f"ALiBi shift [B, N, S, S] ({compute_dtype})",
        "final norm in/out": f"final norm in/out ({compute_dtype})",
        "NormHead x w": f"NormHead x w [S, V] ({compute_dtype})",
        "transient: loss backward": "transient: loss backward (2 x float32 [S, V])",
        "transient: ALiBi build": "transient: ALiBi build (2 x float32 [B, N, S, S])",
        "total": "total (peak: transients not at once)",
    }
    lines = [
        f"{name}: {config.family}, {config.num_parameters() / 1e9:.2f}B parameters, "
        f"{dp * mp * pp} devices (dp {dp} x mp {mp} x pp {pp}{pipeline})",
        f"params {param_dtype}, compute {compute_dtype}, AdamW moments {moment_dtype}; {optimizer}; {mode}; "
        f"batch {batch_size} x seq {seq_length}{accum}",
        "",
        f"| {'GiB per device' + (f', stage {stage} of {pp}' if pp > 1 else ''):50} | {'':>6} |",
        f"|{'-' * 52}|{'-' * 7}:|",
    ]
    for row, value in rows.items():
        lines.append(f"| {labels[row]:50} | {value / GIB:6.2f} |")
    verdict = "fits" if fits(rows["total"], limit_gib, headroom) else "does NOT fit"
    lines.append(f"{verdict}: {rows['total'] / GIB:.1f} GiB against {(1 - headroom) * limit_gib:.1f} "
                 f"({100 - 100 * headroom:.0f}% of a {limit_gib:g} GiB device limit)")
    return lines


# ---------------------------------------------------------------------------------------------- LoRA, one device
def lora_budget(config, lora_params, seq_length, batch_size):
    """{row: (full finetune bytes, LoRA bytes)} on one device (the module docstring's LoRA assumptions);
    `lora_params`: the adapters' parameter count (lora.lora_parameter_count)."""
    p = config.num_parameters()
    rows = {
        "weights": (4 * p + 2 * p, 2 * p + 4 * lora_params),
        "gradients": (4 * p, 4 * lora_params),
        "optimizer states (AdamW m, v)": (8 * p, 8 * lora_params),
    }
    static = tuple(sum(r[k] for r in rows.values()) for k in (0, 1))
    tokens = seq_length * batch_size
    act = activation_bytes(config, tokens, DTYPE_BYTES["bfloat16"], mode="none")
    act_rc = activation_bytes(config, tokens, DTYPE_BYTES["bfloat16"], mode="full")
    rows["activations, no recomputation"] = (act, act)
    rows["activations, full recomputation"] = (act_rc, act_rc)
    rows["total, no recomputation"] = (static[0] + act, static[1] + act)
    rows["total, full recomputation"] = (static[0] + act_rc, static[1] + act_rc)
    return rows


def describe_lora(name, config, rank, targets, seq_length=4096, batch_size=1, device_gb=64.0, headroom=0.10):
    """The printed table of full finetuning against LoRA (rank `rank` on the projections `targets`), as lines."""
    from .lora import lora_parameter_count, resolve_targets  # pylint: disable=import-outside-toplevel
    lora_params = lora_parameter_count(config, rank, targets)
    rows = lora_budget(config, lora_params, seq_length, batch_size)
    lines = [
        f"{name}: {config.num_parameters() / 1e9:.2f}B parameters; LoRA rank {rank} on "
        f"{', '.join(resolve_targets(targets))}: {lora_params / 1e6:.2f}M trainable "
        f"({100 * lora_params / config.num_parameters():.3f}%)",
        f"batch {batch_size} x seq {seq_length}, one {device_gb:g} GiB device, bf16 compute",
        "",
        f"| {'GiB':33} | {'full finetune':>13} | {'LoRA':>8} |",
        f"|{'-' * 35}|{'-' * 14}:|{'-' * 9}:|",
    ]
    for row, (full, lora) in rows.items():
        lines.append(f"| {row:33} | {full / GIB:13.1f} | {lora / GIB:8.1f} |")
    verdict = {True: "yes", False: "no"}
    for label in ("no recomputation", "full recomputation"):
        full, lora = rows["total, " + label]
        title = f"fits (<= {100 - 100 * headroom:.0f}%), {label}"
        lines.append(f"| {title:33} | {verdict[fits(full, device_gb, headroom)]:>13} | "
                     f"{verdict[fits(lora, device_gb, headroom)]:>8} |")
    return lines


# MindFormers r1.3 research/baichuan2 finetune recipes (Atlas 800T A2, 8 x 64 GB a node), and the plain settings
# the budget compares them with: float32 parameters, plain data parallelism.
PUBLISHED = {
    "baichuan2_7b": dict(preset="baichuan2_7b", parallel={"data_parallel": 8, "enable_parallel_optimizer": True},
                         recompute={"recompute": False}),
    "baichuan2_13b": dict(preset="baichuan2_13b", parallel={"data_parallel": 8, "enable_parallel_optimizer": True},
                          recompute={"recompute": True}),
}
SETTINGS = {
    "MindFormers 7B": dict(PUBLISHED["baichuan2_7b"], param_dtype="float16", compute_dtype="float16"),
    "MindFormers 13B": dict(PUBLISHED["baichuan2_13b"], param_dtype="float16", compute_dtype="float16"),
    "MindFormers 7B, two nodes": dict(
        PUBLISHED["baichuan2_7b"], param_dtype="float16", compute_dtype="float16",
        parallel=dict(PUBLISHED["baichuan2_7b"]["parallel"], pipeline_stage=2, micro_batch_num=8)),
    "MindFormers 13B, two nodes": dict(
        PUBLISHED["baichuan2_13b"], param_dtype="float16", compute_dtype="float16",
        parallel=dict(PUBLISHED["baichuan2_13b"]["parallel"], pipeline_stage=2, micro_batch_num=8)),
    "configs/finetune_baichuan2_7b.yaml before": dict(
        preset="baichuan2_7b", parallel={"data_parallel": 8}, recompute=None, param_dtype="float32",
        compute_dtype="bfloat16"),
}

