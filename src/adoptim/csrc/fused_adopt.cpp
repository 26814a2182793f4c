// Single-pass ADOPT step for CPU tensors (adoptim's fused=True path).
//
// One op, adoptim::fused_adopt_, updates a list of parameters and their two moment buffers in
// one read and one write of each element: 4 loads (theta, g, m, v) and 3 stores (theta, m, v),
// the 28 bytes/param that the benchmark counts. The per-tensor scalars (clip bound, weight of
// g*g in v, decoupled-decay factor) come from Python, computed by the same code as the other
// paths (adoptim._schedule.call_scalars), so the schedule lives in one place. The update follows the
// for-loop path's operations in its order, so that the two agree to float32 rounding.
//
// Work is split over the *concatenation* of all tensors, not tensor by tensor: one
// at::parallel_for over the total element count, each thread walking the tensors its range
// covers. Models with thousands of small tensors then cost one parallel region per step, not
// one per tensor. at::parallel_for is inline OpenMP, so this file is built with -fopenmp
// (without it the pragma is ignored and everything runs on one thread).
//
// The headers are kept small on purpose (no torch/extension.h, no pybind11, no
// ATen/cpu/vec): building takes a few seconds instead of ~40 s, and the inner loop is plain
// C++ that GCC/Clang vectorise at -O3 (built with -mavx2 -mfma where the CPU has them).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Hyper {
  // Held in double and cast to the compute type where used, as torch casts Python scalars.
  double lr, beta1_weight, beta2, eps, coupled_wd, grad_mul;
  bool coupled;
  bool stochastic;
  uint64_t seed;
};

