// The fused ADOPT step for CPU tensors (adoptim's fused=True path), for every state format.
//
// Two ops share this file: adoptim::fused_adopt_ (moments stored as floats: float32, or the
// parameter's dtype) and adoptim::fused_adopt_8bit_ (moments stored as block-wise 8-bit
// codes, format: adoptim/formats/blockwise8.py). The per-element update is written once,
// `adopt_element` below; a format supplies only how an element's m and v are loaded and
// stored (FloatFormat: plain loads and stores; Blockwise8: dequantize, and requantize per
// block of 256 with the block's new scales), and how the work is walked.
//
// Arithmetic: the reference's (adoptim/update.py, the for-loop and foreach paths), one IEEE
// operation at a time: every host scalar rounded once to the compute type C (float, or
// double for float64 parameters), no fused multiply-add (this file is built with
// -ffp-contract=off and writes none), IEEE division and correctly rounded sqrt, so every
// path computes the same bits. Per element, in order:
//
//    g = grad / scale (GradScaler) ; g = -g (maximize)
//    g = g + theta * wd              (coupled decay)
//    theta = theta * decay           (decoupled decay; 1 when off and on a tensor's 1st call)
//    d = sqrt(v) ; d = eps where d < eps
//    n = g / d ; n clipped to [-bound, bound]   (bound 0 on the first call, inf: no clip)
//    m = m * beta1 + n * w1          (w1 = 1 - beta1 computed in double)
//    u = m, or with nesterov u = m * beta1 + n * w1 with the new m
//    caution: u = (u * mask) / kept, mask = [u * g > 0], kept = max(count / numel, 1e-3)
//    theta = theta - lr * u
//    v = v * beta2 + (g * g) * sq_weight
//
// max/min/clamp are selects written `x < lo ? lo : x`, so a NaN passes through (as
// torch.clamp lets it), and the loops have no branches, so they vectorise: the choices that
// are the same for every element (coupled decay; whether the gradient is divided by a scale
// or multiplied by +-1 or by a power of two, which is the same value; nesterov; caution) are
// template parameters (GCC does not if-convert a select on a runtime flag here).
//
// Random numbers (bfloat16 stochastic rounding, the 8-bit codes' rounding) are counter-based,
// the rule of adoptim/rng.py: a tensor's seed for a step is a hash of (the user's seed, the
// tensor's key, its call count before the step), and element j's uniform number is
// frac(block_offset(seed, j / 256, stream) + weyl[j % 256]); nothing depends on which tensors
// share a call or how the work is split between threads.
//
// The headers are kept small on purpose (no torch/extension.h, no pybind11, no
// ATen/cpu/vec): building takes seconds, and the inner loops are plain C++ that GCC/Clang
// vectorise at -O3 (-mavx2 -mfma, or AVX-512, where the CPU has them). at::parallel_for is
// inline OpenMP, so this file is built with -fopenmp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// ------------------------------------------------------------------------------------------
// Counter-based random numbers (adoptim/rng.py and adoptim/formats/blockwise8.py)

constexpr int64_t kBlock = 256;
constexpr uint32_t kStreamM = 0, kStreamV = 1, kStreamParam = 2;
// formats/blockwise8.STREAM_MASTER: the parameter's stream (3 would be kStreamM's next block)
constexpr uint32_t kStreamMaster = kStreamParam;

inline uint32_t hash32(uint32_t x) {  // lowbias32 (C. Wellons)
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t f32_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// rng.tensor_seed: the user's seed (64 bits) and the tensor's key, mixed once.
inline uint32_t tensor_seed(uint64_t seed, uint64_t key) {
  uint32_t x = hash32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u);
  x = hash32(x ^ static_cast<uint32_t>(seed >> 32));
  return hash32(x ^ static_cast<uint32_t>(key));
}

// rng.step_seed: a tensor's seed for the step, from its call count before the step.
inline uint32_t step_seed(uint32_t tseed, float count) {
  return hash32(tseed ^ hash32(f32_bits(count) ^ 0x85EBCA6Bu));
}

// One uniform offset in [0, 1) per (seed, block, stream), 24 random bits.
inline float block_offset(uint32_t seed, uint32_t block, uint32_t stream) {
  const uint32_t x = hash32(seed + (3u * block + stream) * 0x9E3779B9u);
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}

// frac(j * phi) for j in a block, phi = (sqrt(5) - 1) / 2, computed in double, rounded once.
struct Weyl {
  float w[kBlock];
  Weyl() {
    const double phi = (std::sqrt(5.0) - 1.0) / 2.0;
    for (int64_t j = 0; j < kBlock; ++j) {
      w[j] = static_cast<float>(std::fmod(static_cast<double>(j) * phi, 1.0));
    }
  }
};
const Weyl kWeyl;

inline float frac_sum(float u0, float w) {  // frac(u0 + w), both in [0, 1)
  const float u = u0 + w;
  return u >= 1.0f ? u - 1.0f : u;
}

// ------------------------------------------------------------------------------------------
// The parameter's store: round to nearest even, or for bfloat16 stochastically

template <typename P, typename C>
inline P round_param(C x, bool, float) {
  return static_cast<P>(x);  // float/double: plain store; Half: round to nearest even
}

// Stochastic rounding: add 16 uniform random bits (from the dither u) below bfloat16's last
// mantissa bit and truncate, so E[result] = x and updates below half an ulp still move the
// parameter on average (formats/blockwise8.py: stochastic_round_bf16).
template <>
inline c10::BFloat16 round_param<c10::BFloat16, float>(float x, bool stochastic, float u) {
  if (!stochastic || std::isnan(x)) {
    return c10::BFloat16(x);  // round to nearest even
  }
  const uint32_t bits = f32_bits(x);
  uint32_t rounded = bits + static_cast<uint32_t>(static_cast<int32_t>(u * 65536.0f));
  if ((rounded & 0x7F800000u) == 0x7F800000u && (bits & 0x7F800000u) != 0x7F800000u) {
    rounded = bits;  // would overflow to inf: truncate toward zero instead
  }
  return c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
}

