"""Fault injection: damaged checkpoints, a worker killed mid-save, damaged model directories.

One tiny single-process baseline run (3 steps, a checkpoint every step) is trained once and copied for every fault.
Each fault damages the newest checkpoint (step 3) and resumes: the run must report the file, move the checkpoint
aside, resume from step 2 and end with the weights and losses of an undamaged run resumed from step 2.
Training runs in this process (example/finetune.py's main) except the one that is killed.

The fault table of issue 39, row by row, and where each is tested (rows handled before it stay tested too):
    checkpoints: truncated / bit-flipped / zeroed / deleted files, no manifest, all damaged, SIGKILL or a full disk
        during a save, two ranks                          this module (checkpoints), test_finetune.py (msrun)
    a torn last line of train_log.jsonl                   this module: test_a_torn_train_log_line_...
    finetune into a previous run's output directory       this module: test_finetune_refuses_..., _overwrite_...
    damaged model directories (every entry point)         this module: test_check_model_dir ... test_server_...
    config.json disagreeing with the weights              this module: test_config_json_that_disagrees_...
    the openmind pipeline on a damaged directory          this module: test_openmind_pipeline_...
    server: a 20 MB body, a prompt too long to tokenize, tokenizing on the event loop, unfinished requests, a
        failed generation (logged 500), the same greedy text afterwards          test_server_faults.py
    server: seed -1, Infinity, wrong types, NaN, huge max_tokens, unknown model  test_server.py (BAD_REQUESTS),
                                                                                 test_generation_settings.py
    preprocessing: a malformed record, an invalid UTF-8 byte in one file of two, a directory or an empty file
        as input, an unwritable output, a killed writer's temp folder, exit status 3   test_belle_preprocess.py
"""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers import PYTHON, REPO, assert_same_weights, call_script, losses, plain_process_env, write_rows

FINETUNE = os.path.join(REPO, "example", "finetune.py")
EXPORT = os.path.join(REPO, "example", "export_model.py")
MERGE = os.path.join(REPO, "research", "baichuan2", "merge_lora.py")
SEQ, ROWS, STEPS = 32, 16, 3
RECIPE = f"""
model: {{preset: tiny, overrides: {{max_position_embeddings: 64, model_max_length: 64}}}}
data: {{seq_length: {SEQ}, shuffle: true}}
train: {{seed: 7, max_steps: {STEPS}, batch_size: 1, grad_accum_steps: 2, lr: 1.0e-2, min_lr: 1.0e-3,
        warmup_ratio: 0.0, weight_decay: 0.1, grad_clip: 1.0}}
output: {{save_steps: 1, keep_checkpoints: 3, log_steps: 1, tokenizer_dir: dataset}}
"""
CHECKPOINT_FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json",
                    "manifest.json")


def finetune(workdir, output_dir, *extra):
    return call_script(FINETUNE, ["--config", workdir / "recipe.yaml", "--train_dataset", workdir / "rows.mindrecord",
                                  "--output_dir", output_dir, *extra])


def error_line(err):
    """The one line a command-line tool prints on bad input (no traceback), besides the runtime's start-up line."""
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[runtime] ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def zero(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * size)


FAULTS = {"truncated": truncate, "zeroed": zero, "deleted": os.remove}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    write_rows(str(d / "rows.mindrecord"), ROWS, SEQ)
    (d / "recipe.yaml").write_text(RECIPE)
    return d


@pytest.fixture(scope="module")
def baseline(workdir):
    """The undamaged run: checkpoints step_000001..3, model/."""
    out = workdir / "baseline"
    code, stdout, stderr = finetune(workdir, out)
    assert code == 0, stderr[-3000:]
    assert sorted(os.listdir(out / "checkpoints")) == [f"step_{s:06d}" for s in (1, 2, 3)]
    return out


