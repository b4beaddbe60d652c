"""Entry points and imports leave the current directory empty and print no INFO line (mindformers would otherwise
create ./output/log there and log INFO on import). Each runs as a user runs it, in a fresh empty directory."""
import os
import re
import subprocess
import sys
import time
import urllib.request

import mindspore as ms
import numpy as np
import pytest

from baichuan2.lora import adapter_params, apply_lora, save_adapter
from baichuan2.modeling_baichuan import BaichuanForCausalLM
from helpers import FIXTURES, PARITY, REPO, free_port

INFO = re.compile(r"\bINFO\b")


def clean_env():
    """The environment a user has: none of the log settings setup_logs makes (the test process made them)."""
    return {k: v for k, v in os.environ.items() if k not in ("GLOG_v", "LOG_MF_PATH", "LOCAL_DEFAULT_PATH",
                                                             "MS_OM_PATH")}


def run_clean(tmp_path, argv, stdin=None):
    """Runs argv in a new empty directory; asserts it exits 0, leaves the directory empty and prints no INFO.
    Returns the output."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=clean_env(), timeout=600, check=False,
                          input=stdin)
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert [line for line in output.splitlines() if INFO.search(line)] == [], output[-2000:]
    assert os.listdir(cwd) == [], os.listdir(cwd)
    cwd.rmdir()
    return output


@pytest.mark.slow
def test_imports_write_nothing_and_log_no_info(tmp_path):
    run_clean(tmp_path, [sys.executable, "-c", "import baichuan2.server, baichuan2.model_dir, baichuan2.evaluation; "
                                               "import baichuan2.modeling_baichuan"])


@pytest.mark.slow
def test_convert_and_llama_export_write_only_their_output(tmp_path):
    script = os.path.join(REPO, "research", "baichuan2", "convert_weight.py")
    run_clean(tmp_path, [sys.executable, script, "--input_path", os.path.join(PARITY, "baichuan_7b"),
                         "--output_path", str(tmp_path / "ms")])
    run_clean(tmp_path, [sys.executable, script, "--reverse", "--to", "llama", "--input_path", str(tmp_path / "ms"),
                         "--output_path", str(tmp_path / "llama")])
    assert (tmp_path / "llama" / "README.md").is_file() and (tmp_path / "ms" / "README.md").is_file()


@pytest.mark.slow
def test_merge_lora_and_lora_export_write_only_their_output(tmp_path, parity_model_dir, pynative):
    base = parity_model_dir("baichuan_7b")
    model = apply_lora(BaichuanForCausalLM.from_pretrained(base, backend="composed"), 2, 4.0, 0.0, ["W_pack"])
    for p in adapter_params(model):
        p.set_data(ms.Tensor(np.full(p.shape, 0.01, np.float32)))
    save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=base)
    run_clean(tmp_path, [sys.executable, os.path.join(REPO, "research", "baichuan2", "merge_lora.py"), "--base", base,
                         "--adapter", str(tmp_path / "adapter"), "--output_path", str(tmp_path / "merged")])
    run_clean(tmp_path, [sys.executable, "-m", "baichuan2.lora", "export", "--to", "llama", "--adapter",
                         str(tmp_path / "adapter"), "--output_path", str(tmp_path / "adapter_llama")])
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "adapter_llama" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_preprocess_and_finetune_write_only_their_outputs(tmp_path):
    """Also: a GRAPH-mode finetune step compiles without MindSpore's "side effect nodes were eliminated by mistake"
    warning (the model no longer unpacks the unused cache outputs)."""
    data = str(tmp_path / "rows.mindrecord")
    run_clean(tmp_path, [sys.executable, os.path.join(REPO, "example", "dataset", "belle_preprocess.py"),
                         "--input_glob", os.path.join(REPO, "dataset", "belle_sample.json"), "--model_file",
                         os.path.join(REPO, "dataset", "tokenizer.model"), "--output_file", data, "--seq_length", "32",
                         "--quiet"])
    output = run_clean(tmp_path, [sys.executable, os.path.join(REPO, "example", "finetune.py"), "--train_dataset",
                                  data, "--seq_length", "32", "--max_steps", "1", "--output_dir",
                                  str(tmp_path / "run")])
    assert "eliminated by mistake" not in output, output[-2000:]
    assert (tmp_path / "run" / "model" / "README.md").is_file()


@pytest.mark.slow
def test_chat_eval_and_serve_write_nothing_in_the_cwd(tmp_path, parity_model_dir):
    model_dir = parity_model_dir("baichuan2_7b", "chat")
    run_clean(tmp_path, [sys.executable, os.path.join(REPO, "example", "chat.py"), "--model_dir", model_dir,
                         "--mode", "pynative"], stdin="/exit\n")
    run_clean(tmp_path, [sys.executable, os.path.join(REPO, "example", "evaluate.py"), "--model_dir", model_dir,
                         "--task", "ceval", "--data_dir", os.path.join(FIXTURES, "eval", "ceval"), "--shots", "1",
                         "--limit", "1", "--subjects", "computer_network", "--output", str(tmp_path / "ceval.json")])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "example", "serve.py"), "--model_dir", model_dir,
                             "--port", str(port), "--mode", "pynative"], cwd=cwd, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, healthy = time.time() + 300, False
        while not healthy and time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    healthy = response.status == 200
            except OSError:
                time.sleep(0.5)
        assert healthy, "the server did not answer /health"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    assert f"http://127.0.0.1:{port}/" in output
    assert [line for line in output.splitlines() if INFO.search(line)] == [], output[-2000:]
    assert os.listdir(cwd) == []
