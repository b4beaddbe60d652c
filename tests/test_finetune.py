"""example/finetune.py + msrun.sh end to end on a tiny model (CPU).

The msrun runs share one recipe (2 ranks, 24 steps = 2 epochs of a 96-row MindRecord) so their final weights can
be compared: 2 workers on one node, the same split over two loopback "nodes", and a run whose rank 1 is killed with
SIGKILL and then resumed must all end with the same weights.
"""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers import PYTHON, REPO, assert_same_weights, call_script, free_port, load_weights, losses, msrun, \
    plain_process_env, wait, write_rows

FINETUNE = os.path.join(REPO, "example", "finetune.py")
EXPORT = os.path.join(REPO, "example", "export_model.py")
SEQ = 32
ROWS = 96
STEPS = 24  # 2 ranks x batch 2 x accum 2 = 8 rows a step -> 12 steps an epoch -> 2 epochs

RECIPE = f"""
model: {{preset: tiny, overrides: {{max_position_embeddings: 64, model_max_length: 64}}}}
data: {{seq_length: {SEQ}, shuffle: true}}
train: {{seed: 11, max_steps: {STEPS}, batch_size: 2, grad_accum_steps: 2, lr: 1.0e-2, min_lr: 1.0e-3,
        warmup_ratio: 0.1, weight_decay: 0.1, grad_clip: 1.0}}
output: {{save_steps: 4, keep_checkpoints: 2, log_steps: 4, tokenizer_dir: dataset}}
"""


def finetune_order(workdir, output_dir, extra=""):
    return f"{FINETUNE} --config {workdir}/recipe.yaml --train_dataset {workdir}/rows.mindrecord " \
           f"--output_dir {output_dir} {extra}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    write_rows(str(d / "rows.mindrecord"), ROWS, SEQ)
    (d / "recipe.yaml").write_text(RECIPE)
    return d


@pytest.fixture(scope="module")
def dp_run(workdir):
    """The reference: 2 workers on one node, uninterrupted."""
    out = workdir / "dp"
    proc = msrun([finetune_order(workdir, out), 2, free_port(), workdir / "dp_logs"], workdir, workdir / "dp_logs")
    rc = wait(proc, 240)
    assert rc == 0, open(str(workdir / "dp_logs") + ".out").read()[-3000:]
    return out


# ---------------------------------------------------------------------------------------------- fast checks
def test_sample_plan_disjoint_and_resumable():
    from baichuan2.training.plan import rank_sample_plan
    full = [rank_sample_plan(ROWS, 8, r, 4, 0, STEPS, 11, True) for r in range(2)]
    for step in range(STEPS):
        assert not set(full[0][step]) & set(full[1][step])
    epoch0 = {i for r in range(2) for step in full[r][:12] for i in step}
    assert epoch0 == set(range(ROWS))  # every row once per epoch
    assert full[0][:12] != full[0][12:]  # a new order each epoch
    # a resumed plan is exactly the tail of the uninterrupted one
    assert rank_sample_plan(ROWS, 8, 1, 4, 7, STEPS, 11, True) == full[1][7:]


