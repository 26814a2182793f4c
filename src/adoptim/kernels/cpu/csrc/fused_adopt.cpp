// Single-pass ADOPT step for CPU tensors (adoptim's fused=True path).
//
// One op, adoptim::fused_adopt_, updates a list of parameters and their two moment buffers in
// one read and one write of each element: 4 loads (theta, g, m, v) and 3 stores (theta, m, v),
// the 28 bytes/param that the benchmark counts (caution=True adds a counting pass that reads
// them once more). The per-tensor scalars (clip bound, weight of g*g in v, decoupled-decay
// factor) come from Python, computed by the same code as the other paths
// (adoptim.schedule.call_scalars), so the schedule lives in one place. The update follows
// the for-loop path's operations in its order, so that the two agree to float32 rounding.
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
#include <atomic>
#include <initializer_list>
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
  bool nesterov, caution;
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

// One element of the ADOPT update, shared by the update pass and caution's counting pass so
// that both see the same u. P: parameter/gradient type, S: state type, C: compute type (float,
// or double for double parameters).
//
// It has no branches, so that the loops around it vectorise: the choices that are the same
// for every element (coupled decay on or off; which of lerp's two formulas applies to the
// weight 1 - beta1; nesterov; caution) are template parameters (GCC does not if-convert a
// select on a runtime flag here), and max/min/clamp are selects written as `x < lo ? lo : x` so that a NaN passes through, as
// torch.clamp lets it.
template <typename C>
struct Scalars {
  C lr, w1, one_minus_w1, beta2, eps, wd, gmul, bound, neg_bound, sq_weight, decay;
};

template <typename C>
struct Element {
  C grad, theta, m, v, u;  // theta after decoupled decay, before the step; u the update
};

template <typename C, bool kSmallWeight>
inline C lerp(C a, C b, const Scalars<C>& s) {  // torch.lerp(a, b, w1)'s formula on CPU
  return kSmallWeight ? a + s.w1 * (b - a) : b - (b - a) * s.one_minus_w1;
}

template <typename P, typename S, typename C, bool kCoupled, bool kSmallWeight, bool kNesterov>
inline Element<C> adopt_element(P p, P g, S m, S v, const Scalars<C>& s) {
  Element<C> e;
  e.grad = static_cast<C>(g) * s.gmul;  // unscale (GradScaler) and sign (maximize)
  e.theta = static_cast<C>(p);
  if constexpr (kCoupled) {
    e.grad = e.grad + s.wd * e.theta;  // coupled (L2) decay, enters v as well
  }
  e.theta = e.theta * s.decay;  // decoupled decay; exactly 1 when off or on the first call
  const C vi = static_cast<C>(v);
  C denom = std::sqrt(vi);
  denom = denom < s.eps ? s.eps : denom;  // max(sqrt(v), eps), NaN propagates
  C normed = e.grad / denom;
  normed = normed < s.neg_bound ? s.neg_bound : normed;  // clip to [-c_t, c_t]; 0 on call 1
  normed = normed > s.bound ? s.bound : normed;
  // m = beta1*m + (1-beta1)*n with torch.lerp's formula, as the other paths use lerp_
  e.m = lerp<C, kSmallWeight>(static_cast<C>(m), normed, s);
  // u = m, or with nesterov u = beta1*m + (1-beta1)*n (the other paths' m.lerp(n, 1-beta1))
  if constexpr (kNesterov) {
    e.u = lerp<C, kSmallWeight>(e.m, normed, s);
  } else {
    e.u = e.m;
  }
  // v = beta2*v + w*g*g, w = 1 - beta2 (1 on the first call, where v is 0); the order of
  // the other paths' mul_(beta2).addcmul_(g, g, value=w)
  e.v = vi * s.beta2 + s.sq_weight * e.grad * e.grad;
  return e;
}

