"""Finetune a Baichuan-family model on a MindRecord of token rows, on one process or many (msrun).

    python example/finetune.py --train_dataset data.mindrecord                     # one process
    cd example && bash msrun.sh "finetune.py --train_dataset /path/belle_512.mindrecord"   # data parallel

The recipe is a yaml file (--config, default configs/finetune_tiny.yaml); command-line flags override it.
MindSpore does the work: GRAPH mode, MindDataset, mindspore.train.Model with callbacks, AdamWeightDecay, and a
TrainOneStepWithLossScaleCell subclass that adds gradient accumulation, clipping and a grad-norm output.

Outputs under --output_dir:
    checkpoints/step_XXXXXX/   config.json + model.safetensors (as save_pretrained), optimizer.safetensors,
                               trainer_state.json (step, data position); written to a temp dir then renamed
    model/                     the final weights as a servable model directory (export_model.py does the same
                               for any checkpoint)
    tensorboard/, train_log.jsonl, loss_curve.png
LoRA (recipe section `lora`, rank > 0, or --lora_rank): adapters on the target projections, base weights frozen;
checkpoints hold adapter_model.safetensors instead of model.safetensors, and the run ends with <output_dir>/adapter/
(merge it into the base with research/baichuan2/merge_lora.py).
Set BAICHUAN_FINETUNE_DEBUG=1 to also write, per rank, the sample indices it trained on, its pid and its final
weights under debug/ (used by the tests to check data sharding and rank agreement).
"""
import argparse
import inspect
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "finetune_tiny.yaml")
COLUMNS = ("input_ids", "labels")
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"

# Every key a recipe may hold, with its default. An unknown key is an error (a typo must not be silently ignored).
DEFAULTS = {
    "model": {"preset": "tiny", "overrides": {}, "load_checkpoint": None},
    "data": {"train_dataset": None, "seq_length": 128, "shuffle": True},
    "train": {"seed": 1234, "epochs": 1, "max_steps": None, "batch_size": 2, "grad_accum_steps": 1, "lr": 1e-3,
              "min_lr": 0.0, "warmup_ratio": 0.0, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
              "grad_clip": 1.0, "loss_scale": None},
    # rank 0 = full finetuning. targets: W_pack (= q/k/v) or any of q_proj k_proj v_proj o_proj gate/up/down_proj.
    "lora": {"rank": 0, "alpha": 16, "dropout": 0.0, "targets": ["W_pack"]},
    "output": {"output_dir": "output/finetune", "save_steps": 100, "keep_checkpoints": 3, "log_steps": 1,
               "tokenizer_dir": "dataset"},
}


class FinetuneError(Exception):
    """A problem with the user's input: reported as one clear message, exit status 2."""


# ---------------------------------------------------------------------------------------------- recipe
def load_recipe(path):
    """The yaml recipe merged over DEFAULTS; unknown sections or keys raise FinetuneError naming them."""
    if not os.path.isfile(path):
        raise FinetuneError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        user = yaml.safe_load(f) or {}
    recipe = {section: dict(values) for section, values in DEFAULTS.items()}
    for section, values in user.items():
        if section not in DEFAULTS:
            raise FinetuneError(f"{path}: unknown section {section!r}; valid sections: {sorted(DEFAULTS)}")
        for key, value in (values or {}).items():
            if key not in DEFAULTS[section]:
                raise FinetuneError(f"{path}: unknown key {section}.{key}; valid keys in {section}: "
                                    f"{sorted(DEFAULTS[section])}")
            recipe[section][key] = value
    # BaichuanConfig swallows unknown kwargs, so model overrides are checked against its signature here.
    from baichuan2.configuration_baichuan import BaichuanConfig
    fields = set(inspect.signature(BaichuanConfig.__init__).parameters) - {"self", "kwargs"}
    for key in recipe["model"]["overrides"] or {}:
        if key not in fields:
            raise FinetuneError(f"{path}: unknown key model.overrides.{key}; it must be a BaichuanConfig field "
                                f"({', '.join(sorted(fields))})")
    # Paths written in the recipe are relative to the repository root (so it works from any directory).
    for section, key in (("model", "load_checkpoint"), ("data", "train_dataset"), ("output", "output_dir"),
                         ("output", "tokenizer_dir")):
        value = recipe[section][key]
        if value and not os.path.isabs(value):
            recipe[section][key] = os.path.join(REPO, value)
    return recipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="yaml recipe (default configs/finetune_tiny.yaml)")
    p.add_argument("--train_dataset", help="MindRecord file (rows of seq_length+1 int32 input_ids/labels)")
    p.add_argument("--load_checkpoint", help="model dir or .safetensors to start from (convert_weight.py output)")
    p.add_argument("--output_dir")
    p.add_argument("--max_steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--batch_size", type=int, help="rows per device per micro-batch")
    p.add_argument("--seed", type=int)
    p.add_argument("--save_steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--lora_rank", type=int, help="LoRA rank (> 0 turns LoRA on, 0 = full finetuning)")
    p.add_argument("--lora_alpha", type=float, help="LoRA alpha (the update is scaled by alpha / rank)")
    p.add_argument("--lora_dropout", type=float, help="dropout on the adapter input")
    p.add_argument("--lora_targets", help="comma-separated projections, e.g. W_pack or q_proj,v_proj,o_proj")
    return p.parse_args(argv)


