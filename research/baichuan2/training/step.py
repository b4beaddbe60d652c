"""The train-step cell: gradient accumulation, loss scaling, clipping and a grad-norm output, on any backend."""
import mindspore as ms
from mindspore import nn, ops


class TrainStep(nn.TrainOneStepWithLossScaleCell):
    """One optimizer step over `accum` micro-batches: summed scaled gradients -> mean across ranks (the
    parent's grad_reducer) -> unscale -> global-norm clip -> optimizer, skipped when the norm is not finite.

    The overflow check is the gradient norm itself: it works on every backend (the parent's check needs
    NPU float-status kernels on this MindSpore build) and all ranks agree because the grads are reduced.
    Returns (mean loss across ranks, grad norm before clipping, overflow, loss scale).
    seq_ends: the actual_seq_len column of packed rows (plan.PACKED_COLUMN), handed to the model; None otherwise.

    Under MindSpore's semi-auto parallel (Ascend only, training/parallel.py; not run here) `framework_reduces`
    is true: the framework inserts the gradient reduction and the loss is already the global batch's, so neither
    the parent's reducer (nn.Identity in that mode) nor the loss all-reduce below adds another; `grad_reducer`
    replaces the parent's (the pipeline's PipelineGradReducer) and `summed_micro_batches` is how many micro-batch
    losses the network returns summed (the pipeline wrapper sums them), divided out of the loss and the sens.
    """

    def __init__(self, network, optimizer, scale_sense, accum, micro_batch, grad_clip, world_size,
                 framework_reduces=False, grad_reducer=None, summed_micro_batches=1):
        super().__init__(network, optimizer, scale_sense)
        self.accum = accum
        self.micro_batch = micro_batch
        self.grad_clip = grad_clip
        self.world_size = world_size
        self.framework_reduces = framework_reduces
        self.loss_parts = accum * summed_micro_batches
        if grad_reducer is not None:
            self.grad_reducer = grad_reducer

    def construct(self, input_ids, labels, seq_ends=None):
        weights = self.weights
        scale = self.scale_sense
        loss, grads = None, None
        for i in range(self.accum):  # unrolled at compile time
            ids = input_ids[i * self.micro_batch:(i + 1) * self.micro_batch]
            lab = labels[i * self.micro_batch:(i + 1) * self.micro_batch]
            sens = ops.cast(scale, ms.float32) / self.loss_parts
            if seq_ends is None:
                micro_loss = self.network(ids, lab)
                micro_grads = self.grad(self.network, weights)(ids, lab, ops.cast(sens, micro_loss.dtype))
            else:
                ends = seq_ends[i * self.micro_batch:(i + 1) * self.micro_batch]
                mask = ops.ones(ids.shape, ms.int32)  # every slot is a token: padding is a segment of its own
                micro_loss = self.network(ids, lab, mask, ends)
                micro_grads = self.grad(self.network, weights)(ids, lab, mask, ends, ops.cast(sens, micro_loss.dtype))
            if grads is None:
                loss, grads = micro_loss, micro_grads
            else:
                loss = loss + micro_loss
                grads = self.hyper_map(ops.add, grads, micro_grads)
        loss = loss / self.loss_parts
        grads = self.grad_reducer(grads)
        inv_scale = 1.0 / ops.cast(scale, ms.float32).reshape(())
        grads = self.hyper_map(ops.partial(ops.mul, inv_scale), grads)
        norm = ops.sqrt(ops.addn([ops.square(g.astype(ms.float32)).sum() for g in grads]))
        overflow = ops.logical_not(ops.isfinite(norm))
        if self.loss_scaling_manager is not None:
            overflow = self.loss_scaling_manager(self.scale_sense, overflow)
        if self.grad_clip > 0:
            grads = ops.clip_by_global_norm(grads, self.grad_clip)
        if not overflow:
            loss = ops.depend(loss, self.optimizer(grads))
        if self.is_distributed and not self.framework_reduces:
            loss = self.allreduce(loss) / self.world_size  # logged loss = mean over all ranks' batches
        return loss, norm, overflow, scale