// The update pass on n contiguous elements. `first_index` numbers elements across the whole
// call (for stochastic rounding). With caution (`cautious`), u is masked where its sign
// disagrees with g and divided by the tensor's kept fraction `kept` (clamped at 1e-3),
// as the other paths' (u * mask).div_(mask.mean().clamp_(min=1e-3)).
template <typename P, typename S, typename C, bool kCoupled, bool kSmallWeight, bool kNesterov,
          bool kCaution>
void update_range(P* __restrict p, const P* __restrict g, S* __restrict m, S* __restrict v,
                  int64_t n, const Hyper& h, const Scalars<C>& s, C kept, uint64_t first_index) {
  for (int64_t i = 0; i < n; ++i) {
    const Element<C> e =
        adopt_element<P, S, C, kCoupled, kSmallWeight, kNesterov>(p[i], g[i], m[i], v[i], s);
    C u = e.u;
    if constexpr (kCaution) {
      const C mask = e.u * e.grad > C(0) ? C(1) : C(0);
      u = (e.u * mask) / kept;
    }
    m[i] = static_cast<S>(e.m);
    v[i] = static_cast<S>(e.v);
    p[i] = round_param<P, C>(e.theta - s.lr * u, h, first_index + static_cast<uint64_t>(i));
  }
}

// Caution's counting pass: how many of the n elements have u * g > 0 (nothing is written).
template <typename P, typename S, typename C, bool kCoupled, bool kSmallWeight, bool kNesterov>
int64_t count_range(const P* __restrict p, const P* __restrict g, const S* __restrict m,
                    const S* __restrict v, int64_t n, const Scalars<C>& s) {
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Element<C> e =
        adopt_element<P, S, C, kCoupled, kSmallWeight, kNesterov>(p[i], g[i], m[i], v[i], s);
    kept += e.u * e.grad > C(0) ? 1 : 0;
  }
  return kept;
}

template <typename C>
Scalars<C> make_scalars(const Hyper& h, double bound, double sq_weight, double decay) {
  Scalars<C> s;
  s.lr = static_cast<C>(h.lr);
  s.w1 = static_cast<C>(h.beta1_weight);
  s.one_minus_w1 = C(1) - s.w1;
  s.beta2 = static_cast<C>(h.beta2);
  s.eps = static_cast<C>(h.eps);
  s.wd = static_cast<C>(h.coupled_wd);
  s.gmul = static_cast<C>(h.grad_mul);
  s.bound = static_cast<C>(bound);
  s.neg_bound = -s.bound;
  s.sq_weight = static_cast<C>(sq_weight);
  s.decay = static_cast<C>(decay);
  return s;
}

// The tensors of one call, as flat element ranges of their concatenation.
template <typename P, typename S, typename C>
struct Batch {
  int64_t count = 0;
  std::vector<int64_t> offsets;  // element offsets of each tensor in the concatenation
  std::vector<P*> p;
  std::vector<const P*> g;
  std::vector<S*> m, v;
  std::vector<Scalars<C>> sc;

  // Calls body(k, lo, hi, pos) for each piece [lo, hi) of tensor k, in parallel: the work is
  // split over the concatenation, so thousands of small tensors cost one parallel region.
  // pos is the piece's first index in the concatenation.
  template <typename Body>
  void for_pieces(const Body& body) const {
    // About 128K elements (~3.5 MB of traffic) per task: enough to amortise the scheduling,
    // small enough that two threads share medium tensors.
    constexpr int64_t grain = 1 << 17;
    at::parallel_for(0, offsets[count], grain, [&](int64_t begin, int64_t end) {
      int64_t k = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
      for (int64_t pos = begin; pos < end; ++k) {
        const int64_t lo = pos - offsets[k];
        const int64_t hi = std::min(end, offsets[k + 1]) - offsets[k];
        if (hi > lo) {
          body(k, lo, hi, pos);
        }
        pos = offsets[k] + hi;
      }
    });
  }
};

template <typename P, typename S, typename C, bool kCoupled, bool kSmallWeight, bool kNesterov,
          bool kCaution>
