"""What several test modules share: paths, the project's scripts run as a user runs them, input-row writers and
weight comparisons. Plain functions; the fixtures built on them are in conftest.py. Test modules import from here
(`from helpers import ...`: pytest puts tests/ on sys.path), never from each other."""
import contextlib
import io
import json
import os
import pty
import random
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
PARITY = os.path.join(FIXTURES, "parity")
OPPO = os.path.join(FIXTURES, "oppo_experiemental_7b")
# the project's own environment when it exists (what `make` uses), else the interpreter running the tests
PYTHON = os.path.join(REPO, ".venv", "bin", "python") if os.path.isfile(
    os.path.join(REPO, ".venv", "bin", "python")) else sys.executable
MSRUN = os.path.join(REPO, "msrun.sh")


# ---------------------------------------------------------------------------------------------- model directories
def oppo_checkpoint(directory, model_type="exp"):
    """OPPO's config.json next to the tiny Baichuan2-7B weights (same shape, same architecture)."""
    shutil.copytree(os.path.join(PARITY, "baichuan2_7b"), directory)
    with open(os.path.join(OPPO, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["model_type"] = model_type
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    os.remove(os.path.join(directory, "reference.safetensors"))
    return directory


# ---------------------------------------------------------------------------------------------- running scripts
def run_module(path, *args):
    """argv for running one of the project's scripts with the test interpreter."""
    return [sys.executable, os.path.join(REPO, path), *map(str, args)]


def call_script(path, argv):
    """Runs a script as its command line does (`python path argv...`: the file run as __main__ with that sys.argv),
    in this process, without a new interpreter's start-up; returns (exit code, stdout, stderr). Nothing is taken
    from the script: tests import only the package."""
    import mindspore as ms
    out, err = io.StringIO(), io.StringIO()
    code, saved_argv = 0, sys.argv
    sys.argv = [str(path), *map(str, argv)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        finally:
            sys.argv = saved_argv
            ms.set_context(mode=ms.PYNATIVE_MODE)
    return code, out.getvalue(), err.getvalue()


def plain_process_env():
    """The environment of a single process started by hand: no msrun variables, so finetune.py calls no init()."""
    env = dict(os.environ)
    env.pop("RANK_SIZE", None)
    env.pop("MS_WORKER_NUM", None)
    return env


def free_port():
    """A free TCP port on loopback (for msrun's scheduler), picked at random so parallel runs rarely collide."""
    for _ in range(50):
        port = random.randint(20000, 60000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def msrun(args, cwd, log_dir, **extra_env):
    """msrun.sh in its own process group, output to <log_dir>.out; args as msrun.sh takes them."""
    env = dict(os.environ, BAICHUAN_FINETUNE_DEBUG="1", **extra_env)
    return subprocess.Popen(["bash", MSRUN, *map(str, args[:1]), *map(str, args[1:])], cwd=cwd, env=env,
                            stdout=open(os.path.join(str(log_dir) + ".out"), "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait(proc, timeout):
    """proc's exit status; past the timeout its whole process group is killed and TimeoutExpired raised."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own launcher's process group
        proc.wait()
        raise


# ---------------------------------------------------------------------------------------------- rows
def write_rows(path, rows, seq, columns=("input_ids", "labels")):
    """A learnable MindRecord: each row an arithmetic token sequence; tokens 0-1 encode the row index."""
    from mindspore.mindrecord import FileWriter
    rng = np.random.default_rng(0)
    writer = FileWriter(path, shard_num=1, overwrite=True)
    writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in columns}, "rows")
    data = []
    for i in range(rows):
        ids = ((rng.integers(0, 990) + np.arange(seq + 1) * (i % 5 + 1)) % 990 + 10).astype(np.int32)
        ids[0], ids[1] = 5 + i // 990, 10 + i % 990
        labels = ids.copy()
        labels[:2] = -100
        data.append(dict(zip(columns, (ids, labels))))
    writer.write_raw_data(data)
    writer.commit()
    return path


def read_rows(path, num_shards=None, shard_id=None):
    """(input_ids, labels) lists of every row of a MindRecord, in file order."""
    import mindspore.dataset as ds
    data = ds.MindDataset(str(path), columns_list=["input_ids", "labels"], shuffle=False,
                          num_shards=num_shards, shard_id=shard_id)
    return [(r["input_ids"].tolist(), r["labels"].tolist()) for r in data.create_dict_iterator(output_numpy=True)]


def conv(*texts, roles=("human", "gpt")):
    """A BELLE conversation alternating the two roles."""
    return [{"from": roles[i % 2], "value": t} for i, t in enumerate(texts)]


def record(i, *texts):
    return {"id": i, "conversations": conv(*texts)}


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------- training results
def load_weights(path):
    from safetensors.numpy import load_file
    return load_file(path)


def assert_same_weights(a, b, atol=1e-6):
    a, b = load_weights(a), load_weights(b)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=atol, err_msg=name)


def losses(output_dir):
    """The loss of every logged step of a finetune run, in step order."""
    with open(os.path.join(output_dir, "train_log.jsonl")) as f:
        by_step = {r["step"]: r["loss"] for r in map(json.loads, f)}
    return [by_step[s] for s in sorted(by_step)]


class Terminal:
    """A child process on a pseudo-terminal: write lines, read until a marker shows up."""

    def __init__(self, argv, cwd):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, close_fds=True)
        os.close(slave)
        self.buffer = ""

    def read_until(self, marker, timeout=240):
        deadline = time.time() + timeout
        while marker not in self.buffer:
            if time.time() > deadline or (self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]):
                raise AssertionError(f"no {marker!r} in the chat output:\n{self.buffer[-3000:]}")
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.buffer += os.read(self.master, 65536).decode("utf-8", errors="replace")
                except OSError:  # child closed the terminal
                    break
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def send(self, line):
        os.write(self.master, (line + "\n").encode("utf-8"))


def chat_script_replies(args, cwd, prompts):
    """example/chat.py with `args` on a pseudo-terminal: each prompt sent in turn, the assistant's replies
    (stripped); the script must then leave with status 0 on /exit."""
    term = Terminal([sys.executable, os.path.join(REPO, "example", "chat.py"), *args], cwd=str(cwd))
    try:
        term.read_until("User: ")
        replies = []
        for prompt in prompts:
            term.send(prompt)
            replies.append(term.read_until("User: ").split("Assistant: ", 1)[1].strip())
        term.send("/exit")
        assert term.proc.wait(timeout=60) == 0
        return replies
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.master)


@contextlib.contextmanager
def running(app, **config):
    """uvicorn serving `app` in a thread on a free loopback port (config: more uvicorn.Config arguments); yields its
    base URL."""
    import uvicorn  # pylint: disable=import-outside-toplevel
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