// ------------------------------------------------------------------------------------------
// The parameter's format: plain (the parameter is the weight: load casts to C, store rounds
// as above), or a bfloat16 parameter plus a master-weight correction K per element
// (adoptim/formats/master.py: int8_t for 24-bit master weights, int16_t for 32-bit). The
// update runs on the float32 master weight join(param, correction) in registers and
// split() stores it back; both are the Python code's integer operations on the float32 bit
// pattern, in uint32 arithmetic where torch's int32 arithmetic wraps (the results are the
// same modulo 2**32), with arithmetic right shifts. float16 parameters with a correction
// take the unfused paths (their correction is a fraction of an fp16 ulp, not bits).

struct NoCorrection {};  // K of a plain parameter

template <typename K>
constexpr bool kCorrected = !std::is_same_v<K, NoCorrection>;

// master.join for bfloat16: q = param_bits * 2**s + c, shifted up into a float32 pattern.
template <typename K>
inline float master_join(c10::BFloat16 param, K corr) {
  constexpr int kS = 8 * static_cast<int>(sizeof(K));
  const int32_t p = static_cast<int16_t>(param.x);  // sign-extended, as view(int16).to(int32)
  const int32_t mag = p & 0x7FFF;
  int32_t c = corr;
  // never made by split (they would wrap into a NaN pattern): read as c = 0
  c = ((mag == 0) & (c < 0)) | ((mag == 0x7F80) & (c > 0)) ? 0 : c;
  const uint32_t bits = (static_cast<uint32_t>(p) << 16) + (static_cast<uint32_t>(c) << (16 - kS));
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// master.split for bfloat16: round the float32 x to the master grid (24 bits: up with
// probability (dropped low byte) / 256, from the dither u of stream kStreamMaster; 32 bits:
// exact), then cut the top bits into the parameter (rounded to nearest, ties away from zero)
// and the signed correction.
template <typename K>
inline void master_split(float x, float u, c10::BFloat16* param, K* corr) {
  constexpr int kS = 8 * static_cast<int>(sizeof(K));
  constexpr int kDrop = 16 - kS;
  const uint32_t bits = f32_bits(x);
  int32_t q;
  if constexpr (kDrop > 0) {
    const uint32_t noise = static_cast<uint32_t>(static_cast<int32_t>(u * 256.0f));
    const int32_t up = static_cast<int32_t>(bits + noise) >> kDrop;
    const int32_t down = static_cast<int32_t>(bits) >> kDrop;
    // next to the largest finite value a round-up could reach inf's pattern: truncate those
    const bool over = ((up & 0x7FFFFF) == 0x7F8000) & ((bits & 0x7F800000u) != 0x7F800000u);
    q = over ? down : up;
  } else {
    q = static_cast<int32_t>(bits);
  }
  const int32_t low = q & ((1 << kS) - 1);
  int32_t c = low - ((low & (1 << (kS - 1))) << 1);  // the low s bits, signed
  int32_t p = static_cast<int32_t>(static_cast<uint32_t>(q) - static_cast<uint32_t>(c)) >> kS;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  p = nan ? 0x7FC0 : p;
  c = nan ? 0 : c;
  *param = c10::BFloat16(static_cast<uint16_t>(p), c10::BFloat16::from_bits());
  *corr = static_cast<K>(c);
}

// The parameter format's load (the weight the update starts from) ...
template <typename P, typename K, typename C>
inline C load_theta(const P* __restrict p, const K* __restrict k, int64_t i) {
  if constexpr (kCorrected<K>) {
    static_assert(std::is_same_v<P, c10::BFloat16> && std::is_same_v<C, float>);
    return master_join<K>(p[i], k[i]);
  } else {
    return static_cast<C>(p[i]);
  }
}

// ... and its store: u_param rounds a plain bfloat16 stochastically, u_master a 24-bit master.
template <typename P, typename K, typename C>
inline void store_theta(P* __restrict p, K* __restrict k, int64_t i, C theta, bool stochastic,
                        float u_param, float u_master) {
  if constexpr (kCorrected<K>) {
    master_split<K>(theta, u_master, &p[i], &k[i]);
  } else {
    p[i] = round_param<P, C>(theta, stochastic, u_param);
  }
}

// ------------------------------------------------------------------------------------------
// The update of one element, written once for every format

// Host scalars of a call, each rounded once to C.
template <typename C>
struct Hyper {
  C lr, beta1, w1, beta2, eps, wd;
  C gscale;  // kDivide: g / gscale (= +-scale); else g * gscale (= +-1/scale, exact)
  bool stochastic;
  uint64_t seed;
};

// Per-tensor scalars (adoptim.schedule.call_scalars, float64 on the host), rounded once.
template <typename C>
struct TensorScalars {
  C bound, neg_bound, sq_weight, decay;
};

template <typename C>
struct Element {
  C g, theta, m, v, u;  // theta after decay, before the step; u before caution
};

template <typename C, bool kCoupled, bool kDivide, bool kNesterov>
inline Element<C> adopt_element(C grad, C theta, C m, C v, const Hyper<C>& h,
                                const TensorScalars<C>& t) {
  Element<C> e;
  e.g = kDivide ? grad / h.gscale : grad * h.gscale;  // GradScaler's scale, maximize's sign
  if constexpr (kCoupled) {
    e.g = e.g + theta * h.wd;  // coupled (L2) decay: enters v too
  }
  e.theta = theta * t.decay;
  C d = std::sqrt(v);
  d = d < h.eps ? h.eps : d;  // max(sqrt(v), eps); NaN passes
  C n = e.g / d;
  n = n < t.neg_bound ? t.neg_bound : n;  // clip to [-c_t, c_t]
  n = n > t.bound ? t.bound : n;
  e.m = m * h.beta1 + n * h.w1;
  e.u = kNesterov ? e.m * h.beta1 + n * h.w1 : e.m;
  e.v = v * h.beta2 + (e.g * e.g) * t.sq_weight;
  return e;
}

// The runtime flags as template arguments, one at a time: calls F::template run<flags...>.
template <typename F, bool... kFlags>
void dispatch_flags(const F& f, std::initializer_list<bool> flags) {
  if constexpr (sizeof...(kFlags) == F::kNumFlags) {
    f.template run<kFlags...>();
  } else {
    if (*(flags.begin() + sizeof...(kFlags))) {
      dispatch_flags<F, kFlags..., true>(f, flags);
    } else {
      dispatch_flags<F, kFlags..., false>(f, flags);
    }
  }
}

template <typename C>
Hyper<C> make_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool maximize, double grad_scale, bool* divide, bool stochastic,
                    int64_t seed) {
  Hyper<C> h;
  h.lr = static_cast<C>(lr);
  h.beta1 = static_cast<C>(beta1);
  h.w1 = static_cast<C>(1.0 - beta1);
  h.beta2 = static_cast<C>(beta2);
  h.eps = static_cast<C>(eps);
  h.wd = static_cast<C>(weight_decay);
  // g / scale (then negated for maximize) is g * (+-1/scale) exactly when scale, rounded
  // to C, is a power of two whose reciprocal is a normal number (GradScaler's default
  // scales are): the multiplication is cheaper where the caller can take either (`divide`
  // given: it learns which); other scales, and callers that always divide (nullptr), divide.
  const C scale = static_cast<C>(grad_scale);
  int exponent = 0;
  const C mantissa = std::frexp(scale, &exponent);
  const bool power_of_two = mantissa == C(0.5) && std::abs(exponent) < 120;
  const bool multiply = divide != nullptr && power_of_two;
  if (divide != nullptr) {
    *divide = !multiply;
  }
  if (multiply) {
    h.gscale = (maximize ? C(-1) : C(1)) / scale;  // exact
  } else {
    h.gscale = maximize ? -scale : scale;  // -(g / s) == g / -s
  }
  h.stochastic = stochastic;
  h.seed = static_cast<uint64_t>(seed);
  return h;
}

