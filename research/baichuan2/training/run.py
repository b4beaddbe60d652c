"""One training run, start to finish: validate inputs, build the model and optimizer, resume, train, write outputs.

Every input is checked (and FinetuneError raised) before anything is written to the output directory.
"""
import dataclasses
import os
import shutil

from ..runtime import setup_training
from .parallel import ParallelRecipeError, needs_semi_auto
from .parallel import validate as validate_parallel
from .checkpoint import (Sharding, checkpoint_dirs, checkpoint_to_resume, rank_strategy_file,
                         remove_partial_checkpoints, restore_checkpoint, resume_from_shards, save_checkpoint,
                         write_adapter_dir, write_model_dir, write_outputs_from_checkpoint)
from .plan import PACKED_COLUMN, build_dataset, dataset_columns, inspect_dataset, rank_sample_plan
from .recipe import FinetuneError, dataset_hint, model_config, model_dir_config
from .schedule import lr_schedule


@dataclasses.dataclass
class RunShape:
    """The sizes of a run, fixed once the inputs are validated."""
    rank: int
    world_size: int
    device: str
    config: object  # BaichuanConfig
    seq_length: int
    num_samples: int
    batch: int  # rows per micro-batch per device
    accum: int
    total_steps: int
    resume_from: str = None
    lora_rank: int = 0
    parallel: dict = None  # checked parallel:/recompute: sections (training/parallel.py)
    recompute: dict = None
    semi_auto: bool = False  # Ascend semi-auto parallel: every rank feeds the whole global batch (full_batch)

    @property
    def sharding(self):
        """Every semi-auto layout here slices parameters across ranks: checkpoints are saved per rank and merged
        (None: whole)."""
        if not self.semi_auto:
            return None
        return Sharding.of_run(self.rank, self.world_size, self.parallel["pipeline_stage"] if self.parallel else 1,
                               self.parallel)

    @property
    def micro_batches(self):
        """Pipeline micro batches per step (each batch x data_parallel rows)."""
        return self.parallel["micro_batch_num"] if self.parallel and self.parallel["pipeline_stage"] > 1 else 1

    @property
    def local_batch(self):
        """Rows this rank reads per optimizer step."""
        return self.global_batch if self.semi_auto else self.batch * self.accum

    @property
    def global_batch(self):
        data_parallel = self.parallel["data_parallel"] if self.parallel else self.world_size
        return self.batch * self.accum * self.micro_batches * data_parallel

    @property
    def steps_per_epoch(self):
        return self.num_samples // self.global_batch

    def state_at(self, step, seed):
        """trainer_state.json of a checkpoint at `step`: where the data position is, and what must match on resume."""
        return {"step": step, "epoch": step // self.steps_per_epoch, "step_in_epoch": step % self.steps_per_epoch,
                "samples_seen": step * self.global_batch, "global_batch": self.global_batch,
                "num_samples": self.num_samples, "world_size": self.world_size, "seed": seed,
                "total_steps": self.total_steps}


def run(recipe, resume, device="auto", threads=None, overwrite=False):
    """Trains as the recipe says; with `resume`, continues from the newest complete checkpoint; with `overwrite`,
    replaces a previous run's outputs in the output directory (else they stop the run). `device`: auto | CPU |
    Ascend (see baichuan2.runtime)."""
    if resume and overwrite:
        raise FinetuneError("--resume continues the previous run and --overwrite replaces it: give one of them")
    rank, world_size, device = setup_training(device, threads, prog="finetune.py")
    shape = validate(recipe, rank, world_size, device, resume, overwrite)
    model = build_model(recipe, shape)
    lrs = lr_schedule(shape.total_steps, float(recipe["train"]["lr"]), float(recipe["train"]["min_lr"]),
                      float(recipe["train"]["warmup_ratio"]))
    train_cell = build_train_cell(model, recipe["train"], lrs, shape)
    first_step = restore(shape, model, train_cell)
    if overwrite and rank == 0:  # everything checked and loaded: only now is the previous run removed
        _remove_previous_run(recipe["output"]["output_dir"])
    writer, debug_dir = prepare_outputs(recipe, shape, model, first_step)
    train(recipe, shape, model, train_cell, lrs, first_step, writer, debug_dir)
    finish(recipe, shape, model, train_cell, writer, debug_dir, first_step)