def copy_run(baseline, dest, drop_newest=False):
    """The baseline's checkpoints and train log in a new output directory (optionally without step 3)."""
    dest.mkdir()
    shutil.copytree(baseline / "checkpoints", dest / "checkpoints")
    shutil.copy(baseline / "train_log.jsonl", dest / "train_log.jsonl")
    if drop_newest:
        shutil.rmtree(dest / "checkpoints" / f"step_{STEPS:06d}")
    return dest


@pytest.fixture(scope="module")
def reference(workdir, baseline):
    """An undamaged run resumed from step 2: what every fallback must reproduce."""
    out = copy_run(baseline, workdir / "reference", drop_newest=True)
    code, stdout, stderr = finetune(workdir, out, "--resume")
    assert code == 0, stderr[-3000:]
    assert "resuming from" in stdout and "step_000002" in stdout
    return out


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_records_sizes_and_checksums(baseline):
    from baichuan2.weights_check import sha256_file
    ckpt = baseline / "checkpoints" / f"step_{STEPS:06d}"
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert sorted(manifest) == sorted(set(CHECKPOINT_FILES) - {"manifest.json"})
    for name, record in manifest.items():
        assert record == {"size": os.path.getsize(ckpt / name), "sha256": sha256_file(ckpt / name)}, name
    assert json.loads((ckpt / "trainer_state.json").read_text())["manifest"] == "manifest.json"


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_every_fault_moves_the_newest_aside_and_picks_the_older(baseline, tmp_path, fault, name):
    """The choice --resume makes, for each file of the newest checkpoint truncated, zeroed or deleted."""
    from baichuan2.training.checkpoint import checkpoint_to_resume
    out = copy_run(baseline, tmp_path / "run")
    FAULTS[fault](out / "checkpoints" / f"step_{STEPS:06d}" / name)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        chosen = checkpoint_to_resume(str(out), rank=0)
    assert chosen == str(out / "checkpoints" / "step_000002")
    lines = printed.getvalue().splitlines()
    assert len(lines) == 1 and f"({name}: " in lines[0] and "moved aside to step_000003.damaged-1" in lines[0], lines
    aside = out / "checkpoints" / "step_000003.damaged-1"  # moved aside, never deleted
    assert sorted(os.listdir(aside)) == sorted(set(CHECKPOINT_FILES) - ({name} if fault == "deleted" else set()))
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000001", "step_000002", "step_000003.damaged-1"]


# One end-to-end resume per kind of fault (the training that follows depends only on the checkpoint chosen, which
# the test above checks for every file and fault).
@pytest.mark.slow
@pytest.mark.parametrize("fault,name", [("truncated", "optimizer.safetensors"), ("zeroed", "model.safetensors"),
                                        ("deleted", "trainer_state.json")])
def test_resume_falls_back_from_a_damaged_checkpoint(workdir, baseline, reference, fault, name):
    out = copy_run(baseline, workdir / f"{fault}_{name}")
    newest = out / "checkpoints" / f"step_{STEPS:06d}"
    FAULTS[fault](newest / name)
    code, stdout, stderr = finetune(workdir, out, "--resume")
    assert code == 0, stderr[-3000:]
    warning = [line for line in stdout.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warning) == 1 and name in warning[0] and "step_000003.damaged-1" in warning[0], stdout
    assert "resuming from" in stdout and "step_000002 (step 2" in stdout
    assert_same_weights(out / "model" / "model.safetensors", reference / "model" / "model.safetensors")
    assert_same_weights(newest / "optimizer.safetensors", reference / "checkpoints" / "step_000003" /
                        "optimizer.safetensors")
    assert losses(out) == losses(reference)  # the curve continues from step 2: step 3 was retrained
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * 2


def test_no_checkpoint_verifies(workdir, baseline, tmp_path):
    out = copy_run(baseline, tmp_path / "all_bad")
    for step in (1, 2, 3):
        truncate(out / "checkpoints" / f"step_{step:06d}" / "optimizer.safetensors")
    code, stdout, stderr = finetune(workdir, out, "--resume")
    line = error_line(stderr)
    assert code == 2 and "no checkpoint" in line and "verifies" in line and "optimizer.safetensors" in line, line
    assert "truncated" in line and "step_000003" in line
    assert sorted(os.listdir(out / "checkpoints")) == [f"step_{s:06d}" for s in (1, 2, 3)]  # nothing moved
    assert not (out / "model").exists()