template <typename C>
TensorScalars<C> tensor_scalars(double bound, double sq_weight, double decay) {
  TensorScalars<C> t;
  t.bound = static_cast<C>(bound);
  t.neg_bound = -t.bound;
  t.sq_weight = static_cast<C>(sq_weight);
  t.decay = static_cast<C>(decay);
  return t;
}

// ------------------------------------------------------------------------------------------
// Format 1: float moments (state type S), walked element by element

template <typename P, typename S, typename C, typename K>
struct FloatTensor {
  P* p;
  K* k;  // the master-weight correction (nullptr for a plain parameter)
  const P* g;
  S* m;
  S* v;
  TensorScalars<C> sc;
  uint32_t seed;    // this step's seed (stochastic rounding)
  int64_t offset;   // index of element 0 in the whole tensor (a shard's place), for the dither
};

// The update pass on elements [lo, hi) of one tensor. With caution (kCaution), u is masked
// where its sign disagrees with g and divided by the tensor's kept fraction `kept`.
// (The arrays are restrict-qualified parameters and the scalars are passed by value, so that
// the compiler knows no store can change a scalar and vectorises the loop.)
// kRandom: the store takes a uniform number, frac(u0 + w[i - lo]) (the run [lo, hi) lies in
// one block of 256 of the dither: see float_update).
template <typename P, typename S, typename C, typename K, bool kCoupled, bool kDivide,
          bool kNesterov, bool kCaution, bool kStochastic, bool kRandom>
void float_update_run(P* __restrict p, K* __restrict k, const P* __restrict g,
                      S* __restrict m, S* __restrict v, int64_t lo, int64_t hi, const Hyper<C> h,
                      const TensorScalars<C> sc, C kept, float u0, const float* __restrict w) {
  for (int64_t i = lo; i < hi; ++i) {
    const Element<C> e = adopt_element<C, kCoupled, kDivide, kNesterov>(
        static_cast<C>(g[i]), load_theta<P, K, C>(p, k, i), static_cast<C>(m[i]),
        static_cast<C>(v[i]), h, sc);
    C u = e.u;
    if constexpr (kCaution) {
      const C mask = e.u * e.g > C(0) ? C(1) : C(0);
      u = (u * mask) / kept;
    }
    m[i] = static_cast<S>(e.m);
    v[i] = static_cast<S>(e.v);
    const C theta = e.theta - h.lr * u;
    const float up = kRandom ? frac_sum(u0, w[i - lo]) : 0.0f;
    store_theta<P, K, C>(p, k, i, theta, kStochastic, up, up);
  }
}

// The update pass on elements [lo, hi) of one tensor (element 0 at `offset` in the whole
// tensor). Where the store rounds with random numbers (a plain bfloat16's stochastic
// rounding: stream 2; a 24-bit master weight: stream 3), they are formats/blockwise8.dither's
// for element j = offset + i: one hash per block of 256 and the block's Weyl sequence, so the
// range is walked one block of the dither at a time (contiguous loads of the Weyl table, one
// hash per block: the loop vectorises).
template <typename P, typename S, typename C, typename K, bool kCoupled, bool kDivide,
          bool kNesterov, bool kCaution, bool kStochastic>
void float_update(P* __restrict p, K* __restrict k, const P* __restrict g, S* __restrict m,
                  S* __restrict v, int64_t lo, int64_t hi, const Hyper<C> h,
                  const TensorScalars<C> sc, C kept, uint32_t seed, int64_t offset) {
  if constexpr (kStochastic || std::is_same_v<K, int8_t>) {
    constexpr uint32_t stream = kCorrected<K> ? kStreamMaster : kStreamParam;
    for (int64_t i0 = lo; i0 < hi;) {
      const uint64_t j0 = static_cast<uint64_t>(offset + i0);
      const int64_t in_block = static_cast<int64_t>(j0 & (kBlock - 1));
      const int64_t i1 = std::min(hi, i0 + (kBlock - in_block));
      const float u0 = block_offset(seed, static_cast<uint32_t>(j0 >> 8), stream);
      float_update_run<P, S, C, K, kCoupled, kDivide, kNesterov, kCaution, kStochastic, true>(
          p, k, g, m, v, i0, i1, h, sc, kept, u0, kWeyl.w + in_block);
      i0 = i1;
    }
  } else {
    float_update_run<P, S, C, K, kCoupled, kDivide, kNesterov, kCaution, kStochastic, false>(
        p, k, g, m, v, lo, hi, h, sc, kept, 0.0f, kWeyl.w);
  }
}

