"""baichuan2.runtime: --device for every entry point, the start-up line, quiet logs kept out of the cwd, loading a
model directory in the device's compute dtype."""
import argparse
import json
import logging
import os
import shutil
import subprocess
import time

import mindspore as ms
import pytest

from baichuan2 import runtime
from helpers import REPO, run_module

NO_ASCEND = runtime.ascend_unavailable_reason()
needs_no_ascend = pytest.mark.skipif(NO_ASCEND is None, reason="this host has a usable Ascend NPU")
# what the set-up reads from the environment: the tests start from none of it, as a user's shell would
RUNTIME_ENV = ("GLOG_v", "LOG_MF_PATH", "LOCAL_DEFAULT_PATH", "MS_OM_PATH", "OMP_NUM_THREADS")


def clean_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in RUNTIME_ENV}
    env["TMPDIR"] = str(tmp_path / "tmp")  # where the default log folder goes
    os.makedirs(env["TMPDIR"], exist_ok=True)
    return env


@pytest.fixture(scope="module")
def model_dir(parity_model_dir):
    return parity_model_dir("baichuan2_7b")


@pytest.fixture(scope="module")
def bf16_model_dir(model_dir, tmp_path_factory):
    """The tiny model dir saved with compute_dtype bfloat16, which CPU cannot run (no bf16 MatMul kernel)."""
    half = tmp_path_factory.mktemp("runtime") / "bf16_config"
    shutil.copytree(model_dir, half)
    config = json.loads((half / "config.json").read_text(encoding="utf-8"))
    config["compute_dtype"] = "bfloat16"
    (half / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(half)


# ---------------------------------------------------------------------------------------------- --device Ascend
ENTRY_POINTS = {
    "chat": ["example/chat.py", "--model_dir", "{missing}"],
    "inference": ["example/inference.py", "--model_dir", "{missing}", "--prompt", "hi"],
    "serve": ["example/serve.py", "--model_dir", "{missing}"],
    "evaluate": ["example/evaluate.py", "--model_dir", "{missing}", "--task", "ceval", "--data_dir", "{missing}"],
    "bench_generate": ["example/bench_generate.py", "--configs", "S"],
    "finetune": ["example/finetune.py", "--train_dataset", "{missing}"],
    "demo": ["example/demo.py", "--output_dir", "{missing}"],
}


@pytest.mark.slow
@needs_no_ascend
@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_device_ascend_fails_cleanly_before_loading(name, tmp_path):
    # the model directory does not exist: any attempt to load it (or the data) would fail with another message
    argv = [a.format(missing=tmp_path / "missing") for a in ENTRY_POINTS[name]]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(run_module(*argv, "--device", "Ascend"), capture_output=True, text=True, cwd=cwd,
                          env=clean_env(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    script = os.path.basename(argv[0])
    assert lines[0].startswith(f"{script}: error: --device Ascend: MindSpore cannot use an Ascend NPU here: ")
    assert "--device CPU" in lines[0] and proc.stdout == ""
    assert os.listdir(cwd) == []


# ---------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_inference_prints_its_device_and_keeps_cwd_and_console_clean(model_dir, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = clean_env(tmp_path)
    proc = subprocess.run(run_module("example/inference.py", "--model_dir", model_dir, "--prompt", "你好",
                                     "--max_new_tokens", "3", "--device", "cpu", "--threads", "1"),
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[0] == "[runtime] device CPU (asked), mode GRAPH, 1 threads, compute float32"
    assert proc.stderr.count("[runtime]") == 1
    for stream in (proc.stdout, proc.stderr):  # mindformers logs to stdout, MindSpore to stderr
        assert " INFO " not in stream and "[INFO]" not in stream, stream[-3000:]
    assert proc.stdout.startswith("### prompt: 你好\n"), proc.stdout[-3000:]
    assert os.listdir(cwd) == [], "mindformers' ./output/log (or anything else) was written into the cwd"
    logs = os.path.join(env["TMPDIR"], f"baichuan2-{os.environ.get('USER') or os.getuid()}", "logs", "mindformers")
    assert os.path.isdir(logs), "mindformers' log folder should be under the temp directory"


@pytest.mark.slow
@needs_no_ascend
def test_auto_chooses_cpu_here(model_dir, tmp_path):
    proc = subprocess.run(run_module("example/inference.py", "--model_dir", model_dir, "--prompt", "a",
                                     "--max_new_tokens", "2", "--mode", "pynative"),
                          capture_output=True, text=True, cwd=tmp_path, env=clean_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[0].startswith("[runtime] device CPU (auto), mode PYNATIVE, ")


# ---------------------------------------------------------------------------------------------- in process
def test_device_argument_is_case_insensitive_and_checked():
    parser = runtime.add_device_argument(argparse.ArgumentParser())
    assert parser.parse_args([]).device == "auto"
    assert parser.parse_args(["--device", "cpu"]).device == "CPU"
    assert parser.parse_args(["--device", "ASCEND"]).device == "Ascend"
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "GPU"])


def test_resolve_device(monkeypatch):
    assert runtime.resolve_device("CPU") == "CPU"
    monkeypatch.setattr(runtime, "ascend_unavailable_reason", lambda: "this host shows no NPU")
    assert runtime.resolve_device("auto") == "CPU"
    with pytest.raises(runtime.DeviceError, match=r"^--device Ascend: .*shows no NPU\. Run with --device CPU"):
        runtime.resolve_device("Ascend")
    monkeypatch.setattr(runtime, "ascend_unavailable_reason", lambda: None)
    assert runtime.resolve_device("auto") == "Ascend" and runtime.resolve_device("Ascend") == "Ascend"


@needs_no_ascend
def test_the_reason_names_what_is_missing():
    # this project's machines have MindSpore's Ascend plugin but not the CANN libraries it needs
    assert "Ascend plugin did not load" in NO_ASCEND and "CANN" in NO_ASCEND and "\n" not in NO_ASCEND


def test_inference_dtype_per_device():
    assert runtime.inference_dtype("CPU", "bfloat16") == "float32"  # no bf16 MatMul on CPU
    assert runtime.inference_dtype("Ascend", "float32") == "bfloat16"
    assert runtime.inference_dtype("Ascend", "float16") == "float16"


def test_setup_training_single_process(monkeypatch, capsys):
    for key in RUNTIME_ENV + ("RANK_SIZE", "MS_WORKER_NUM"):
        monkeypatch.delenv(key, raising=False)
    try:
        assert runtime.setup_training("CPU", threads=1) == (0, 1, "CPU")
        assert ms.get_context("mode") == ms.GRAPH_MODE
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert capsys.readouterr().err.startswith("[runtime] device CPU (asked), mode GRAPH, 1 threads")


def test_load_model_dir_uses_the_device_dtype_and_the_dirs_generation_config(bf16_model_dir, tmp_path):
    model, tokenizer, generation = runtime.load_model_dir(bf16_model_dir)
    assert model.config.compute_dtype == "float32"
    with open(os.path.join(bf16_model_dir, "generation_config.json"), encoding="utf-8") as f:
        assert generation == json.load(f)
    ids = tokenizer.encode("你好")
    logits = model(ms.Tensor([ids], ms.int32)).asnumpy()
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        runtime.load_model_dir(tmp_path)


def test_server_loads_a_model_dir_through_the_runtime(bf16_model_dir, tmp_path):
    from baichuan2.server import create_app  # pylint: disable=import-outside-toplevel
    app = create_app(bf16_model_dir, max_batch=2)
    try:
        assert app.state.generator.config.compute_dtype == "float32"
        assert app.state.tokenizer.encode("你好")
    finally:
        app.state.worker.close()
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        create_app(str(tmp_path))


def test_setup_logs_points_logs_away_from_cwd_and_keeps_user_settings(monkeypatch, tmp_path):
    for key in RUNTIME_ENV:
        monkeypatch.delenv(key, raising=False)
    runtime.setup_logs(str(tmp_path / "logs"))
    assert os.environ["GLOG_v"] == "2"
    assert os.environ["LOG_MF_PATH"] == str(tmp_path / "logs" / "mindformers")
    assert os.environ["MS_OM_PATH"] == str(tmp_path / "logs" / "mindspore")
    # the logger mindformers will use for that folder lets warnings through, not INFO
    mf_logger = logging.getLogger("mindformers" + os.environ["LOG_MF_PATH"])
    def record(level, msg):
        return logging.LogRecord("m", level, __file__, 1, msg, None, None)
    assert not mf_logger.filter(record(logging.INFO, "config ..."))
    assert mf_logger.filter(record(logging.WARNING, "a real warning"))
    assert mf_logger.filter(record(logging.ERROR, "an error"))

    for key in RUNTIME_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GLOG_v", "1")
    monkeypatch.setenv("LOCAL_DEFAULT_PATH", str(tmp_path / "mine"))
    runtime.setup_logs(str(tmp_path / "logs"))
    assert os.environ["GLOG_v"] == "1" and "LOG_MF_PATH" not in os.environ  # mindformers uses $LOCAL_DEFAULT_PATH/log


def test_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0))
    assert runtime.default_threads() == cores and runtime.default_threads(workers=cores * 2) == 1


# ---------------------------------------------------------------------------------------------- quiet, cwd untouched
def assert_quiet(*streams):
    for stream in streams:  # mindformers logs to stdout, MindSpore to stderr
        assert " INFO " not in stream and "[INFO]" not in stream, stream[-3000:]


def test_chat_cli_keeps_cwd_and_stderr_clean(model_dir, tmp_path):
    # a terminal as the user has it (pseudo-terminals, as in test_chat_cli.py), stderr on its own one to check it;
    # input() writes its "User: " prompt to stderr when stdin and stdout are terminals
    import pty  # pylint: disable=import-outside-toplevel
    import select  # pylint: disable=import-outside-toplevel
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (out_master, out_slave), (err_master, err_slave) = pty.openpty(), pty.openpty()
    proc = subprocess.Popen(run_module("example/chat.py", "--model_dir", model_dir, "--greedy", "--max_new_tokens",
                                       "3", "--mode", "pynative", "--threads", "1"),
                            stdin=out_slave, stdout=out_slave, stderr=err_slave, cwd=cwd, env=clean_env(tmp_path))
    os.close(out_slave)
    os.close(err_slave)
    shown = {out_master: "", err_master: ""}

    def read_until(marker, count, timeout=180):
        deadline = time.time() + timeout
        while "".join(shown.values()).count(marker) < count:
            assert time.time() < deadline and proc.poll() is None, shown
            for fd in select.select(list(shown), [], [], 0.2)[0]:
                shown[fd] += os.read(fd, 65536).decode("utf-8", errors="replace")

    try:
        read_until("User: ", 1)
        os.write(out_master, "你好\n".encode("utf-8"))
        read_until("User: ", 2)
        os.write(out_master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
        for fd in list(shown):  # what the process wrote before it exited
            while select.select([fd], [], [], 0.2)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # the terminal closed with the process
                    break
                if not data:
                    break
                shown[fd] += data.decode("utf-8", errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(out_master)
        os.close(err_master)
    stdout, stderr = shown.values()
    assert "Assistant: " in stdout and "bye" in stdout, shown
    lines = [line for line in stderr.replace("\r", "").splitlines() if line.strip() and line.strip() != "User:"]
    assert len(lines) == 1 and lines[0].startswith("[runtime] device CPU"), stderr[-3000:]
    assert_quiet(stdout, stderr)
    assert os.listdir(cwd) == [], "the chat CLI wrote into the current directory"


def test_preprocess_then_finetune_keep_cwd_and_console_clean(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = clean_env(tmp_path)
    env.pop("RANK_SIZE", None)
    env.pop("MS_WORKER_NUM", None)  # one process started by hand: no msrun
    rows = tmp_path / "rows.mindrecord"
    proc = subprocess.run(run_module("example/dataset/belle_preprocess.py", "--input_glob",
                                     os.path.join(REPO, "dataset", "belle_sample.json"),
                                     "--model_file", os.path.join(REPO, "dataset", "tokenizer.model"),
                                     "--output_file", rows, "--seq_length", 32, "--quiet"),
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_quiet(proc.stdout, proc.stderr)
    assert os.listdir(cwd) == [], "belle_preprocess.py wrote into the current directory"

    proc = subprocess.run(run_module("example/finetune.py", "--train_dataset", rows, "--seq_length", 32,
                                     "--output_dir", tmp_path / "out", "--max_steps", 2, "--set", "train.batch_size=1",
                                     "--device", "cpu", "--threads", "1"),
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_quiet(proc.stdout, proc.stderr)
    assert os.listdir(cwd) == [], "finetune.py wrote into the current directory"
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert steps[0].startswith("step 1/2 loss") and steps[0].endswith("| 50% epoch 1/1 ETA --"), proc.stdout
    assert steps[1].endswith("| 100% epoch 1/1 ETA 0:00:00"), proc.stdout
