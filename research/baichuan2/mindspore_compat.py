"""MindSpore adaptation: re-running a compiled GRAPH-mode cell without MindSpore's per-call bookkeeping.

Why: every call of a Cell in GRAPH mode goes through Cell.compile, which re-derives the graph's key from the
arguments and re-sets the compile phase on every sub-cell (~100 recursive calls for a Baichuan model): ~1 ms a call
on these CPUs, where a decode step of the 58M shape S takes ~6.5 ms in all (measured side by side: 7.3 against
6.3 ms a step). `CompiledCall` runs the graph compiled by the cell's last call directly (MindSpore's own run path,
_CellGraphExecutor._exec_pip) when the arguments have that call's signature (shapes, dtypes, tuple structure,
Python values); any other signature, PyNative mode, or any error from these private functions goes through the
normal call, which compiles or re-selects the graph. Private API of mindspore 2.7 and 2.10 (where the executor
moved to mindspore.graph.api): `tests/test_generation.py` checks that the fast path is taken and gives the normal
call's logits.
"""
import logging
import sys

import mindspore as ms
from mindspore import Tensor


def _import_moved_modules_quietly():
    """MindSpore 2.9+ logs a deprecation warning on the first import of a module it moved (mindspore.common.api ->
    mindspore.graph.api), which mindformers 1.6 imports: one WARNING line on every program's console. Imported once
    here, before mindformers, with MindSpore's logger at ERROR; the module works as before."""
    if "mindspore.graph.api" not in sys.modules or "mindspore.common.api" in sys.modules:
        return  # mindspore 2.7 has no mindspore.graph (nothing moved), or it is imported already
    from mindspore.log import _get_logger  # pylint: disable=import-outside-toplevel
    logger = _get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import mindspore.common.api  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    finally:
        logger.setLevel(level)


_import_moved_modules_quietly()

try:  # mindspore 2.7 (2.10 has no nn.cell._get_args_for_run, and warns on importing mindspore.common.api)
    from mindspore.nn.cell import _get_args_for_run
    from mindspore.common.api import _cell_graph_executor
except ImportError:
    try:  # mindspore 2.10: the executor moved to mindspore.graph.api, argument packing into the executor itself
        from mindspore.graph.api import _cell_graph_executor

        def _get_args_for_run(cell, args, kwargs, mutable_flags, _predict):
            """What Cell.compile_and_run (2.10) hands the executor: the same call, outside the cell."""
            return _cell_graph_executor._graph_executor.get_args_for_run(  # pylint: disable=protected-access
                cell, args, kwargs, list(mutable_flags or []), list(getattr(cell, "sequence_modified", None) or []),
                False, False)
    except ImportError:  # another MindSpore: always the normal call
        _cell_graph_executor = _get_args_for_run = None


def signature(value):
    """What selects a compiled graph: shape and dtype of tensors, structure of tuples, other values as they are."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(signature(v) for v in value)
    return ("value", type(value).__name__, value)


class CompiledCall:
    """cell(*args), skipping MindSpore's per-call compile bookkeeping when the last call compiled this signature."""

    def __init__(self, cell):
        self.cell = cell
        self.last = None  # (signature, real phase) of the last normal GRAPH-mode call
        self.fast_calls = 0
        self.usable = _cell_graph_executor is not None

    def __call__(self, *args):
        graph = ms.get_context("mode") == ms.GRAPH_MODE
        key = signature(args) if graph and self.usable else None
        if key is not None and self.last is not None and self.last[0] == key:
            try:
                cell = self.cell
                run_args = _get_args_for_run(cell, args, {}, cell._has_mutable_args_list, False)
                out = _cell_graph_executor._exec_pip(cell, *run_args, phase=self.last[1])
                self.fast_calls += 1
                return out
            except Exception:  # pylint: disable=broad-except  # private API changed: use the normal call for good
                self.usable = False
        out = self.cell(*args)
        phase = getattr(self.cell, "current_phase", None) if key is not None else None
        self.last = (key, phase) if phase is not None else None
        return out
