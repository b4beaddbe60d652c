"""The `parallel:` and `recompute:` sections of a finetune recipe: defaults, validation and application.

Field names are MindFormers' (its `parallel_config`, `parallel.parallel_optimizer_config` and `recompute_config`),
flattened into two sections:

    parallel:
      data_parallel: 8                  # ranks holding a full copy of the model's layout (batch split over them)
      model_parallel: 1                 # tensor parallelism inside each layer (Megatron-style column/row split)
      pipeline_stage: 1                 # consecutive groups of decoder layers on different devices
      micro_batch_num: 1                # micro batches per step when pipeline_stage > 1 (>= pipeline_stage)
      enable_parallel_optimizer: false  # shard optimizer state (and weights, see optimizer_level) over data_parallel
      optimizer_level: level1           # MindSpore's levels: level1 weights + optimizer state, level2 + gradients,
                                        # level3 + weights gathered again for the backward pass
      parallel_optimizer_threshold: 64  # KB; smaller parameters (the norms) are not sharded
      gradient_accumulation_shard: false  # MindSpore's older spelling of level2; only valid with level2
    recompute:
      recompute: false                  # recompute every decoder layer in the backward pass (keep only its input)
      select_recompute: false           # recompute only each layer's SwiGLU MLP block (see apply_recompute)

`validate(...)` checks a recipe against the model and the device count and raises ParallelRecipeError with one line
per problem (the first found). `apply_recompute(model, recompute)` runs everywhere (CPU included);
`apply_ascend_parallel(...)` is the one Ascend-only function.
"""

PARALLEL_DEFAULTS = {
    "data_parallel": 1,
    "model_parallel": 1,
    "pipeline_stage": 1,
    "micro_batch_num": 1,
    "enable_parallel_optimizer": False,
    "optimizer_level": "level1",
    "parallel_optimizer_threshold": 64,
    "gradient_accumulation_shard": False,
}
RECOMPUTE_DEFAULTS = {"recompute": False, "select_recompute": False}
OPTIMIZER_LEVELS = ("level1", "level2", "level3")


class ParallelRecipeError(ValueError):
    """An invalid parallel/recompute setting: one line saying what, where and how to fix it."""