def test_checkpoint_without_manifest_is_verified_by_reading(baseline, tmp_path):
    """Checkpoints written before manifests existed: verified by their safetensors headers and sizes."""
    from baichuan2.training.checkpoint import CheckpointDamaged, verify_checkpoint
    old = tmp_path / "step_000003"
    shutil.copytree(baseline / "checkpoints" / "step_000003", old)
    os.remove(old / "manifest.json")
    state = json.loads((old / "trainer_state.json").read_text())
    del state["manifest"]
    (old / "trainer_state.json").write_text(json.dumps(state))
    assert verify_checkpoint(str(old))["step"] == 3
    for name in ("model.safetensors", "optimizer.safetensors", "config.json"):
        for fault in ("truncated", "zeroed"):
            damaged = tmp_path / f"{fault}_{name}"
            shutil.copytree(old, damaged)
            FAULTS[fault](damaged / name)
            with pytest.raises(CheckpointDamaged) as exc:
                verify_checkpoint(str(damaged))
            assert exc.value.file == name, (fault, str(exc.value))


def test_manifest_deleted_from_a_new_checkpoint_is_damage(baseline, tmp_path):
    from baichuan2.training.checkpoint import CheckpointDamaged, verify_checkpoint
    ckpt = tmp_path / "step_000003"
    shutil.copytree(baseline / "checkpoints" / "step_000003", ckpt)
    os.remove(ckpt / "manifest.json")
    with pytest.raises(CheckpointDamaged, match="manifest.json: is missing"):
        verify_checkpoint(str(ckpt))


class _Holder:
    """All save_checkpoint asks of a train cell: its parameters."""

    def __init__(self, params):
        self.params = params

    def get_parameters(self):
        return iter(self.params)


def test_rotation_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.training import checkpoint
    model = BaichuanForCausalLM(BaichuanConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=1))
    cell = _Holder(list(model.get_parameters()))
    root = tmp_path / "checkpoints"
    state = {"global_batch": 2, "num_samples": 16}
    checkpoint.save_checkpoint(str(tmp_path), model, cell, dict(state, step=1), keep=1)
    (root / "step_000000.damaged-1").mkdir()  # moved aside by an earlier resume: never counted, never removed
    checkpoint.save_checkpoint(str(tmp_path), model, cell, dict(state, step=2), keep=1)
    assert sorted(os.listdir(root)) == ["step_000000.damaged-1", "step_000002"]

    # a new checkpoint that does not verify after writing (here: a manifest recording wrong sizes) removes nothing
    real = checkpoint.write_manifest

    def bad_manifest(directory):
        real(directory)
        path = os.path.join(directory, checkpoint.MANIFEST_FILE)
        data = json.loads(open(path).read())
        data["files"]["model.safetensors"]["size"] += 1
        with open(path, "w") as f:
            json.dump(data, f)
    monkeypatch.setattr(checkpoint, "write_manifest", bad_manifest)
    checkpoint.save_checkpoint(str(tmp_path), model, cell, dict(state, step=3), keep=1)
    assert sorted(os.listdir(root)) == ["step_000000.damaged-1", "step_000002", "step_000003"]
    monkeypatch.setattr(checkpoint, "write_manifest", real)
    checkpoint.verify_checkpoint(str(root / "step_000002"))


