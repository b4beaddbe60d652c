"""What a training run writes and reads back.

    checkpoints/step_XXXXXX/   config.json + model.safetensors (or adapter_model.safetensors under LoRA),
                               optimizer.safetensors, trainer_state.json (step, data position),
                               manifest.json (size and sha256 of each of the other files)
    checkpoints/step_XXXXXX.damaged-N/   a checkpoint that failed verification on --resume, moved aside (kept)
    model/                     the final weights as a servable model directory (model_dir.write_servable_dir)
    adapter/                   the final LoRA adapters (config.json + adapter_model.safetensors)
Every directory is written through model_dir.atomic_dir (files and directory fsynced, then renamed): a crash leaves a
`.tmp_*` directory, never a partial one.

A sharded run (Ascend semi-auto parallel: each rank holds slices of the parameters, a pipeline stage only its
stage's layers) saves the MindSpore way, through Sharding: every rank writes its own slices
(mindspore.save_checkpoint with integrated_save=False; MindSpore refuses integrated_save=True under pipeline stages)
to checkpoints/.tmp_shards_step_XXXXXX/rank_<r>/, and rank 0 merges them with MindSpore's checkpoint transformation
(mindspore.parallel.merge_pipeline_strategys over the ranks' strategy files, which MindSpore writes at compile time
to <output_dir>/strategy/rank_<r>.ckpt, then mindspore.parallel.transform_checkpoints to an unsharded layout) into
the same directory, with the same names and formats, as an unsharded run, plus the merged strategy.ckpt it came
from (save_rank_shard, merge_rank_shards). The rank shards stay in the checkpoint, each beside a copy of its rank's
strategy file, with the layout they were cut by (shards/rank_<r>/, shards/layout.json, all in the manifest): a
resume with the same layout loads each rank's own shard (resume_from_shards), no merge needed; the merged files
serve export, the final model/ and a resume with another layout.

Verification (verify_checkpoint): every file listed in manifest.json has its recorded size and sha256. Checkpoints
written before manifests existed (no "manifest" key in trainer_state.json) are verified by reading them: the JSON
files parse and every safetensors file passes weights_check.check_safetensors (header, offsets, exact size). That
catches truncated, zeroed and missing files, not flipped bits inside a tensor.
"""
import dataclasses
import json
import os
import re
import shutil
import time

from baichuan2.lora import ADAPTER_FILE
from baichuan2.model_dir import atomic_dir, write_servable_dir
from baichuan2.weights_check import WeightsFileError, check_safetensors, sha256_file

from .recipe import FinetuneError

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
SHARD_FILE = "shard.safetensors"  # one rank's slices of the weights and optimizer state (sharded runs)
STRATEGY_FILE = "strategy.ckpt"  # MindSpore's parallel strategy (protobuf) a sharded checkpoint was merged with
_STEP_DIR = re.compile(r"^step_(\d+)$")
SHARD_TIMEOUT_S = 1800  # how long rank 0 waits for another rank's shard or strategy file
SHARDS_DIR = "shards"  # in a sharded run's checkpoint: rank_<r>/{shard.safetensors, strategy.ckpt}, layout.json
RANK_STRATEGY = "strategy.ckpt"  # beside a rank's shard: the strategy file its slices were cut by
LAYOUT_FILE = "layout.json"  # the run's world size and parallel settings the shards were cut for


@dataclasses.dataclass(frozen=True)
class Sharding:
    """Where this rank stands in a sharded run. `stage_leaders`: the first rank of each pipeline stage (just rank 0
    without pipeline stages); their strategy files together describe every parameter."""
    rank: int
    world_size: int = 1
    stage_leaders: tuple = (0,)
    parallel: str = "{}"  # the run's checked parallel settings as sorted JSON: what cuts the parameters

    @classmethod
    def of_run(cls, rank, world_size, pipeline_stages, parallel=None):
        """MindSpore puts ranks [s * n, (s + 1) * n) on stage s, n = world_size / pipeline_stages."""
        per_stage = world_size // max(1, pipeline_stages)
        return cls(rank, world_size, tuple(range(0, world_size, per_stage)), json.dumps(parallel or {},
                                                                                       sort_keys=True))

    def layout(self):
        """What layout.json records: a resume loads rank shards only when its own layout is the same."""
        return {"world_size": self.world_size, "parallel": json.loads(self.parallel)}


