"""The ADOPT optimizer (Taniguchi et al., NeurIPS 2024, arXiv 2411.02853).

Layout, as in ``torch.optim``: the :class:`ADOPT` class keeps hyperparameters and state,
validates them, collects each group's tensors and calls the functional
:func:`adoptim.functional.adopt`, which picks a path (for-loop, foreach, fused kernel; one
module each). Every path performs the same operations in the same order; the tests hold each
to a float64 reference.

The first call on which a tensor has a gradient only stores ``v = g*g``. Rather than branch on
the step count (a tensor, which would break ``torch.compile`` graphs and CUDA-graph capture),
every call runs the same operations with per-tensor scalars that make the first call a no-op
for ``theta`` and ``m``: the clip bound is 0 (so the normalised gradient is 0 and ``m`` stays
0), decoupled decay is 1, and ``v`` takes ``g*g`` with weight 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adoptim import _cpu_kernel, _kernel_cache, _state, _triton_kernel
from adoptim._convert import from_adam
from adoptim._schedule import DEFAULT_CLIP, ClipSpec, PowerClip, split_clip
from adoptim.functional import adopt

__all__ = ["ADOPT", "ADOPTW", "PowerClip", "adopt"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
# Param-group flags that choose how the step runs rather than what it computes.
_PATH_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def _check_range(name: str, value: Any, low: float, high: float | None = None) -> None:
    """Raise ValueError unless ``low <= value`` (and ``value < high`` when high is given)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element")
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected a number, got {type(value).__name__}")
    ok = low <= value and (high is None or value < high)
    if not ok:
        accepted = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"Invalid {name}: {value} (accepted: {accepted})")