# ---------------------------------------------------------------------------------------------- validate
def validate(recipe, rank, world_size, device, resume, overwrite=False):
    """Checks the model config, data, batch sizes, checkpoints and LoRA settings; returns the run's shape."""
    mcfg, dcfg, tcfg = recipe["model"], recipe["data"], recipe["train"]
    seq_length = int(dcfg["seq_length"])
    config, note = model_config(mcfg, device)  # the load_checkpoint directory's architecture, else the preset's
    if note and rank == 0:
        print(f"note: {note}")
    parallel, recompute = _validate_parallel(recipe, config, world_size, device)
    if seq_length > config.max_context:
        fix = ("shorten the rows" if model_dir_config(mcfg["load_checkpoint"]) else
               "raise model.overrides.max_position_embeddings or shorten the rows")
        raise FinetuneError(f"data.seq_length {seq_length} exceeds the model's context {config.max_context}; {fix}")
    dataset_hint(dcfg["train_dataset"])
    num_samples = inspect_dataset(dcfg["train_dataset"], seq_length)
    shape = RunShape(rank=rank, world_size=world_size, device=device, config=config, seq_length=seq_length,
                     num_samples=num_samples, batch=int(tcfg["batch_size"]), accum=int(tcfg["grad_accum_steps"]),
                     total_steps=0, lora_rank=adapter_rank(recipe["lora"], rank), parallel=parallel,
                     recompute=recompute, semi_auto=device == "Ascend" and needs_semi_auto(parallel))
    if num_samples < shape.global_batch:
        raise FinetuneError(f"train dataset {dcfg['train_dataset']} has {num_samples} rows, fewer than one global "
                            f"batch ({shape.batch} x {shape.accum} accumulation x {world_size} devices = "
                            f"{shape.global_batch})")
    shape.total_steps = int(tcfg["max_steps"]) if tcfg["max_steps"] else int(tcfg["epochs"]) * shape.steps_per_epoch
    if shape.total_steps <= 0:
        raise FinetuneError("nothing to train: set train.max_steps or train.epochs to a positive number")
    shape.resume_from = None if overwrite else _checkpoint_to_resume(recipe["output"]["output_dir"], resume, rank)
    if shape.lora_rank > 0:
        _validate_lora(recipe["lora"], mcfg["load_checkpoint"], rank)
    return shape