void run_passes(const Batch<P, S, C>& b, const Hyper& h) {
  // Caution needs each tensor's fraction of kept coordinates before any is updated: a first
  // pass counts them (reading g, m, v and theta once more; caution is opt-in).
  std::vector<C> kept(b.count, C(1));
  if constexpr (kCaution) {
    std::vector<std::atomic<int64_t>> counts(b.count);
    for (auto& n : counts) {
      n.store(0, std::memory_order_relaxed);
    }
    b.for_pieces([&](int64_t k, int64_t lo, int64_t hi, int64_t) {
      counts[k].fetch_add(count_range<P, S, C, kCoupled, kSmallWeight, kNesterov>(
                              b.p[k] + lo, b.g[k] + lo, b.m[k] + lo, b.v[k] + lo, hi - lo, b.sc[k]),
                          std::memory_order_relaxed);
    });
    for (int64_t k = 0; k < b.count; ++k) {  // mask.mean().clamp_(min=1e-3), in C like torch
      const int64_t numel = b.offsets[k + 1] - b.offsets[k];
      const C mean = static_cast<C>(counts[k].load()) / static_cast<C>(numel);
      kept[k] = mean < C(1e-3) ? C(1e-3) : mean;
    }
  }
  b.for_pieces([&](int64_t k, int64_t lo, int64_t hi, int64_t pos) {
    update_range<P, S, C, kCoupled, kSmallWeight, kNesterov, kCaution>(
        b.p[k] + lo, b.g[k] + lo, b.m[k] + lo, b.v[k] + lo, hi - lo, h, b.sc[k], kept[k],
        static_cast<uint64_t>(pos));
  });
}

// run_passes with the run-time flags turned into template choices, one at a time.
template <typename P, typename S, typename C, bool... kFlags>
void dispatch(const Batch<P, S, C>& b, const Hyper& h, std::initializer_list<bool> flags) {
  if constexpr (sizeof...(kFlags) == 4) {
    run_passes<P, S, C, kFlags...>(b, h);
  } else {
    const bool next = *(flags.begin() + sizeof...(kFlags));
    if (next) {
      dispatch<P, S, C, kFlags..., true>(b, h, flags);
    } else {
      dispatch<P, S, C, kFlags..., false>(b, h, flags);
    }
  }
}

template <typename P, typename S, typename C>
void run(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
         at::TensorList exp_avg_sqs, const double* scalars, const Hyper& h) {
  Batch<P, S, C> b;
  b.count = static_cast<int64_t>(params.size());
  b.offsets.assign(b.count + 1, 0);
  b.p.resize(b.count);
  b.g.resize(b.count);
  b.m.resize(b.count);
  b.v.resize(b.count);
  b.sc.resize(b.count);
  for (int64_t k = 0; k < b.count; ++k) {
    b.offsets[k + 1] = b.offsets[k] + params[k].numel();
    b.p[k] = params[k].data_ptr<P>();
    b.g[k] = grads[k].data_ptr<P>();
    b.m[k] = exp_avgs[k].data_ptr<S>();
    b.v[k] = exp_avg_sqs[k].data_ptr<S>();
    b.sc[k] = make_scalars<C>(h, scalars[k], scalars[b.count + k], scalars[2 * b.count + k]);
  }
  // The loop-invariant template choices, made once per call.
  const bool small_weight = static_cast<C>(h.beta1_weight) < C(0.5);
  dispatch<P, S, C>(b, h, {h.coupled, small_weight, h.nesterov, h.caution});
}

void fused_adopt_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& scalars,
                  double lr, double beta1,
                  double beta2, double eps, double weight_decay, bool coupled, bool maximize,
                  double grad_scale, bool stochastic, int64_t seed, bool nesterov,
                  bool caution) {
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
  h.nesterov = nesterov;
  h.caution = caution;
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
      "bool stochastic, int seed, bool nesterov, bool caution) -> ()");
}

TORCH_LIBRARY_IMPL(adoptim, CPU, m) { m.impl("fused_adopt_", &fused_adopt_); }
