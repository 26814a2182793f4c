"""Gradient release: step each parameter during backward, as soon as its gradient is final,
and free that gradient, so that a model's gradients never exist all at once.

Built on :meth:`torch.Tensor.register_post_accumulate_grad_hook` (public; PyTorch's
"How to save memory by fusing the optimizer step into the backward pass" tutorial), which
fires once per backward for each leaf after its gradient has been accumulated: after every
use of a parameter shared by several layers, and, under FSDP2 (``fully_shard``), on the
sharded parameter after its gradient has been reduce-scattered (FSDP2 runs these hooks
itself). The step is :meth:`adoptim.ADOPT.step_params`, which shares :meth:`ADOPT.step`'s
per-group body, so the result is the normal step's, bit for bit on the for-loop path and
the fused CPU kernel. See ``docs/memory.md`` ("Gradient release").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["GradientRelease", "enable_gradient_release"]

_ACCUMULATION = (
    "gradient release steps each parameter as soon as its gradient is ready, so it cannot "
    "accumulate gradients over micro-batches (or over several backward calls before one "
    "step): a parameter received a second gradient since the last opt.step()/opt.zero_grad(). "
    "Call opt.step() (a no-op for released parameters) once per backward, or disable "
    "gradient release (handle.remove()) to accumulate."
)
_GRAD_SCALER = (
    "torch.amp.GradScaler cannot be used with gradient release: the parameters were "
    "stepped during backward with the *scaled* gradients, before the scaler could unscale "
    "them or skip a step with inf/NaN. Use bf16 autocast (no scaler needed) or disable "
    "gradient release (handle.remove()) and restore the parameters from a checkpoint."
)


def _is_ddp(module: torch.nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return any(isinstance(m, DistributedDataParallel) for m in module.modules())


def _is_dtensor(p: Tensor) -> bool:
    return callable(getattr(p, "to_local", None)) and hasattr(p, "placements")


class GradientRelease:
    """The handle :func:`enable_gradient_release` returns; :meth:`remove` ends the release
    (the optimizer steps normally again). Usable as a context manager."""

    def __init__(self, params: list[Tensor], opt: Any) -> None:
        self.optimizer = opt
        self.params = params
        self._stepped: set[int] = set()  # ids of the parameters stepped since the last step()
        self._handles: list[Any] = []
        try:
            for p in params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
            self._handles.append(opt.register_step_pre_hook(self._before_step))
            self._handles.append(opt.register_step_post_hook(self._end_iteration))
        except Exception:
            self.remove()
            raise
        # opt.zero_grad() also ends an iteration (loops that never call step() before it).
        self._zero_grad = opt.__dict__.get("zero_grad")
        inner = opt.zero_grad

        def zero_grad(*args: Any, **kwargs: Any) -> None:
            inner(*args, **kwargs)  # the released parameters' gradients are None already
            self._stepped.clear()

        opt.zero_grad = zero_grad
        self._zero_grad_wrapper = zero_grad
        # torch.amp.GradScaler then skips its own unscale_ (there are no gradients to unscale)
        # and hands its scale to step(), where _before_step refuses it clearly.
        self._amp_flag = opt.__dict__.get("_step_supports_amp_scaling", None)
        opt._step_supports_amp_scaling = True
        opt._gradient_release = self
        self.active = True

    def _hook(self, p: Tensor) -> None:
        key = id(p)
        if key in self._stepped:
            raise RuntimeError(_ACCUMULATION)
        self._stepped.add(key)
        self.optimizer.step_params([p])
        p.grad = None  # the point of the release: this gradient is no longer held

    def _before_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        if "found_inf" in opt.__dict__ or "grad_scale" in opt.__dict__:
            # GradScaler deletes these after step() returns, not when it raises: the hooks
            # of a later backward would read them.
            opt.__dict__.pop("found_inf", None)
            opt.__dict__.pop("grad_scale", None)
            raise RuntimeError(_GRAD_SCALER)

    def _end_iteration(self, *_: Any) -> None:
        self._stepped.clear()

    def remove(self) -> None:
        """Remove the hooks: backward leaves gradients in ``.grad`` again and ``opt.step()``
        steps them. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles = []
        opt = self.optimizer
        if getattr(self, "active", False):
            if opt.__dict__.get("zero_grad") is self._zero_grad_wrapper:
                if self._zero_grad is None:
                    del opt.zero_grad
                else:
                    opt.zero_grad = self._zero_grad
            if self._amp_flag is None:
                opt.__dict__.pop("_step_supports_amp_scaling", None)
            else:
                opt._step_supports_amp_scaling = self._amp_flag
            opt.__dict__.pop("_gradient_release", None)
        self.active = False

    def __enter__(self) -> GradientRelease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def enable_gradient_release(
    model_or_params: torch.nn.Module | Iterable[Tensor], opt: Any
) -> GradientRelease:
    r"""Step each parameter of ``model_or_params`` during backward, as soon as its gradient
    is final, and free that gradient (``p.grad = None``), so that gradients never exist all
    at once: at most the gradients of the parameters autograd is finishing at that moment.

    While the release is active, ``opt.step()`` and ``opt.zero_grad()`` change nothing for
    the released parameters (their gradients are already gone) but mark the end of an
    iteration: keep calling them as usual. ``opt.step()`` still steps any parameter of
    ``opt`` that holds a gradient without a release hook (one not in ``model_or_params``,
    not requiring grad at enable time, or added later with ``add_param_group``).
    ``handle.remove()`` restores normal stepping.

    The result is that of ``loss.backward(); opt.step()`` on the same data, bit for bit on
    the for-loop path (``foreach=False, fused=False``) and the fused CPU kernel, with every
    state format, param groups, LR schedulers (which change ``lr`` between iterations, as
    before) and parameters that get no gradient on some steps (left alone, as ``step()``
    does with ``zero_grad(set_to_none=True)``, the default); ``opt.state_dict()`` is a
    normal run's. One exception: ``stochastic_rounding=True`` with float32 state draws
    its random bits from torch's generator in another order (same distribution).

    Refused (an error, never a silently different run):

    * gradient accumulation over micro-batches (two backward passes without an
      ``opt.step()``/``opt.zero_grad()`` between them): the first would already have
      stepped;
    * ``torch.amp.GradScaler``: the hooks would step with scaled gradients (use bf16);
    * ``torch.nn.parallel.DistributedDataParallel``, and plain (non-DTensor)
      parameters in a multi-process group: DDP averages gradients after they are
      accumulated, so a hook would step on this rank's gradient alone, and DDP keeps every
      gradient in its buckets anyway (nothing to save). FSDP2 (``fully_shard``) works: each
      rank steps its shard after the reduce-scatter.
    * global gradient-norm clipping cannot be done (no moment sees all gradients); ADOPT's
      own per-element clip bounds every update by ``lr * t**0.25`` per element instead
      (``docs/memory.md``).

    Args:
        model_or_params: a module (its parameters) or an iterable of parameters, each in
            one of ``opt``'s param groups, with no gradient yet.
        opt: an :class:`adoptim.ADOPT` (or :class:`adoptim.ADOPTW`).

    Returns:
        a :class:`GradientRelease` handle; ``handle.remove()`` ends the release.

    Example::

        >>> import torch
        >>> import adoptim
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
        ...                             torch.nn.Linear(8, 1))
        >>> opt = adoptim.ADOPT(model.parameters(), lr=1e-2)
        >>> handle = adoptim.enable_gradient_release(model, opt)
        >>> for _ in range(3):
        ...     model(torch.randn(16, 4)).pow(2).mean().backward()  # steps each parameter
        ...     opt.step()  # no-op for released parameters; ends the iteration
        >>> all(p.grad is None for p in model.parameters())
        True
        >>> handle.remove()  # back to normal stepping
        >>> with adoptim.enable_gradient_release(model, opt):  # or for a block
        ...     model(torch.randn(16, 4)).pow(2).mean().backward()
        ...     opt.step()
    """
    step_params = getattr(opt, "step_params", None)
    if not callable(step_params):
        raise TypeError(
            "enable_gradient_release: opt must be an adoptim.ADOPT/ADOPTW optimizer (it "
            f"needs step_params), got {type(opt).__name__}"
        )
    existing = opt.__dict__.get("_gradient_release")
    if existing is not None and existing.active:
        raise RuntimeError(
            "enable_gradient_release: gradient release is already active on this optimizer; "
            "call handle.remove() first"
        )
    if isinstance(model_or_params, torch.nn.Module):
        if _is_ddp(model_or_params):
            raise RuntimeError(
                "enable_gradient_release: DistributedDataParallel is not supported. DDP "
                "all-reduces gradients in buckets after they are accumulated and keeps every "
                "gradient in those buckets, so release would step before the average and save "
                "no memory. Use FSDP2 (torch.distributed.fsdp.fully_shard), whose "
                "reduce-scattered shards are stepped during backward, or train under DDP "
                "without gradient release."
            )
        params = list(model_or_params.parameters())
    elif isinstance(model_or_params, Tensor):
        params = [model_or_params]
    else:
        params = list(model_or_params)
    if params and isinstance(params[0], dict):
        raise TypeError(
            "enable_gradient_release: model_or_params must be a module or an iterable of "
            "parameters, not param-group dicts (the groups are opt's)"
        )
    unique: dict[int, Tensor] = {}
    for p in params:
        unique.setdefault(id(p), p)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    hooked = []
    for i, p in enumerate(unique.values()):
        if id(p) not in in_opt:
            raise ValueError(
                f"enable_gradient_release: model_or_params[{i}] (shape {tuple(p.shape)}) is in "
                "none of opt's param groups"
            )
        if p.grad is not None:
            raise RuntimeError(
                f"enable_gradient_release: model_or_params[{i}] already has a gradient; call "
                "opt.zero_grad() (set_to_none=True) before enabling gradient release"
            )
        if p.requires_grad:  # the others are stepped by opt.step() if they get a gradient
            hooked.append(p)
    if any(g["differentiable"] for g in opt.param_groups):
        raise ValueError(
            "enable_gradient_release: differentiable=True is not supported (the step runs "
            "inside backward)"
        )
    dist = torch.distributed
    if (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
        and any(not _is_dtensor(p) for p in hooked)
    ):
        raise RuntimeError(
            "enable_gradient_release: plain (non-DTensor) parameters in a multi-process run: "
            "DDP, ZeRO or a manual all-reduce average gradients after backward, and release "
            "would step each parameter on this rank's gradient alone. Shard the model with "
            "FSDP2 (torch.distributed.fsdp.fully_shard; its parameters are DTensors, stepped "
            "after their reduce-scatter), or train without gradient release."
        )
    return GradientRelease(hooked, opt)
