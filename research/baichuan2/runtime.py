"""Where a process runs: device choice, MindSpore context, threads, logs, and loading a model directory.

Every entry point starts here:

    parser = argparse.ArgumentParser(...)
    runtime.add_device_argument(parser)                    # --device auto|CPU|Ascend, --threads N
    args = parser.parse_args()
    rt = runtime.setup_inference(args.device, mode="graph", threads=args.threads)    # prints one line
    model, tokenizer, generation = runtime.load_model_dir(args.model_dir)

Training uses `setup_training(device)` instead (GRAPH mode, msrun data parallel).

Nothing here imports MindSpore or mindformers at module level, and the setup functions set the environment before
importing them: MindSpore reads GLOG_v and OMP_NUM_THREADS when it loads, and mindformers logs INFO lines (and
creates its log folder) while it is being imported.
"""
import glob
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import NamedTuple

DEVICES = ("auto", "CPU", "Ascend")
_DEVICE_NAMES = {"auto": "auto", "cpu": "CPU", "ascend": "Ascend"}


class DeviceError(RuntimeError):
    """The asked device cannot be used here (the message says why and what to do)."""


# ---------------------------------------------------------------------------------------------- command line
def add_device_argument(parser):
    """--device and --threads, the same for every entry point."""
    parser.add_argument("--device", type=lambda s: _DEVICE_NAMES.get(s.lower(), s), choices=DEVICES, default="auto",
                        help="auto (default): Ascend when MindSpore can use an Ascend NPU here, else CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="host CPU threads for MindSpore's kernels (default: $OMP_NUM_THREADS, else the cores "
                             "this process may use)")
    return parser


def cpu_model():
    """The CPU as every benchmark prints it: model, CPU count and the vector extensions the kernels can use."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    extras = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile") if f in flags]
    family = f", family {fields['CPU family'].strip()} model {fields.get('Model', '?').strip()}" if "CPU family" in fields else ""
    return (f"{fields.get('Model name', '?').strip()}{family}, {fields.get('CPU(s)', '?').strip()} CPUs, "
            f"{' '.join(extras) or 'no AVX2'}")


# ---------------------------------------------------------------------------------------------- logs
def default_log_dir():
    """Per-user folder under the system temp directory, kept out of the current directory."""
    user = os.environ.get("USER") or str(os.getuid())
    return os.path.join(tempfile.gettempdir(), f"baichuan2-{user}", "logs")


class _WarningsAndUp(logging.Filter):
    """Warnings and errors, except one that is false here: mindformers' hub logs "It will download files from
    openMind Hub" at WARNING before every file lookup, local directories included (we load only local ones)."""

    def filter(self, record):
        if record.levelno < logging.WARNING:
            return False
        return not str(record.msg).startswith("It will download files from openMind Hub")


def setup_logs(log_dir=None):
    """Console: MindSpore's and mindformers' warnings and errors, no INFO. Files: mindformers' log files and
    MindSpore's compile-failure dumps (rank_0/om/analyze_fail.ir) go under `log_dir` (default `default_log_dir()`),
    never into the current directory. Settings already in the environment win (GLOG_v=1 brings INFO back)."""
    log_dir = os.path.abspath(log_dir or default_log_dir())
    os.environ.setdefault("GLOG_v", "2")  # MindSpore, C++ and Python: 0 debug, 1 info, 2 warning, 3 error
    # mindformers' log folder: LOG_MF_PATH, else $LOCAL_DEFAULT_PATH/log, else ./output/log
    if "LOCAL_DEFAULT_PATH" not in os.environ:
        os.environ.setdefault("LOG_MF_PATH", os.path.join(log_dir, "mindformers"))
    os.environ.setdefault("MS_OM_PATH", os.path.join(log_dir, "mindspore"))  # where MindSpore writes rank_0/om/
    if os.environ["GLOG_v"].strip() in ("0", "1"):
        return log_dir
    # mindformers' get_logger() names its logger "mindformers" + log path and sets it to INFO on first use (often
    # during `import mindformers`). Creating that logger first with a filter keeps its INFO lines off the console.
    mf_log_path = os.environ.get("LOG_MF_PATH") or os.path.join(os.environ["LOCAL_DEFAULT_PATH"], "log")
    mf_logger = logging.getLogger("mindformers" + os.path.expanduser(mf_log_path))
    if not any(isinstance(f, _WarningsAndUp) for f in mf_logger.filters):
        mf_logger.addFilter(_WarningsAndUp())
    return log_dir


# ---------------------------------------------------------------------------------------------- device
def ascend_unavailable_reason():
    """None when MindSpore can run on an Ascend NPU here, else a short phrase saying why not.

    Two conditions: MindSpore's Ascend plugin loaded when MindSpore was imported (it needs the CANN libraries, e.g.
    libge_runner.so, on the library path), and the host exposes an NPU (/dev/davinciN, made by the Ascend driver).
    Only the negative answer is exercised on the CPU machines this project is tested on (tests/test_runtime.py);
    the positive one is first checked on an Ascend server by `python example/inference.py --device auto ...`
    printing "device Ascend".
    """
    try:  # the flag MindSpore records while loading its plugins; the public is_available() logs a warning instead
        from mindspore._c_expression import MSContext  # pylint: disable=import-outside-toplevel
        context = MSContext.get_instance()
        loaded, error = context.is_pkg_support_device("Ascend"), context.load_plugin_error()
    except (ImportError, AttributeError):
        import mindspore as ms  # pylint: disable=import-outside-toplevel
        loaded, error = ms.device_context.ascend.is_available(), ""
    if not loaded:
        detail = next((line.split("failed. ", 1)[-1] for line in error.splitlines() if "ascend" in line.lower()), "")
        detail = detail.strip().rstrip(".") + "; " if detail else ""
        return f"its Ascend plugin did not load ({detail}install the CANN toolkit and source its set_env.sh)"
    if not glob.glob("/dev/davinci[0-9]*"):
        return "this host shows no NPU (no /dev/davinci* device)"
    return None


