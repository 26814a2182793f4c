"""The ADOPT optimizer (Taniguchi et al., NeurIPS 2024, arXiv 2411.02853).

Layout, as in ``torch.optim``: the :class:`ADOPT` class keeps hyperparameters and state and
calls the functional :func:`adopt`, which dispatches to the for-loop path
(:func:`_single_tensor_adopt`, the readable one) or the multi-tensor path
(:func:`_multi_tensor_adopt`). Both take the same arguments and perform the same operations in
the same order; the tests hold both to a float64 reference.

The first call on which a tensor has a gradient only stores ``v = g*g``. Rather than branch on
the step count (a tensor, which would break ``torch.compile`` graphs and CUDA-graph capture),
every call runs the same operations with per-tensor scalars that make the first call a no-op
for ``theta`` and ``m``: the clip bound is 0 (so the normalised gradient is 0 and ``m`` stays
0), decoupled decay is 1, and ``v`` takes ``g*g`` with weight 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adoptim import _fused
from adoptim._utils import group_by_device_and_dtype, is_compiling, view_as_real_if_complex

__all__ = ["ADOPT", "ADOPTW", "PowerClip", "adopt"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
ClipSpec = float | Callable[[Any], Any] | None
# Param-group flags that choose how the step runs rather than what it computes.
_PATH_FLAGS = ("foreach", "fused", "capturable", "differentiable")


class PowerClip:
    """The clip schedule ``c_t = t ** exponent`` (the paper's is ``t ** 0.25``).

    A callable, so it can be passed where ``torch-adopt`` takes ``clip_lambda``; unlike a
    lambda it is stored in ``state_dict()`` (as the group's ``clip_exp``) and pickles.
    """

    def __init__(self, exponent: float = 0.25) -> None:
        self.exponent = float(exponent)

    def __call__(self, step: Any) -> Any:
        return step**self.exponent

    def __repr__(self) -> str:
        return f"PowerClip({self.exponent})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PowerClip) and other.exponent == self.exponent

    def __hash__(self) -> int:
        return hash(("PowerClip", self.exponent))


DEFAULT_CLIP = PowerClip(0.25)  # the paper's c_t = t ** 0.25


def _split_clip(clip_lambda: ClipSpec) -> tuple[float | None, Callable | None]:
    """``clip_lambda`` as (power-law exponent kept in param groups, custom callable or None)."""
    if clip_lambda is None:
        return None, None
    if isinstance(clip_lambda, PowerClip):
        exponent = clip_lambda.exponent
    elif isinstance(clip_lambda, (int, float)) and not isinstance(clip_lambda, bool):
        exponent = float(clip_lambda)
    elif callable(clip_lambda):
        return None, clip_lambda
    else:
        raise TypeError(
            "clip_lambda must be a number p (clip at t ** p), a PowerClip, a callable "
            f"step -> bound, or None (no clipping); got {clip_lambda!r}"
        )
    if not (math.isfinite(exponent) and exponent >= 0.0):
        raise ValueError(f"Invalid clip exponent: {exponent} (must be finite and >= 0)")
    return exponent, None


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
        state_dtype = _fused.resolve_state_dtype(state_dtype)
        if fused:
            if foreach:
                raise ValueError("fused=True and foreach=True cannot be used together")
            if differentiable:
                raise ValueError("fused=True and differentiable=True cannot be used together")
        if foreach and differentiable:
            raise ValueError("foreach=True and differentiable=True cannot be used together")
        clip_exp, self.clip_lambda = _split_clip(clip_lambda)
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
            reason = _fused.unsupported_reason(
                [p for group in self.param_groups for p in group["params"]]
            )
            if reason is not None:
                raise RuntimeError(f"fused=True cannot be used: {reason}")
            _fused.load_kernel(build=True)  # start building now, so it is ready sooner
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
        _fused.restore_state_dtypes(self, state_dict)  # torch cast float32 moments to bf16
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
        if not isinstance(adam, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(
                f"from_adam expects a torch.optim.Adam or AdamW optimizer, got "
                f"{type(adam).__name__}"
            )
        if exp_avg not in ("normalized", "zero"):
            raise ValueError(f"exp_avg must be 'normalized' or 'zero', got {exp_avg!r}")
        def own(value: Any) -> Any:  # a tensor lr/beta is copied, not shared with Adam's
            return value.detach().clone() if isinstance(value, Tensor) else value

        groups = []
        for g in adam.param_groups:
            group: dict[str, Any] = {
                "params": list(g["params"]),
                "lr": own(g["lr"]),
                "betas": tuple(own(b) for b in g["betas"]),
                "weight_decay": g["weight_decay"],
                "maximize": g.get("maximize", False),
            }
            if cls is ADOPT:
                decoupled = isinstance(adam, torch.optim.AdamW) or g.get(
                    "decoupled_weight_decay", False
                )
                group["decouple"] = bool(decoupled)
            group.update(overrides)
            groups.append(group)
        new = cls(groups)
        for group, adam_group in zip(new.param_groups, adam.param_groups):
            beta2 = group["betas"][1]
            beta2_adam = float(adam_group["betas"][1])
            for p in group["params"]:
                old = adam.state.get(p, {})
                if "step" not in old:
                    continue
                t = float(old["step"])
                if t == 0:
                    continue
                dtype = _fused.state_dtype_for(p, group["state_dtype"])
                real = p.real if torch.is_complex(p) else p
                work = torch.promote_types(real.dtype, torch.float32)
                v_adam, m_adam = (
                    view_as_real_if_complex(old[k])[0].to(work) for k in ("exp_avg_sq", "exp_avg")
                )
                v = v_adam / (1 - beta2_adam**t)
                if exp_avg == "normalized":
                    m = m_adam / v.sqrt().clamp(min=group["eps"])
                    (bound,), _, _ = _call_scalars(
                        [torch.tensor(t)],
                        as_tensors=False,
                        lr=0.0,
                        beta2=beta2,
                        weight_decay=0.0,
                        clip_exp=group["clip_exp"],
                        clip_fn=new.clip_lambda,
                    )
                    m = m.clamp(-bound, bound)
                else:
                    m = torch.zeros_like(v)
                state = new.state[p]
                device = p.device if group["capturable"] else torch.device("cpu")
                state["step"] = torch.tensor(t, dtype=torch.float32, device=device)
                for key, value in (("exp_avg", m), ("exp_avg_sq", v)):
                    buf = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    view_as_real_if_complex(buf)[0].copy_(value)
                    state[key] = buf
        return new

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
                state_dtype = _fused.state_dtype_for(p, group["state_dtype"])
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


def _default_foreach(params: list[Tensor], differentiable: bool) -> bool:
    """The multi-tensor path on CUDA (fewer kernel launches), the for-loop path elsewhere.

    On CPU (when the fused kernel cannot be built) the for-loop path is the faster of the two
    on real model shapes (``adoptim bench``, 2 cores: 2.8x vs 5.2x fused Adam's step time on
    20 x 1M, 3.4x vs 5.5x on GPT-2 small's shapes): it walks each tensor while it is in cache,
    where the foreach ops make one full pass over all tensors per operation. Only thousands of
    tiny tensors favour foreach (3.0x vs 3.8x on 2,000 x 1k).
    """
    if differentiable or is_compiling():
        return False
    return all(p.device.type == "cuda" for p in params)


def adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    has_complex: bool = False,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    clip_exp: float | None,
    clip_fn: Callable | None = None,
    weight_decay: float,
    decouple: bool,
    maximize: bool,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    stochastic_rounding: bool = False,
) -> None:
    """Functional ADOPT: update ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps``
    in place. See :class:`ADOPT` for the algorithm and the arguments.

    ``grad_scale``/``found_inf`` are a GradScaler's: gradients are divided by ``grad_scale``,
    and if ``found_inf`` is nonzero nothing changes, step counts included (one host read).
    Moments wider than their parameter (float32 state for bfloat16) make the update run in
    float32 and round the parameter once (``stochastic_rounding`` for bfloat16).
    """
    if found_inf is not None and found_inf.item() != 0:
        return
    if fused is True:  # asked for: a failed kernel build raises instead of falling back
        run = functools.partial(_fused.fused_adopt, strict=True)
    elif fused is None and foreach is None and _fused.default_to_fused(params, differentiable):
        run = _fused.fused_adopt
    else:
        if foreach is None:
            foreach = _default_foreach(params, differentiable)
        func = _multi_tensor_adopt if foreach else _single_tensor_adopt
        run = functools.partial(_fused.run_unfused, func)
    run(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        # Host-side scalars are cheapest; tensors keep compiled and captured steps sync-free.
        scalars_as_tensors=capturable or differentiable or is_compiling(),
        has_complex=has_complex,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        clip_exp=clip_exp,
        clip_fn=clip_fn,
        weight_decay=weight_decay,
        decouple=decouple,
        maximize=maximize,
        grad_scale=grad_scale,
        stochastic_rounding=stochastic_rounding,
    )


def _call_scalars(
    steps: list[Tensor],
    *,
    as_tensors: bool,
    lr: float | Tensor,
    beta2: float,
    weight_decay: float,
    clip_exp: float | None,
    clip_fn: Callable | None,
) -> tuple[list, list, list]:
    """Per-tensor scalars for this call from each tensor's count of earlier calls ``s``.

    Returns three lists (Python floats, or 0-dim tensors when ``as_tensors``):
      * the clip bound: ``s ** clip_exp`` (or ``clip_fn(s)``, or inf without clipping) for
        s >= 1, and 0 on the first call, which zeroes n so neither m nor theta moves;
      * the weight w of ``g*g`` in ``v = beta2*v + w*g*g``: ``1 - beta2``, or 1 on the first
        call, where v is still 0 and becomes ``g*g``;
      * the decoupled-decay factor ``1 - lr * weight_decay``, or 1 on the first call.

    They are computed in float64 (float32 on MPS, which has no float64) and rounded once
    where an op meets the tensor: ``1 - beta2`` formed in float32 would be 1.7e-4 off.
    """
    dtype = torch.float32 if steps[0].device.type == "mps" else torch.float64
    s = torch.stack(steps) if as_tensors else torch.tensor([t.item() for t in steps])
    s = s.to(dtype)
    first = s == 0
    started = (~first).to(dtype)
    if clip_exp is not None:
        bound = torch.where(first, 0.0, s.pow(clip_exp))
    elif clip_fn is not None and as_tensors:
        bound = torch.where(first, 0.0, clip_fn(s.clamp(min=1)))
    elif clip_fn is not None:  # a user's callable may expect a Python number, as in torch-adopt
        bound = torch.tensor([clip_fn(t) if t > 0 else 0.0 for t in s.tolist()], dtype=dtype)
    else:
        bound = torch.where(first, 0.0, math.inf)
    sq_weight = 1 - started * beta2
    decay = 1 - started * (lr * weight_decay)
    if as_tensors:
        return list(bound.unbind()), list(sq_weight.unbind()), list(decay.unbind())
    return bound.tolist(), sq_weight.tolist(), decay.tolist()


def _single_tensor_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    scalars_as_tensors: bool,
    has_complex: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    clip_exp: float | None,
    clip_fn: Callable | None,
    weight_decay: float,
    decouple: bool,
    maximize: bool,
) -> None:
    if isinstance(lr, Tensor) and not scalars_as_tensors:
        lr = lr.item()
    scalar_kw = dict(
        as_tensors=scalars_as_tensors,
        lr=lr,
        beta2=beta2,
        weight_decay=weight_decay if decouple else 0.0,
        clip_exp=clip_exp,
        clip_fn=clip_fn,
    )
    if not scalars_as_tensors:  # one host-side computation for the whole group
        bounds, sq_weights, decays = _call_scalars(state_steps, **scalar_kw)

    # A tensor weight_decay (differentiable mode) is always applied: no branch on its value.
    has_decay = isinstance(weight_decay, Tensor) or weight_decay != 0
    tracking = torch.is_grad_enabled()  # autograd records the update (differentiable=True)
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq, step_t = grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        if scalars_as_tensors:
            (bound,), (sq_weight,), (decay,) = _call_scalars([step_t], **scalar_kw)
        else:
            bound, sq_weight, decay = bounds[i], sq_weights[i], decays[i]

        if maximize:
            grad = -grad
        if has_decay and not decouple:  # coupled (L2): enters v too
            if isinstance(weight_decay, Tensor):  # alpha must be a number
                grad = grad.addcmul(param.clone() if tracking else param, weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        param, grad, exp_avg, exp_avg_sq = view_as_real_if_complex(
            param, grad, exp_avg, exp_avg_sq
        )

        if has_decay and decouple:
            param.mul_(decay)
        denom = exp_avg_sq.sqrt()
        # Under autograd, sqrt's backward needs its output and addcmul's needs m as they are
        # now: update copies instead of the tensors autograd saved.
        denom = denom.clamp(min=eps) if tracking else denom.clamp_(min=eps)
        normed = grad / denom  # n = g / max(sqrt(v), eps)
        normed.clamp_(-bound, bound)  # n = clip(n, c_t)
        exp_avg.lerp_(normed, 1 - beta1)  # m = beta1*m + (1-beta1)*n
        if isinstance(lr, Tensor):
            param.addcmul_(exp_avg.clone() if tracking else exp_avg, lr, value=-1)
        else:  # theta = theta - lr*m
            param.add_(exp_avg, alpha=-lr)
        # v = beta2*v + (1-beta2)*g*g; on the first call v is 0 and the weight is 1
        if isinstance(sq_weight, Tensor):  # addcmul's value must be a number
            exp_avg_sq.mul_(beta2).addcmul_(grad * sq_weight, grad)
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=sq_weight)
        step_t += 1


def _multi_tensor_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    scalars_as_tensors: bool,
    has_complex: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    clip_exp: float | None,
    clip_fn: Callable | None,
    weight_decay: float,
    decouple: bool,
    maximize: bool,
) -> None:
    if isinstance(lr, Tensor) and not scalars_as_tensors:
        lr = lr.item()
    buckets = group_by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    for b_params, b_grads, b_exp_avgs, b_exp_avg_sqs, b_steps in buckets.values():
        # Each tensor gets its own scalars from its own step count: tensors that started
        # late, or were frozen for a while, share a bucket with the others.
        bounds, sq_weights, decays = _call_scalars(
            b_steps,
            as_tensors=scalars_as_tensors,
            lr=lr,
            beta2=beta2,
            weight_decay=weight_decay if decouple else 0.0,
            clip_exp=clip_exp,
            clip_fn=clip_fn,
        )
        if maximize:
            b_grads = torch._foreach_neg(b_grads)
        if weight_decay != 0 and not decouple:
            b_grads = torch._foreach_add(b_grads, b_params, alpha=weight_decay)
        if has_complex:
            b_params, b_grads, b_exp_avgs, b_exp_avg_sqs = (
                [view_as_real_if_complex(t)[0] for t in tensors]
                for tensors in (b_params, b_grads, b_exp_avgs, b_exp_avg_sqs)
            )

        if weight_decay != 0 and decouple:
            torch._foreach_mul_(b_params, decays)
        denom = torch._foreach_sqrt(b_exp_avg_sqs)
        torch._foreach_clamp_min_(denom, eps)
        normed = torch._foreach_div(b_grads, denom)  # n = g / max(sqrt(v), eps)
        del denom
        torch._foreach_clamp_min_(normed, [-b for b in bounds])  # n = clip(n, c_t)
        torch._foreach_clamp_max_(normed, bounds)
        torch._foreach_lerp_(b_exp_avgs, normed, 1 - beta1)  # m = beta1*m + (1-beta1)*n
        del normed
        if isinstance(lr, Tensor):  # theta = theta - lr*m
            torch._foreach_sub_(b_params, torch._foreach_mul(b_exp_avgs, lr))
        else:
            torch._foreach_add_(b_params, b_exp_avgs, alpha=-lr)
        # v = beta2*v + (1-beta2)*g*g; on the first call v is 0 and the weight is 1
        torch._foreach_mul_(b_exp_avg_sqs, beta2)
        if scalars_as_tensors:  # addcmul's per-tensor scalars must be numbers
            torch._foreach_addcmul_(b_exp_avg_sqs, torch._foreach_mul(b_grads, sq_weights), b_grads)
        else:
            torch._foreach_addcmul_(b_exp_avg_sqs, b_grads, b_grads, sq_weights)
        torch._foreach_add_(b_steps, 1)