def test_a_second_damaged_copy_gets_the_next_number(baseline, tmp_path):
    from baichuan2.training.checkpoint import checkpoint_to_resume
    out = copy_run(baseline, tmp_path / "twice")
    (out / "checkpoints" / "step_000003.damaged-1").mkdir()
    zero(out / "checkpoints" / "step_000003" / "model.safetensors")
    truncate(out / "checkpoints" / "step_000002" / "trainer_state.json")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        chosen = checkpoint_to_resume(str(out), rank=0)
    assert chosen == str(out / "checkpoints" / "step_000001")
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000001", "step_000002.damaged-1",
                                                       "step_000003.damaged-1", "step_000003.damaged-2"]
    lines = printed.getvalue().splitlines()
    assert len(lines) == 2 and "model.safetensors: sha256 differs" in lines[0], lines
    assert "trainer_state.json" in lines[1], lines


def test_other_ranks_choose_the_same_checkpoint_without_moving_anything(baseline, tmp_path):
    from baichuan2.training.checkpoint import checkpoint_to_resume
    out = copy_run(baseline, tmp_path / "rank1")
    truncate(out / "checkpoints" / "step_000003" / "model.safetensors")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        chosen = checkpoint_to_resume(str(out), rank=1)
    assert chosen == str(out / "checkpoints" / "step_000002") and printed.getvalue() == ""
    assert sorted(os.listdir(out / "checkpoints")) == [f"step_{s:06d}" for s in (1, 2, 3)]