// Caution's counting pass: how many of the elements have u * g > 0 (nothing is written).
template <typename P, typename S, typename C, typename K, bool kCoupled, bool kDivide,
          bool kNesterov>
int64_t float_count(const P* __restrict p, const K* __restrict k, const P* __restrict g,
                    const S* __restrict m, const S* __restrict v, int64_t lo, int64_t hi,
                    const Hyper<C> h, const TensorScalars<C> sc) {
  int64_t kept = 0;
  for (int64_t i = lo; i < hi; ++i) {
    const Element<C> e = adopt_element<C, kCoupled, kDivide, kNesterov>(
        static_cast<C>(g[i]), load_theta<P, K, C>(p, k, i), static_cast<C>(m[i]),
        static_cast<C>(v[i]), h, sc);
    kept += e.u * e.g > C(0) ? 1 : 0;
  }
  return kept;
}

// The tensors of one call, walked as the concatenation of their elements: one
// at::parallel_for over the total count, each task walking the tensors its range covers, so
// that thousands of small tensors cost one parallel region per step. (Which task computes an
// element changes none of its bits.)
template <typename P, typename S, typename C, typename K>
struct FloatBatch {
  // coupled, nesterov, caution: the float kernels always divide by the scale (a power of
  // two's exact reciprocal gives the same bits multiplied; this memory-bound loop does not
  // notice the division, and one flag fewer halves the instantiations: the build time)
  static constexpr int kNumFlags = 3;
  std::vector<FloatTensor<P, S, C, K>> ts;
  std::vector<int64_t> offsets;  // element offsets of each tensor in the concatenation
  Hyper<C> h;

  template <typename Body>
  void for_pieces(const Body& body) const {
    // About 128K elements (~3.5 MB of traffic) per task: enough to amortise the scheduling,
    // small enough that two threads share medium tensors.
    constexpr int64_t grain = 1 << 17;
    const int64_t count = static_cast<int64_t>(ts.size());
    at::parallel_for(0, offsets[count], grain, [&](int64_t begin, int64_t end) {
      int64_t k = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
      for (int64_t pos = begin; pos < end; ++k) {
        const int64_t lo = pos - offsets[k];
        const int64_t hi = std::min(end, offsets[k + 1]) - offsets[k];
        if (hi > lo) {
          body(k, lo, hi);
        }
        pos = offsets[k] + hi;
      }
    });
  }

  template <bool kCoupled, bool kNesterov, bool kCaution>
  void run() const {
    constexpr bool kDivide = true;
    // stochastic rounding is a choice for plain bfloat16 parameters only (fewer
    // instantiations); a master weight's rounding is its format's
    if constexpr (std::is_same_v<P, c10::BFloat16> && !kCorrected<K>) {
      if (h.stochastic) {
        run_passes<kCoupled, kDivide, kNesterov, kCaution, true>();
        return;
      }
    }
    run_passes<kCoupled, kDivide, kNesterov, kCaution, false>();
  }

  template <bool kCoupled, bool kDivide, bool kNesterov, bool kCaution, bool kStochastic>
  void run_passes() const {
    const int64_t count = static_cast<int64_t>(ts.size());
    // Caution needs each tensor's kept fraction before any element is updated: a first pass
    // counts (exactly, as an integer) where u * g > 0.
    std::vector<C> kept(count, C(1));
    if constexpr (kCaution) {
      std::vector<std::atomic<int64_t>> counts(count);
      for (auto& n : counts) {
        n.store(0, std::memory_order_relaxed);
      }
      for_pieces([&](int64_t k, int64_t lo, int64_t hi) {
        const FloatTensor<P, S, C, K>& t = ts[k];
        counts[k].fetch_add(float_count<P, S, C, K, kCoupled, kDivide, kNesterov>(
                                t.p, t.k, t.g, t.m, t.v, lo, hi, h, t.sc),
                            std::memory_order_relaxed);
      });
      for (int64_t k = 0; k < count; ++k) {
        const int64_t numel = offsets[k + 1] - offsets[k];
        const C frac = static_cast<C>(counts[k].load()) / static_cast<C>(numel);
        kept[k] = frac < C(1e-3) ? C(1e-3) : frac;
      }
    }
    for_pieces([&](int64_t k, int64_t lo, int64_t hi) {
      const FloatTensor<P, S, C, K>& t = ts[k];
      float_update<P, S, C, K, kCoupled, kDivide, kNesterov, kCaution, kStochastic>(
          t.p, t.k, t.g, t.m, t.v, lo, hi, h, t.sc, kept[k], t.seed, t.offset);
    });
  }
};

// ------------------------------------------------------------------------------------------
// Format 2: block-wise 8-bit moments (formats/blockwise8.py; Dettmers et al. 2021 for
// block-wise quantization, Li et al. 2023 for keeping a nonzero v off the zero code)
//
// Per block of 256 elements: read theta, g and one byte each of m and v, dequantize, run
// adopt_element, keep the new m and v in an L1 buffer (two blocks: 4 KB), take the block's
// new scales (largest |m|, largest sqrt(v); a NaN anywhere in the block makes the scale NaN,
// as torch's amax does on the other paths), and write the requantized codes: 16 bytes of
// traffic per float32 parameter plus 8 per 256, no tensor-sized temporaries.
//
// A block's work is two loops: pass 1 (dequantize, update, write theta, fill the buffer, the
// block's maxima) is memory-bound, pass 2 (requantize from the buffer: dither, floor, square
// roots, the v-unbiased choice between two levels) compute-bound, so a task runs them
// software-pipelined: one loop does pass 1 of block b+1 and pass 2 of block b, so that the
// core computes while it waits for memory. Every element gets the same operations either way.
// The requantization loop vectorises only with -fno-trapping-math (floor, and selects between
// computed values); it changes no result.

