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

from adoptim import rng as _rng
from adoptim.convert import from_adam
from adoptim.formats import master as _master
from adoptim.formats import state as _state
from adoptim.functional import adopt
from adoptim.kernels.cpu import build as _kernel_cache
from adoptim.kernels.cpu import launch as _cpu_kernel
from adoptim.kernels.triton import launch as _triton_kernel
from adoptim.schedule import DEFAULT_CLIP, ClipSpec, PowerClip, split_clip

__all__ = ["ADOPT", "ADOPTW", "PowerClip", "adopt"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
# Param-group flags that choose how the step runs rather than what it computes.
_PATH_FLAGS = ("foreach", "fused", "capturable", "differentiable")
# Param-group options that choose the format of the moments (loading converts between them).
_FORMAT_FLAGS = ("state_dtype", "min_8bit_size", "master_weight_bits")


def _check_range(
    name: str, value: Any, low: float, high: float | None = None, *, short: str | None = None
) -> None:
    """Raise ValueError unless ``low <= value`` (and ``value < high`` when high is given).

    Messages read like torch's ("Invalid learning rate: ...", "Tensor lr must be 1-element")
    so that code matching torch's messages keeps working. A tensor must have one element; any
    shape (``[]``, ``[1]``, ``[1, 1]``) is accepted and used as a scalar.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Tensor {short or name} must be 1-element: {name} must be a number or a "
                f"tensor with one element (of any shape), got shape {tuple(value.shape)}"
            )
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected a number, got {type(value).__name__}")
    ok = low <= value and (high is None or value < high)
    if not ok:
        accepted = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"Invalid {name}: {value} (accepted: {accepted})")


def _check_betas(betas: Any) -> None:
    """betas must be a pair (beta1, beta2) of numbers (or one-element tensors) in [0, 1)."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)):
        raise TypeError(
            f"Invalid betas: expected a pair (beta1, beta2) such as (0.9, 0.9999), got "
            f"{betas!r}"
        )
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    _check_range("beta parameter at index 0", betas[0], 0.0, 1.0, short="beta1")
    _check_range("beta parameter at index 1", betas[1], 0.0, 1.0, short="beta2")


def _callable_name(fn: Callable | None) -> str | None:
    if fn is None:
        return None
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else name


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
    tensor), ``exp_avg`` (m) and ``exp_avg_sq`` (v); with ``state_dtype="8bit"`` the last two
    hold flat int8/uint8 codes and ``exp_avg_scale``/``exp_avg_sq_scale`` their block scales
    (read the moments with :meth:`moments`).

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
            turns clipping off; any other callable ``step -> bound`` works as in torch-adopt.
            A callable's code cannot be saved: ``state_dict()`` records only its name (the
            group's ``clip_custom``), and ``load_state_dict`` refuses such a checkpoint in an
            optimizer built without a callable (it would run unclipped); build the optimizer
            with the same ``clip_lambda`` again, then load. It is called with the step as a
            Python number, or as a tensor under ``torch.compile``/``capturable``/
            ``differentiable``.
        weight_decay: the weight-decay coefficient, at least 0 (default 0).
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
            computes the update in float32 and rounds the parameter once. ``"8bit"`` keeps m
            and v as 8-bit codes with one float32 scale per block of 256 elements (2.03
            bytes per element instead of 8; Dettmers et al. 2021) for float32, bfloat16,
            float16 and complex64 tensors with at least ``min_8bit_size`` elements; the
            others keep ``"auto"``'s state. The update runs in float32 and the moments are
            requantized with unbiased stochastic rounding; format, measurements and speed:
            ``docs/lowbit.md``. Use :meth:`moments` to read them as float32.
        stochastic_rounding: round bfloat16 parameters stochastically when writing them back
            from a float32 update (unbiased, so updates below half an ulp are not lost).
        nesterov: apply ``u = beta1 * m + (1 - beta1) * n`` (with the new ``m``) instead of
            ``m``: Nesterov-style momentum on the normalised gradient, as optax's ``adopt``
            offers with ``nesterov=True``. The stored ``m`` is unchanged by it.
        caution: the cautious update of Liang et al. 2024 ("Cautious Optimizers: Improving
            Training with One Line of Code", arXiv 2411.16085): zero the coordinates of the
            update ``u`` whose sign disagrees with the gradient, and rescale the rest by the
            fraction kept, ``u = u * mask / max(mean(mask), 1e-3)`` with ``mask = [u * g > 0]``
            over each tensor (as timm's and pytorch_optimizer's ADOPT do). The stored ``m``
            is unchanged by it. With both, the mask applies to the Nesterov update.
        min_8bit_size: with ``state_dtype="8bit"``, tensors with fewer (real) elements keep
            float32 state (default 4096, the threshold bitsandbytes and torchao use: small
            tensors hold little memory, and biases and norms are the most sensitive).
        master_weight_bits: ``None`` (default): bfloat16/float16 parameters are rounded
            after every step, and updates under half an ulp are lost. ``24``: each
            bfloat16/float16 element keeps an 8-bit correction (state ``master_correction``,
            int8, shaped like it) so that the update runs on a 24-bit master weight and the
            parameter the model sees is always its nearest bf16 (rounded stochastically on
            the 24-bit grid: unbiased). ``32``: a 16-bit correction, float32 master weights
            (for bf16 exactly a float32-parameter run's). Float32/float64/complex
            parameters ignore it. Format and measurements: :mod:`adoptim.formats.master`,
            ``docs/memory.md``; float32 weights out and in:
            :meth:`get_fp32_model_state_dict`, :meth:`set_fp32_model_state_dict`. Works
            with every ``state_dtype``, on every CPU path (the fused C++ kernel, the default
            on CPU, joins and splits the master weight in registers for bfloat16 parameters;
            float16 ones with a correction run the for-loop path) and with FSDP2 (bf16
            DTensor parameters, e.g. ``model.to(torch.bfloat16)`` before ``fully_shard``:
            each rank corrects its local shard, the correction a DTensor sharded like it).
            On CUDA/ROCm ``fused=True`` runs the Triton kernel, which does the same for
            bfloat16 parameters (verified under Triton's interpreter). Not with
            ``stochastic_rounding``, ``capturable`` or ``differentiable``. A numerics check warns once (an
            :class:`~adoptim.formats.master.UpdateStallWarning`) when most updates of a
            bf16/fp16 tensor leave it unchanged.

        seed: the seed of the step's random numbers (stochastic rounding, the 8-bit codes'
            rounding), an integer in [0, 2**63). They are counter-based (a hash of the seed,
            the parameter's index in ``state_dict()``, its step count and the element's
            index; :mod:`adoptim.rng`): every path computes the same bits, a run resumed from
            a checkpoint replays them, and torch's global generator is never drawn from.

    Every path (for-loop, foreach, the C++ and Triton kernels) computes the same bits: each
    operation of the update is rounded once (no fused multiply-add, correctly rounded sqrt),
    and the random numbers are counter-based (``seed``). A NaN or inf gradient without a
    GradScaler (which skips such a step) is not filtered: a NaN reaches its element's
    ``theta``, ``m`` and ``v``; an inf makes its ``v`` inf and its normalised gradient inf
    (clipped to the bound when clipping is on). With 8-bit state a NaN or inf in a block's new
    ``m`` or ``v`` makes that block's scale NaN or inf (a NaN code is stored as 0), so the
    whole block's moments read back as NaN or inf from the next step on; the same on every
    path.

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
        nesterov: bool = False,
        caution: bool = False,
        min_8bit_size: int = 4096,
        master_weight_bits: int | None = None,
        seed: int = 0,
    ) -> None:
        _check_range("learning rate", lr, 0.0, short="lr")
        _check_range("epsilon value (eps)", eps, 0.0)
        _check_betas(betas)
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
            # The name of a custom clip callable (its code is not saved): loading refuses to
            # run such a checkpoint unclipped in an optimizer that has no callable.
            clip_custom=_callable_name(self.clip_lambda),
            weight_decay=weight_decay,
            decouple=decouple,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            state_dtype=state_dtype,
            stochastic_rounding=bool(stochastic_rounding),
            nesterov=bool(nesterov),
            caution=bool(caution),
            min_8bit_size=_state.check_min_8bit_size(min_8bit_size),
            master_weight_bits=_master.check_master_weight_bits(master_weight_bits),
            seed=_rng.check_seed(seed),
        )
        super().__init__(params, defaults)
        _state.check_8bit_groups(self.param_groups, fused=fused)
        _master.check_groups(self.param_groups, fused=fused)
        self._numerics = _master.NumericsCheck()
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
            group.setdefault("clip_custom", None)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("state_dtype", "auto")
            group.setdefault("stochastic_rounding", False)
            group.setdefault("nesterov", False)
            group.setdefault("caution", False)
            group.setdefault("min_8bit_size", 4096)
            group.setdefault("master_weight_bits", None)
            group.setdefault("seed", 0)
        self.__dict__.setdefault("_numerics", _master.NumericsCheck())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by ADOPT, ADOPTW or torch-adopt's ADOPT.

        A state dict from ``torch.optim.Adam``/``AdamW`` has the same state keys but means
        something else (its v is one step ahead and its m is not normalised); it is refused.

        The state format is this optimizer's (``state_dtype``, ``min_8bit_size``), not the
        checkpoint's: float moments loaded into an 8-bit optimizer are quantized, 8-bit ones
        loaded into a float-state optimizer are dequantized (exactly the values
        :meth:`moments` returns).
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
        self._check_loadable(state_dict)
        kept_format = [{k: g[k] for k in _FORMAT_FLAGS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flags in zip(self.param_groups, kept_format):
            group.update(flags)  # this optimizer's state format: 8-bit <-> float converts
        _state.restore_state_dtypes(self, state_dict)  # torch cast float32 moments to bf16
        _master.restore_after_load(self, state_dict)  # and int8/int16 corrections to bf16
        for group, flags in zip(self.param_groups, kept):
            group.update(flags)
            for p in group["params"]:  # `step` on the device only when capturable
                state = self.state.get(p, {})
                if "step" in state:  # a tensor, or a number in older or foreign checkpoints
                    device = _state.step_device(p, group)
                    state["step"] = torch.as_tensor(
                        state["step"], dtype=torch.float32, device=device
                    ).reshape(())

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Refuse a state dict that would fail later or silently change the run: moments of
        another shape (another model), or a custom clip schedule this optimizer lacks."""
        saved_groups = state_dict.get("param_groups", [])
        saved_state = state_dict.get("state", {})
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for pi, (p, pid) in enumerate(zip(group["params"], saved.get("params", []))):
                for key in ("exp_avg", "exp_avg_sq"):
                    value = saved_state.get(pid, {}).get(key)
                    if "exp_avg_scale" in saved_state.get(pid, {}):
                        continue  # 8-bit codes are flat; _state checks their size
                    if isinstance(value, Tensor) and value.shape != p.shape:
                        raise ValueError(
                            f"loaded state dict does not match this optimizer's parameters: "
                            f"group {gi}, parameter {pi} has shape {tuple(p.shape)}, but its "
                            f"saved {key!r} has shape {tuple(value.shape)} (a state dict "
                            "from another model?)"
                        )
            custom = saved.get("clip_custom")
            if custom and saved.get("clip_exp") is None and self.clip_lambda is None:
                raise ValueError(
                    f"loaded state dict was saved with a custom clip schedule "
                    f"(clip_lambda={custom}) in param group {gi}, which a state dict cannot "
                    "hold; this optimizer has none, so it would run unclipped. Build the "
                    "optimizer with the same clip_lambda callable, then load."
                )

    @classmethod
    def from_adam(cls, adam: Optimizer, *, exp_avg: str = "normalized", **overrides: Any):
        r"""Warm-start ADOPT from a ``torch.optim.Adam``/``AdamW`` optimizer (to continue from
        an Adam checkpoint, load it into the Adam optimizer first).

        The new optimizer holds the same parameters and param groups (``lr``,
        ``weight_decay``, ``maximize``; AdamW, or Adam with ``decoupled_weight_decay``, gives
        decoupled decay), with ``overrides`` applied to every group (e.g. ``lr=...``).

        Not carried over, as when switching by hand (the README's advice: keep the learning
        rate, drop Adam's ``betas`` and ``eps``):

        * ``betas``: ADOPT's defaults, ``(0.9, 0.9999)``, are used, not Adam's (typically
          ``(0.9, 0.999)``); pass ``betas=`` to choose. In lr sweeps on six tasks, ADOPT at
          ``beta2 = 0.999`` was worse than at 0.9999 on three and better on none
          (docs/switching-from-adam.md). Adam's ``v`` still carries over: it was averaged with
          Adam's ``beta2`` and is bias-corrected with it (below), which makes it an estimate
          of the recent ``g*g``, a better start than the single ``g_1^2`` a fresh ADOPT
          averages from; ADOPT's longer average continues from there.
        * ``eps``: Adam's is *added* to ``sqrt(v)``, ADOPT's is a floor on it, so ADOPT's
          default (or ``eps=`` in overrides) is used.

        State, per parameter with Adam state after ``t`` Adam steps:

        * ``step = t``: ADOPT has seen ``t`` gradients, so the next call is an update, with
          clip bound ``c_t``.
        * ``exp_avg_sq = v_adam / (1 - beta2_adam^t)``: Adam's ``exp_avg_sq`` is the same EMA of
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
        scales: tuple[list, list] | None = None,
        corrections: list | None = None,
        candidates: Iterable[Tensor] | None = None,
        keys: list[int] | None = None,
    ) -> bool:
        """Collect the tensors that have a gradient on this call, creating state on first
        sight; return whether any of them is complex. ``scales`` collects the block scales
        of 8-bit moments (None for the others), ``corrections`` the master-weight
        corrections (None for tensors without), ``keys`` each tensor's index in the
        state_dict numbering: the key of its random numbers (:mod:`adoptim.rng`), the same
        after save/load and on every rank. ``candidates``: only these parameters of the
        group (default: all of them)."""
        has_complex = False
        index = self._param_index() if keys is not None else {}  # once per group, not per p
        for p in group["params"] if candidates is None else candidates:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "ADOPT does not support sparse gradients; use dense gradients "
                    "(e.g. nn.Embedding(sparse=False))"
                )
            has_complex |= torch.is_complex(p)
            state = self.state[p]
            # (a correction may exist before the first step: set_fp32_model_state_dict)
            if "step" not in state:
                # `step` lives on the host unless capturable, so that reading it costs no
                # device sync (as in torch.optim.Adam).
                step_device = _state.step_device(p, group)
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                state.update(_state.new_state(p, group))  # float or 8-bit moments
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError("`step` must not require grad in differentiable mode")
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
            if keys is not None:
                place = index.get(p) or self._place_of(p, caller="step")
                keys.append(place[1])
            if scales is not None:
                scales[0].append(state.get("exp_avg_scale"))
                scales[1].append(state.get("exp_avg_sq_scale"))
            if corrections is not None:
                if _master.has_correction(p, group) and _master.STATE_KEY not in state:
                    # new, or from a checkpoint without one: the master weight is the param
                    state[_master.STATE_KEY] = _master.new_correction(
                        p, group["master_weight_bits"]
                    )
                corrections.append(state.get(_master.STATE_KEY))
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

        checked = self._numerics.before(self)  # every CHECK_EVERY calls of a bf16 tensor
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            for group in self.param_groups:
                self._step_group(group)
        self._numerics.after(self, checked)
        return loss

    # --- Stepping some of the parameters: step() and step_params() share _step_group -------
    # (gradient release, adoptim.release, steps each parameter as soon as its gradient is
    # final; the per-group body is written once so that both compute the same bits.)

    def _step_group(
        self, group: dict[str, Any], candidates: Iterable[Tensor] | None = None
    ) -> None:
        """The body of :meth:`step` for one param group: step those of ``candidates``
        (default: all of the group's parameters) that have a gradient."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        state_steps: list[Tensor] = []
        scales: tuple[list, list] = ([], [])
        corrections: list = []
        keys: list[int] = []
        has_complex = self._init_group(
            group, params, grads, exp_avgs, exp_avg_sqs, state_steps, scales, corrections,
            candidates, keys,
        )  # fmt: skip
        if not params:
            return
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
            nesterov=group["nesterov"],
            caution=group["caution"],
            exp_avg_scales=scales[0],
            exp_avg_sq_scales=scales[1],
            master_corrections=corrections,
            seed=group["seed"],
            keys=keys,
        )

    def step_params(self, params: Iterable[Tensor]) -> None:
        """Step only ``params`` (each must be in one of this optimizer's param groups), with
        the same state creation and the same functional call as :meth:`step`, at a cost
        proportional to ``len(params)``, not to the number of parameters. Parameters without
        a gradient are skipped, as in :meth:`step`. Step hooks
        (``register_step_pre_hook``/``register_step_post_hook``) do not run: this is one
        piece of a step, used by :func:`adoptim.enable_gradient_release`.
        """
        by_group: dict[int, list[Tensor]] = {}
        for p in params:
            gi, _ = self._place_of(p, caller="step_params")
            by_group.setdefault(gi, []).append(p)
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            for gi, group_params in by_group.items():
                self._step_group(self.param_groups[gi], group_params)

    def _param_index(self, rebuild: bool = False) -> dict[Tensor, tuple[int, int]]:
        """Parameter -> (index of its param group, its index in the state_dict numbering),
        cached; rebuilt when the group list was replaced (load_state_dict) or grew
        (add_param_group), or on request."""
        cached = self.__dict__.get("_param_index_cache")
        groups = self.param_groups
        if rebuild or cached is None or cached[0] is not groups or cached[1] != len(groups):
            params = [(gi, p) for gi, g in enumerate(groups) for p in g["params"]]
            index = {p: (gi, key) for key, (gi, p) in enumerate(params)}
            cached = (groups, len(groups), index)
            self.__dict__["_param_index_cache"] = cached
        return cached[2]

    def _place_of(self, p: Tensor, caller: str) -> tuple[int, int]:
        """(group index, state_dict key) of ``p``, rebuilding the index once if it has moved
        since (a param list changed in place)."""
        place = self._param_index().get(p)
        if place is None:
            place = self._param_index(rebuild=True).get(p)
        if place is None:
            raise ValueError(
                f"{caller}: a parameter of shape {tuple(p.shape)} is in none of this "
                "optimizer's param groups"
            )
        return place

    # --- end of the subset stepping ---------------------------------------------------------

    def get_fp32_model_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """``model.state_dict()`` in float32, for export or evaluation: each parameter with a
        master-weight correction (``master_weight_bits``) as its master weight (bf16 +
        correction), every other floating-point parameter and buffer as a float32 copy,
        integer buffers as they are. New tensors: changing them changes nothing here.
        Under FSDP2 the entries are DTensors sharded like the model's (each rank joins its
        shard, no communication), as ``model.state_dict()`` is: ``.full_tensor()`` gathers
        one, DCP saves them."""
        return _master.fp32_model_state_dict(self, model)

    def set_fp32_model_state_dict(
        self, model: torch.nn.Module, state_dict: dict[str, Tensor], *, strict: bool = True
    ) -> None:
        """Load float32 weights into ``model`` (e.g. bf16): each parameter that takes a
        correction gets the nearest bf16/fp16 of the weight and a correction holding the
        rest (exactly, with ``master_weight_bits=32``; to 24 bits, rounded to nearest even,
        with 24), so that :meth:`get_fp32_model_state_dict` gives the weights back; other
        entries are copied with a cast. Optimizer moments are not touched. ``strict``:
        missing or unexpected keys raise a KeyError, as ``Module.load_state_dict`` does.
        Under FSDP2 an entry is a DTensor placed as the model's (e.g. from
        :meth:`get_fp32_model_state_dict`) or the full tensor, the same on every rank
        (each rank takes its shard of it, no communication)."""
        _master.load_fp32_model_state_dict(self, model, state_dict, strict=strict)

    def moments(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """``(m, v)`` of parameter ``p`` as new float32 tensors shaped like it (complex64 for
        complex parameters), whatever the state format (8-bit codes are dequantized): for
        logging, debugging and conversion. Zeros before ``p``'s first step; writing to them
        does not change the optimizer."""
        return _state.moments(self.state.get(p, {}), p)


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
        nesterov: bool = False,
        caution: bool = False,
        min_8bit_size: int = 4096,
        master_weight_bits: int | None = None,
        seed: int = 0,
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
            nesterov=nesterov,
            caution=caution,
            min_8bit_size=min_8bit_size,
            master_weight_bits=master_weight_bits,
            seed=seed,
        )