def strategy_dir(output_dir):
    """Where the ranks of a sharded run write their parallel strategy files (one per rank: stages differ)."""
    return os.path.join(output_dir, "strategy")


def rank_strategy_file(output_dir, rank):
    """The file MindSpore writes rank `rank`'s strategy to (parallel.set_ascend_parallel_context's
    strategy_ckpt_config save_file): protobuf, mindspore.train.node_strategy_pb2.ParallelStrategyMap."""
    return os.path.join(strategy_dir(output_dir), f"rank_{rank}.ckpt")


def checkpoint_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def checkpoint_dirs(output_dir):
    """Checkpoint directories (step_XXXXXX), oldest first. Temp dirs of an interrupted save and checkpoints moved
    aside as damaged never count; whether a listed one is intact is verify_checkpoint's job."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [p for _, p in sorted(found)]


class CheckpointDamaged(Exception):
    """A checkpoint that does not verify; str() is one line: which file and why."""

    def __init__(self, checkpoint, file, problem):
        self.checkpoint, self.file, self.problem = checkpoint, file, problem
        super().__init__(f"{file}: {problem}")


def _read_json(checkpoint, name):
    path = os.path.join(checkpoint, name)
    if not os.path.isfile(path):
        raise CheckpointDamaged(checkpoint, name, "is missing")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointDamaged(checkpoint, name, f"is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointDamaged(checkpoint, name, "is not a JSON object")
    return data


def _file_record(path):
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def write_manifest(directory):
    """manifest.json: size and sha256 of every other file under `directory`, subdirectories included (a sharded
    checkpoint's shards/), by relative path (read back from disk after writing)."""
    names = []
    for root, _, found in os.walk(directory):
        names += [os.path.relpath(os.path.join(root, n), directory).replace(os.sep, "/") for n in found]
    files = {name: _file_record(os.path.join(directory, name)) for name in sorted(names) if name != MANIFEST_FILE}
    with open(os.path.join(directory, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump({"format": 1, "files": files}, f, indent=2)


def verify_checkpoint(checkpoint, files=None, checksums=True):
    """Raises CheckpointDamaged naming the first file that is missing, truncated or altered; returns the parsed
    trainer_state.json. `files`: only these (plus the state file); checksums=False: sizes only (cheap)."""
    state = _read_json(checkpoint, STATE_FILE)
    for key in ("step", "global_batch", "num_samples"):
        if not isinstance(state.get(key), int):
            raise CheckpointDamaged(checkpoint, STATE_FILE, f"has no integer {key!r}")
    if "manifest" not in state:  # a checkpoint without a manifest: verify by reading the files
        weights = ADAPTER_FILE if os.path.exists(os.path.join(checkpoint, ADAPTER_FILE)) else WEIGHTS_FILE
        for name in files or ("config.json", weights, OPTIMIZER_FILE):
            if name.endswith(".json"):
                _read_json(checkpoint, name)
                continue
            try:
                check_safetensors(os.path.join(checkpoint, name))
            except WeightsFileError as e:
                raise CheckpointDamaged(checkpoint, name, e.problem) from e
        return state
    manifest = _read_json(checkpoint, MANIFEST_FILE)
    recorded = manifest.get("files")
    if not isinstance(recorded, dict) or STATE_FILE not in recorded or not all(
            isinstance(r, dict) and isinstance(r.get("size"), int) for r in recorded.values()):
        raise CheckpointDamaged(checkpoint, MANIFEST_FILE, "does not list each file with its size and sha256")
    for name in [STATE_FILE] + [n for n in sorted(recorded) if n != STATE_FILE and (files is None or n in files)]:
        path, want = os.path.join(checkpoint, name), recorded[name]
        if not os.path.isfile(path):
            raise CheckpointDamaged(checkpoint, name, "is missing")
        size = os.path.getsize(path)
        if size != want["size"]:
            raise CheckpointDamaged(checkpoint, name, f"is {size} bytes, the manifest records {want['size']} "
                                                      f"({'truncated' if size < want['size'] else 'altered'})")
        if checksums and sha256_file(path) != want.get("sha256"):
            raise CheckpointDamaged(checkpoint, name, "sha256 differs from the manifest (the contents changed)")
    for name in files or ():
        if name not in recorded:
            raise CheckpointDamaged(checkpoint, name, "is not listed in the manifest")
    return state


def move_aside(checkpoint):
    """Renames a damaged checkpoint to step_XXXXXX.damaged-N (the first free N); never deletes it."""
    n = 1
    while os.path.exists(f"{checkpoint}.damaged-{n}"):
        n += 1
    os.rename(checkpoint, f"{checkpoint}.damaged-{n}")
    return f"{checkpoint}.damaged-{n}"


def checkpoint_to_resume(output_dir, rank):
    """The newest checkpoint that verifies, or None when there are none.

    Newer ones that do not verify are reported (one line each: which file and why) and moved aside by rank 0;
    other ranks verify for themselves and reach the same choice. When checkpoints exist but none verifies,
    FinetuneError (one line) and nothing is moved.
    """
    candidates = checkpoint_dirs(output_dir)
    damaged = []
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as e:
            damaged.append((path, e))
            continue
        except FileNotFoundError:  # rank 0 moved it aside while this rank was reading it
            damaged.append((path, None))
            continue
        if rank == 0:
            for bad, why in damaged:
                if why is not None and os.path.isdir(bad):
                    aside = move_aside(bad)
                    print(f"warning: checkpoint {os.path.basename(bad)} is damaged ({why}); moved aside to "
                          f"{os.path.basename(aside)}, resuming from {os.path.basename(path)}", flush=True)
        return path
    if candidates:
        reasons = "; ".join(f"{os.path.basename(p)}: {e}" for p, e in damaged if e is not None)
        raise FinetuneError(f"--resume: no checkpoint under {checkpoint_root(output_dir)} verifies ({reasons}); "
                            "nothing was moved: restore the files, or train into a new --output_dir")
    return None


def remove_partial_checkpoints(output_dir):
    """Removes the temp directories a crash mid-save left under checkpoints/."""
    root = checkpoint_root(output_dir)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".tmp_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def train_cell_state(train_cell, model):
    """Everything the train cell holds besides the model weights: AdamW moments, global_step, loss scale.
    The learning-rate table is left out: it is rebuilt from the recipe (a resumed run may extend max_steps)."""
    weight_names = {p.name for p in model.get_parameters()} | {"learning_rate"}
    return {p.name: p for p in train_cell.get_parameters() if p.name not in weight_names}


def save_weights(model, directory):
    """config.json + the trainable weights: model.safetensors, or only the adapters under LoRA."""
    from baichuan2.lora import has_lora, save_adapter  # pylint: disable=import-outside-toplevel
    if not has_lora(model):
        model.save_pretrained(directory)
        return
    os.makedirs(directory, exist_ok=True)
    model.config.to_json_file(os.path.join(directory, "config.json"))
    save_adapter(model, os.path.join(directory, ADAPTER_FILE))


def save_checkpoint(output_dir, model, train_cell, state, keep, sharding=None):
    """Writes checkpoints/step_XXXXXX atomically (with its manifest) and keeps only the newest `keep`.

    Older checkpoints are removed only once the new one is in place with every file at its recorded size, so the
    rotation never removes the last good checkpoint; directories moved aside as damaged are never touched.

    sharding None: the parameters are whole on this process; call on rank 0 only. A Sharding: call on EVERY rank
    at the same step; each writes its shard, rank 0 merges them into the directory (others return None).
    """
    # pylint: disable=import-outside-toplevel
    from safetensors import SafetensorError
    from safetensors.numpy import save_file
    final = os.path.join(checkpoint_root(output_dir), f"step_{state['step']:06d}")
    if os.path.isdir(final):  # every rank sees the same answer: only an earlier run could have written it
        return final if sharding is None or sharding.rank == 0 else None
    shards = None
    if sharding is not None:
        shards = save_rank_shard(model, train_cell, checkpoint_root(output_dir), state["step"], sharding.rank)
        if sharding.rank != 0:
            return None
    try:
        with atomic_dir(final) as tmp:
            if shards:
                merge_rank_shards(model, train_cell, shards, output_dir, sharding, tmp)
                keep_rank_shards(shards, output_dir, sharding, tmp)
            else:
                save_weights(model, tmp)
                _debug_pause_between_files(output_dir, state["step"])
                opt = {name: p.asnumpy() for name, p in train_cell_state(train_cell, model).items()}
                save_file(opt, os.path.join(tmp, OPTIMIZER_FILE), metadata={"format": "np"})
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(dict(state, manifest=MANIFEST_FILE), f, indent=2)
            for name in os.listdir(tmp):  # what was written must read back whole before it is checksummed
                if name.endswith(".safetensors"):
                    check_safetensors(os.path.join(tmp, name))
            write_manifest(tmp)
    except (OSError, SafetensorError, WeightsFileError) as e:  # a full disk, a lost mount: the temp dir is gone
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise FinetuneError(f"cannot write checkpoint {final} ({why}); the older checkpoints are kept: fix the "
                            "cause and rerun with --resume") from e
    finally:
        if shards:
            shutil.rmtree(shards, ignore_errors=True)
    try:
        verify_checkpoint(final, checksums=False)
    except CheckpointDamaged as e:
        print(f"warning: checkpoint {final} does not verify right after writing ({e}); older checkpoints kept",
              flush=True)
        return final
    for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def weight_names(model):
    """Names of what a checkpoint's weights file holds: every parameter, or only the adapters under LoRA."""
    from baichuan2.lora import adapter_params, has_lora  # pylint: disable=import-outside-toplevel
    return {p.name for p in (adapter_params(model) if has_lora(model) else model.get_parameters())}


def shard_names(model, train_cell):
    """What a rank's shard holds: the weights (only the adapters under LoRA) and the optimizer state."""
    return weight_names(model) | set(train_cell_state(train_cell, model))


def save_rank_shard(model, train_cell, root, step, rank):
    """Every rank of a sharded run: its own slices of the weights and optimizer state at `step`, as MindSpore
    saves them (mindspore.save_checkpoint(train_cell, ..., integrated_save=False, format="safetensors"): no
    collective, each rank writes what it holds; MindSpore writes <name>.tmp and renames it, so a visible file is
    whole) to <root>/.tmp_shards_step_XXXXXX/rank_<rank>/shard.safetensors, the layout
    mindspore.parallel.transform_checkpoints reads. Returns the shards directory (.tmp_*: a crash leftover is
    removed at the next start). Runs on CPU too (there every parameter is whole: tests/test_sharded_checkpoint.py)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    shards = os.path.join(root, f".tmp_shards_step_{step:06d}")
    directory = os.path.join(shards, f"rank_{rank}")
    os.makedirs(directory, exist_ok=True)
    names = shard_names(model, train_cell)
    ms.save_checkpoint(train_cell, os.path.join(directory, SHARD_FILE), integrated_save=False, format="safetensors",
                       choice_func=lambda name: name in names)
    return shards


def merge_strategies(output_dir, sharding, target):
    """Rank 0: one strategy file at `target` for the whole run. Each stage's ranks write their stage's layouts;
    mindspore.parallel.merge_pipeline_strategys joins the stages (prefixing names with the stage), as
    transform_checkpoints expects them. Waits for the stage leaders' files (written when their graphs compile)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    for leader in sharding.stage_leaders:
        _wait_for(rank_strategy_file(output_dir, leader), SHARD_TIMEOUT_S)
    if len(sharding.stage_leaders) == 1:
        shutil.copyfile(rank_strategy_file(output_dir, 0), target)
        return target
    # only this run's stage leaders: merge_pipeline_strategys reads every file of a folder, and strategy/ may hold
    # files of an earlier run with more ranks
    leaders = target + ".leaders"
    os.makedirs(leaders, exist_ok=True)
    try:
        for leader in sharding.stage_leaders:
            shutil.copyfile(rank_strategy_file(output_dir, leader), os.path.join(leaders, f"rank_{leader}.ckpt"))
        ms.parallel.merge_pipeline_strategys(leaders, target)
    finally:
        shutil.rmtree(leaders, ignore_errors=True)
    return target


def merge_rank_shards(model, train_cell, shards, output_dir, sharding, directory):
    """Rank 0: every rank's shard (save_rank_shard) merged by MindSpore's checkpoint transformation into a
    checkpoint's config.json, weights (or adapter) file, optimizer file and the merged strategy.ckpt.

    mindspore.parallel.transform_checkpoints(shards, ..., src_strategy_file=<merged strategy>,
    dst_strategy_file=None, output_format="safetensors") reassembles each parameter from the ranks that hold its
    slices (model-parallel splits, parallel-optimizer shards, pipeline stages) into one unsharded file; it is split
    here by name into the weights and the optimizer state, one tensor in memory at a time."""
    # pylint: disable=import-outside-toplevel
    import mindspore as ms
    from baichuan2.lora import has_lora, save_adapter
    from baichuan2.safetensors_io import SafetensorsFile, SafetensorsWriter
    for rank in range(sharding.world_size):
        _wait_for(os.path.join(shards, f"rank_{rank}", SHARD_FILE), SHARD_TIMEOUT_S)
    strategy = merge_strategies(output_dir, sharding, os.path.join(directory, STRATEGY_FILE))
    merged_dir = shards + "_merged"  # a .tmp_* sibling of the shards
    try:
        try:
            ms.parallel.transform_checkpoints(shards, merged_dir, "merged", src_strategy_file=strategy,
                                              dst_strategy_file=None, output_format="safetensors")
        except (ValueError, TypeError, RuntimeError) as e:  # MindSpore's message, on one line
            why = " ".join(str(e).split())
            raise FinetuneError(f"mindspore.parallel.transform_checkpoints could not merge the rank shards under "
                                f"{shards} with {strategy} ({why}); the older checkpoints are kept") from e
        found = [os.path.join(merged_dir, "rank_0", n) for n in os.listdir(os.path.join(merged_dir, "rank_0"))
                 if n.endswith(".safetensors")]
        if len(found) != 1:
            raise FinetuneError(f"mindspore.parallel.transform_checkpoints wrote {len(found)} files to "
                                f"{merged_dir}/rank_0, expected one")
        merged = SafetensorsFile(found[0])
        weights, state = weight_names(model), set(train_cell_state(train_cell, model))
        names = set(merged.keys())
        if not weights | state <= names:  # a parameter no strategy file lists would be lost
            raise FinetuneError(f"the merged checkpoint lacks {sorted((weights | state) - names)[:5]}: a rank's "
                                f"strategy file under {strategy_dir(output_dir)} is missing or from another run")
        model.config.to_json_file(os.path.join(directory, "config.json"))
        target = os.path.join(directory, ADAPTER_FILE if has_lora(model) else WEIGHTS_FILE)
        for path, chosen in ((target, weights), (os.path.join(directory, OPTIMIZER_FILE), state)):
            entries = [(n, merged.dtype(n), tuple(merged.shape(n))) for n in sorted(chosen)]
            with SafetensorsWriter(path, entries, {"format": "np"}) as writer:
                for name, _, _ in entries:
                    writer.write(merged.read(name))
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)
    if has_lora(model):  # PEFT's layout and names, as save_adapter writes them (adapters are small)
        adapter = SafetensorsFile(target)
        tensors = {name: adapter.read(name) for name in adapter.keys()}
        os.remove(target)
        save_adapter(model, target, tensors=tensors)


def keep_rank_shards(shards, output_dir, sharding, directory):
    """Rank 0, after the merge: every rank's shard moved into the checkpoint as shards/rank_<r>/shard.safetensors,
    with a copy of that rank's strategy file (written at its compile) and layout.json, for resume_from_shards."""
    kept = os.path.join(directory, SHARDS_DIR)
    os.makedirs(kept)
    for rank in range(sharding.world_size):
        strategy = rank_strategy_file(output_dir, rank)
        _wait_for(strategy, SHARD_TIMEOUT_S)
        target = os.path.join(kept, f"rank_{rank}")
        os.rename(os.path.join(shards, f"rank_{rank}"), target)
        shutil.copyfile(strategy, os.path.join(target, RANK_STRATEGY))
    with open(os.path.join(kept, LAYOUT_FILE), "w", encoding="utf-8") as f:
        json.dump(sharding.layout(), f, indent=2)


def _same_strategy(saved, current):
    """Whether two strategy files (ParallelStrategyMap protobuf) hold the same layouts."""
    from mindspore.train import node_strategy_pb2  # pylint: disable=import-outside-toplevel
    maps = []
    for path in (saved, current):
        strategy = node_strategy_pb2.ParallelStrategyMap()
        with open(path, "rb") as f:
            strategy.ParseFromString(f.read())
        maps.append(strategy)
    return maps[0] == maps[1]


def resume_from_shards(checkpoint, model, train_cell, sharding, output_dir):
    """Every rank of a sharded run: loads its own shard of `checkpoint` (no merge) when the checkpoint was cut by
    this run's layout; returns trainer_state.json, or None when it cannot (no shards, another world size or
    parallel settings, or a strategy file that differs from this rank's current one): then resume from the merged
    files (restore_checkpoint).

    The slices go in as MindSpore's own compile-time slicing leaves them (mindspore.parallel._utils
    _slice_parameter): set_data(slice, slice_shape=True) and `sliced` set, so the compile keeps them instead of
    cutting the (here absent) whole tensor. Call before the train graph compiles. The strategy check compares the
    rank's saved strategy with its file under <output_dir>/strategy when one is there (the previous run's);
    whether this run's compile writes the same is for the first resumed save to show (docs/ASCEND_TRAINING.md)."""
    # pylint: disable=import-outside-toplevel
    from mindspore import Tensor
    from baichuan2.safetensors_io import SafetensorsFile
    kept = os.path.join(checkpoint, SHARDS_DIR)
    if not os.path.isfile(os.path.join(kept, LAYOUT_FILE)):
        return None
    with open(os.path.join(kept, LAYOUT_FILE), encoding="utf-8") as f:
        if json.load(f) != sharding.layout():
            return None
    mine = os.path.join(kept, f"rank_{sharding.rank}")
    current = rank_strategy_file(output_dir, sharding.rank)
    if os.path.isfile(current) and not _same_strategy(os.path.join(mine, RANK_STRATEGY), current):
        return None
    shard = SafetensorsFile(os.path.join(mine, SHARD_FILE))
    params = {p.name: p for p in train_cell.get_parameters() if p.name in shard_names(model, train_cell)}
    if set(shard.keys()) != set(params):
        raise FinetuneError(f"{mine}/{SHARD_FILE} does not hold this run's parameters: missing "
                            f"{sorted(set(params) - set(shard.keys()))[:5]}, unexpected "
                            f"{sorted(set(shard.keys()) - set(params))[:5]}; resume from another checkpoint")
    for name, param in params.items():
        piece = tuple(shard.shape(name))
        whole = tuple(param.shape)
        if len(piece) != len(whole) or any(w % p for w, p in zip(whole, piece)):
            raise FinetuneError(f"{mine}/{SHARD_FILE}: {name} has shape {piece}, not a slice of {whole}")
        param.set_data(Tensor(shard.read(name)).astype(param.dtype), True)
        param.sliced = True
    with open(os.path.join(checkpoint, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def _wait_for(path, timeout):
    """Another rank's file appears whole (renamed into place) on the shared output directory."""
    deadline = time.time() + timeout
    while not os.path.isfile(path):
        if time.time() > deadline:
            raise FinetuneError(f"{path} did not appear within {timeout} s: another rank failed to save (its log "
                                "says why), or the output directory is not shared between nodes")
        time.sleep(1)


def _debug_pause_between_files(output_dir, step):
    """Fault-injection hook (tests only): with BAICHUAN_FINETUNE_DEBUG=1 and BAICHUAN_FINETUNE_PAUSE_IN_SAVE=<step>,
    the save of that step stops after its first file, writes debug/saving_step_<step> and sleeps, so a test can kill
    the process mid-checkpoint."""
    if os.environ.get("BAICHUAN_FINETUNE_DEBUG") != "1" or os.environ.get("BAICHUAN_FINETUNE_PAUSE_IN_SAVE") != str(
            step):
        return
    with open(os.path.join(output_dir, "debug", f"saving_step_{step}"), "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    time.sleep(120)


def restore_checkpoint(path, model, train_cell):
    """Loads a checkpoint's weights (or adapters) and optimizer state; returns its trainer_state.json.
    A damaged file raises WeightsFileError (a ValueError) naming it."""
    # pylint: disable=import-outside-toplevel
    from mindspore import Tensor
    from safetensors.numpy import load_file
    from baichuan2.lora import has_lora, load_adapter
    if has_lora(model):  # the frozen base came from load_checkpoint; the checkpoint holds the adapters
        if not os.path.isfile(os.path.join(path, ADAPTER_FILE)):
            raise ValueError(f"{path} holds no {ADAPTER_FILE}: it is not a LoRA checkpoint")
        check_safetensors(os.path.join(path, ADAPTER_FILE))
        load_adapter(model, os.path.join(path, ADAPTER_FILE))
    else:
        model.load_weights(os.path.join(path, WEIGHTS_FILE))
    check_safetensors(os.path.join(path, OPTIMIZER_FILE))
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
    with atomic_dir(final, replace=True) as tmp:
        save_weights(model, tmp)
    return final


def write_model_dir(output_dir, model, config, tokenizer_dir):
    """<output_dir>/model: the final weights as a servable model directory (replaced atomically)."""
    return write_servable_dir(os.path.join(output_dir, "model"), config, model=model, tokenizer_dir=tokenizer_dir,
                              replace=True)


def write_outputs_from_checkpoint(output_dir, checkpoint, config, tokenizer_dir, lora):
    """A sharded run's final <output_dir>/model (or /adapter) directory, copied from its last checkpoint: rank 0's
    parameters hold only its slices, the checkpoint holds them merged. Same files as write_model_dir /
    write_adapter_dir write (replaced atomically)."""
    if not lora:
        def copy_weights(directory):
            shutil.copyfile(os.path.join(checkpoint, WEIGHTS_FILE), os.path.join(directory, WEIGHTS_FILE))
        return write_servable_dir(os.path.join(output_dir, "model"), config, weights=copy_weights,
                                  tokenizer_dir=tokenizer_dir, replace=True)
    final = os.path.join(output_dir, "adapter")
    with atomic_dir(final, replace=True) as tmp:
        for name in os.listdir(checkpoint):
            if name not in (OPTIMIZER_FILE, STATE_FILE, MANIFEST_FILE, STRATEGY_FILE):
                shutil.copyfile(os.path.join(checkpoint, name), os.path.join(tmp, name))
    return final


def export_checkpoint(checkpoint, output_path, tokenizer_dir):
    """A full-finetuning checkpoint directory -> a new servable model directory at `output_path`.

    The checkpoint's config.json and model.safetensors are checked by loading them into the model (names and
    shapes), then written exactly like the <output_dir>/model/ directory a run ends with.
    """
    # pylint: disable=import-outside-toplevel
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    for name in ("config.json", WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(checkpoint, name)):
            raise FinetuneError(f"{checkpoint} is not a finetune checkpoint: {name} is missing (expected a "
                                "<output_dir>/checkpoints/step_XXXXXX directory)")
    if os.path.exists(output_path):
        raise FinetuneError(f"--output_path {output_path} already exists; choose a new directory")
    if os.path.isfile(os.path.join(checkpoint, STATE_FILE)):  # a finetune checkpoint: check what export reads
        try:
            verify_checkpoint(checkpoint, files=["config.json", WEIGHTS_FILE])
        except CheckpointDamaged as e:
            raise FinetuneError(f"checkpoint {checkpoint} is damaged: {e}; export another checkpoint") from e
    try:
        config = BaichuanConfig.from_hf_config(checkpoint)
        model = BaichuanForCausalLM(config)
        model.load_weights(os.path.join(checkpoint, WEIGHTS_FILE))
    except ValueError as e:  # WeightsFileError included
        raise FinetuneError(str(e)) from e
    return write_servable_dir(output_path, config, model=model, tokenizer_dir=tokenizer_dir)