constexpr float kMLevels = 127.0f;
constexpr float kVLevels2 = 65025.0f;  // 255 * 255

struct Tensor8 {
  void* p;
  void* k;  // the master-weight correction (nullptr for a plain parameter)
  const void* g;
  int8_t* qm;
  float* sm;
  uint8_t* qv;
  float* sv;
  int64_t n;
  uint32_t seed;  // this step's seed
  TensorScalars<float> sc;
};

struct Pass1 {  // block b's inputs for pass 1
  void* p;
  void* k;
  const void* g;
  const int8_t* qm;
  const uint8_t* qv;
  float* mbuf;
  float* vbuf;
  float m_step, s_step, u0p, u0k;  // u0k: the block's offset on the master's stream
  const Tensor8* t;
  float amax, vmax, nan_m, nan_v;  // out: the block's largest |m| and v; NaNs among m, v
};

struct Pass2 {  // block b's inputs for pass 2
  int8_t* qm;
  uint8_t* qv;
  const float* mbuf;
  const float* vbuf;
  float m_inv, v_step, v_inv, u0m, u0v;
};

inline int64_t block_len(const Tensor8& t, int64_t b) { return std::min(kBlock, t.n - b * kBlock); }

inline Pass1 pass1_of(const Tensor8& t, int64_t b, size_t elem, size_t k_elem, float* mbuf,
                      float* vbuf) {
  const int64_t j0 = b * kBlock;
  Pass1 a;
  a.p = static_cast<char*>(t.p) + j0 * elem;
  a.k = t.k == nullptr ? nullptr : static_cast<char*>(t.k) + j0 * k_elem;
  a.g = static_cast<const char*>(t.g) + j0 * elem;
  a.qm = t.qm + j0;
  a.qv = t.qv + j0;
  a.mbuf = mbuf;
  a.vbuf = vbuf;
  a.m_step = t.sm[b] / kMLevels;
  a.s_step = t.sv[b] / kVLevels2;
  a.u0p = block_offset(t.seed, static_cast<uint32_t>(b), kStreamParam);
  a.u0k = block_offset(t.seed, static_cast<uint32_t>(b), kStreamMaster);
  a.t = &t;
  a.amax = 0.0f;
  a.vmax = 0.0f;
  a.nan_m = 0.0f;
  a.nan_v = 0.0f;
  return a;
}

// After pass 1 of block b: store its new scales and return pass 2's inputs.
inline Pass2 pass2_of(const Tensor8& t, int64_t b, const Pass1& a) {
  const int64_t j0 = b * kBlock;
  const uint32_t blk = static_cast<uint32_t>(b);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float amax = a.nan_m > 0.0f ? nan : a.amax;  // NaN propagates, as torch's amax
  const float smax = std::sqrt(a.nan_v > 0.0f ? nan : a.vmax);
  t.sm[b] = amax;
  t.sv[b] = smax;
  Pass2 c;
  c.qm = t.qm + j0;
  c.qv = t.qv + j0;
  c.mbuf = a.mbuf;
  c.vbuf = a.vbuf;
  c.m_inv = amax > 0.0f ? kMLevels / amax : 0.0f;
  c.v_step = smax / kVLevels2;
  c.v_inv = smax > 0.0f ? kVLevels2 / smax : 0.0f;
  c.u0m = block_offset(t.seed, blk, kStreamM);
  c.u0v = block_offset(t.seed, blk, kStreamV);
  return c;
}

// len elements of pass 1 of block a (kP1) and/or pass 2 of block c (kP2).
template <typename P, typename K, bool kCoupled, bool kDivide, bool kNesterov, bool kP1,
          bool kP2>