def _validate_parallel(recipe, config, world_size, device):
    """The parallel:/recompute: sections checked against the model and this job's devices, and the AdamW state
    dtypes against the parameters'. data_parallel null = the devices left by model_parallel x pipeline_stage."""
    parallel = dict(recipe["parallel"])
    if parallel.get("data_parallel") is None:
        rest = int(parallel.get("model_parallel") or 1) * int(parallel.get("pipeline_stage") or 1)
        parallel["data_parallel"] = max(1, world_size // rest)
    try:
        parallel, recompute = validate_parallel(parallel, recipe["recompute"], config, world_size, device)
    except ParallelRecipeError as e:
        raise FinetuneError(str(e)) from e
    accum = recipe["train"]["grad_accum_steps"]
    if parallel["pipeline_stage"] > 1 and int(accum) != 1:
        raise FinetuneError(f"train.grad_accum_steps {accum} with parallel.pipeline_stage "
                            f"{parallel['pipeline_stage']}: "
                            "a pipeline accumulates over parallel.micro_batch_num; set train.grad_accum_steps: 1")
    moment_dtype = recipe["train"]["moment_dtype"]
    if moment_dtype not in ("float32", config.param_dtype):
        raise FinetuneError(f"train.moment_dtype {moment_dtype!r}: AdamW moments are float32 or the parameters' own "
                            f"dtype ({config.param_dtype}); float32 is what keeps half-precision training finite")
    if not isinstance(recipe["train"]["master_weights"], bool):
        raise FinetuneError(f"train.master_weights must be true or false, got {recipe['train']['master_weights']!r}")
    return parallel, recompute


# What a run leaves in its output directory; a new run into it needs --resume (continue) or --overwrite (replace).
PREVIOUS_RUN_RESULTS = ("model", "adapter", "train_log.jsonl")
PREVIOUS_RUN_OUTPUTS = ("checkpoints",) + PREVIOUS_RUN_RESULTS + ("loss_curve.png", "tensorboard")


def _previous_results(output_dir):
    return [name for name in PREVIOUS_RUN_RESULTS if os.path.lexists(os.path.join(output_dir, name))]


def _checkpoint_to_resume(output_dir, resume, rank):
    """With --resume, the newest checkpoint that verifies (damaged newer ones are moved aside); refuses to train
    over existing checkpoints, or a previous run's model/, adapter/ or train_log.jsonl, without it. A --resume that
    finds no checkpoint starts from the beginning, unless that would replace a previous run's final model."""
    found_results = _previous_results(output_dir)
    if not resume:
        if checkpoint_dirs(output_dir):
            raise FinetuneError(f"{output_dir} already holds checkpoints; pass --resume to continue that run, "
                                "--overwrite to replace it, or choose another --output_dir (nothing was overwritten)")
        if found_results:
            raise FinetuneError(f"{output_dir} holds a previous run's {' and '.join(found_results)}; pass --resume "
                                "to continue that run, --overwrite to replace it, or choose another --output_dir "
                                "(nothing was overwritten)")
        return None
    found = checkpoint_to_resume(output_dir, rank)
    finals = [name for name in found_results if name in ("model", "adapter")]
    if not found and finals:
        raise FinetuneError(f"--resume: no checkpoint under {output_dir}/checkpoints to continue from, and starting "
                            f"again would replace the previous run's {' and '.join(finals)}/; pass --overwrite to "
                            "train from the beginning and replace it, or choose another --output_dir")
    if not found and rank == 0:
        print(f"--resume: no complete checkpoint under {output_dir}/checkpoints; starting from the beginning")
    return found


def _remove_previous_run(output_dir):
    """--overwrite: the previous run's outputs go, so that none of them mixes with the new run's."""
    removed = []
    for name in PREVIOUS_RUN_OUTPUTS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    if removed:
        print(f"--overwrite: removed the previous run's {', '.join(removed)} from {output_dir}", flush=True)


def adapter_rank(lora, rank=0):
    """The LoRA rank of the run: lora.rank, or the rank of lora.load_adapter (which then also supplies alpha and
    targets; a different non-zero lora.rank is a contradiction)."""
    if not lora.get("load_adapter"):
        return int(lora["rank"] or 0)
    # pylint: disable=import-outside-toplevel
    from safetensors import SafetensorError
    from baichuan2.lora import read_adapter
    try:
        _, found = read_adapter(lora["load_adapter"])
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise FinetuneError(f"--load_adapter {lora['load_adapter']}: {e}") from e
    if lora["rank"] and int(lora["rank"]) != found["rank"]:
        raise FinetuneError(f"lora.rank {lora['rank']} contradicts the rank {found['rank']} of the adapter "
                            f"{lora['load_adapter']} to continue from; drop --lora_rank (or set it to {found['rank']})")
    if rank == 0:
        print(f"continuing the adapter {lora['load_adapter']}: rank {found['rank']}, alpha {found['alpha']}, "
              f"targets {found['targets']} (from the adapter)")
    lora.update(rank=found["rank"], alpha=found["alpha"], targets=found["targets"])
    return found["rank"]


def _validate_lora(lora, load_checkpoint, rank):
    from baichuan2.lora import resolve_targets  # pylint: disable=import-outside-toplevel
    try:
        resolve_targets(lora["targets"])
    except ValueError as e:
        raise FinetuneError(f"lora.targets: {e}") from e
    if not 0.0 <= float(lora["dropout"]) < 1.0:
        raise FinetuneError(f"lora.dropout must be in [0, 1), got {lora['dropout']}")
    if not load_checkpoint and rank == 0:
        print("warning: LoRA without model.load_checkpoint trains adapters on a randomly initialised base")


# ---------------------------------------------------------------------------------------------- build
def build_model(recipe, shape):
    """The model with its starting weights (and LoRA adapters), in training mode."""
    # pylint: disable=import-outside-toplevel
    import mindspore as ms
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.weights_io import load_weights_checked
    from .parallel import apply_ascend_parallel, apply_recompute, set_ascend_parallel_context
    ms.set_seed(int(recipe["train"]["seed"]))  # same seed on every rank -> identical initial weights
    if shape.semi_auto:  # Ascend only: MindSpore wants the parallel context before the network is built
        strategy = rank_strategy_file(recipe["output"]["output_dir"], shape.rank)
        os.makedirs(os.path.dirname(strategy), exist_ok=True)
        set_ascend_parallel_context(shape.parallel, strategy)
    model = BaichuanForCausalLM(shape.config, backend=training_backend(recipe, shape))
    load_checkpoint, lora = recipe["model"]["load_checkpoint"], recipe["lora"]
    # A LoRA resume still needs the frozen base: only the adapters are in its checkpoints.
    if load_checkpoint and (not shape.resume_from or shape.lora_rank > 0):
        try:
            load_weights_checked(model, load_checkpoint)
        except (ValueError, FileNotFoundError) as e:  # WeightsFileError (a damaged file) or mismatched shapes
            raise FinetuneError(f"--load_checkpoint {load_checkpoint}: {e}") from e
    if lora.get("load_adapter"):  # continue an adapter (ours or PEFT's): its rank, alpha and targets
        from baichuan2.lora import load_adapter
        try:
            load_adapter(model, lora["load_adapter"], dropout=float(lora["dropout"]))
        except (OSError, ValueError) as e:
            raise FinetuneError(f"--load_adapter {lora['load_adapter']}: {e}") from e
    elif shape.lora_rank > 0:
        from baichuan2.lora import apply_lora
        apply_lora(model, shape.lora_rank, float(lora["alpha"]), float(lora["dropout"]), lora["targets"])
    if shape.lora_rank > 0:
        model.lora_config["base_model"] = load_checkpoint  # adapter_config.json's base_model_name_or_path
    if shape.semi_auto:
        apply_ascend_parallel(model, shape.parallel, shape.recompute)  # layout, stages and recompute
    else:
        apply_recompute(model, shape.recompute)
    model.set_train(True)
    return model


def training_backend(recipe, shape):
    """"auto" off Ascend; on Ascend the fused backend (backend_ascend.py): with unpacked rows (no padding, no
    segments: every call causal over whole rows) its sparse causal attention; with packed rows it takes the
    conversation ends (varlen attention for RoPE models, the dense block-diagonal mask for ALiBi ones)."""
    path = recipe["data"]["train_dataset"]
    if shape.device != "Ascend":
        return "auto"
    from baichuan2.backend_ascend import AscendBackend  # pylint: disable=import-outside-toplevel
    unpacked = bool(path and os.path.isfile(path)) and PACKED_COLUMN not in dataset_columns(path)
    return AscendBackend(shape.config, causal_rows=unpacked)


def build_train_cell(model, tcfg, lrs, shape):
    """AdamW over the trainable parameters (matrices decayed, norm weights not), wrapped in TrainStep.
    Half-precision parameters with train.moment_dtype float32 get FP32StateAdamW (float32 moments and master)."""
    # pylint: disable=import-outside-toplevel
    import mindspore as ms
    from mindspore import nn
    from .step import TrainStep
    params = model.trainable_params()  # under LoRA: the adapter matrices only (the base is frozen)
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": float(tcfg["weight_decay"])},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # LoRA has no norm weights to train: MindSpore rejects empty groups
    adamw = dict(learning_rate=lrs, beta1=float(tcfg["beta1"]), beta2=float(tcfg["beta2"]), eps=float(tcfg["eps"]))
    if shape.config.param_dtype != "float32" and tcfg["moment_dtype"] == "float32":
        from .optim import FP32StateAdamW
        optimizer = FP32StateAdamW(groups, master_weights=tcfg["master_weights"], **adamw)
    else:
        optimizer = nn.AdamWeightDecay(groups, **adamw)
    ls = tcfg["loss_scale"]
    if ls:
        scale_sense = nn.DynamicLossScaleUpdateCell(loss_scale_value=float(ls.get("init", 65536)),
                                                    scale_factor=float(ls.get("factor", 2)),
                                                    scale_window=int(ls.get("window", 1000)))
    else:
        scale_sense = ms.Tensor(1.0, ms.float32)
    network, grad_reducer, summed = model, None, 1
    if shape.semi_auto:
        from .parallel import ascend_train_network
        network, grad_reducer, summed = ascend_train_network(model, shape.parallel, optimizer.parameters)
    return TrainStep(network, optimizer, scale_sense, shape.accum, shape.local_batch // shape.accum,
                     float(tcfg["grad_clip"] or 0.0), shape.world_size, framework_reduces=shape.semi_auto,
                     grad_reducer=grad_reducer, summed_micro_batches=summed)


def restore(shape, model, train_cell):
    """Loads the checkpoint to resume from, if any; returns the first optimizer step to run."""
    if not shape.resume_from:
        return 0
    try:
        state = None
        if shape.sharding is not None:  # the same layout: each rank its own shard, no merge
            output_dir = os.path.dirname(os.path.dirname(shape.resume_from))  # <output_dir>/checkpoints/step_X
            state = resume_from_shards(shape.resume_from, model, train_cell, shape.sharding, output_dir)
        if state is None:
            state = restore_checkpoint(shape.resume_from, model, train_cell)
    except ValueError as e:
        raise FinetuneError(f"cannot resume from {shape.resume_from}: {e}") from e
    if state["global_batch"] != shape.global_batch or state["num_samples"] != shape.num_samples:
        raise FinetuneError(f"cannot resume from {shape.resume_from}: it was trained with global batch "
                            f"{state['global_batch']} on {state['num_samples']} rows, this run has "
                            f"{shape.global_batch} on {shape.num_samples}; the data position would not carry over")
    if shape.rank == 0:
        print(f"resuming from {shape.resume_from} (step {state['step']}, epoch {state['epoch']}, "
              f"{state['samples_seen']} samples seen)")
    return state["step"]


# ---------------------------------------------------------------------------------------------- train
def prepare_outputs(recipe, shape, model, first_step):
    """Creates the output directory (rank 0: TensorBoard writer, stale temp dirs removed, run summary printed).
    Returns (writer or None, debug_dir or None)."""
    output_dir = recipe["output"]["output_dir"]
    os.makedirs(output_dir, exist_ok=True)
    debug_dir = None
    if os.environ.get("BAICHUAN_FINETUNE_DEBUG") == "1":
        debug_dir = os.path.join(output_dir, "debug")
        os.makedirs(debug_dir, exist_ok=True)
        with open(os.path.join(debug_dir, f"pid_rank{shape.rank}"), "w") as f:
            f.write(str(os.getpid()))
    if shape.rank != 0:
        return None, debug_dir
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
    remove_partial_checkpoints(output_dir)  # left by a crash mid-save
    config = shape.config
    print(f"training {config.family}: {config.num_parameters() / 1e6:.2f}M parameters, {shape.world_size} device(s) "
          f"({shape.device}), {shape.num_samples} rows, global batch {shape.global_batch} x {shape.seq_length} "
          f"tokens, steps {first_step}->{shape.total_steps} ({shape.steps_per_epoch} per epoch)", flush=True)
    if shape.lora_rank > 0:
        lora = recipe["lora"]
        print(f"LoRA rank {lora['rank']} alpha {lora['alpha']} on {model.lora_config['targets']}: "
              f"{sum(p.size for p in model.trainable_params())} trainable parameters", flush=True)
    return writer, debug_dir


def train(recipe, shape, model, train_cell, lrs, first_step, writer, debug_dir):
    """Runs the optimizer steps [first_step, total_steps) on this rank's planned rows."""
    # pylint: disable=import-outside-toplevel
    from mindspore.train import Model
    from .monitor import TrainMonitor
    ocfg, seed = recipe["output"], int(recipe["train"]["seed"])
    # semi-auto (full_batch): every rank reads the whole global batch, as rank 0 of a one-rank plan would
    plan = rank_sample_plan(shape.num_samples, shape.global_batch, 0 if shape.semi_auto else shape.rank,
                            shape.local_batch, first_step, shape.total_steps, seed, bool(recipe["data"]["shuffle"]))

    save = checkpoint_saver(recipe, shape, model, train_cell)
    monitor = TrainMonitor(rank=shape.rank, world_size=shape.world_size, output_dir=ocfg["output_dir"], plan=plan,
                           lrs=lrs, first_step=first_step, total_steps=shape.total_steps,
                           tokens_per_step=shape.global_batch * shape.seq_length, log_steps=int(ocfg["log_steps"]),
                           save_steps=int(ocfg["save_steps"]), save=save, writer=writer, debug_dir=debug_dir,
                           steps_per_epoch=shape.steps_per_epoch)
    if plan:
        dataset = build_dataset(recipe["data"]["train_dataset"], plan, shape.local_batch)
        Model(train_cell).train(1, dataset, callbacks=[monitor], dataset_sink_mode=False)
    if monitor.failed:
        raise FinetuneError(monitor.failed)


def checkpoint_saver(recipe, shape, model, train_cell):
    """save(step), to be called on every rank: rank 0 writes the checkpoint of `step` and gets its path, other
    ranks get None. A sharded run's ranks all take part (each saves its shard, rank 0 merges them); in plain data
    parallelism every rank holds the whole model and only rank 0 touches the output directory."""
    ocfg, seed = recipe["output"], int(recipe["train"]["seed"])

    def save(step):
        if shape.sharding is None and shape.rank != 0:
            return None
        return save_checkpoint(ocfg["output_dir"], model, train_cell, shape.state_at(step, seed),
                               int(ocfg["keep_checkpoints"]), sharding=shape.sharding)
    return save


def finish(recipe, shape, model, train_cell, writer, debug_dir, first_step=0):
    """The last checkpoint, then (rank 0) the final model or adapter directory and the loss curve."""
    from .monitor import write_loss_curve  # pylint: disable=import-outside-toplevel
    ocfg = recipe["output"]
    output_dir = ocfg["output_dir"]
    if debug_dir:
        from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
        save_file({p.name: p.asnumpy() for p in model.get_parameters()},
                  os.path.join(debug_dir, f"weights_rank{shape.rank}.safetensors"))
    # Trained steps end with the monitor's save of total_steps; otherwise (resumed at the end) check the directory,
    # which then only an earlier run wrote: every rank decides alike, as a sharded save needs.
    final = None if first_step < shape.total_steps else checkpoint_dirs(output_dir)
    if final is not None and (not final or not final[-1].endswith(f"{shape.total_steps:06d}")):
        checkpoint_saver(recipe, shape, model, train_cell)(shape.total_steps)
    if shape.rank != 0:
        return
    writer.close()
    if shape.sharding is not None:  # rank 0's parameters are slices; the checkpoint holds them whole
        model_dir = write_outputs_from_checkpoint(output_dir, checkpoint_dirs(output_dir)[-1], shape.config,
                                                  ocfg["tokenizer_dir"], shape.lora_rank > 0)
    elif shape.lora_rank > 0:
        model_dir = write_adapter_dir(output_dir, model)
    else:
        model_dir = write_model_dir(output_dir, model, shape.config, ocfg["tokenizer_dir"])
    if shape.lora_rank > 0:
        print(f"adapter written: merge it with research/baichuan2/merge_lora.py --base <base dir> "
              f"--adapter {model_dir} --output_path <new dir>", flush=True)
    curve = write_loss_curve(output_dir)
    print(f"done: {'adapter' if shape.lora_rank > 0 else 'model'} directory {model_dir}, loss curve {curve}",
          flush=True)