// Counter-based random bits: the same seed and element index give the same bits however
// the work is split between threads.
inline uint32_t hash_bits(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

template <typename P, typename C>
inline P round_param(C x, const Hyper&, uint64_t) {
  return static_cast<P>(x);  // float/double: plain store; Half: round to nearest even
}

template <>
inline c10::BFloat16 round_param<c10::BFloat16, float>(float x, const Hyper& h, uint64_t index) {
  if (!h.stochastic || std::isnan(x)) {
    return c10::BFloat16(x);  // round to nearest even
  }
  // Stochastic rounding: add uniform random bits below bf16's last mantissa bit and truncate,
  // so E[result] = x and updates smaller than half an ulp still move the parameter on average.
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  uint32_t rounded = bits + (hash_bits(h.seed, index) & 0xFFFFu);
  if ((rounded & 0x7F800000u) == 0x7F800000u && (bits & 0x7F800000u) != 0x7F800000u) {
    rounded = bits;  // would overflow to inf: fall back to truncation toward zero
  }
  return c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
}

// The ADOPT update on n contiguous elements; P: parameter/gradient type, S: state type,
// C: compute type (float, or double for double parameters). `first_index` numbers elements
// across the whole call (for stochastic rounding).
//
// The loop body has no branches, so that the compiler vectorises it: the choices that are
// the same for every element (coupled decay on or off; which of lerp's two formulas applies
// to the weight 1 - beta1) are template parameters, and max/min/clamp are selects. Clamps are
// written as `x < lo ? lo : x` so that a NaN passes through, as torch.clamp lets it.
template <typename P, typename S, typename C, bool kCoupled, bool kSmallWeight>
void update_range(P* __restrict p, const P* __restrict g, S* __restrict m, S* __restrict v,
                  int64_t n, const Hyper& h, C bound, C sq_weight, C decay,
                  uint64_t first_index) {
  const C lr = static_cast<C>(h.lr), w1 = static_cast<C>(h.beta1_weight);
  const C one_minus_w1 = C(1) - w1;
  const C beta2 = static_cast<C>(h.beta2);
  const C eps = static_cast<C>(h.eps), wd = static_cast<C>(h.coupled_wd);
  const C gmul = static_cast<C>(h.grad_mul);
  const C neg_bound = -bound;
  for (int64_t i = 0; i < n; ++i) {
    C grad = static_cast<C>(g[i]) * gmul;  // unscale (GradScaler) and sign (maximize)
    C theta = static_cast<C>(p[i]);
    if constexpr (kCoupled) {
      grad = grad + wd * theta;  // coupled (L2) decay, enters v as well
    }
    theta = theta * decay;  // decoupled decay; exactly 1 when off or on the first call
    C vi = static_cast<C>(v[i]);
    C denom = std::sqrt(vi);
    denom = denom < eps ? eps : denom;  // max(sqrt(v), eps), NaN propagates
    C normed = grad / denom;
    normed = normed < neg_bound ? neg_bound : normed;  // clip to [-c_t, c_t]; c_t = 0 on call 1
    normed = normed > bound ? bound : normed;
    // m = beta1*m + (1-beta1)*n with torch.lerp's formula (CPU), as the other paths use lerp_
    C mi = static_cast<C>(m[i]);
    if constexpr (kSmallWeight) {
      mi = mi + w1 * (normed - mi);
    } else {
      mi = normed - (normed - mi) * one_minus_w1;
    }
    theta = theta - lr * mi;
    // v = beta2*v + w*g*g, w = 1 - beta2 (1 on the first call, where v is 0); the order of
    // the other paths' mul_(beta2).addcmul_(g, g, value=w)
    vi = vi * beta2 + sq_weight * grad * grad;
    m[i] = static_cast<S>(mi);
    v[i] = static_cast<S>(vi);
    p[i] = round_param<P, C>(theta, h, first_index + static_cast<uint64_t>(i));
  }
}

// update_range with its loop-invariant template choices made once per call.
template <typename P, typename S, typename C>
void update_range_dispatch(P* p, const P* g, S* m, S* v, int64_t n, const Hyper& h, C bound,
                           C sq_weight, C decay, uint64_t first_index) {
  const bool small_weight = static_cast<C>(h.beta1_weight) < C(0.5);
  if (h.coupled) {
    if (small_weight) {
      update_range<P, S, C, true, true>(p, g, m, v, n, h, bound, sq_weight, decay, first_index);
    } else {
      update_range<P, S, C, true, false>(p, g, m, v, n, h, bound, sq_weight, decay, first_index);
    }
  } else if (small_weight) {
    update_range<P, S, C, false, true>(p, g, m, v, n, h, bound, sq_weight, decay, first_index);
  } else {
    update_range<P, S, C, false, false>(p, g, m, v, n, h, bound, sq_weight, decay, first_index);
  }
}

template <typename P, typename S, typename C>
void run(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
         at::TensorList exp_avg_sqs, const double* scalars, const Hyper& h) {
  const int64_t count = static_cast<int64_t>(params.size());
  std::vector<int64_t> offsets(count + 1, 0);  // element offsets of each tensor in the concatenation
  std::vector<P*> p_ptr(count);
  std::vector<const P*> g_ptr(count);
  std::vector<S*> m_ptr(count), v_ptr(count);
  for (int64_t k = 0; k < count; ++k) {
    offsets[k + 1] = offsets[k] + params[k].numel();
    p_ptr[k] = params[k].data_ptr<P>();
    g_ptr[k] = grads[k].data_ptr<P>();
    m_ptr[k] = exp_avgs[k].data_ptr<S>();
    v_ptr[k] = exp_avg_sqs[k].data_ptr<S>();
  }
  const int64_t total = offsets[count];
  // About 128K elements (~3.5 MB of traffic) per task: enough to amortise the scheduling,
  // small enough that two threads share medium tensors.
  constexpr int64_t grain = 1 << 17;
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    int64_t k = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (int64_t pos = begin; pos < end; ++k) {
      const int64_t lo = pos - offsets[k];
      const int64_t hi = std::min(end, offsets[k + 1]) - offsets[k];
      if (hi > lo) {
        update_range_dispatch<P, S, C>(
            p_ptr[k] + lo, g_ptr[k] + lo, m_ptr[k] + lo, v_ptr[k] + lo, hi - lo, h,
            static_cast<C>(scalars[k]), static_cast<C>(scalars[count + k]),
            static_cast<C>(scalars[2 * count + k]), static_cast<uint64_t>(pos));
      }
      pos = offsets[k] + hi;
    }
  });
}