void block_loop(Pass1& a, const Pass2& c, int64_t len, const Hyper<float>& hyper) {
  const Hyper<float> h = hyper;  // a local copy: no store through the arrays can change it
  P* __restrict p = static_cast<P*>(a.p);
  K* __restrict k = static_cast<K*>(a.k);
  const P* __restrict g = static_cast<const P*>(a.g);
  const int8_t* __restrict qm_in = a.qm;
  const uint8_t* __restrict qv_in = a.qv;
  float* __restrict mbuf_out = a.mbuf;
  float* __restrict vbuf_out = a.vbuf;
  int8_t* __restrict qm_out = c.qm;
  uint8_t* __restrict qv_out = c.qv;
  const float* __restrict mbuf_in = c.mbuf;
  const float* __restrict vbuf_in = c.vbuf;
  const float m_step = a.m_step, s_step = a.s_step, u0p = a.u0p, u0k = a.u0k;
  const TensorScalars<float> sc = kP1 ? a.t->sc : TensorScalars<float>{};
  const float m_inv = c.m_inv, v_step = c.v_step, v_inv = c.v_inv, u0m = c.u0m, u0v = c.u0v;
  float amax = 0.0f, vmax = 0.0f, nan_m = 0.0f, nan_v = 0.0f;
#pragma omp simd reduction(max : amax, vmax) reduction(+ : nan_m, nan_v)
  for (int64_t i = 0; i < len; ++i) {
    if constexpr (kP1) {  // dequantize (blockwise8.dequantize_m / dequantize_v), update
      const float q = static_cast<float>(qv_in[i]);
      const float s = (q * q) * s_step;
      const Element<float> e = adopt_element<float, kCoupled, kDivide, kNesterov>(
          static_cast<float>(g[i]), load_theta<P, K, float>(p, k, i),
          static_cast<float>(qm_in[i]) * m_step, s * s, h, sc);
      mbuf_out[i] = e.m;
      vbuf_out[i] = e.v;
      const float am = std::fabs(e.m);
      amax = am > amax ? am : amax;
      vmax = e.v > vmax ? e.v : vmax;
      nan_m += e.m != e.m ? 1.0f : 0.0f;  // (std::max and the selects above skip a NaN)
      nan_v += e.v != e.v ? 1.0f : 0.0f;
      store_theta<P, K, float>(p, k, i, e.theta - h.lr * e.u, h.stochastic,
                               frac_sum(u0p, kWeyl.w[i]), frac_sum(u0k, kWeyl.w[i]));
    }
    if constexpr (kP2) {  // requantize (blockwise8.quantize_m / quantize_v)
      const float um = frac_sum(u0m, kWeyl.w[i]);
      float ym = std::floor(mbuf_in[i] * m_inv + um);  // y = m * (127 / A), rounded, then + u
      ym = ym < -kMLevels ? -kMLevels : ym;
      ym = ym > kMLevels ? kMLevels : ym;
      ym = ym != ym ? 0.0f : ym;  // NaN (a NaN m; its block's scale is NaN): code 0
      qm_out[i] = static_cast<int8_t>(static_cast<int32_t>(ym));

      const float v = vbuf_in[i];
      float lo = std::floor(std::sqrt(std::sqrt(v) * v_inv));  // 255 * sqrt(sqrt(v) / S)
      lo = lo > 254.0f ? 254.0f : lo;  // (and lo >= 0, or NaN: a square root)
      const float hi = lo + 1.0f;
      const float s_lo = (lo * lo) * v_step, s_hi = (hi * hi) * v_step;
      const float v_lo = s_lo * s_lo, v_hi = s_hi * s_hi;
      const float uv = frac_sum(u0v, kWeyl.w[i]);
      float qf = lo + (uv * (v_hi - v_lo) < v - v_lo ? 1.0f : 0.0f);  // unbiased in v
      qf = (v > 0.0f) & (qf < 1.0f) ? 1.0f : qf;  // no zero code for a nonzero v
      qf = qf != qf ? 0.0f : qf;  // NaN: code 0
      qv_out[i] = static_cast<uint8_t>(static_cast<int32_t>(qf));
    }
  }
  if constexpr (kP1) {
    a.amax = amax;
    a.vmax = vmax;
    a.nan_m = nan_m;
    a.nan_v = nan_v;
  }
}

template <typename P, typename K>
struct Batch8 {
  static constexpr int kNumFlags = 3;  // coupled, divide, nesterov
  const std::vector<Tensor8>* ts;
  Hyper<float> h;

  template <bool kCoupled, bool kDivide, bool kNesterov>
  void run() const {
    const std::vector<Tensor8>& tensors = *ts;
    const int64_t count = static_cast<int64_t>(tensors.size());
    std::vector<int64_t> offsets(count + 1, 0);  // block offsets of each tensor
    for (int64_t k = 0; k < count; ++k) {
      offsets[k + 1] = offsets[k] + (tensors[k].n + kBlock - 1) / kBlock;
    }
    // 512 blocks (128K elements, ~2 MB of traffic) per task.
    at::parallel_for(0, offsets[count], 512, [&](int64_t begin, int64_t end) {
      alignas(64) float mbuf[2][kBlock];  // the new m and v of two blocks (double-buffered)
      alignas(64) float vbuf[2][kBlock];
      const Pass2 none{};
      int64_t k = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
      Pass2 prev{};  // pass 2 of the block before this one
      int64_t prev_len = 0;
      for (int64_t blk = begin; blk < end; ++blk) {
        while (blk >= offsets[k + 1]) {
          ++k;
        }
        const Tensor8& t = tensors[k];
        const int64_t b = blk - offsets[k], len = block_len(t, b), slot = blk & 1;
        Pass1 a = pass1_of(t, b, sizeof(P), kCorrected<K> ? sizeof(K) : 0, mbuf[slot],
                           vbuf[slot]);
        if (prev_len == kBlock && len == kBlock) {
          block_loop<P, K, kCoupled, kDivide, kNesterov, true, true>(a, prev, kBlock, h);
        } else {
          if (prev_len > 0) {
            block_loop<P, K, kCoupled, kDivide, kNesterov, false, true>(a, prev, prev_len, h);
          }
          block_loop<P, K, kCoupled, kDivide, kNesterov, true, false>(a, none, len, h);
        }
        prev = pass2_of(t, b, a);
        prev_len = len;
      }
      if (prev_len > 0) {
        Pass1 unused{};
        block_loop<P, K, kCoupled, kDivide, kNesterov, false, true>(unused, prev, prev_len, h);
      }
    });
  }
};

// ------------------------------------------------------------------------------------------
// The ops

// scalars: float64 (rows, n) with rows bound, sq_weight, decay, key, offset (offset: the
// index of the tensor's element 0 in the whole tensor, for a shard; 8-bit: 4 rows, no offset)
void check_common(const char* op, size_t count, at::TensorList params, at::TensorList grads,
                  at::TensorList steps, const at::Tensor& scalars, int64_t rows) {
  TORCH_CHECK(grads.size() == count && steps.size() == count, op,
              ": tensor lists differ in length");
  TORCH_CHECK(scalars.scalar_type() == at::kDouble && scalars.is_contiguous() &&
                  scalars.numel() == static_cast<int64_t>(rows * count),
              op, ": scalars must be a contiguous float64 tensor of shape (", rows, ", n)");
  for (size_t k = 0; k < count; ++k) {
    TORCH_CHECK(params[k].device().is_cpu() && grads[k].device().is_cpu(), op,
                ": CPU tensors only");
    TORCH_CHECK(params[k].scalar_type() == params[0].scalar_type() &&
                    grads[k].scalar_type() == params[0].scalar_type(),
                op, ": parameters and gradients must share one dtype");
    TORCH_CHECK(steps[k].device().is_cpu() && steps[k].scalar_type() == at::kFloat &&
                    steps[k].numel() == 1,
                op, ": step ", k, " must be a one-element float32 CPU tensor");
  }
}