class ADOPT(Optimizer):
    r"""ADOPT: Adam with the current gradient normalised by the *previous* second moment, and
    momentum applied after normalisation (clipped form, the authors' recommendation).

    For each parameter tensor ``theta`` with gradient ``g``, counting only calls on which it
    has a gradient::

        first call:        v = g*g                      (theta and m unchanged)
        later calls t=1,2,...:
            n     = clip(g / max(sqrt(v), eps), t ** 0.25)
            m     = beta1 * m + (1 - beta1) * n         (m starts at 0, no bias correction)
            theta = theta - lr * m
            v     = beta2 * v + (1 - beta2) * g*g

    State per parameter, under ``torch.optim.Adam``'s keys: ``step`` (calls so far, a float
    tensor), ``exp_avg`` (m) and ``exp_avg_sq`` (v).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate, a float or a one-element tensor (default 1e-3). Use the lr you
            would use with Adam.
        betas: (beta1, beta2), each in [0, 1) (default (0.9, 0.9999)). ADOPT converges for any
            beta2; 0.9999 is the paper's default.
        eps: floor on ``sqrt(v)`` (a ``max``, not an addition), >= 0 (default 1e-6). With
            ``eps=0`` a coordinate whose gradients have all been 0 divides 0 by 0 and becomes
            NaN (as in ``torch.optim.Adam`` with ``eps=0``); keep it positive.
        clip_lambda: the clip schedule c_t. A number p or :class:`PowerClip` (default
            ``t ** 0.25``) is stored in ``state_dict()`` as the group's ``clip_exp``; ``None``
            turns clipping off; any other callable ``step -> bound`` works as in torch-adopt
            but is *not* saved in ``state_dict()`` (pass it again when you rebuild the
            optimizer). It is called with the step as a Python number, or as a tensor under
            ``torch.compile``/``capturable``/``differentiable``.
        weight_decay: >= 0 (default 0).
        decouple: False adds ``weight_decay * theta`` to the gradient on every call (L2, so
            it enters v); True multiplies theta by ``1 - lr * weight_decay`` on the calls that
            update it, as AdamW does (see :class:`ADOPTW`).
        foreach: True for the multi-tensor path, False for the for-loop path, None to choose:
            see ``_default_foreach``.
        maximize: maximise the objective instead of minimising it.
        capturable: keep ``step`` on the parameter's device and never read it on the host,
            so the step can be captured in a CUDA graph.
        differentiable: let autograd run through the step (for meta-learning).
        fused: True for the single-pass C++ kernel (CPU; built on first use and cached, the
            for-loop path runs until it is ready); raises at construction where it cannot
            run, saying why. None (default, with foreach None): the kernel for CPU
            parameters when a C++ compiler is available, else as ``foreach``. With
            ``fused=True`` a ``torch.amp.GradScaler`` unscales and skips inf/NaN steps inside
            the step. See ``docs/performance.md``.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq``: ``"auto"`` (default) keeps them in
            float32 for bfloat16/float16 parameters (in bfloat16, v cannot move at
            beta2 = 0.9999) and in the parameter's dtype otherwise; ``"float32"`` is the same;
            ``"param"`` always uses the parameter's dtype. With float32 state every path
            computes the update in float32 and rounds the parameter once.
        stochastic_rounding: round bfloat16 parameters stochastically when writing them back
            from a float32 update (unbiased, so updates below half an ulp are not lost).

    Example::

        >>> import torch
        >>> from adoptim import ADOPT
        >>> x = torch.tensor([3.0, -2.0], requires_grad=True)
        >>> opt = ADOPT([x], lr=0.1)
        >>> for _ in range(200):
        ...     opt.zero_grad()
        ...     (x ** 2).sum().backward()
        ...     opt.step()
        >>> bool(x.abs().max() < 0.1)
        True

    Reference: S. Taniguchi, K. Harada, G. Minegishi, Y. Oshima, S. C. Jeong, G. Nagahara,
    T. Iiyama, M. Suzuki, Y. Iwasawa, Y. Matsuo. "ADOPT: Modified Adam Can Converge with Any
    beta2 with the Optimal Rate." NeurIPS 2024. https://arxiv.org/abs/2411.02853
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_lambda: ClipSpec = DEFAULT_CLIP,
        weight_decay: float = 0.0,
        decouple: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: str | torch.dtype | None = "auto",
        stochastic_rounding: bool = False,
    ) -> None:
        _check_range("learning rate (lr)", lr, 0.0)
        _check_range("epsilon value (eps)", eps, 0.0)
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: expected (beta1, beta2), got {betas!r}")
        _check_range("beta parameter at index 0 (beta1)", betas[0], 0.0, 1.0)
        _check_range("beta parameter at index 1 (beta2)", betas[1], 0.0, 1.0)
        _check_range("weight_decay value", weight_decay, 0.0)
        state_dtype = _state.resolve_state_dtype(state_dtype)
        if fused:
            if foreach:
                raise ValueError("fused=True and foreach=True cannot be used together")
            if differentiable:
                raise ValueError("fused=True and differentiable=True cannot be used together")
        if foreach and differentiable:
            raise ValueError("foreach=True and differentiable=True cannot be used together")
        clip_exp, self.clip_lambda = split_clip(clip_lambda)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            clip_exp=clip_exp,
            weight_decay=weight_decay,
            decouple=decouple,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            state_dtype=state_dtype,
            stochastic_rounding=bool(stochastic_rounding),
        )
        super().__init__(params, defaults)
        if fused:
            all_params = [p for group in self.param_groups for p in group["params"]]
            # CUDA/ROCm parameters (or CPU ones under ADOPTIM_FUSED_BACKEND=triton): Triton.
            triton = _triton_kernel.selected(all_params, fused=True)
            if triton:
                state_dtypes = [group["state_dtype"] for group in self.param_groups]
                reason = _triton_kernel.unsupported_reason(all_params, state_dtypes)
            else:
                reason = _cpu_kernel.unsupported_reason(all_params)
            if reason is not None:
                raise RuntimeError(f"fused=True cannot be used: {reason}")
            if not triton:
                _kernel_cache.load_kernel(build=True)  # start building now: ready sooner
            # A GradScaler then hands its scale and inf flag to step() instead of unscaling.
            self._step_supports_amp_scaling = True

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer pickles (and deep-copies) only defaults, state and param_groups; keep the
        # custom clip schedule and GradScaler's fused hand-off flag as well.
        state = super().__getstate__()
        state["clip_lambda"] = self.clip_lambda
        if getattr(self, "_step_supports_amp_scaling", False):
            state["_step_supports_amp_scaling"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("clip_lambda", None)
        clip_exp = self.defaults.get("clip_exp", 0.25)
        for group in self.param_groups:
            # State dicts from torch-adopt have none of these keys; its default clip is t**0.25.
            group.setdefault("clip_exp", clip_exp)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("state_dtype", "auto")
            group.setdefault("stochastic_rounding", False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by ADOPT, ADOPTW or torch-adopt's ADOPT.

        A state dict from ``torch.optim.Adam``/``AdamW`` has the same state keys but means
        something else (its v is one step ahead and its m is not normalised); it is refused.
        """
        if any("amsgrad" in group for group in state_dict.get("param_groups", [])):
            raise ValueError(
                "This state dict comes from torch.optim.Adam/AdamW (its param groups have "
                "'amsgrad'); ADOPT's moments mean something else. Load it into the Adam "
                "optimizer it came from and convert that with ADOPT.from_adam(adam)."
            )
        # Which path runs is the loading optimizer's choice, not the checkpoint's: keep this
        # optimizer's flags (torch would take the saved ones), so a state dict saved with
        # foreach=True loads into a for-loop or fused optimizer and runs there.
        kept = [{k: g[k] for k in _PATH_FLAGS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        _state.restore_state_dtypes(self, state_dict)  # torch cast float32 moments to bf16
        for group, flags in zip(self.param_groups, kept):
            group.update(flags)
            for p in group["params"]:  # `step` on the device only when capturable
                step = self.state.get(p, {}).get("step")
                if isinstance(step, Tensor):
                    device = p.device if group["capturable"] else torch.device("cpu")
                    self.state[p]["step"] = step.to(device=device, dtype=torch.float32)

    @classmethod
    def from_adam(cls, adam: Optimizer, *, exp_avg: str = "normalized", **overrides: Any):
        r"""Warm-start ADOPT from a ``torch.optim.Adam``/``AdamW`` optimizer (to continue from
        an Adam checkpoint, load it into the Adam optimizer first).

        The new optimizer holds the same parameters and param groups (``lr``, ``betas``,
        ``weight_decay``, ``maximize``; AdamW, or Adam with ``decoupled_weight_decay``, gives
        decoupled decay), with ``overrides`` applied to every group (e.g. ``lr=...``). Adam's
        ``eps`` is *added* to ``sqrt(v)``, ADOPT's is a floor, so ``eps`` is not carried over:
        ADOPT's default (or ``eps=`` in overrides) is used.

        State, per parameter with Adam state after ``t`` Adam steps:

        * ``step = t``: ADOPT has seen ``t`` gradients, so the next call is an update, with
          clip bound ``c_t``.
        * ``exp_avg_sq = v_adam / (1 - beta2^t)``: Adam's ``exp_avg_sq`` is the same EMA of
          ``g*g`` that ADOPT keeps, except that it starts from 0 and is bias-corrected only
          when used; ADOPT's starts from ``g_1^2`` and is never corrected. The corrected value
          is ADOPT's ``v`` over the same gradients (exactly so for ``t = 1``), which ADOPT
          uses as the previous ``v`` to normalise the next gradient.
        * ``exp_avg``: Adam's ``m`` is an EMA of raw gradients, ADOPT's an EMA of normalised,
          clipped gradients ``n = clip(g / max(sqrt(v), eps), c)``, so it cannot be copied.
          ``exp_avg="normalized"`` (default) uses
          ``m = clip(m_adam / max(sqrt(v), eps), c_t)`` with the ``v`` above: ``v`` moves
          slowly (``beta2`` close to 1), so dividing the average of past gradients by today's
          ``sqrt(v)`` approximates the average of past normalised gradients, and the clip
          keeps it inside the bound every past ``n`` obeyed. Neither is bias-corrected, like
          ADOPT's own ``m``. The run continues in the direction and at about the step size
          Adam was taking. ``exp_avg="zero"`` restarts momentum instead (as a fresh ADOPT
          does; updates are small for the first ~``1/(1 - beta1)`` steps).

        Parameters without Adam state (no step yet) start fresh.
        """
        return from_adam(cls, adam, exp_avg=exp_avg, **overrides)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        """Collect the tensors that have a gradient on this call, creating state on first
        sight; return whether any of them is complex."""
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "ADOPT does not support sparse gradients; use dense gradients "
                    "(e.g. nn.Embedding(sparse=False))"
                )
            has_complex |= torch.is_complex(p)
            state = self.state[p]
            if len(state) == 0:
                # `step` lives on the host unless capturable, so that reading it costs no
                # device sync (as in torch.optim.Adam).
                step_device = p.device if group["capturable"] else torch.device("cpu")
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                state_dtype = _state.state_dtype_for(p, group["state_dtype"])
                state["exp_avg"] = torch.zeros_like(
                    p, dtype=state_dtype, memory_format=torch.preserve_format
                )
                state["exp_avg_sq"] = torch.zeros_like(
                    p, dtype=state_dtype, memory_format=torch.preserve_format
                )
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError("`step` must not require grad in differentiable mode")
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
        return has_complex

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        with torch.set_grad_enabled(self.defaults["differentiable"]):
            for group in self.param_groups:
                params: list[Tensor] = []
                grads: list[Tensor] = []
                exp_avgs: list[Tensor] = []
                exp_avg_sqs: list[Tensor] = []
                state_steps: list[Tensor] = []
                has_complex = self._init_group(
                    group, params, grads, exp_avgs, exp_avg_sqs, state_steps
                )
                if not params:
                    continue
                beta1, beta2 = group["betas"]
                adopt(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    state_steps,
                    foreach=group["foreach"],
                    fused=group["fused"],
                    # Set by torch.amp.GradScaler for fused=True (_step_supports_amp_scaling).
                    grad_scale=getattr(self, "grad_scale", None),
                    found_inf=getattr(self, "found_inf", None),
                    stochastic_rounding=group["stochastic_rounding"],
                    capturable=group["capturable"],
                    differentiable=group["differentiable"],
                    has_complex=has_complex,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    clip_exp=group["clip_exp"],
                    clip_fn=self.clip_lambda,
                    weight_decay=group["weight_decay"],
                    decouple=group["decouple"],
                    maximize=group["maximize"],
                )
        return loss


class ADOPTW(ADOPT):
    """ADOPT with decoupled weight decay, the counterpart of ``torch.optim.AdamW``.

    Same as ``ADOPT(..., decouple=True)`` with AdamW's default ``weight_decay=1e-2``: on every
    call that updates theta, ``theta *= 1 - lr * weight_decay`` before the ADOPT step.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_lambda: ClipSpec = DEFAULT_CLIP,
        weight_decay: float = 1e-2,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: str | torch.dtype | None = "auto",
        stochastic_rounding: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            clip_lambda=clip_lambda,
            weight_decay=weight_decay,
            decouple=True,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
        )
