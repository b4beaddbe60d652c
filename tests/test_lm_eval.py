"""lm-eval (the `lm-eval` package, installed in .venv-ref) scores a multiple-choice task through our server and gets
example/evaluate.py's accuracy, item for item.

Our OpenAI-compatible server (baichuan2.server, uvicorn in a thread) serves a tiny random model directory; lm-eval's
`local-completions` model runs in .venv-ref as a client against its /v1/completions (legacy `logprobs` + `echo`:
the log-likelihood of each answer letter after the prompt). The task is the C-Eval fixtures' val split, 2-shot, as
tools/lm_eval/ceval_tasks.py writes it (a task YAML per subject over local JSON Lines files, no hub). The same items go
through baichuan2.evaluation's own scorer (a full forward pass, no cache). Asserted: lm-eval's prompts are ours, each
choice's log-likelihood equals our scorer's, and so each item's choice and each subject's accuracy are the same.
"""
import glob
import json
import os
import subprocess

import mindspore as ms
import numpy as np
import pytest

from baichuan2.evaluation import ModelScorer, evaluate, load_task
from baichuan2.evaluation.datasets import LETTERS
from baichuan2.evaluation.prompts import fit_prompt

from helpers import FIXTURES, REPO, call_script, running

REF_PYTHON = os.path.join(REPO, ".venv-ref", "bin", "python")
CEVAL = os.path.join(FIXTURES, "eval", "ceval")
SHOTS = 2
MODEL = "tiny-lm-eval"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model (seeded) with the bundled tokenizer and room for the 2-shot prompts (~380 tokens)."""
    from baichuan2 import BaichuanConfig, BaichuanForCausalLM
    from baichuan2.model_dir import write_servable_dir
    ms.set_seed(7)
    config = BaichuanConfig.from_preset("tiny", max_position_embeddings=512, model_max_length=512)
    return write_servable_dir(str(tmp_path_factory.mktemp("lm_eval") / "model"), config,
                              model=BaichuanForCausalLM(config), tokenizer_dir=os.path.join(REPO, "dataset"))


def run_lm_eval(url, model_dir, tasks_dir, out_dir, cwd):
    """lm-eval in .venv-ref against our server; returns (results dict, {task: [samples]})."""
    assert os.path.isfile(REF_PYTHON), (
        f"{REF_PYTHON} is missing: scripts/setup_env.sh makes it (make setup), with tools/parity/requirements.txt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false", HF_HOME=os.path.join(cwd, "hf_home"))
    model_args = (f"base_url={url}/v1/completions,model={MODEL},tokenizer={model_dir},trust_remote_code=True,"
                  "tokenized_requests=False,max_retries=1")
    proc = subprocess.run([REF_PYTHON, "-m", "lm_eval", "run", "--model", "local-completions",
                           "--model_args", model_args, "--include_path", tasks_dir, "--tasks", "baichuan2_ceval",
                           "--output_path", out_dir, "--log_samples"],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [results] = glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True)
    with open(results, encoding="utf-8") as f:
        results = json.load(f)
    samples = {}
    for path in glob.glob(os.path.join(out_dir, "**", "samples_*.jsonl"), recursive=True):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        samples[os.path.basename(path)[len("samples_"):].rsplit("_", 1)[0]] = rows
    return results["results"], samples


@pytest.mark.slow
def test_lm_eval_through_our_server_scores_as_evaluate_py(model_dir, tmp_path):
    tasks_dir = str(tmp_path / "tasks")
    code, out, err = call_script(os.path.join(REPO, "tools", "lm_eval", "ceval_tasks.py"), [
        "--task", "ceval", "--data_dir", CEVAL, "--out", tasks_dir, "--shots", str(SHOTS)])
    assert code == 0 and "--tasks baichuan2_ceval" in out, err

    # ours: example/evaluate.py's loop and scorer; per-item predictions from its per-subject cache files
    scorer = ModelScorer.from_model_dir(model_dir)
    report = evaluate("ceval", CEVAL, scorer, split="val", shots=SHOTS, output=str(tmp_path / "ours.json"),
                      batch_size=4, progress=False)
    ours = {}
    for subject in load_task("ceval", CEVAL, "val", None, SHOTS):
        with open(tmp_path / "ours.json.cache" / f"ceval_{subject.name}.json", encoding="utf-8") as f:
            records = json.load(f)["records"]
        prompts = [fit_prompt(subject, item, scorer.fits)[0] for item in subject.items]
        ours[subject.name] = {"records": records, "prompts": prompts,
                              "log_probs": np.asarray(scorer.score(prompts, LETTERS[:4], "zh"))}

    from baichuan2.server import create_app
    app = create_app(model_dir, model_name=MODEL, kv_cache_dtype="float32")  # float32 rows: as the scorer computes
    with running(app) as url:
        results, samples = run_lm_eval(url, model_dir, tasks_dir, str(tmp_path / "lm_eval_out"), str(tmp_path))

    assert sorted(samples) == sorted(f"baichuan2_ceval_{name}" for name in ours)
    for name, mine in ours.items():
        rows = sorted(samples[f"baichuan2_ceval_{name}"], key=lambda row: row["doc_id"])
        assert len(rows) == len(mine["records"])
        for row, record, prompt, log_probs in zip(rows, mine["records"], mine["prompts"], mine["log_probs"]):
            requests = list(row["arguments"].values())  # {"gen_args_0": {"arg_0": context, "arg_1": choice}, ...}
            assert [r["arg_0"] for r in requests] == [prompt] * 4
            assert [r["arg_1"] for r in requests] == list(LETTERS[:4])  # each letter straight after "答案："
            theirs = [float(resp[0]) for resp in row["filtered_resps"]]  # (log-likelihood, is_greedy), as text
            np.testing.assert_allclose(theirs, log_probs, atol=1e-4)
            assert LETTERS[int(np.argmax(theirs))] == record["pred"]
            assert row["acc"] == float(record["pred"] == record["answer"])
        assert results[f"baichuan2_ceval_{name}"]["acc,none"] == pytest.approx(report["subjects"][name]["accuracy"])
    assert results["baichuan2_ceval"]["acc,none"] == pytest.approx(report["overall"]["micro"])