// corrections: empty (plain parameters) or one per parameter, all int8 (24-bit master
// weights) or all int16 (32-bit), contiguous and shaped like bfloat16 contiguous parameters.
// Returns the correction's element size (0: none).
size_t check_corrections(const char* op, at::TensorList params, at::TensorList corrections) {
  if (corrections.empty()) {
    return 0;
  }
  TORCH_CHECK(corrections.size() == params.size(), op,
              ": corrections must be empty or one per parameter");
  const auto c_type = corrections[0].scalar_type();
  TORCH_CHECK(c_type == at::kChar || c_type == at::kShort, op,
              ": corrections must be int8 (24-bit master weights) or int16 (32-bit)");
  for (size_t k = 0; k < params.size(); ++k) {
    TORCH_CHECK(params[k].scalar_type() == at::kBFloat16, op,
                ": the kernel takes master-weight corrections for bfloat16 parameters only");
    TORCH_CHECK(corrections[k].device().is_cpu() && corrections[k].scalar_type() == c_type &&
                    corrections[k].is_contiguous() && params[k].is_contiguous() &&
                    corrections[k].numel() == params[k].numel(),
                op, ": tensor ", k, " and its correction must be contiguous, of ",
                params[k].numel(), " elements, and the corrections of one dtype");
  }
  return c_type == at::kChar ? 1 : 2;
}

void advance_steps(at::TensorList steps) {
  // Each tensor's call count, as the other paths' step_t += 1 (a Python loop or a foreach op
  // over thousands of one-element tensors costs more than the update of small ones).
  for (const auto& s : steps) {
    *s.data_ptr<float>() += 1.0f;
  }
}

template <typename P, typename S, typename C, typename K>
void run_float(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList corrections,
               const double* sc, const Hyper<C>& h, std::initializer_list<bool> flags) {
  FloatBatch<P, S, C, K> b;
  const int64_t count = static_cast<int64_t>(params.size());
  b.h = h;
  b.ts.resize(count);
  b.offsets.assign(count + 1, 0);
  for (int64_t k = 0; k < count; ++k) {
    b.offsets[k + 1] = b.offsets[k] + params[k].numel();
    FloatTensor<P, S, C, K>& t = b.ts[k];
    t.p = params[k].data_ptr<P>();
    if constexpr (kCorrected<K>) {
      t.k = static_cast<K*>(corrections[k].data_ptr());
    } else {
      t.k = nullptr;
    }
    t.g = grads[k].data_ptr<P>();
    t.m = exp_avgs[k].data_ptr<S>();
    t.v = exp_avg_sqs[k].data_ptr<S>();
    t.sc = tensor_scalars<C>(sc[k], sc[count + k], sc[2 * count + k]);
    const uint64_t key = static_cast<uint64_t>(sc[3 * count + k]);
    t.seed = step_seed(tensor_seed(h.seed, key), *steps[k].data_ptr<float>());
    t.offset = static_cast<int64_t>(sc[4 * count + k]);
  }
  dispatch_flags(b, flags);
}

void fused_adopt_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList steps,
                  at::TensorList corrections, const at::Tensor& scalars,
                  double lr, double beta1, double beta2, double eps, double weight_decay,
                  bool coupled, bool maximize, double grad_scale, bool stochastic, int64_t seed,
                  bool nesterov, bool caution) {
  const size_t count = params.size();
  TORCH_CHECK(exp_avgs.size() == count && exp_avg_sqs.size() == count,
              "fused_adopt_: tensor lists differ in length");
  check_common("fused_adopt_", count, params, grads, steps, scalars, 5);
  if (count == 0) {
    return;
  }
  const size_t k_size = check_corrections("fused_adopt_", params, corrections);
  const auto p_type = params[0].scalar_type();
  const auto s_type = exp_avgs[0].scalar_type();
  for (size_t k = 0; k < count; ++k) {
    TORCH_CHECK(exp_avgs[k].device().is_cpu() && exp_avg_sqs[k].device().is_cpu(),
                "fused_adopt_: CPU tensors only");
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
  }
  const double* sc = scalars.data_ptr<double>();
  const bool coupled_on = coupled && weight_decay != 0.0;
  const bool sr = stochastic && p_type == at::kBFloat16;

  using BF = c10::BFloat16;
  using H = c10::Half;
  const auto go = [&](auto p_tag, auto s_tag, auto c_tag, auto k_tag) {
    using P = decltype(p_tag);
    using S = decltype(s_tag);
    using C = decltype(c_tag);
    using K = decltype(k_tag);
    const Hyper<C> h = make_hyper<C>(lr, beta1, beta2, eps, weight_decay, maximize, grad_scale,
                                     nullptr, sr && !kCorrected<K>, seed);  // always divides
    run_float<P, S, C, K>(params, grads, exp_avgs, exp_avg_sqs, steps, corrections, sc, h,
                          {coupled_on, nesterov, caution});
  };
  const NoCorrection none;
  if (k_size != 0) {  // bfloat16 + correction (checked above), float32 or bfloat16 moments
    TORCH_CHECK(s_type == at::kFloat || s_type == at::kBFloat16,
                "fused_adopt_: moments of a corrected bfloat16 parameter must be float32 or "
                "bfloat16, not ", s_type);
    if (s_type == at::kFloat) {
      k_size == 1 ? go(BF{}, float{}, float{}, int8_t{}) : go(BF{}, float{}, float{}, int16_t{});
    } else {
      k_size == 1 ? go(BF{}, BF{}, float{}, int8_t{}) : go(BF{}, BF{}, float{}, int16_t{});
    }
  } else if (p_type == at::kFloat && s_type == at::kFloat) {
    go(float{}, float{}, float{}, none);
  } else if (p_type == at::kDouble && s_type == at::kDouble) {
    go(double{}, double{}, double{}, none);
  } else if (p_type == at::kBFloat16 && s_type == at::kFloat) {
    go(BF{}, float{}, float{}, none);
  } else if (p_type == at::kBFloat16 && s_type == at::kBFloat16) {
    go(BF{}, BF{}, float{}, none);
  } else if (p_type == at::kHalf && s_type == at::kFloat) {
    go(H{}, float{}, float{}, none);
  } else if (p_type == at::kHalf && s_type == at::kHalf) {
    go(H{}, H{}, float{}, none);
  } else {
    TORCH_CHECK(false, "fused_adopt_: unsupported dtypes (parameter ", p_type, ", state ",
                s_type, ")");
  }
  advance_steps(steps);
}

