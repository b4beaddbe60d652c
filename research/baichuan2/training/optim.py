"""AdamW whose state stays in float32 when the parameters are float16/bfloat16.

MindSpore's nn.AdamWeightDecay clones its moments from the parameters, so half-precision parameters get
half-precision moments: AdamW's eps (1e-8) is 0 in float16, v underflows, and a float16 run of the tiny model went
NaN at step 2 (tests/test_half_precision_training.py). MindFormers' Baichuan2 recipes name an AdamW keeping float32
moments (FP32StateAdamWeightDecay, which mindformers 1.6 does not ship); this is our own version of the idea, with one
addition: a float32 master copy of every parameter, so updates smaller than a half-precision step are not lost.

The update is nn.AdamWeightDecay's (no bias correction; weight decay added to the update, then scaled by the lr):
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  u = m / (eps + sqrt(v)) [+ wd * w];  w = w - lr u
computed in float32 on the master copy, then cast into the parameter. With float32 parameters it gives
nn.AdamWeightDecay's numbers (tests/test_half_precision_training.py checks both).

The state is cloned from the parameters (Parameter.clone, then cast to float32), so MindSpore's parallel optimizer
can shard it over data_parallel like AdamWeightDecay's own moments (Ascend only; not run here).
"""
import mindspore as ms
from mindspore import nn, ops
from mindspore.common.parameter import ParameterTuple

_update = ops.MultitypeFuncGraph("fp32_state_adamw")


@_update.register("Bool", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                  "Tensor", "Bool", "Bool")
def _update_one(has_master, beta1, beta2, eps, lr, weight_decay, param, master, m, v, grad, decay_flag, optim_filter):
    if not optim_filter:  # a parameter the parallel optimizer gives to another rank
        return param
    g = ops.cast(grad, ms.float32)
    w = ops.cast(master, ms.float32)  # the master copy, or (without one) the parameter itself
    next_m = beta1 * m + (1.0 - beta1) * g
    next_v = beta2 * v + (1.0 - beta2) * ops.square(g)
    update = next_m / (eps + ops.sqrt(next_v))
    if decay_flag:
        update = weight_decay * w + update
    next_w = w - ops.reshape(lr * update, ops.shape(w))
    next_w = ops.depend(next_w, ops.assign(m, next_m))
    next_w = ops.depend(next_w, ops.assign(v, next_v))
    if has_master:
        next_w = ops.depend(next_w, ops.assign(master, next_w))
    new_param = ops.cast(next_w, ops.dtype(param))
    return ops.depend(new_param, ops.assign(param, new_param))


def float32_state(params, prefix, init):
    """One float32 Parameter per parameter, named prefix.<name>: zeros (init "zeros") or its value ("same")."""
    state = []
    for p in params:
        s = p.clone(init=init)  # the clone keeps the link MindSpore's parallel optimizer shards state by
        s.set_dtype(ms.float32)
        s.name = f"{prefix}.{p.name}"
        state.append(s)
    return ParameterTuple(state)


class FP32StateAdamW(nn.Optimizer):
    """AdamW with float32 moments m, v and a float32 master copy of each parameter (see the module docstring).

    Arguments as nn.AdamWeightDecay (parameter groups with their own weight_decay included). The state costs
    12 bytes a parameter (m, v, master); `master_weights=False` keeps only the float32 moments (8 bytes, as
    MindFormers' FP32StateAdamWeightDecay), the update then computed in float32 and cast into the parameter.
    """
    _support_parallel_optimizer = True

    def __init__(self, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
                 master_weights=True):
        super().__init__(learning_rate, params, weight_decay)
        self.beta1 = ms.Tensor(beta1, ms.float32)
        self.beta2 = ms.Tensor(beta2, ms.float32)
        self.eps = ms.Tensor(eps, ms.float32)
        self.moments1 = float32_state(self._parameters, "adam_m", "zeros")
        self.moments2 = float32_state(self._parameters, "adam_v", "zeros")
        self.has_master = bool(master_weights)
        self.master = float32_state(self._parameters, "master", "same") if master_weights else self._parameters

    def construct(self, gradients):
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        params, master, m, v, flags, keep = (self._parameters, self.master, self.moments1, self.moments2,
                                             self.decay_flags, self.optim_filter)
        if self.is_group and self.is_group_lr:
            result = self.hyper_map(ops.partial(_update, self.has_master, self.beta1, self.beta2, self.eps), lr,
                                    weight_decay, params, master, m, v, gradients, flags, keep)
        elif self.is_group:
            result = self.hyper_map(ops.partial(_update, self.has_master, self.beta1, self.beta2, self.eps, lr),
                                    weight_decay, params, master, m, v, gradients, flags, keep)
        else:
            result = self.hyper_map(ops.partial(_update, self.has_master, self.beta1, self.beta2, self.eps, lr,
                                                weight_decay), params, master, m, v, gradients, flags, keep)
        if self.use_parallel:
            self.broadcast_params(result)
        return result