@pytest.mark.slow
def test_killed_between_checkpoint_files_then_resume(workdir, baseline):
    """SIGKILL while step 2's checkpoint is half written (model.safetensors done, optimizer not yet): the resume
    drops the temp directory, continues from step 1 and ends with the uninterrupted run's weights."""
    out = workdir / "killed"
    env = dict(plain_process_env(), BAICHUAN_FINETUNE_DEBUG="1", BAICHUAN_FINETUNE_PAUSE_IN_SAVE="2")
    proc = subprocess.Popen([PYTHON, FINETUNE, "--config", workdir / "recipe.yaml", "--train_dataset",
                             workdir / "rows.mindrecord", "--output_dir", out], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    marker, deadline = out / "debug" / "saving_step_2", time.time() + 180
    try:
        while not marker.is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the run never reached the step-2 checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp_step_000002")]
    assert len(partial) == 1, os.listdir(out / "checkpoints")
    assert sorted(os.listdir(out / "checkpoints" / partial[0])) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(out / "checkpoints")) == sorted(["step_000001", partial[0]])

    code, stdout, stderr = finetune(workdir, out, "--resume")
    assert code == 0, stderr[-3000:]
    assert "step_000001 (step 1" in stdout
    assert sorted(os.listdir(out / "checkpoints")) == [f"step_{s:06d}" for s in (1, 2, 3)]  # temp dir gone
    assert_same_weights(out / "model" / "model.safetensors", baseline / "model" / "model.safetensors")
    np.testing.assert_allclose(losses(out), losses(baseline), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- output directory
def previous_run(baseline, dest, names):
    """`names` of the baseline's outputs (no checkpoints: as if checkpoints/ had been deleted) in a new directory."""
    dest.mkdir()
    for name in names:
        (shutil.copytree if (baseline / name).is_dir() else shutil.copy)(baseline / name, dest / name)
    return dest


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("names,flags,expected", [
    (("model", "train_log.jsonl"), (), "holds a previous run's model and train_log.jsonl; pass --resume"),
    (("train_log.jsonl",), (), "holds a previous run's train_log.jsonl; pass --resume"),
    (("model", "train_log.jsonl"), ("--resume",), "starting again would replace the previous run's model/; pass "
                                                  "--overwrite"),
    (("model",), ("--resume", "--overwrite"), "give one of them")])
def test_finetune_refuses_to_replace_a_previous_run(workdir, baseline, tmp_path, names, flags, expected):
    out = previous_run(baseline, tmp_path / "earlier", names)
    before = snapshot(out)
    code, stdout, stderr = finetune(workdir, out, *flags)
    line = error_line(stderr)
    assert code == 2 and expected in line, line
    assert snapshot(out) == before  # nothing replaced, nothing appended


@pytest.mark.slow
def test_finetune_overwrite_replaces_the_previous_run(workdir, baseline, tmp_path):
    out = previous_run(baseline, tmp_path / "earlier", ("model", "train_log.jsonl", "loss_curve.png"))
    (out / "train_log.jsonl").write_text('{"step": 99, "loss": 5.0}\n')  # must not survive into the new log
    code, stdout, stderr = finetune(workdir, out, "--overwrite")
    assert code == 0, stderr[-3000:]
    assert "--overwrite: removed the previous run's model, train_log.jsonl, loss_curve.png" in stdout
    assert losses(out) == losses(baseline)  # a log of this run only
    assert_same_weights(out / "model" / "model.safetensors", baseline / "model" / "model.safetensors")


class _Scalars:
    def add_scalar(self, *args):
        pass


def test_a_torn_train_log_line_does_not_stop_the_next_run(tmp_path, capsys):
    """A full disk cuts a train_log.jsonl line short: the next run's records start on a line of their own, and the
    loss curve skips the torn line (one warning naming it) instead of failing the run after training."""
    from baichuan2.training.monitor import TrainMonitor, read_train_log, write_loss_curve
    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')  # torn: no end, no newline
    monitor = TrainMonitor(rank=0, world_size=1, output_dir=str(tmp_path), plan=[], lrs=[1e-3], first_step=2,
                           total_steps=4, tokens_per_step=8, log_steps=100, save_steps=100, save=lambda step: None,
                           writer=_Scalars())
    monitor._log(3, 1.5, 0.1, False, 1.0, 0.5)  # pylint: disable=protected-access
    monitor._log(4, 1.0, 0.1, False, 1.0, 0.5)  # pylint: disable=protected-access
    assert [r["step"] for r in read_train_log(str(log))] == [1, 3, 4]
    assert "line 2" in capsys.readouterr().err
    curve = write_loss_curve(str(tmp_path))
    assert curve == str(tmp_path / "loss_curve.png") and os.path.isfile(curve)
    assert len(log.read_text().splitlines()) == 4


@pytest.mark.slow
def test_disk_full_during_a_checkpoint(workdir, tmp_path, monkeypatch):
    """The optimizer file of step 2 fails half-way (ENOSPC): one line, exit 2, step 1 kept, no temp dir left."""
    import errno
    import safetensors.numpy
    real = safetensors.numpy.save_file

    def fill_disk(tensors, filename, metadata=None):
        if ".tmp_step_000002" in filename and filename.endswith("optimizer.safetensors"):
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.numpy, "save_file", fill_disk)
    out = tmp_path / "full"
    code, stdout, stderr = finetune(workdir, out)
    line = error_line(stderr)
    assert code == 2 and "step_000002" in line and "No space left on device" in line and "--resume" in line, line
    assert os.listdir(out / "checkpoints") == ["step_000001"]
    from baichuan2.training.checkpoint import checkpoint_to_resume
    assert checkpoint_to_resume(str(out), rank=0) == str(out / "checkpoints" / "step_000001")


def test_lora_checkpoint_damage_names_the_adapter_file(tmp_path):
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.lora import apply_lora
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.training.checkpoint import CheckpointDamaged, save_checkpoint, verify_checkpoint
    model = BaichuanForCausalLM(BaichuanConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=1))
    apply_lora(model, 2, 4.0, 0.0, ["W_pack"])
    ckpt = save_checkpoint(str(tmp_path), model, _Holder(list(model.get_parameters())),
                           {"step": 1, "global_batch": 2, "num_samples": 16}, keep=1)
    assert "adapter_model.safetensors" in json.loads(open(os.path.join(ckpt, "manifest.json")).read())["files"]
    truncate(os.path.join(ckpt, "adapter_model.safetensors"))
    with pytest.raises(CheckpointDamaged, match="adapter_model.safetensors: is .* bytes.*truncated"):
        verify_checkpoint(ckpt)
    os.remove(os.path.join(ckpt, "manifest.json"))  # as written before manifests: the header check finds it
    state = json.loads(open(os.path.join(ckpt, "trainer_state.json")).read())
    del state["manifest"]
    with open(os.path.join(ckpt, "trainer_state.json"), "w") as f:
        json.dump(state, f)
    with pytest.raises(CheckpointDamaged, match="adapter_model.safetensors: .*truncated"):
        verify_checkpoint(ckpt)