void fused_adopt_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& scalars,
                  double lr, double beta1,
                  double beta2, double eps, double weight_decay, bool coupled, bool maximize,
                  double grad_scale, bool stochastic, int64_t seed) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count &&
                  exp_avg_sqs.size() == count && steps.size() == count,
              "fused_adopt_: tensor lists differ in length");
  TORCH_CHECK(scalars.scalar_type() == at::kDouble && scalars.is_contiguous() &&
                  scalars.numel() == static_cast<int64_t>(3 * count),
              "fused_adopt_: scalars must be a contiguous float64 tensor of shape (3, n)");
  if (count == 0) {
    return;
  }
  const auto p_type = params[0].scalar_type();
  const auto s_type = exp_avgs[0].scalar_type();
  for (size_t k = 0; k < count; ++k) {
    TORCH_CHECK(params[k].device().is_cpu() && grads[k].device().is_cpu() &&
                    exp_avgs[k].device().is_cpu() && exp_avg_sqs[k].device().is_cpu(),
                "fused_adopt_: CPU tensors only");
    TORCH_CHECK(params[k].scalar_type() == p_type && grads[k].scalar_type() == p_type,
                "fused_adopt_: parameters and gradients must share one dtype");
    TORCH_CHECK(exp_avgs[k].scalar_type() == s_type && exp_avg_sqs[k].scalar_type() == s_type,
                "fused_adopt_: moment buffers must share one dtype");
    const int64_t n = params[k].numel();
    TORCH_CHECK(grads[k].numel() == n && exp_avgs[k].numel() == n && exp_avg_sqs[k].numel() == n,
                "fused_adopt_: size mismatch at tensor ", k);
    // Elements are walked in memory order, so any dense layout works (channels_last
    // included) as long as all four tensors share it.
    const auto strides = params[k].strides();
    TORCH_CHECK(params[k].is_non_overlapping_and_dense() && grads[k].strides() == strides &&
                    exp_avgs[k].strides() == strides && exp_avg_sqs[k].strides() == strides,
                "fused_adopt_: tensor ", k, " is not dense or its buffers differ in layout");
    TORCH_CHECK(steps[k].device().is_cpu() && steps[k].scalar_type() == at::kFloat &&
                    steps[k].numel() == 1,
                "fused_adopt_: step ", k, " must be a one-element float32 CPU tensor");
  }
  Hyper h;
  h.lr = lr;
  h.beta1_weight = 1.0 - beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.coupled = coupled && weight_decay != 0.0;
  h.coupled_wd = weight_decay;
  h.grad_mul = (maximize ? -1.0 : 1.0) / grad_scale;
  h.stochastic = stochastic;
  h.seed = static_cast<uint64_t>(seed);
  const double* sc = scalars.data_ptr<double>();

  using BF = c10::BFloat16;
  using H = c10::Half;
  if (p_type == at::kFloat && s_type == at::kFloat) {
    run<float, float, float>(params, grads, exp_avgs, exp_avg_sqs, sc, h);
  } else if (p_type == at::kDouble && s_type == at::kDouble) {
    run<double, double, double>(params, grads, exp_avgs, exp_avg_sqs, sc, h);
  } else if (p_type == at::kBFloat16 && s_type == at::kFloat) {
    run<BF, float, float>(params, grads, exp_avgs, exp_avg_sqs, sc, h);
  } else if (p_type == at::kBFloat16 && s_type == at::kBFloat16) {
    run<BF, BF, float>(params, grads, exp_avgs, exp_avg_sqs, sc, h);
  } else if (p_type == at::kHalf && s_type == at::kFloat) {
    run<H, float, float>(params, grads, exp_avgs, exp_avg_sqs, sc, h);
  } else if (p_type == at::kHalf && s_type == at::kHalf) {
    run<H, H, float>(params, grads, exp_avgs, exp_avg_sqs, sc, h);
  } else {
    TORCH_CHECK(false, "fused_adopt_: unsupported dtypes (parameter ", p_type, ", state ",
                s_type, ")");
  }
  // Each tensor's call count, as the other paths' step_t += 1 (a Python loop or a foreach
  // op over thousands of one-element tensors costs more than the update of small ones).
  for (size_t k = 0; k < count; ++k) {
    *steps[k].data_ptr<float>() += 1.0f;
  }
}

}  // namespace

TORCH_LIBRARY(adoptim, m) {
  m.def(
      "fused_adopt_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor scalars, float lr, float beta1, "
      "float beta2, float eps, "
      "float weight_decay, bool coupled, bool maximize, float grad_scale, "
      "bool stochastic, int seed) -> ()");
}

TORCH_LIBRARY_IMPL(adoptim, CPU, m) { m.impl("fused_adopt_", &fused_adopt_); }