def resolve_device(choice="auto"):
    """"CPU" or "Ascend" for a --device value; DeviceError when Ascend is asked for and cannot be used."""
    if choice not in DEVICES:
        raise DeviceError(f"--device {choice!r}: choose one of {', '.join(DEVICES)}")
    if choice == "CPU":
        return "CPU"
    reason = ascend_unavailable_reason()
    if reason is None:
        return "Ascend"
    if choice == "Ascend":
        raise DeviceError(f"--device Ascend: MindSpore cannot use an Ascend NPU here: {reason}. "
                          "Run with --device CPU or auto")
    return "CPU"


def inference_dtype(device, saved=None):
    """Compute dtype for inference: float32 on CPU (no bfloat16 MatMul kernel there); on Ascend the model
    directory's own half dtype, else bfloat16 (the fused attention kernel takes only float16/bfloat16)."""
    if device == "Ascend":
        return saved if saved in ("float16", "bfloat16") else "bfloat16"
    return "float32"


def default_threads(workers=1):
    """OMP_NUM_THREADS when the environment sets it, else this process's share of the cores it may use."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


# ---------------------------------------------------------------------------------------------- set-up
@dataclass(frozen=True)
class Runtime:
    device: str         # "CPU" | "Ascend"
    mode: str           # "graph" | "pynative"
    threads: int
    compute_dtype: str  # inference default on this device
    asked: str          # the --device value

    def describe(self):
        how = "auto" if self.asked == "auto" else "asked"
        return (f"device {self.device} ({how}), mode {self.mode.upper()}, {self.threads} threads, "
                f"compute {self.compute_dtype}")


def setup_inference(device="auto", mode="graph", threads=None, log_dir=None, prog=None):
    """Logs, device, context mode and threads for a process that serves a model; prints one line saying so.

    For entry points: when the device cannot be used it prints `<prog>: error: ...` and exits with status 2,
    before anything is loaded."""
    return _setup(device, mode, threads or default_threads(), log_dir, prog)


def setup_training(device="auto", threads=None, log_dir=None, prog=None):
    """GRAPH mode on the chosen device; data parallel when launched by msrun (RANK_SIZE / MS_WORKER_NUM set).
    Returns (rank, world_size, device). Exits 2 like setup_inference when the device cannot be used.

    Threads default to this host's cores shared by the workers (msrun's usual one-host launch)."""
    workers = int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1)
    rt = _setup(device, "graph", threads or default_threads(workers), log_dir, prog)
    if not (os.environ.get("RANK_SIZE") or os.environ.get("MS_WORKER_NUM")):
        return 0, 1, rt.device  # plain process: init() raises without msrun
    # pylint: disable=import-outside-toplevel
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size(), rt.device


def _setup(choice, mode, threads, log_dir, prog):
    if mode not in ("graph", "pynative"):
        raise ValueError(f"mode must be 'graph' or 'pynative', got {mode!r}")
    setup_logs(log_dir)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read when MindSpore's OpenMP kernels load
    try:
        device = resolve_device(choice)
    except DeviceError as exc:
        print(f"{prog or os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    ms.set_device(device)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    _set_kernel_threads(ms, threads)
    rt = Runtime(device=device, mode=mode, threads=threads, compute_dtype=inference_dtype(device), asked=choice)
    print(f"[runtime] {rt.describe()}", file=sys.stderr, flush=True)
    return rt


def _set_kernel_threads(ms, threads):
    """MindSpore's own CPU kernel thread pool (OMP_NUM_THREADS covers the OpenMP kernels); it can be set once
    per process, so a second set-up in the same process keeps the first value."""
    try:
        ms.device_context.cpu.op_tuning.threads_num(threads)
    except RuntimeError:  # "can not be set repeatedly"
        pass


# ---------------------------------------------------------------------------------------------- model directory
class LoadedModel(NamedTuple):
    model: object       # BaichuanForCausalLM in eval mode, computing in the device's inference dtype
    tokenizer: object
    generation: dict    # generation_config.json of the directory (the variant's defaults)


def load_model_dir_or_exit(model_dir, prog):
    """load_model_dir for a command-line tool: a directory that cannot be loaded is one line on stderr, exit 2."""
    try:
        return load_model_dir(model_dir)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"{prog}: error: cannot load {model_dir}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def load_model_dir(model_dir, compute_dtype=None):
    """Model, tokenizer and generation defaults of a model directory, ready for inference on the current device
    (set by setup_inference; compute dtype from `inference_dtype` unless given). Raises FileNotFoundError /
    OSError / ValueError with the directory named when it is not a usable model directory."""
    # pylint: disable=import-outside-toplevel
    import mindspore as ms
    from .configuration_baichuan import BaichuanConfig
    from .model_dir import generation_config, load_tokenizer
    from .modeling_baichuan import BaichuanForCausalLM
    from .weights_check import check_config

    model_dir = str(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json); "
                                "make one with research/baichuan2/convert_weight.py")
    check_config(model_dir)  # a damaged config.json: one line naming it (from_pretrained checks the weights files)
    config = BaichuanConfig.from_hf_config(model_dir)
    dtype = compute_dtype or inference_dtype(ms.get_context("device_target"), config.compute_dtype)
    model = BaichuanForCausalLM.from_pretrained(model_dir, config=config, compute_dtype=dtype)
    tokenizer = load_tokenizer(model_dir)
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            generation = json.load(f)
    else:
        generation = generation_config(config)
    return LoadedModel(model, tokenizer, generation)