def _merged(section, values, defaults):
    values = dict(values or {})
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ParallelRecipeError(f"unknown key {section}.{unknown[0]}; valid keys in {section}: {sorted(defaults)}")
    merged = dict(defaults)
    merged.update(values)
    for key, default in defaults.items():
        value = merged[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ParallelRecipeError(f"{section}.{key} must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParallelRecipeError(f"{section}.{key} must be an integer, got {value!r}")
    return merged


def parallel_settings(values=None):
    """The `parallel:` section merged over PARALLEL_DEFAULTS, with its own fields checked (no model, no devices)."""
    p = _merged("parallel", values, PARALLEL_DEFAULTS)
    for key in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"):
        if p[key] < 1:
            raise ParallelRecipeError(f"parallel.{key} must be >= 1, got {p[key]}")
    if p["parallel_optimizer_threshold"] < 0:
        raise ParallelRecipeError(f"parallel.parallel_optimizer_threshold is a size in KB, >= 0; got "
                                  f"{p['parallel_optimizer_threshold']}")
    if p["optimizer_level"] not in OPTIMIZER_LEVELS:
        raise ParallelRecipeError(f"parallel.optimizer_level must be one of {list(OPTIMIZER_LEVELS)}, got "
                                  f"{p['optimizer_level']!r}")
    if p["gradient_accumulation_shard"] and p["optimizer_level"] != "level2":
        raise ParallelRecipeError("parallel.gradient_accumulation_shard: true is MindSpore's old name for "
                                  f"optimizer_level level2, but optimizer_level is {p['optimizer_level']}; set "
                                  "optimizer_level: level2 and drop gradient_accumulation_shard")
    if p["pipeline_stage"] > 1 and p["micro_batch_num"] < p["pipeline_stage"]:
        raise ParallelRecipeError(f"parallel.micro_batch_num {p['micro_batch_num']} < pipeline_stage "
                                  f"{p['pipeline_stage']}: every stage needs a micro batch in flight; set "
                                  f"micro_batch_num >= {p['pipeline_stage']}")
    if p["pipeline_stage"] == 1 and p["micro_batch_num"] != 1:
        raise ParallelRecipeError(f"parallel.micro_batch_num {p['micro_batch_num']} only applies with "
                                  "pipeline_stage > 1; use train.grad_accum_steps to accumulate without a pipeline")
    if p["data_parallel"] == 1 and p["enable_parallel_optimizer"]:
        raise ParallelRecipeError("parallel.enable_parallel_optimizer shards over data_parallel ranks, but "
                                  "data_parallel is 1: set data_parallel > 1 or enable_parallel_optimizer: false")
    return p


def recompute_settings(values=None):
    """The `recompute:` section merged over RECOMPUTE_DEFAULTS."""
    r = _merged("recompute", values, RECOMPUTE_DEFAULTS)
    if r["recompute"] and r["select_recompute"]:
        raise ParallelRecipeError("recompute.recompute and recompute.select_recompute are both true: full "
                                  "recomputation already covers the MLP block; keep one")
    return r


def device_count(p):
    return p["data_parallel"] * p["model_parallel"] * p["pipeline_stage"]


def check_model_split(p, config):
    """model_parallel must divide every split dimension, pipeline_stage the layer count."""
    mp = p["model_parallel"]
    for name, size in (("num_attention_heads", config.num_attention_heads), ("hidden_size", config.hidden_size),
                       ("intermediate_size", config.intermediate_size), ("vocab_size", config.vocab_size)):
        if size % mp:
            raise ParallelRecipeError(f"parallel.model_parallel {mp} does not divide the model's {name} {size}; "
                                      f"choose a model_parallel that divides {name}")
    if config.num_hidden_layers % p["pipeline_stage"]:
        raise ParallelRecipeError(f"parallel.pipeline_stage {p['pipeline_stage']} does not divide the model's "
                                  f"{config.num_hidden_layers} layers; choose a divisor of {config.num_hidden_layers}")


def needs_semi_auto(p):
    """True when the layout is more than plain data parallelism (MindSpore's semi-auto parallel is needed)."""
    return p["model_parallel"] > 1 or p["pipeline_stage"] > 1 or p["enable_parallel_optimizer"]


def check_cpu(p):
    """CPU compiles plain data parallelism only (semi-auto parallel stops with 'Invalid backend: CPU')."""
    refused = [f"{key} {p[key]} (needs semi_auto_parallel)" for key in ("model_parallel", "pipeline_stage")
               if p[key] > 1]
    if p["enable_parallel_optimizer"]:
        refused.append("enable_parallel_optimizer (MindSpore's optimizer sharding runs on Ascend only)")
    if refused:
        raise ParallelRecipeError("CPU runs plain data parallelism only; this recipe asks for parallel."
                                  + ", parallel.".join(refused) + ": set them to 1/false or run on Ascend")


def validate(parallel, recompute, config, device_num, device_target):
    """Checked (parallel, recompute) settings for a run on `device_num` devices of `device_target`.

    Raises ParallelRecipeError naming the first invalid setting.
    """
    p = parallel_settings(parallel)
    r = recompute_settings(recompute)
    if device_target != "Ascend":
        check_cpu(p)
    if device_count(p) != device_num:
        raise ParallelRecipeError(
            f"parallel: data_parallel {p['data_parallel']} x model_parallel {p['model_parallel']} x pipeline_stage "
            f"{p['pipeline_stage']} = {device_count(p)}, but the job has {device_num} device(s); make the product "
            f"equal the worker count")
    check_model_split(p, config)
    return p, r


def apply_recompute(model, recompute):
    """Marks decoder layers for recomputation (runs on CPU and Ascend alike; MindSpore recomputes in GRAPH mode).

    recompute: true -> every layer of model.model.layers recomputes its forward in the backward pass, keeping only
    its input. select_recompute: true -> only each layer's MLP block (gate/up/silu/product, the largest per-token
    activations) is recomputed; our model composes the SwiGLU from functional ops, so the selection is the MLP cell,
    not MindFormers' individual primitives. A cell can be marked once: call this once per model.
    """
    r = recompute_settings(recompute)
    for layer in model.model.layers:
        if r["recompute"]:
            layer.recompute()
        elif r["select_recompute"]:
            layer.mlp.recompute()
    return model


# ---------------------------------------------------------------------------------------------- Ascend only
def apply_ascend_parallel(model, parallel, recompute):  # pragma: no cover - Ascend only
    """ASCEND ONLY, NOT RUN HERE: sets MindSpore's semi-auto parallel context and the model's layout.

    How it is checked: first MindSpore's dry run on a host with the CANN toolkit and no NPUs
    (`msrun --sim_level 1 ...`, or `MS_SIMULATION_LEVEL=1 RANK_SIZE=8 RANK_ID=0 python ...`; docs/ASCEND_TRAINING.md),
    which compiles the N-rank graph, rejects inconsistent strategies and prints the per-device peak memory; then a
    real job on the devices. None of that has been run in this project; the CPU machines it is tested on refuse
    semi-auto parallel ("Invalid backend: CPU"), which is why `validate` refuses these settings on CPU.

    Must be called after `mindspore.communication.init()` and before the train step cell is built; the context
    itself must be set before the network is built (MindSpore's pipeline tutorial: "call it before initializing the
    network"), so training/run.py calls set_ascend_parallel_context first and this function (which sets the same
    context again) after building the model. What it does:
    - set_ascend_parallel_context (its docstring);
    - model_parallel > 1: column-parallel q/k/v/gate/up (weight rows split), row-parallel o/down (weight columns
      split, partial sums all-reduced by the framework), vocab-parallel embedding and lm_head, activations split
      over data_parallel on the batch axis. The strategies sit on each projection cell (Cell.shard with a
      parameter_plan keyed by the parameter's full name). NOTE: modeling_baichuan.linear shares one module-level
      MatMul primitive between all projections; cell-level strategies avoid per-primitive .shard(), but if the dry
      run reports conflicting strategies the model needs one MatMul primitive per Linear cell.
    - pipeline_stage > 1: layer i goes to stage i // (layers / stages); the embedding to stage 0, the final norm and
      lm_head to the last stage. The caller must wrap the loss network in `nn.PipelineCell(net, micro_batch_num)`
      (mindspore.parallel.nn.Pipeline in 2.7) before the train step.
    - the fused backend's own primitives (AscendBackend.shard, backend_ascend.py): FlashAttentionScore over batch
      and heads, the RoPE table gather, the ALiBi shift and the NormHead's normalisation;
    - recompute per layer (apply_recompute).

    The train step in semi-auto (training/step.py with framework_reduces, built by run.build_train_cell): the
    framework inserts the gradient reduction (AllReduce, or ReduceScatter with the parallel optimizer) itself, so
    the step adds no DistributedGradReducer (the parent's is nn.Identity in that mode) and no loss all-reduce; the
    pipeline's wrapper and reducer come from ascend_train_network. Open points a dry run / device must settle: the
    step's global-norm (sum of squares over the gradients as the single-device program sees them) relies on the
    framework completing sums over sharded tensors; checkpoints of a sharded run are saved per rank and merged
    with MindSpore's checkpoint transformation on rank 0 (training/checkpoint.py save_rank_shard and
    merge_rank_shards; not yet run on a device: docs/ASCEND_TRAINING.md says what the first run must check).
    """
    p = parallel_settings(parallel)
    set_ascend_parallel_context(p)
    dp, mp = p["data_parallel"], p["model_parallel"]
    lm = model
    if hasattr(lm.backend, "shard"):  # the fused backend: attention, its input builders and the NormHead's ops
        lm.backend.shard(dp, mp)
    if mp > 1:
        def split(cell, x_strategy, weight_strategy):
            cell.shard(in_strategy=(x_strategy,), parameter_plan={cell.weight.name: weight_strategy})

        for layer in lm.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for column in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                split(column, (dp, 1, 1), (mp, 1))
            for row in (attn.o_proj, mlp.down_proj):
                split(row, (dp, 1, mp), (1, mp))
        split(lm.model.embed_tokens, (dp, 1), (mp, 1))
        split(lm.lm_head, (dp, 1, 1), (mp, 1))
    stages = p["pipeline_stage"]
    if stages > 1:
        per_stage = len(lm.model.layers) // stages
        lm.model.embed_tokens.pipeline_stage = 0
        for i, layer in enumerate(lm.model.layers):
            layer.pipeline_stage = i // per_stage
        lm.model.norm.pipeline_stage = stages - 1
        lm.lm_head.pipeline_stage = stages - 1
    apply_recompute(lm, recompute)
    return lm


def set_ascend_parallel_context(parallel, strategy_file=None):  # pragma: no cover - compiled on Ascend only
    """ASCEND ONLY, NOT RUN HERE (checked as apply_ascend_parallel is): MindSpore's semi-auto parallel context.

    parallel_mode "semi_auto_parallel" ("auto_parallel" with search_mode "sharding_propagation" when
    model_parallel > 1, so the ops inside the sharded cells get derived strategies), full_batch=True (every rank
    feeds the whole global batch and the framework takes its slice: training/run.py plans the data that way),
    gradients_mean=False (as MindFormers: the semi-auto loss is already the global batch's mean),
    enable_parallel_optimizer, parallel_optimizer_config {optimizer_level, parallel_optimizer_threshold},
    pipeline_stages; with `strategy_file` (training/checkpoint.py rank_strategy_file: one per rank, since each
    pipeline stage writes its own layouts), strategy_ckpt_config save_file there with only_trainable_params False
    (the optimizer state's layouts too), which checkpoint.merge_rank_shards needs to merge the ranks' shards.
    Call after communication.init() and before the network is built.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    p = parallel_settings(parallel)
    # mp > 1: the strategies sit on cells, and MindSpore derives the ops inside them by sharding propagation,
    # which runs in auto_parallel mode (MindFormers' recipes name the same search_mode). mp == 1 needs no strategy.
    mode = {"parallel_mode": "auto_parallel", "search_mode": "sharding_propagation"} if p["model_parallel"] > 1 \
        else {"parallel_mode": "semi_auto_parallel"}
    ms.set_auto_parallel_context(
        **mode,
        full_batch=True,
        gradients_mean=False,
        enable_parallel_optimizer=p["enable_parallel_optimizer"],
        parallel_optimizer_config={"optimizer_level": p["optimizer_level"],
                                   "parallel_optimizer_threshold": p["parallel_optimizer_threshold"]},
        pipeline_stages=p["pipeline_stage"],
        **({"strategy_ckpt_config": {"save_file": strategy_file, "only_trainable_params": False}}
           if strategy_file else {}),
    )


def ascend_train_network(model, parallel, weights):  # pragma: no cover - compiled on Ascend only
    """ASCEND ONLY, NOT RUN HERE (checked as apply_ascend_parallel is): what the train step differentiates, and
    its gradient reducer.

    Returns (network, grad_reducer, summed_micro_batches). Without pipeline stages: the model itself, and no
    reducer (None: the train step keeps its parent's, which in semi-auto mode is nn.Identity, since the framework
    inserts the AllReduce / ReduceScatter of the gradients itself). With pipeline_stage > 1: the model wrapped in
    mindspore.parallel.nn.Pipeline(model, micro_batch_num), which cuts the batch into micro batches and returns
    the SUM of their losses (hence summed_micro_batches, which the train step divides the loss and the loss-scale
    sens by), and mindspore.parallel.nn.PipelineGradReducer, MindSpore's reducer for a pipeline trained through
    GradOperation (opt_shard when the parallel optimizer is on), over `weights`: the optimizer's parameters in its
    own order, the order the train step's gradients come in.
    """
    # pylint: disable=import-outside-toplevel
    from mindspore.parallel.nn import Pipeline, PipelineGradReducer
    p = parallel_settings(parallel)
    if p["pipeline_stage"] == 1:
        return model, None, 1
    network = Pipeline(model, p["micro_batch_num"])
    reducer = PipelineGradReducer(weights, opt_shard=p["enable_parallel_optimizer"])
    return network, reducer, p["micro_batch_num"]