def test_dataset_reads_planned_rows(workdir):
    from baichuan2.training.plan import build_dataset, rank_sample_plan
    plan = [[5, 17, 3, 90], [44, 0, 61, 2]]
    batches = list(build_dataset(str(workdir / "rows.mindrecord"), plan, 4).create_dict_iterator(output_numpy=True))
    got = [[int(row[1]) - 10 for row in b["input_ids"]] for b in batches]
    assert got == plan
    # one process over three epochs: the plan lists every row three times (more indices than the file has rows)
    long_plan = rank_sample_plan(ROWS, 4, 0, 4, 0, 3 * (ROWS // 4), 11, True)
    batches = build_dataset(str(workdir / "rows.mindrecord"), long_plan, 4).create_dict_iterator(output_numpy=True)
    assert [[int(row[1]) - 10 for row in b["input_ids"]] for b in batches] == long_plan


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def call_main():
    """finetune.py's command line run in this process: its stderr, after checking that it failed."""
    def call(*argv):
        code, _, err = call_script(FINETUNE, argv)
        assert code != 0, err
        return err
    return call


def test_bad_inputs(workdir, tmp_path, call_main):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    base = ["--config", workdir / "recipe.yaml", "--output_dir", out]

    err = call_main(*base, "--train_dataset", tmp_path / "missing.mindrecord")
    assert "train dataset not found" in err and "missing.mindrecord" in err

    wrong_cols = write_rows(str(tmp_path / "cols.mindrecord"), 8, SEQ, columns=("tokens", "labels"))
    err = call_main(*base, "--train_dataset", wrong_cols)
    assert "lacks column" in err and "input_ids" in err

    wrong_len = write_rows(str(tmp_path / "len.mindrecord"), 8, 16)
    err = call_main(*base, "--train_dataset", wrong_len)
    assert "seq_length + 1 = 33" in err and "(17,)" in err and "pass --seq_length 16 for these rows" in err

    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    BaichuanForCausalLM(BaichuanConfig.from_preset("tiny", hidden_size=32)).save_pretrained(str(tmp_path / "other"))
    # a bare weights file has no config.json: the preset's shape applies and the mismatch is named
    err = call_main(*base, "--train_dataset", workdir / "rows.mindrecord", "--load_checkpoint",
                    tmp_path / "other" / "model.safetensors")
    assert "--load_checkpoint" in err and "mis-shaped" in err and "model.norm.weight" in err
    # the directory's config.json is the architecture: a recipe shape that differs is one clear error
    err = call_main(*base, "--train_dataset", workdir / "rows.mindrecord", "--load_checkpoint", tmp_path / "other",
                    "--set", "model.overrides.hidden_size=64")
    error = err.strip().splitlines()[-1]  # after the [runtime] start-up line
    assert error.startswith("finetune.py: error: model.overrides contradict")
    assert "hidden_size: 64 (config.json: 32)" in error

    records = tmp_path / "belle.json"
    records.write_text("[]")
    err = call_main(*base, "--train_dataset", records)
    error = err.strip().splitlines()[-1]
    assert error.startswith(f"finetune.py: error: train dataset {records}") and "belle_preprocess.py" in error

    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text(RECIPE.replace("weight_decay: 0.1", "weight_decay: 0.1, wieght_decay: 0.1"))
    err = call_main("--config", bad_recipe, "--output_dir", out, "--train_dataset", workdir / "rows.mindrecord")
    assert "unknown key train.wieght_decay" in err and str(bad_recipe) in err
    bad_recipe.write_text(RECIPE.replace("max_position_embeddings: 64", "max_positions: 64"))
    err = call_main("--config", bad_recipe, "--output_dir", out, "--train_dataset", workdir / "rows.mindrecord")
    assert "model.overrides.max_positions" in err

    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "untouched"


# ---------------------------------------------------------------------------------------------- single process
@pytest.mark.slow
def test_single_process_run_and_export(workdir, tmp_path):
    out = tmp_path / "single"
    env = plain_process_env()
    proc = subprocess.run([PYTHON, FINETUNE, "--config", workdir / "recipe.yaml", "--train_dataset",
                           workdir / "rows.mindrecord", "--output_dir", out, "--max_steps", "6", "--save_steps", "2"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4/6 loss" in proc.stdout and "tokens/s" in proc.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000004", "step_000006"]  # keep_checkpoints: 2
    ckpt = out / "checkpoints" / "step_000004"
    assert sorted(os.listdir(ckpt)) == ["config.json", "manifest.json", "model.safetensors", "optimizer.safetensors",
                                        "trainer_state.json"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["samples_seen"] == 16
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    for name in ("config.json", "model.safetensors", "tokenizer.model", "modeling_baichuan.py"):
        assert (out / "model" / name).is_file(), name
    assert_same_weights(out / "model" / "model.safetensors", out / "checkpoints" / "step_000006" / "model.safetensors")

    # the final model dir loads straight into the inference path
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    model = BaichuanForCausalLM.from_pretrained(str(out / "model"))
    assert model.config.max_position_embeddings == 64

    # any intermediate checkpoint exports to the same kind of directory
    exported = tmp_path / "exported"
    proc = subprocess.run([PYTHON, EXPORT, "--checkpoint", ckpt, "--config", workdir / "recipe.yaml",
                           "--output_path", exported], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(exported)) == sorted(os.listdir(out / "model"))
    assert_same_weights(exported / "model.safetensors", ckpt / "model.safetensors", atol=0)

    # a fresh run into a directory with checkpoints refuses (nothing overwritten)
    proc = subprocess.run([PYTHON, FINETUNE, "--config", workdir / "recipe.yaml", "--train_dataset",
                           workdir / "rows.mindrecord", "--output_dir", out, "--max_steps", "6"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "already holds checkpoints" in proc.stderr


@pytest.mark.slow
def test_loss_that_turns_non_finite_stops_the_run(workdir, tmp_path):
    """A learning rate of 1e30 blows the weights up within a few steps: the run must stop with a clear message,
    keep the checkpoint written before (step 2) and write no later checkpoint or final model."""
    out = tmp_path / "nan"
    env = plain_process_env()
    proc = subprocess.run([PYTHON, FINETUNE, "--config", workdir / "recipe.yaml", "--train_dataset",
                           workdir / "rows.mindrecord", "--output_dir", out, "--max_steps", "12", "--save_steps", "2",
                           "--lr", "1e30"], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "loss is nan" in proc.stderr or "loss is inf" in proc.stderr, proc.stderr[-2000:]
    assert "--resume" in proc.stderr and str(out / "checkpoints") in proc.stderr
    stopped_at = int(proc.stderr.split(" at step ")[1].split(":")[0])
    saved = sorted(os.listdir(out / "checkpoints"))
    assert saved and all(int(name.split("_")[1]) < stopped_at for name in saved), (saved, stopped_at)
    assert not (out / "model").exists()


# ---------------------------------------------------------------------------------------------- msrun
@pytest.mark.slow
def test_two_workers(dp_run):
    loss = losses(dp_run)
    assert len(loss) == STEPS
    assert np.mean(loss[-4:]) < np.mean(loss[:4]) - 0.5, loss
    assert_same_weights(dp_run / "debug" / "weights_rank0.safetensors",
                        dp_run / "debug" / "weights_rank1.safetensors", atol=0)
    seen = []
    for rank in range(2):
        with open(dp_run / "debug" / f"samples_rank{rank}.jsonl") as f:
            seen.append({r["step"]: r["indices"] for r in map(json.loads, f)})
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(1, STEPS + 1))
    for step in seen[0]:
        assert not set(seen[0][step]) & set(seen[1][step])
    first_epoch = [i for r in range(2) for s in range(1, 13) for i in seen[r][s]]
    assert sorted(first_epoch) == list(range(ROWS))


@pytest.mark.slow
def test_two_nodes_on_loopback(workdir, dp_run):
    out, port = workdir / "nodes", free_port()
    procs = [msrun([finetune_order(workdir, out), 2, 1, "127.0.0.1", port, node, workdir / f"node{node}_logs"],
                   workdir, workdir / f"node{node}_logs") for node in (0, 1)]
    rcs = [wait(p, 240) for p in procs]
    assert rcs == [0, 0], open(str(workdir / "node0_logs") + ".out").read()[-3000:]
    assert_same_weights(out / "model" / "model.safetensors", dp_run / "model" / "model.safetensors")


@pytest.mark.slow
def test_kill_one_worker_then_resume(workdir, dp_run):
    out = workdir / "killed"
    # MS_NODE_TIMEOUT: the scheduler notices the dead worker after 10 s of missed heartbeats instead of ~30 s
    proc = msrun([finetune_order(workdir, out), 2, free_port(), workdir / "kill_logs"], workdir,
                 workdir / "kill_logs", MS_NODE_TIMEOUT="10")
    deadline = time.time() + 180
    while not (out / "checkpoints" / "step_000004").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(int((out / "debug" / "pid_rank1").read_text()), signal.SIGKILL)
    killed_at = time.time()
    rc = wait(proc, 120)
    print(f"msrun exited {time.time() - killed_at:.1f} s after the kill")
    assert rc != 0, "msrun must report the killed worker"
    done = sorted(os.listdir(out / "checkpoints"))
    assert f"step_{STEPS:06d}" not in done, "the run finished before the kill; the test proves nothing"

    resumed = msrun([finetune_order(workdir, out, "--resume"), 2, free_port(), workdir / "resume_logs"], workdir,
                    workdir / "resume_logs")
    started = time.time()
    assert wait(resumed, 240) == 0, open(str(workdir / "resume_logs") + ".out").read()[-3000:]
    print(f"resumed run took {time.time() - started:.1f} s")
    assert "resuming from" in open(workdir / "resume_logs" / "worker_0.log").read()
    assert_same_weights(out / "model" / "model.safetensors", dp_run / "model" / "model.safetensors")
    # optimizer moments and step carried over too
    a = load_weights(out / "checkpoints" / f"step_{STEPS:06d}" / "optimizer.safetensors")
    b = load_weights(dp_run / "checkpoints" / f"step_{STEPS:06d}" / "optimizer.safetensors")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-7, err_msg=name)