void fused_adopt_8bit_(at::TensorList params, at::TensorList grads, at::TensorList m_codes,
                       at::TensorList m_scales, at::TensorList v_codes, at::TensorList v_scales,
                       at::TensorList steps, at::TensorList corrections,
                       const at::Tensor& scalars, double lr, double beta1,
                       double beta2, double eps, double weight_decay, bool coupled,
                       bool maximize, double grad_scale, bool stochastic, int64_t seed,
                       bool nesterov) {
  const size_t count = params.size();
  TORCH_CHECK(m_codes.size() == count && m_scales.size() == count && v_codes.size() == count &&
                  v_scales.size() == count,
              "fused_adopt_8bit_: tensor lists differ in length");
  check_common("fused_adopt_8bit_", count, params, grads, steps, scalars, 4);
  if (count == 0) {
    return;
  }
  const size_t k_size = check_corrections("fused_adopt_8bit_", params, corrections);
  const auto p_type = params[0].scalar_type();
  const double* sc = scalars.data_ptr<double>();
  std::vector<Tensor8> ts(count);
  for (size_t k = 0; k < count; ++k) {
    const int64_t n = params[k].numel();
    TORCH_CHECK(params[k].is_contiguous() && grads[k].is_contiguous() && grads[k].numel() == n,
                "fused_adopt_8bit_: tensor ", k, " and its gradient must be contiguous");
    TORCH_CHECK(m_codes[k].scalar_type() == at::kChar && v_codes[k].scalar_type() == at::kByte &&
                    m_codes[k].is_contiguous() && v_codes[k].is_contiguous() &&
                    m_codes[k].numel() == n && v_codes[k].numel() == n,
                "fused_adopt_8bit_: tensor ", k, " needs contiguous int8 m and uint8 v codes of ",
                n, " elements");
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    TORCH_CHECK(m_scales[k].scalar_type() == at::kFloat && v_scales[k].scalar_type() == at::kFloat &&
                    m_scales[k].is_contiguous() && v_scales[k].is_contiguous() &&
                    m_scales[k].numel() == blocks && v_scales[k].numel() == blocks,
                "fused_adopt_8bit_: tensor ", k, " needs ", blocks, " float32 scales per moment");
    Tensor8& t = ts[k];
    t.p = params[k].data_ptr();
    t.k = k_size == 0 ? nullptr : corrections[k].data_ptr();
    t.g = grads[k].data_ptr();
    t.qm = m_codes[k].data_ptr<int8_t>();
    t.sm = m_scales[k].data_ptr<float>();
    t.qv = v_codes[k].data_ptr<uint8_t>();
    t.sv = v_scales[k].data_ptr<float>();
    t.n = n;
    const uint64_t key = static_cast<uint64_t>(sc[3 * count + k]);
    t.seed = step_seed(tensor_seed(static_cast<uint64_t>(seed), key), *steps[k].data_ptr<float>());
    t.sc = tensor_scalars<float>(sc[k], sc[count + k], sc[2 * count + k]);
  }
  bool divide = false;
  const bool sr = stochastic && p_type == at::kBFloat16;
  const bool coupled_on = coupled && weight_decay != 0.0;
  const Hyper<float> h = make_hyper<float>(lr, beta1, beta2, eps, weight_decay, maximize,
                                           grad_scale, &divide, sr && k_size == 0, seed);
  const auto go = [&](auto p_tag, auto k_tag) {
    Batch8<decltype(p_tag), decltype(k_tag)> b;
    b.ts = &ts;
    b.h = h;
    dispatch_flags(b, {coupled_on, divide, nesterov});
  };
  const NoCorrection none;
  if (k_size == 1) {  // bfloat16 (checked above) + 24-bit master weights
    go(c10::BFloat16{}, int8_t{});
  } else if (k_size == 2) {  // + 32-bit master weights
    go(c10::BFloat16{}, int16_t{});
  } else if (p_type == at::kFloat) {
    go(float{}, none);
  } else if (p_type == at::kBFloat16) {
    go(c10::BFloat16{}, none);
  } else if (p_type == at::kHalf) {
    go(c10::Half{}, none);
  } else {
    TORCH_CHECK(false, "fused_adopt_8bit_: unsupported parameter dtype ", p_type,
                " (float32, bfloat16, float16)");
  }
  advance_steps(steps);
}

}  // namespace

TORCH_LIBRARY(adoptim, m) {
  m.def(
      "fused_adopt_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor(e!)[] corrections, Tensor scalars, "
      "float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool coupled, bool maximize, "
      "float grad_scale, bool stochastic, int seed, bool nesterov, bool caution) -> ()");
  m.def(
      "fused_adopt_8bit_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] m_codes, "
      "Tensor(c!)[] m_scales, Tensor(d!)[] v_codes, Tensor(e!)[] v_scales, "
      "Tensor(f!)[] steps, Tensor(g!)[] corrections, Tensor scalars, float lr, float beta1, "
      "float beta2, "
      "float eps, float weight_decay, bool coupled, bool maximize, float grad_scale, "
      "bool stochastic, int seed, bool nesterov) -> ()");
}

TORCH_LIBRARY_IMPL(adoptim, CPU, m) {
  m.impl("fused_adopt_", &fused_adopt_);
  m.impl("fused_adopt_8bit_", &fused_adopt_8bit_);
}