def apply_overrides(recipe, args):
    for section, key in (("data", "train_dataset"), ("model", "load_checkpoint"), ("output", "output_dir"),
                         ("train", "max_steps"), ("train", "epochs"), ("train", "lr"), ("train", "batch_size"),
                         ("train", "seed"), ("output", "save_steps")):
        value = getattr(args, key)
        if value is not None:
            if key in ("train_dataset", "load_checkpoint", "output_dir"):
                value = os.path.abspath(value)  # command-line paths are relative to the current directory
            recipe[section][key] = value
    for key in ("rank", "alpha", "dropout", "targets"):
        value = getattr(args, f"lora_{key}")
        if value is not None:
            recipe["lora"][key] = value.split(",") if key == "targets" else value
    if args.epochs is not None and args.max_steps is None:
        recipe["train"]["max_steps"] = None  # --epochs on the command line beats a max_steps in the yaml
    return recipe


# ---------------------------------------------------------------------------------------------- data
def inspect_dataset(path, seq_length):
    """Checks the MindRecord exists and holds int32 `input_ids`/`labels` rows of seq_length + 1; returns row count."""
    import mindspore.dataset as ds
    if not path:
        raise FinetuneError("no training data: pass --train_dataset PATH.mindrecord (make one with "
                            "example/dataset/belle_preprocess.py)")
    if not os.path.isfile(path):
        raise FinetuneError(f"train dataset not found: {path} (make one with example/dataset/belle_preprocess.py)")
    try:
        data = ds.MindDataset(path, shuffle=False)
        columns = data.get_col_names()
        count = data.get_dataset_size()
    except RuntimeError as e:
        raise FinetuneError(f"train dataset {path} is not a readable MindRecord file: {e}") from e
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise FinetuneError(f"train dataset {path} lacks column(s) {missing}; it has {columns}, expected int32 "
                            f"{list(COLUMNS)} of length seq_length + 1")
    row = next(data.project(list(COLUMNS)).create_dict_iterator(output_numpy=True, num_epochs=1))
    for name in COLUMNS:
        if row[name].shape != (seq_length + 1,):
            raise FinetuneError(f"train dataset {path}: column {name!r} has shape {row[name].shape}, the recipe wants "
                                f"rows of seq_length + 1 = {seq_length + 1} tokens (data.seq_length {seq_length}); "
                                "re-make the data or set data.seq_length")
    return count


