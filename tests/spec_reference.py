"""The update's arithmetic written out from its specification, one IEEE operation at a time,
for float moments: what every path must compute bit for bit (tests/test_same_bits.py).

Compute type C = float32 (float32/bfloat16/float16/complex64 parameters) or float64
(float64/complex128); every host scalar is rounded once to C; only single-rounding ops
(``*``, ``+``, ``-``, ``/`` on tensors, a correctly rounded sqrt through float64 for
float32); no lerp/addcmul/add(alpha), whose CPU kernels may contract into an fma.
Independent of adoptim's own update code on purpose.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from adoptim import rng
from adoptim.formats import blockwise8
from adoptim.formats.params import stochastic_round_bf16


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded sqrt. torch's CPU sqrt is not (AVX2 build, measured here: 17 % of
    random float32 and 1.2 % of random float64 inputs differ from the IEEE result); numpy's is
    (the hardware's sqrtps/sqrtpd)."""
    return torch.from_numpy(np.sqrt(x.detach().cpu().numpy())).to(x.device)


def _scalars(step: float, *, lr, beta2, weight_decay, decouple, clip_exp, clip_fn):
    first = step == 0
    if clip_exp is not None:
        bound = 0.0 if first else math.pow(float(step), clip_exp)
    elif clip_fn is not None:
        bound = 0.0 if first else float(clip_fn(float(step)))
    else:
        bound = 0.0 if first else math.inf
    sq_weight = 1.0 if first else 1.0 - beta2
    decay = 1.0 if first or not decouple else 1.0 - lr * weight_decay
    return bound, sq_weight, decay


def spec_step(params, grads, ms, vs, steps, *, lr, beta1, beta2, eps, clip_exp=0.25,
              clip_fn=None, weight_decay=0.0, decouple=False, maximize=False, nesterov=False,
              caution=False, grad_scale=None, stochastic=False, seed=0, keys=None):  # fmt: skip
    """One step on lists of tensors (in place), float moments."""
    lr = float(lr)
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, ms, vs, steps)):
        real = torch.view_as_real if p.is_complex() else (lambda t: t)
        pr, gr, mr, vr = real(p), real(g), real(m), real(v)
        c = torch.float64 if pr.dtype == torch.float64 else torch.float32

        def k(x, c=c):
            return torch.tensor(float(x), dtype=c)

        count = float(s)
        bound, sq_weight, decay = _scalars(
            count, lr=lr, beta2=beta2, weight_decay=weight_decay, decouple=decouple,
            clip_exp=clip_exp, clip_fn=clip_fn,
        )  # fmt: skip
        x = gr.to(c)
        if grad_scale is not None:
            x = x / k(float(grad_scale))
        if maximize:
            x = -x
        theta = pr.to(c)
        if weight_decay != 0 and not decouple:
            x = x + theta * k(weight_decay)
        theta = theta * k(decay)
        d = _sqrt(vr.to(c))
        d = torch.where(d < k(eps), k(eps), d)
        n = x / d
        b = k(bound)
        n = torch.where(n < -b, -b, n)
        n = torch.where(n > b, b, n)
        w1 = k(1.0 - beta1)
        m_new = mr.to(c) * k(beta1) + n * w1
        u = m_new * k(beta1) + n * w1 if nesterov else m_new
        if caution:
            mask = (u * x > 0).to(c)
            kept = k(int(mask.sum(dtype=torch.int64))) / k(mask.numel())
            kept = torch.where(kept < 1e-3, k(1e-3), kept)
            u = (u * mask) / kept
        theta = theta - k(lr) * u
        v_new = vr.to(c) * k(beta2) + (x * x) * k(sq_weight)
        if stochastic and pr.dtype == torch.bfloat16:
            key = i if keys is None else keys[i]
            step_seed = rng.step_seed(rng.tensor_seed(seed, key), count)
            pr.copy_(stochastic_round_bf16(theta, step_seed))
        else:
            pr.copy_(theta)
        mr.copy_(m_new)
        vr.copy_(v_new)
        s += 1


def spec_step_8bit(params, grads, m_codes, m_scales, v_codes, v_scales, steps, *,
                   stochastic=False, seed=0, keys=None, **kwargs):  # fmt: skip
    """One step with 8-bit moments (blockwise8's format): dequantize, :func:`spec_step` on
    float32 copies, requantize with the step's seed, store the parameter (rounded to nearest,
    or stochastically for bfloat16 with the same seed's parameter stream)."""
    for i, p in enumerate(params):
        real = torch.view_as_real(p) if p.is_complex() else p
        g = torch.view_as_real(grads[i]) if grads[i].is_complex() else grads[i]
        key = i if keys is None else keys[i]
        step_seed = rng.step_seed(rng.tensor_seed(seed, key), float(steps[i]))
        wp = real.reshape(-1).float()
        wg = g.reshape(-1).float()
        wm = blockwise8.dequantize_m(m_codes[i], m_scales[i])
        wv = blockwise8.dequantize_v(v_codes[i], v_scales[i])
        spec_step([wp], [wg], [wm], [wv], [steps[i]], **kwargs)
        blockwise8.quantize_m(wm, step_seed, m_codes[i], m_scales[i])
        blockwise8.quantize_v(wv, step_seed, v_codes[i], v_scales[i])
        if stochastic and real.dtype == torch.bfloat16:
            wp = stochastic_round_bf16(wp, step_seed)
        real.copy_(wp.view(real.shape))
