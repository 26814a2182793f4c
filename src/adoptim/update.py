"""The ADOPT update, written once in Python.

:func:`adopt_update` is the arithmetic of one step on tensors that already hold the compute
dtype (float32, or float64 for float64/complex128 parameters): the for-loop path
(:mod:`adoptim.paths.forloop`) calls it one tensor at a time, the foreach path
(:mod:`adoptim.paths.foreach`) on whole buckets. What differs between the two is only how an
operation is applied to a list of tensors, which the ``ops`` argument says:
:data:`TENSOR_OPS` (one torch op per tensor; autograd can follow it) or :data:`FOREACH_OPS`
(one ``torch._foreach_*`` call per list).

The C++ kernel (``kernels/cpu/csrc``) and the Triton kernel (``kernels/triton``) perform the
same operations in the same order, so that every path produces the same bits. For that, only
operations with a single IEEE rounding are used: products, sums, differences, quotients of two
tensors, a correctly rounded square root, and comparisons/selects. No ``lerp``, ``addcmul`` or
``add(alpha=)``: torch computes those with a fused multiply-add or not depending on its build
and on where an element falls in a vectorised loop. Per element, with every host scalar
rounded once to the compute dtype::

     1. g = g / scale                       (GradScaler only)   ; g = -g  (maximize only)
     2. g = g + theta * wd                  (coupled weight decay only)
     3. theta = theta * decay               (decoupled decay: 1 - lr*wd; 1 on a first call)
     4. d = sqrt(v) ; d = eps where d < eps (a NaN passes)
     5. n = g / d
     6. n = clamp(n, -c, c)                 (c = c_t; 0 on a tensor's first call, so m and
                                             theta do not move; a NaN passes)
     7. m = m * beta1 + n * w1              (w1 = 1 - beta1, formed in float64)
     8. u = m ; u = m * beta1 + n * w1      (nesterov only, with the new m)
     9. u = (u * mask) / kept               (caution only: mask = [u*g > 0], kept = the
                                             tensor's fraction of ones, at least 1e-3)
    10. theta = theta - lr * u
    11. v = v * beta2 + (g * g) * w         (w = 1 - beta2; 1 on a first call, where v is 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["FOREACH_OPS", "TENSOR_OPS", "Hyper", "adopt_update", "call_hyper", "sqrt_rn"]

Scalar = float | Tensor
Scalars = Scalar | Sequence[Scalar]  # one for the whole list, or one per tensor


def sqrt_rn(x: Tensor) -> Tensor:
    """The correctly rounded square root of ``x``, as IEEE hardware (and the kernels) compute.

    torch's own CPU ``sqrt`` is within an ulp but not always correctly rounded (measured here:
    about 1 float32 input in 6 and 1 float64 input in 80 differ). float32 goes through
    float64, whose rounding back to float32 is exact for a square root; float64 uses numpy's
    (the hardware instruction) when numpy is installed. Other devices' ``sqrt`` (CUDA's
    ``sqrt.rn``) is correctly rounded already.
    """
    if x.device.type != "cpu":
        return torch.sqrt(x)
    if type(x) not in (Tensor, torch.nn.Parameter):
        if callable(getattr(x, "to_local", None)) and not x.requires_grad:  # a DTensor
            from torch.distributed.tensor import DTensor  # elementwise: shard by shard

            local = sqrt_rn(x.to_local())
            return DTensor.from_local(local, x.device_mesh, x.placements, run_check=False,
                                      shape=x.shape, stride=x.stride())  # fmt: skip
        return torch.sqrt(x)
    if x.dtype == torch.float32:
        return torch.sqrt(x.double()).float()
    if x.dtype == torch.float64 and not x.requires_grad:
        try:
            import numpy
        except ImportError:  # pragma: no cover - numpy ships with every torch install here
            return torch.sqrt(x)
        return torch.from_numpy(numpy.asarray(numpy.sqrt(x.contiguous().numpy())))
    return torch.sqrt(x)


def _each(scalars: Scalars, n: int) -> Sequence[Scalar]:
    return scalars if isinstance(scalars, (list, tuple)) else [scalars] * n


class _TensorOps:
    """Each operation applied with one torch op per tensor (the for-loop path).

    ``tracking`` (autograd records the step: ``differentiable=True``) makes the operations that
    would overwrite a tensor autograd saved work on a copy instead."""

    def mul(self, xs, c: Scalars):
        return [x * s for x, s in zip(xs, _each(c, len(xs)))]

    def mul_(self, xs, c: Scalars):
        for x, s in zip(xs, _each(c, len(xs))):
            x.mul_(s)

    def mul_tensors(self, xs, ys):
        return [x * y for x, y in zip(xs, ys)]

    def add(self, xs, ys):
        return [x + y for x, y in zip(xs, ys)]

    def add_(self, xs, ys):
        for x, y in zip(xs, ys):
            x.add_(y)

    def sub_(self, xs, ys):
        for x, y in zip(xs, ys):
            x.sub_(y)

    def div(self, xs, ys):
        return [x / y for x, y in zip(xs, ys)]

    def div_scalar(self, xs, c: Tensor):
        return [x / c.to(x.device) for x in xs]

    def neg(self, xs):
        return [-x for x in xs]

    def sqrt(self, xs):
        return [sqrt_rn(x) for x in xs]

    def floor_at(self, xs, low: float):  # where(x < low, low, x), out of place
        return [x.clamp(min=low) for x in xs]

    def floor_at_(self, xs, low: float):
        for x in xs:
            x.clamp_(min=low)

    def clamp_(self, xs, bounds: Scalars):
        for x, b in zip(xs, _each(bounds, len(xs))):
            x.clamp_(-b, b)


class _ForeachOps(_TensorOps):
    """Each operation as one ``torch._foreach_*`` call on the whole list (the foreach path)."""

    def mul(self, xs, c):
        return torch._foreach_mul(xs, c)

    def mul_(self, xs, c):
        torch._foreach_mul_(xs, c)

    def mul_tensors(self, xs, ys):
        return torch._foreach_mul(xs, ys)

    def add(self, xs, ys):
        return torch._foreach_add(xs, ys)

    def add_(self, xs, ys):
        torch._foreach_add_(xs, ys)

    def sub_(self, xs, ys):
        torch._foreach_sub_(xs, ys)

    def div(self, xs, ys):
        return torch._foreach_div(xs, ys)

    def neg(self, xs):
        return torch._foreach_neg(xs)

    def floor_at(self, xs, low):
        return torch._foreach_clamp_min(xs, low)

    def floor_at_(self, xs, low):
        torch._foreach_clamp_min_(xs, low)

    def clamp_(self, xs, bounds):
        if isinstance(bounds, (list, tuple)):
            torch._foreach_clamp_min_(xs, [-b for b in bounds])
            torch._foreach_clamp_max_(xs, list(bounds))
        else:
            torch._foreach_clamp_min_(xs, -bounds)
            torch._foreach_clamp_max_(xs, bounds)


TENSOR_OPS = _TensorOps()
FOREACH_OPS = _ForeachOps()


@dataclass(frozen=True)
class Hyper:
    """The hyperparameters of one call, as the paths receive them (numbers, or 0-dim tensors
    for compiled, captured and differentiable steps)."""

    lr: Scalar
    beta1: Scalar
    beta2: Scalar
    eps: float
    weight_decay: Scalar
    decouple: bool
    maximize: bool
    nesterov: bool = False
    caution: bool = False
    grad_scale: Tensor | None = None

    @property
    def coupled(self) -> bool:
        """Coupled (L2) decay is on; a tensor weight_decay (differentiable) always applies."""
        return not self.decouple and (
            isinstance(self.weight_decay, Tensor) or self.weight_decay != 0
        )

    @property
    def decoupled(self) -> bool:
        return self.decouple and (isinstance(self.weight_decay, Tensor) or self.weight_decay != 0)


def _caution(us: list[Tensor], gs: list[Tensor]) -> list[Tensor]:
    """u = (u * mask) / kept, mask = [u*g > 0], kept = max(count / numel, 1e-3) per tensor.

    The count is an exact integer (a float32 mean of ones is not, beyond 2**24 elements);
    count and numel are rounded once to the compute dtype, as the kernels do. On a DTensor
    the sum is over the whole tensor (a reduction across ranks)."""
    out = []
    for u, g in zip(us, gs):
        positive = u * g > 0
        mask = positive.to(u.dtype)
        kept = positive.sum().to(u.dtype) / float(u.numel())
        # out of place: a DTensor's sum is Partial until reduced, which clamp_ refuses
        out.append((u * mask) / kept.clamp(min=1e-3))
    return out


def adopt_update(
    ops: _TensorOps,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    bounds: Scalars,
    sq_weights: Scalars,
    decays: Scalars,
    h: Hyper,
    tracking: bool = False,
) -> None:
    """One ADOPT step on real tensors of the compute dtype, in place: ``params``,
    ``exp_avgs`` and ``exp_avg_sqs`` are updated; ``grads`` are read. ``bounds``,
    ``sq_weights`` and ``decays`` are the per-tensor scalars of
    :func:`adoptim.schedule.call_scalars` (the clip bound c, the weight w of g*g and the
    decoupled-decay factor). ``tracking``: autograd records the step (``differentiable``)."""
    g = grads
    if h.grad_scale is not None:  # 1. unscale (GradScaler) ...
        g = ops.div_scalar(g, h.grad_scale)
    if h.maximize:  # ... and the sign of maximize
        g = ops.neg(g)
    if h.coupled:  # 2. coupled (L2) decay: enters v too
        if tracking:  # autograd must see theta as it is now, not after step 3
            g = ops.add(g, ops.mul([p.clone() for p in params], h.weight_decay))
        else:
            g = ops.add(g, ops.mul(params, h.weight_decay))
    if h.decoupled:  # 3. decoupled decay
        ops.mul_(params, decays)
    d = ops.sqrt(exp_avg_sqs)  # 4. max(sqrt(v), eps)
    if tracking:  # sqrt's backward needs its output as it is
        d = ops.floor_at(d, h.eps)
    else:
        ops.floor_at_(d, h.eps)
    n = ops.div(g, d)  # 5.
    del d
    ops.clamp_(n, bounds)  # 6. clip to [-c_t, c_t]
    w1 = 1 - h.beta1
    ops.mul_(exp_avgs, h.beta1)  # 7. m = beta1*m + (1-beta1)*n
    ops.add_(exp_avgs, ops.mul(n, w1))
    u = exp_avgs
    if h.nesterov:  # 8. one momentum step ahead
        u = ops.add(ops.mul(exp_avgs, h.beta1), ops.mul(n, w1))
    del n
    if h.caution:  # 9.
        u = _caution(u, g)
    elif tracking and u is exp_avgs:  # the product below saves u; m changes next step
        u = [m.clone() for m in u]
    ops.sub_(params, ops.mul(u, h.lr))  # 10. theta = theta - lr*u
    del u
    ops.mul_(exp_avg_sqs, h.beta2)  # 11. v = beta2*v + w*g*g
    ops.add_(exp_avg_sqs, ops.mul(ops.mul_tensors(g, g), sq_weights))


def call_hyper(**kwargs: Any) -> Hyper:
    """A :class:`Hyper` from the paths' keyword arguments (extra keys are ignored)."""
    return Hyper(
        lr=kwargs["lr"],
        beta1=kwargs["beta1"],
        beta2=kwargs["beta2"],
        eps=kwargs["eps"],
        weight_decay=kwargs["weight_decay"],
        decouple=kwargs["decouple"],
        maximize=kwargs["maximize"],
        nesterov=kwargs.get("nesterov", False),
        caution=kwargs.get("caution", False),
        grad_scale=kwargs.get("grad_scale"),
    )