# ---------------------------------------------------------------------------------------------- weights files
def test_check_safetensors_names_the_file_and_the_problem(baseline, tmp_path):
    from baichuan2.weights_check import WeightsFileError, check_safetensors
    good = baseline / "model" / "model.safetensors"
    check_safetensors(str(good))
    size = os.path.getsize(good)
    cases = {"empty": (0, "too short"), "eight_bytes": (8, "truncated"), "a_third": (size // 3, "truncated"),
             "one_byte_short": (size - 1, "truncated")}
    for label, (keep, problem) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(good.read_bytes()[:keep])
        with pytest.raises(WeightsFileError) as exc:
            check_safetensors(str(path))
        assert str(path) in str(exc.value) and problem in str(exc.value) and "\n" not in str(exc.value), label
    extra = tmp_path / "extra.safetensors"
    extra.write_bytes(good.read_bytes() + b"\0" * 16)
    zeroed = tmp_path / "zeroed.safetensors"
    zeroed.write_bytes(b"\0" * size)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 31 + b"\0" * 64)
    for path, problem in ((extra, "damaged"), (zeroed, "zeroed"), (garbage, "not valid JSON"),
                          (tmp_path / "absent.safetensors", "missing")):
        with pytest.raises(WeightsFileError, match=problem) as exc:
            check_safetensors(str(path))
        assert exc.value.path == str(path)


@pytest.fixture
def damaged_model_dir(baseline, tmp_path):
    """A copy of the baseline's model/ directory with one file damaged: make(fault, name) -> its path."""
    def make(fault, name):
        model_dir = tmp_path / f"model_{fault}_{name.replace('.', '_')}"
        shutil.copytree(baseline / "model", model_dir)
        FAULTS[fault](model_dir / name)
        return model_dir
    return make


WEIGHT_FAULTS = [(fault, "model.safetensors") for fault in sorted(FAULTS)] + [("zeroed", "config.json"),
                                                                             ("truncated", "config.json")]


