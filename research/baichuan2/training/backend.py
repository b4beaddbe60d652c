"""Device, execution mode and data-parallel set-up for a training process."""
import os
import shutil


def setup_backend():
    """GRAPH mode on CPU or Ascend; data parallel when launched by msrun. Returns (rank, world_size, device)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    device = "Ascend" if (os.path.isdir("/usr/local/Ascend") or shutil.which("npu-smi")) else "CPU"
    ms.set_device(device)
    ms.set_context(mode=ms.GRAPH_MODE)
    if not (os.environ.get("RANK_SIZE") or os.environ.get("MS_WORKER_NUM")):
        return 0, 1, device  # plain process: init() would raise without msrun
    from mindspore.communication import init, get_rank, get_group_size  # pylint: disable=import-outside-toplevel
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size(), device