def epoch_order(num_samples, epoch, seed, shuffle):
    """The sample order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same one."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_sample_plan(num_samples, global_batch, rank, local_batch, first_step, last_step, seed, shuffle):
    """Sample indices this rank trains on for optimizer steps [first_step, last_step), one list per step.

    Each step takes the next `global_batch` samples of the epoch order; rank r gets the r-th contiguous slice of
    `local_batch`. Ranks are disjoint; the leftover samples of an epoch (< global_batch) are dropped.
    """
    steps_per_epoch = num_samples // global_batch
    plan, order, order_epoch = [], None, None
    for step in range(first_step, last_step):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(num_samples, epoch, seed, shuffle), epoch
        start = k * global_batch + rank * local_batch
        plan.append(order[start:start + local_batch].tolist())
    return plan


def build_dataset(path, plan, local_batch):
    """MindDataset reading exactly the planned rows, in order, batched per optimizer step."""
    import mindspore.dataset as ds
    # A SubsetSampler may not list more indices than the file has rows, so a run of several epochs reads one
    # MindDataset per stretch of steps without a repeated row (one epoch each) and concatenates them.
    segments, current, seen = [], [], set()
    for step in plan:
        if seen.intersection(step):
            segments.append(current)
            current, seen = [], set()
        current.extend(step)
        seen.update(step)
    segments.append(current)
    parts = [ds.MindDataset(path, columns_list=list(COLUMNS), sampler=ds.SubsetSampler(rows), num_parallel_workers=1)
             for rows in segments]
    data = parts[0]
    for part in parts[1:]:
        data = data + part
    return data.batch(local_batch, drop_remainder=True)


def lr_schedule(total_steps, lr, min_lr, warmup_ratio):
    """Per-step learning rates: linear warmup to `lr`, then cosine decay to `min_lr` (indexed by optimizer step)."""
    warmup = int(math.ceil(warmup_ratio * total_steps))
    lrs = []
    for step in range(total_steps):
        if step < warmup:
            lrs.append(lr * (step + 1) / warmup)
        else:
            progress = (step - warmup) / max(1, total_steps - warmup)
            lrs.append(min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress)))
    return lrs


# ---------------------------------------------------------------------------------------------- train cell
def make_train_step_class():
    """Built lazily so `import finetune` (export_model.py, tests) does not need mindspore's nn at import time."""
    import mindspore as ms
    from mindspore import nn, ops

    class TrainStep(nn.TrainOneStepWithLossScaleCell):
        """One optimizer step over `accum` micro-batches: summed scaled gradients -> mean across ranks (the
        parent's grad_reducer) -> unscale -> global-norm clip -> optimizer, skipped when the norm is not finite.

        The overflow check is the gradient norm itself: it works on every backend (the parent's check needs
        NPU float-status kernels on this MindSpore build) and all ranks agree because the grads are reduced.
        Returns (mean loss across ranks, grad norm before clipping, overflow, loss scale).
        """

        def __init__(self, network, optimizer, scale_sense, accum, micro_batch, grad_clip, world_size):
            super().__init__(network, optimizer, scale_sense)
            self.accum = accum
            self.micro_batch = micro_batch
            self.grad_clip = grad_clip
            self.world_size = world_size

        def construct(self, input_ids, labels):
            weights = self.weights
            scale = self.scale_sense
            loss, grads = None, None
            for i in range(self.accum):  # unrolled at compile time
                ids = input_ids[i * self.micro_batch:(i + 1) * self.micro_batch]
                lab = labels[i * self.micro_batch:(i + 1) * self.micro_batch]
                micro_loss = self.network(ids, lab)
                sens = ops.cast(scale, ms.float32) / self.accum
                micro_grads = self.grad(self.network, weights)(ids, lab, ops.cast(sens, micro_loss.dtype))
                if grads is None:
                    loss, grads = micro_loss, micro_grads
                else:
                    loss = loss + micro_loss
                    grads = self.hyper_map(ops.add, grads, micro_grads)
            loss = loss / self.accum
            grads = self.grad_reducer(grads)
            inv_scale = 1.0 / ops.cast(scale, ms.float32).reshape(())
            grads = self.hyper_map(ops.partial(ops.mul, inv_scale), grads)
            norm = ops.sqrt(ops.addn([ops.square(g.astype(ms.float32)).sum() for g in grads]))
            overflow = ops.logical_not(ops.isfinite(norm))
            if self.loss_scaling_manager is not None:
                overflow = self.loss_scaling_manager(self.scale_sense, overflow)
            if self.grad_clip > 0:
                grads = ops.clip_by_global_norm(grads, self.grad_clip)
            if not overflow:
                loss = ops.depend(loss, self.optimizer(grads))
            if self.is_distributed:
                loss = self.allreduce(loss) / self.world_size  # logged loss = mean over all ranks' batches
            return loss, norm, overflow, scale

    return TrainStep


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(output_dir):
    """Complete checkpoints, oldest first. Only renamed dirs with a state file count (temp dirs never do)."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("step_") and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(name[len("step_"):]), path))
    return [p for _, p in sorted(found)]


def train_cell_state(train_cell, model):
    """Everything the train cell holds besides the model weights: AdamW moments, global_step, loss scale.
    The learning-rate table is left out: it is rebuilt from the recipe (a resumed run may extend max_steps)."""
    weight_names = {p.name for p in model.get_parameters()} | {"learning_rate"}
    return {p.name: p for p in train_cell.get_parameters() if p.name not in weight_names}


def save_weights(model, directory):
    """config.json + the trainable weights: model.safetensors, or only the adapters under LoRA."""
    from baichuan2.lora import ADAPTER_FILE, has_lora, save_adapter
    if not has_lora(model):
        model.save_pretrained(directory)
        return
    os.makedirs(directory, exist_ok=True)
    model.config.to_json_file(os.path.join(directory, "config.json"))
    save_adapter(model, os.path.join(directory, ADAPTER_FILE))


def save_checkpoint(output_dir, model, train_cell, state, keep):
    """Writes checkpoints/step_XXXXXX atomically (temp dir + rename) and keeps only the newest `keep`."""
    from safetensors.numpy import save_file
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"step_{state['step']:06d}")
    if os.path.isdir(final):
        return final
    tmp = os.path.join(root, f".tmp_step_{state['step']:06d}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp)
    opt = {name: p.asnumpy() for name, p in train_cell_state(train_cell, model).items()}
    save_file(opt, os.path.join(tmp, OPTIMIZER_FILE), metadata={"format": "np"})
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
    os.rename(tmp, final)  # atomic: a crash before this leaves only a .tmp_ dir, which resume ignores
    for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore_checkpoint(path, model, train_cell):
    from safetensors.numpy import load_file
    from mindspore import Tensor
    from baichuan2.lora import ADAPTER_FILE, has_lora, load_adapter
    from baichuan2.modeling_baichuan import load_safetensors_into
    if has_lora(model):  # the frozen base came from load_checkpoint; the checkpoint holds the adapters
        if not os.path.isfile(os.path.join(path, ADAPTER_FILE)):
            raise ValueError(f"{path} holds no {ADAPTER_FILE}: it is not a LoRA checkpoint")
        load_adapter(model, os.path.join(path, ADAPTER_FILE))
    else:
        load_safetensors_into(model, os.path.join(path, WEIGHTS_FILE))
    saved = load_file(os.path.join(path, OPTIMIZER_FILE))
    params = train_cell_state(train_cell, model)
    if set(saved) != set(params):
        raise FinetuneError(f"optimizer state in {path} does not match this run: missing "
                            f"{sorted(set(params) - set(saved))}, unexpected {sorted(set(saved) - set(params))}")
    for name, array in saved.items():
        if tuple(array.shape) != tuple(params[name].shape):
            raise FinetuneError(f"optimizer tensor {name} in {path} has shape {array.shape}, expected "
                                f"{tuple(params[name].shape)}")
        params[name].set_data(Tensor(array).astype(params[name].dtype))
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def write_adapter_dir(output_dir, model):
    """<output_dir>/adapter: config.json + adapter_model.safetensors (replaced atomically)."""
    final = os.path.join(output_dir, "adapter")
    tmp = final + f".tmp_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def write_model_dir(output_dir, model, config, tokenizer_dir):
    """<output_dir>/model: the final weights as a servable model directory (replaced atomically)."""
    from baichuan2.model_dir import finish_model_dir
    final = os.path.join(output_dir, "model")
    tmp = final + f".tmp_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    finish_model_dir(tmp, config, tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else None)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


# ---------------------------------------------------------------------------------------------- logging
def write_loss_curve(output_dir):
    """loss_curve.png from train_log.jsonl (later lines win, so a resumed run overwrites replayed steps)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(output_dir, "train_log.jsonl")
    if not os.path.isfile(path):
        return None
    losses = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            losses[rec["step"]] = rec["loss"]
    steps = sorted(losses)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [losses[s] for s in steps])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("finetune loss")
    ax.grid(alpha=0.3)
    out = os.path.join(output_dir, "loss_curve.png")
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def make_callback(ctx):
    from mindspore.train import Callback

    class TrainMonitor(Callback):
        """Per optimizer step: logs (rank 0), TensorBoard, NaN stop, periodic checkpoints, debug sample log."""

        def __init__(self):
            super().__init__()
            self.last_time = time.time()
            self.failed = None
            self.step = ctx["first_step"]

        def on_train_step_end(self, run_context):
            outputs = run_context.original_args().net_outputs
            loss, norm, overflow, scale = (float(o.asnumpy()) for o in outputs)
            self.step += 1
            step = self.step
            now = time.time()
            elapsed, self.last_time = now - self.last_time, now
            if ctx["debug_dir"]:
                with open(os.path.join(ctx["debug_dir"], f"samples_rank{ctx['rank']}.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, "indices": ctx["plan"][step - 1 - ctx["first_step"]]}) + "\n")
            if not math.isfinite(loss):
                # Every rank sees the same all-reduced loss, so all stop together; no checkpoint is written.
                self.failed = (f"loss is {loss} at step {step}: stopping. The last good checkpoint is kept in "
                               f"{os.path.join(ctx['output_dir'], 'checkpoints')}; lower the learning rate or "
                               f"check the data, then rerun with --resume")
                run_context.request_stop()
                return
            if ctx["rank"] != 0:
                return
            lr = ctx["lrs"][min(step - 1, len(ctx["lrs"]) - 1)]
            tokens_per_s = ctx["tokens_per_step"] / max(elapsed, 1e-9)
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tokens_per_s,
                      "skipped": bool(overflow), "loss_scale": scale}
            with open(os.path.join(ctx["output_dir"], "train_log.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            ctx["writer"].add_scalar("train/loss", loss, step)
            ctx["writer"].add_scalar("train/lr", lr, step)
            ctx["writer"].add_scalar("train/grad_norm", norm, step)
            ctx["writer"].add_scalar("train/tokens_per_s", tokens_per_s, step)
            if step % ctx["log_steps"] == 0 or step == ctx["total_steps"]:
                print(f"step {step}/{ctx['total_steps']} loss {loss:.4f} lr {lr:.3e} grad_norm {norm:.3f} "
                      f"tokens/s {tokens_per_s:.0f} ({tokens_per_s / ctx['world_size']:.0f} per device)"
                      + (" [skipped: non-finite gradients]" if overflow else ""), flush=True)
            if step % ctx["save_steps"] == 0 or step == ctx["total_steps"]:
                path = save_checkpoint(ctx["output_dir"], ctx["model"], ctx["train_cell"],
                                       ctx["state_at"](step), ctx["keep"])
                print(f"saved checkpoint {path}", flush=True)

    return TrainMonitor()


# ---------------------------------------------------------------------------------------------- main
def setup_backend():
    """GRAPH mode on CPU or Ascend; data parallel when launched by msrun. Returns (rank, world_size, device)."""
    import mindspore as ms
    device = "Ascend" if (os.path.isdir("/usr/local/Ascend") or shutil.which("npu-smi")) else "CPU"
    ms.set_device(device)
    ms.set_context(mode=ms.GRAPH_MODE)
    if not (os.environ.get("RANK_SIZE") or os.environ.get("MS_WORKER_NUM")):
        return 0, 1, device  # plain process: init() would raise without msrun
    from mindspore.communication import init, get_rank, get_group_size
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size(), device


def run(recipe, resume):
    import mindspore as ms
    from mindspore import nn
    from mindspore.train import Model
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.modeling_baichuan import BaichuanForCausalLM, load_safetensors_into

    mcfg, dcfg, tcfg, ocfg = recipe["model"], recipe["data"], recipe["train"], recipe["output"]
    output_dir = ocfg["output_dir"]
    seq_length = int(dcfg["seq_length"])
    rank, world_size, device = setup_backend()

    # ---- validate every input before anything is written
    overrides = dict(mcfg["overrides"] or {})
    if device == "CPU" and overrides.get("compute_dtype", "float32") != "float32":
        print(f"note: compute_dtype {overrides['compute_dtype']} has no CPU kernels; training in float32")
        overrides["compute_dtype"] = "float32"
    try:
        config = BaichuanConfig.from_preset(mcfg["preset"], **overrides)
    except (ValueError, TypeError) as e:
        raise FinetuneError(f"model config (preset {mcfg['preset']!r}, overrides {overrides}): {e}") from e
    if seq_length > config.max_context:
        raise FinetuneError(f"data.seq_length {seq_length} exceeds the model's context {config.max_context}; "
                            "raise model.overrides.max_position_embeddings or shorten the rows")
    num_samples = inspect_dataset(dcfg["train_dataset"], seq_length)
    batch, accum = int(tcfg["batch_size"]), int(tcfg["grad_accum_steps"])
    local_batch = batch * accum
    global_batch = local_batch * world_size
    if num_samples < global_batch:
        raise FinetuneError(f"train dataset {dcfg['train_dataset']} has {num_samples} rows, fewer than one global "
                            f"batch ({batch} x {accum} accumulation x {world_size} devices = {global_batch})")
    steps_per_epoch = num_samples // global_batch
    total_steps = int(tcfg["max_steps"]) if tcfg["max_steps"] else int(tcfg["epochs"]) * steps_per_epoch
    if total_steps <= 0:
        raise FinetuneError("nothing to train: set train.max_steps or train.epochs to a positive number")

    resume_from = None
    if resume:
        complete = checkpoint_dirs(output_dir)
        if complete:
            resume_from = complete[-1]
        elif rank == 0:
            print(f"--resume: no complete checkpoint under {output_dir}/checkpoints; starting from the beginning")
    elif checkpoint_dirs(output_dir):
        raise FinetuneError(f"{output_dir} already holds checkpoints; pass --resume to continue that run or choose "
                            "another --output_dir (nothing was overwritten)")

    lora = recipe["lora"]
    if int(lora["rank"] or 0) > 0:
        from baichuan2.lora import resolve_targets
        try:
            resolve_targets(lora["targets"])
        except ValueError as e:
            raise FinetuneError(f"lora.targets: {e}") from e
        if not 0.0 <= float(lora["dropout"]) < 1.0:
            raise FinetuneError(f"lora.dropout must be in [0, 1), got {lora['dropout']}")
        if not mcfg["load_checkpoint"] and rank == 0:
            print("warning: LoRA without model.load_checkpoint trains adapters on a randomly initialised base")

    ms.set_seed(int(tcfg["seed"]))  # same seed on every rank -> identical initial weights
    model = BaichuanForCausalLM(config)
    # A LoRA resume still needs the frozen base: only the adapters are in its checkpoints.
    if mcfg["load_checkpoint"] and (not resume_from or int(lora["rank"] or 0) > 0):
        try:
            load_safetensors_into(model, mcfg["load_checkpoint"])
        except (ValueError, FileNotFoundError) as e:
            raise FinetuneError(f"--load_checkpoint {mcfg['load_checkpoint']}: {e}") from e
    if int(lora["rank"] or 0) > 0:
        from baichuan2.lora import apply_lora
        apply_lora(model, int(lora["rank"]), float(lora["alpha"]), float(lora["dropout"]), lora["targets"])
    model.set_train(True)

    lrs = lr_schedule(total_steps, float(tcfg["lr"]), float(tcfg["min_lr"]), float(tcfg["warmup_ratio"]))
    params = model.trainable_params()  # under LoRA: the adapter matrices only (the base is frozen)
    decay = [p for p in params if p.ndim > 1]  # matrices; RMSNorm weights are not decayed
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": float(tcfg["weight_decay"])},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # LoRA has no norm weights to train: MindSpore rejects empty groups
    optimizer = nn.AdamWeightDecay(groups, learning_rate=lrs, beta1=float(tcfg["beta1"]),
                                   beta2=float(tcfg["beta2"]), eps=float(tcfg["eps"]))
    ls = tcfg["loss_scale"]
    if ls:
        scale_sense = nn.DynamicLossScaleUpdateCell(loss_scale_value=float(ls.get("init", 65536)),
                                                    scale_factor=float(ls.get("factor", 2)),
                                                    scale_window=int(ls.get("window", 1000)))
    else:
        scale_sense = ms.Tensor(1.0, ms.float32)
    train_cell = make_train_step_class()(model, optimizer, scale_sense, accum, batch,
                                         float(tcfg["grad_clip"] or 0.0), world_size)

    first_step = 0
    if resume_from:
        try:
            state = restore_checkpoint(resume_from, model, train_cell)
        except ValueError as e:
            raise FinetuneError(f"cannot resume from {resume_from}: {e}") from e
        if state["global_batch"] != global_batch or state["num_samples"] != num_samples:
            raise FinetuneError(f"cannot resume from {resume_from}: it was trained with global batch "
                                f"{state['global_batch']} on {state['num_samples']} rows, this run has "
                                f"{global_batch} on {num_samples}; the data position would not carry over")
        first_step = state["step"]
        if rank == 0:
            print(f"resuming from {resume_from} (step {first_step}, epoch {state['epoch']}, "
                  f"{state['samples_seen']} samples seen)")

    # ---- outputs (rank 0 writes the shared ones)
    os.makedirs(output_dir, exist_ok=True)
    debug_dir = None
    if os.environ.get("BAICHUAN_FINETUNE_DEBUG") == "1":
        debug_dir = os.path.join(output_dir, "debug")
        os.makedirs(debug_dir, exist_ok=True)
        with open(os.path.join(debug_dir, f"pid_rank{rank}"), "w") as f:
            f.write(str(os.getpid()))
    writer = None
    if rank == 0:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        root = os.path.join(output_dir, "checkpoints")
        for name in os.listdir(root) if os.path.isdir(root) else []:
            if name.startswith(".tmp_"):  # left by a crash mid-save
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        print(f"training {config.family}: {config.num_parameters() / 1e6:.2f}M parameters, {world_size} device(s) "
              f"({device}), {num_samples} rows, global batch {global_batch} x {seq_length} tokens, "
              f"steps {first_step}->{total_steps} ({steps_per_epoch} per epoch)", flush=True)
        if int(lora["rank"] or 0) > 0:
            print(f"LoRA rank {lora['rank']} alpha {lora['alpha']} on {model.lora_config['targets']}: "
                  f"{sum(p.size for p in params)} trainable parameters", flush=True)

    plan = rank_sample_plan(num_samples, global_batch, rank, local_batch, first_step, total_steps,
                            int(tcfg["seed"]), bool(dcfg["shuffle"]))

    def state_at(step):
        return {"step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                "samples_seen": step * global_batch, "global_batch": global_batch, "num_samples": num_samples,
                "world_size": world_size, "seed": int(tcfg["seed"]), "total_steps": total_steps}

    ctx = dict(rank=rank, world_size=world_size, output_dir=output_dir, debug_dir=debug_dir, plan=plan, lrs=lrs,
               first_step=first_step, total_steps=total_steps, tokens_per_step=global_batch * seq_length,
               log_steps=int(ocfg["log_steps"]), save_steps=int(ocfg["save_steps"]),
               keep=int(ocfg["keep_checkpoints"]), writer=writer, model=model, train_cell=train_cell,
               state_at=state_at)
    monitor = make_callback(ctx)
    if plan:
        dataset = build_dataset(dcfg["train_dataset"], plan, local_batch)
        Model(train_cell).train(1, dataset, callbacks=[monitor], dataset_sink_mode=False)
    if monitor.failed:
        raise FinetuneError(monitor.failed)

    if debug_dir:
        from safetensors.numpy import save_file
        save_file({p.name: p.asnumpy() for p in model.get_parameters()},
                  os.path.join(debug_dir, f"weights_rank{rank}.safetensors"))
    if rank == 0:
        if not checkpoint_dirs(output_dir) or not checkpoint_dirs(output_dir)[-1].endswith(f"{total_steps:06d}"):
            save_checkpoint(output_dir, model, train_cell, state_at(total_steps), int(ocfg["keep_checkpoints"]))
        writer.close()
        if int(lora["rank"] or 0) > 0:
            model_dir = write_adapter_dir(output_dir, model)
            print(f"adapter written: merge it with research/baichuan2/merge_lora.py --base <base dir> "
                  f"--adapter {model_dir} --output_path <new dir>", flush=True)
        else:
            model_dir = write_model_dir(output_dir, model, config, ocfg["tokenizer_dir"])
        curve = write_loss_curve(output_dir)
        print(f"done: {'adapter' if int(lora['rank'] or 0) > 0 else 'model'} directory {model_dir}, loss curve "
              f"{curve}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        config_path = args.config
        if not os.path.isfile(config_path) and os.path.isfile(os.path.join(REPO, config_path)):
            config_path = os.path.join(REPO, config_path)  # e.g. configs/... given from inside example/
        recipe = apply_overrides(load_recipe(os.path.abspath(config_path)), args)
        run(recipe, args.resume)
    except FinetuneError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