@pytest.mark.parametrize("fault,name", WEIGHT_FAULTS)
def test_check_model_dir(damaged_model_dir, fault, name):
    from baichuan2.weights_check import WeightsFileError, check_model_dir
    model_dir = damaged_model_dir(fault, name)
    with pytest.raises(WeightsFileError) as exc:
        check_model_dir(str(model_dir))
    message = str(exc.value)
    assert str(model_dir) in message and "\n" not in message, message
    assert name in message or (fault == "deleted" and "no weights" in message), message


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_load_checkpoint_damaged(workdir, damaged_model_dir, tmp_path, fault):
    model_dir = damaged_model_dir(fault, "model.safetensors")
    out = tmp_path / "out"
    code, stdout, stderr = finetune(workdir, out, "--load_checkpoint", model_dir)
    line = error_line(stderr)
    assert code == 2 and "--load_checkpoint" in line and str(model_dir) in line, line
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("fault,name", [(f, n) for f in sorted(FAULTS) for n in ("model.safetensors", "config.json")])
def test_export_damaged_checkpoint(workdir, baseline, tmp_path, fault, name):
    ckpt = tmp_path / "step_000003"
    shutil.copytree(baseline / "checkpoints" / "step_000003", ckpt)
    FAULTS[fault](ckpt / name)
    exported = tmp_path / "exported"
    code, stdout, stderr = call_script(EXPORT, ["--checkpoint", ckpt, "--config", workdir / "recipe.yaml",
                                                "--output_path", exported])
    line = error_line(stderr)
    assert code == 2 and name in line, line
    assert not exported.exists() and [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


def test_export_ignores_damage_to_files_it_does_not_read(workdir, baseline, tmp_path):
    ckpt = tmp_path / "step_000003"
    shutil.copytree(baseline / "checkpoints" / "step_000003", ckpt)
    truncate(ckpt / "optimizer.safetensors")
    code, stdout, stderr = call_script(EXPORT, ["--checkpoint", ckpt, "--config", workdir / "recipe.yaml",
                                                "--output_path", tmp_path / "exported"])
    assert code == 0, stderr
    assert_same_weights(tmp_path / "exported" / "model.safetensors", ckpt / "model.safetensors", atol=0)


@pytest.fixture(scope="module")
def adapter_file(baseline, tmp_path_factory):
    """A LoRA adapter for the baseline's model (random B so the merge changes the weights)."""
    from mindspore import Tensor
    from baichuan2.lora import ADAPTER_FILE, adapter_params, apply_lora, save_adapter
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    model = BaichuanForCausalLM.from_pretrained(str(baseline / "model"), backend="composed")
    apply_lora(model, 2, 4.0, 0.0, ["W_pack"])
    rng = np.random.default_rng(0)
    for p in adapter_params(model):
        p.set_data(Tensor(rng.normal(size=p.shape).astype(np.float32)))
    path = tmp_path_factory.mktemp("adapter") / ADAPTER_FILE
    save_adapter(model, str(path))
    return path


@pytest.mark.parametrize("fault,name", WEIGHT_FAULTS + [("truncated", "adapter"), ("zeroed", "adapter")])
def test_merge_lora_damaged_inputs(baseline, adapter_file, damaged_model_dir, tmp_path, fault, name):
    base, adapter = baseline / "model", adapter_file
    if name == "adapter":
        adapter = tmp_path / adapter_file.name
        shutil.copy(adapter_file, adapter)
        FAULTS[fault](adapter)
    else:
        base = damaged_model_dir(fault, name)
    merged = tmp_path / "merged"
    code, stdout, stderr = call_script(MERGE, ["--base", base, "--adapter", adapter, "--output_path", merged])
    line = error_line(stderr)
    assert code == 2 and (adapter_file.name if name == "adapter" else name) in line, line
    assert not merged.exists()


def test_merge_lora_undamaged(baseline, adapter_file, tmp_path):
    code, stdout, stderr = call_script(MERGE, ["--base", baseline / "model", "--adapter", adapter_file,
                                               "--output_path", tmp_path / "merged"])
    assert code == 0, stderr


# ---------------------------------------------------------------------------------------------- inference
# A damaged model directory in the inference entry points: from_pretrained (what the openmind pipeline calls) and
# runtime.load_model_dir both run weights_check.check_model_dir first, and the command-line tools exit with status 2.


def test_from_pretrained_names_a_missing_weights_file(damaged_model_dir):
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.weights_check import WeightsFileError
    with pytest.raises(WeightsFileError, match="no weights in the directory: expected model.safetensors"):
        BaichuanForCausalLM.from_pretrained(str(damaged_model_dir("deleted", "model.safetensors")))


@pytest.mark.parametrize("fault", ["truncated", "zeroed"])
def test_from_pretrained_names_the_damaged_file(damaged_model_dir, fault):
    """What the openmind pipeline, chat, server and evaluation all call."""
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    model_dir = damaged_model_dir(fault, "model.safetensors")
    with pytest.raises(ValueError) as exc:
        BaichuanForCausalLM.from_pretrained(str(model_dir))
    assert str(model_dir / "model.safetensors") in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("script,extra", [("example/inference.py", ["--prompt", "hi", "--max_new_tokens", "2"]),
                                          ("example/chat.py", []),
                                          ("example/serve.py", ["--port", "1"])])
def test_entry_points_exit_2_naming_the_damaged_file(damaged_model_dir, script, extra):
    model_dir = damaged_model_dir("truncated", "model.safetensors")
    code, stdout, stderr = call_script(os.path.join(REPO, script), ["--model_dir", model_dir, *extra])
    line = error_line(stderr)
    assert code == 2 and str(model_dir / "model.safetensors") in line and "truncated" in line, line


def test_evaluation_scorer_names_the_damaged_file(damaged_model_dir):
    """example/evaluate.py loads through ModelScorer.from_model_dir (its data layout is checked first)."""
    from baichuan2.evaluation.scoring import ModelScorer
    model_dir = damaged_model_dir("truncated", "model.safetensors")
    with pytest.raises(ValueError) as exc:
        ModelScorer.from_model_dir(str(model_dir))
    assert "model.safetensors" in str(exc.value) and "truncated" in str(exc.value)


def test_server_refuses_a_damaged_model_dir(damaged_model_dir):
    """The server must not start serving (no /health "ok") from a damaged directory."""
    from baichuan2.server import create_app
    model_dir = damaged_model_dir("zeroed", "model.safetensors")
    with pytest.raises(ValueError) as exc:
        create_app(str(model_dir))
    assert "model.safetensors" in str(exc.value)


def test_config_json_that_disagrees_with_the_weights_is_named(baseline, tmp_path):
    """A config.json whose sizes are not the weights' (here hidden_size and num_hidden_layers): one line naming
    config.json and each disagreement, from the check every loader runs and from an entry point (exit 2)."""
    from baichuan2.weights_check import WeightsFileError, check_model_dir
    model_dir = tmp_path / "mismatched"
    shutil.copytree(baseline / "model", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    config.update(hidden_size=hidden * 2, num_hidden_layers=layers + 1)
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsFileError) as exc:
        check_model_dir(str(model_dir))
    message = str(exc.value)
    assert message.startswith(f"{model_dir / 'config.json'}: disagrees with the weights") and "\n" not in message
    assert f"hidden_size is {hidden * 2} but the weights have model.norm.weight [{hidden}]" in message, message
    assert f"num_hidden_layers is {layers + 1} but the weights have layers 0..{layers - 1}" in message, message
    code, stdout, stderr = call_script(os.path.join(REPO, "example", "inference.py"),
                                       ["--model_dir", model_dir, "--prompt", "hi", "--max_new_tokens", "2"])
    line = error_line(stderr)
    assert code == 2 and str(model_dir / "config.json") in line and "hidden_size is" in line, line


def test_openmind_pipeline_error_is_ours_not_mindformers_fallback():
    """mindformers wraps the model's error in RuntimeError("... experimental mode ... yaml file"); the openmind
    adaptation raises the WeightsFileError behind it (matched by name: the model code runs from its copy)."""
    from baichuan2.openmind_compat import _model_dir_error  # pylint: disable=protected-access
    from baichuan2.weights_check import WeightsFileError
    ours = WeightsFileError("/m/model.safetensors", "file is 10 bytes (truncated)")
    try:
        try:
            raise ours
        except WeightsFileError as e:
            raise RuntimeError("You are using AutoModelForCausalLM in experimental mode ... yaml file") from e
    except RuntimeError as wrapped:
        assert _model_dir_error(wrapped) is ours
    assert _model_dir_error(RuntimeError("unrelated")) is None


OPENMIND_CALL = """
from openmind import pipeline
pipeline(task="text_generation", model={model_dir!r}, framework='ms', trust_remote_code=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fault,name", [("truncated", "model.safetensors"), ("zeroed", "config.json")])
def test_openmind_pipeline_on_a_damaged_model_dir(damaged_model_dir, tmp_path, fault, name):
    """The model card's call on a damaged directory ends with our line naming the file, not mindformers'."""
    model_dir = damaged_model_dir(fault, name)
    env = dict(os.environ)
    env.pop("OPENMIND_HIDE_STACKTRACE", None)
    proc = subprocess.run([PYTHON, "-c", OPENMIND_CALL.format(model_dir=str(model_dir))], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "WeightsFileError: " in last and str(model_dir / name) in last, proc.stderr[-3000:]
    assert "experimental mode" not in proc.stderr
