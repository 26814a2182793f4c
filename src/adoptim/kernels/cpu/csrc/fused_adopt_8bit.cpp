// Single-pass ADOPT step for CPU tensors with 8-bit moments (state_dtype="8bit").
//
// adoptim::fused_adopt_8bit_ updates parameters whose m and v are block-wise 8-bit codes
// (format: adoptim/_quant.py; Dettmers et al. 2021 for block-wise quantization, Li et al.
// 2023 for keeping a nonzero v off the zero code). Per block of 256 elements it reads theta,
// g and one byte each of m and v, runs the float32 ADOPT update (the same operations, in the
// same order, as adoptim.paths.forloop.single_tensor_adopt and the float kernel), keeps the new m
// and v in a stack buffer (L1, two blocks: 4 KB), takes the block's new scales (largest |m|,
// largest sqrt(v)) and writes the requantized codes: 16 bytes of traffic per float32
// parameter plus 8 bytes of scales per 256, and no tensor-sized temporaries.
//
// On a CPU it is compute-bound, not at that 16-byte wall: with AVX-512 on 2 Zen 4 cores the
// update alone (pass 1 below, requantization removed) takes ~0.57x fused Adam's step on
// 20 x 1M float32, and requantizing m and v (dither, floor, two square roots and the
// v-unbiased choice between two levels) adds ~50 vector instructions per 16 elements.
//
// Rounding of the codes is stochastic and unbiased in m and in v, with the random numbers of
// _quant.py: one hash per block and stream, then a Weyl sequence over the block. The
// arithmetic is written as the Python one, operation by operation: fused multiply-adds are
// written out (std::fma) exactly where torch's vectorised CPU kernels use them (lerp_, add_
// with alpha, addcmul_), and _kernel_cache builds with -ffp-contract=off so that the compiler
// fuses no other product with an add (m * 127/A + u below), so that the kernel and the
// for-loop path produce the same parameters and codes (apart from rare elements that torch
// computes in a loop's scalar tail). The requantization loop vectorises only with
// -fno-trapping-math (floor, and selects between computed values): _kernel_cache builds with
// it, which changes no result.

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

constexpr int64_t kBlock = 256;
constexpr float kMLevels = 127.0f;
constexpr float kVLevels2 = 65025.0f;  // 255 * 255
constexpr uint32_t kStreamM = 0, kStreamV = 1, kStreamParam = 2;

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

inline uint32_t hash32(uint32_t x) {  // lowbias32 (C. Wellons)
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// One uniform offset in [0, 1) per (seed, block, stream), 24 random bits.
inline float block_offset(uint32_t seed, uint32_t block, uint32_t stream) {
  const uint32_t x = hash32(seed + (3u * block + stream) * 0x9E3779B9u);
  return static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
}

inline uint32_t f32_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// A tensor's rounding seed for this step: its call count before the step and its size
// (_quant.state_seed).
inline uint32_t state_seed(float step, int64_t numel) {
  const uint32_t x = hash32(f32_bits(step) ^ 0x9E3779B9u);
  return hash32(x ^ static_cast<uint32_t>(numel));
}

struct Hyper {
  float lr, w1, one_minus_w1, beta2, eps, wd, gmul;
  bool coupled, small_weight, nesterov, stochastic;
};

struct Tensor8 {
  void* p;
  const void* g;
  int8_t* qm;
  float* sm;
  uint8_t* qv;
  float* sv;
  int64_t n;
  uint32_t seed;
  float bound, sq_weight, decay;
};

template <typename P>
inline float load(const P* x, int64_t i) {
  return static_cast<float>(x[i]);
}

template <typename P>
inline void store_param(P* p, int64_t i, float x, bool, float) {
  p[i] = static_cast<P>(x);  // float: plain store; Half and BFloat16: round to nearest even
}

template <>
inline void store_param<c10::BFloat16>(c10::BFloat16* p, int64_t i, float x, bool stochastic,
                                       float u) {
  if (!stochastic || std::isnan(x)) {
    p[i] = c10::BFloat16(x);
    return;
  }
  // Stochastic rounding with 16 random bits from the dither, as _lowbit.stochastic_round_bf16.
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  uint32_t rounded = bits + static_cast<uint32_t>(static_cast<int32_t>(u * 65536.0f));
  if ((rounded & 0x7F800000u) == 0x7F800000u && (bits & 0x7F800000u) != 0x7F800000u) {
    rounded = bits;  // would overflow to inf: truncate instead
  }
  p[i] = c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
}

// A block's work is two loops: pass 1 (dequantize, the float32 update, write theta, keep the
// new m and v in an L1 buffer and take the block's new scales: largest |m| and largest v, a
// max reduction, exact in any order), then pass 2 (requantize from the buffer). Pass 1 is
// memory-bound and pass 2 compute-bound, so a task runs them software-pipelined: one loop
// does pass 1 of block b+1 and pass 2 of block b, element by element, so that the core
// computes while it waits for memory. Every element gets the same operations in the same
// order either way. The template parameters are the choices that are the same for every
// element, so that the loops have no branches and vectorise.

struct Pass1 {  // block b's inputs for pass 1
  void* p;
  const void* g;
  const int8_t* qm;
  const uint8_t* qv;
  float* mbuf;
  float* vbuf;
  float m_step, s_step, u0p;
  const Tensor8* t;
  float amax, vmax;  // out: the block's largest |m| and v
};

struct Pass2 {  // block b's inputs for pass 2
  int8_t* qm;
  uint8_t* qv;
  const float* mbuf;
  const float* vbuf;
  float m_inv, v_step, v_inv, u0m, u0v;
};

inline int64_t block_len(const Tensor8& t, int64_t b) { return std::min(kBlock, t.n - b * kBlock); }

// Pass 1's inputs for block b of t, reading the block's old scales.
inline Pass1 pass1_of(const Tensor8& t, int64_t b, size_t elem, float* mbuf, float* vbuf) {
  const int64_t j0 = b * kBlock;
  Pass1 a;
  a.p = static_cast<char*>(t.p) + j0 * elem;
  a.g = static_cast<const char*>(t.g) + j0 * elem;
  a.qm = t.qm + j0;
  a.qv = t.qv + j0;
  a.mbuf = mbuf;
  a.vbuf = vbuf;
  a.m_step = t.sm[b] / kMLevels;
  a.s_step = t.sv[b] / kVLevels2;
  a.u0p = block_offset(t.seed, static_cast<uint32_t>(b), kStreamParam);
  a.t = &t;
  a.amax = 0.0f;
  a.vmax = 0.0f;
  return a;
}

// After pass 1 of block b: store its new scales and return pass 2's inputs.
inline Pass2 pass2_of(const Tensor8& t, int64_t b, const Pass1& a) {
  const int64_t j0 = b * kBlock;
  const uint32_t blk = static_cast<uint32_t>(b);
  const float smax = std::sqrt(a.vmax);
  t.sm[b] = a.amax;
  t.sv[b] = smax;
  Pass2 c;
  c.qm = t.qm + j0;
  c.qv = t.qv + j0;
  c.mbuf = a.mbuf;
  c.vbuf = a.vbuf;
  c.m_inv = a.amax > 0.0f ? kMLevels / a.amax : 0.0f;
  c.v_step = smax / kVLevels2;
  c.v_inv = smax > 0.0f ? kVLevels2 / smax : 0.0f;
  c.u0m = block_offset(t.seed, blk, kStreamM);
  c.u0v = block_offset(t.seed, blk, kStreamV);
  return c;
}

// len elements of pass 1 of block a (kP1) and/or pass 2 of block c (kP2).
template <typename P, bool kCoupled, bool kSmallWeight, bool kNesterov, bool kP1, bool kP2>
void block_loop(Pass1& a, const Pass2& c, int64_t len, const Hyper& h) {
  P* __restrict p = static_cast<P*>(a.p);
  const P* __restrict g = static_cast<const P*>(a.g);
  const int8_t* __restrict qm_in = a.qm;
  const uint8_t* __restrict qv_in = a.qv;
  float* __restrict mbuf_out = a.mbuf;
  float* __restrict vbuf_out = a.vbuf;
  int8_t* __restrict qm_out = c.qm;
  uint8_t* __restrict qv_out = c.qv;
  const float* __restrict mbuf_in = c.mbuf;
  const float* __restrict vbuf_in = c.vbuf;
  const float m_step = a.m_step, s_step = a.s_step, u0p = a.u0p;
  const float neg_lr = -h.lr, w1 = h.w1, w1_minus_one = h.w1 - 1.0f, beta2 = h.beta2;
  const float eps = h.eps, wd = h.wd, gmul = h.gmul;
  const float bound = kP1 ? a.t->bound : 0.0f, sq_weight = kP1 ? a.t->sq_weight : 0.0f;
  const float decay = kP1 ? a.t->decay : 1.0f, neg_bound = -bound;
  const float m_inv = c.m_inv, v_step = c.v_step, v_inv = c.v_inv, u0m = c.u0m, u0v = c.u0v;
  float amax = 0.0f, vmax = 0.0f;
#pragma omp simd reduction(max : amax, vmax)
  for (int64_t i = 0; i < len; ++i) {
    if constexpr (kP1) {  // the for-loop path's operations, in order
      float grad = load(g, i) * gmul;  // unscale (GradScaler) and sign (maximize)
      float theta = load(p, i);
      if constexpr (kCoupled) {
        grad = std::fma(theta, wd, grad);  // coupled (L2) decay, enters v as well
      }
      theta = theta * decay;  // decoupled decay; exactly 1 when off or on the first call
      const float q = static_cast<float>(qv_in[i]);
      const float s = (q * q) * s_step;  // sqrt(v), dequantized (sqrt(s*s) == s in float32)
      float vi = s * s;
      float denom = s < eps ? eps : s;  // max(sqrt(v), eps)
      float normed = grad / denom;
      normed = normed < neg_bound ? neg_bound : normed;  // clip to [-c_t, c_t]
      normed = normed > bound ? bound : normed;
      float mi = static_cast<float>(qm_in[i]) * m_step;
      // m = beta1*m + (1-beta1)*n, as torch's vectorised lerp computes it (one fma)
      if constexpr (kSmallWeight) {
        mi = std::fma(w1, normed - mi, mi);
      } else {
        mi = std::fma(w1_minus_one, normed - mi, normed);
      }
      float upd = mi;
      if constexpr (kNesterov) {  // u = beta1*m + (1-beta1)*n with the new m
        if constexpr (kSmallWeight) {
          upd = std::fma(w1, normed - mi, mi);
        } else {
          upd = std::fma(w1_minus_one, normed - mi, normed);
        }
      }
      theta = std::fma(upd, neg_lr, theta);  // theta - lr*u, as add_(u, alpha=-lr)
      vi = std::fma(sq_weight * grad, grad, vi * beta2);  // v = beta2*v + w*g*g, as addcmul_
      mbuf_out[i] = mi;
      vbuf_out[i] = vi;
      amax = std::max(amax, std::fabs(mi));
      vmax = std::max(vmax, vi);
      float up = u0p + kWeyl.w[i];
      up = up >= 1.0f ? up - 1.0f : up;
      store_param<P>(p, i, theta, h.stochastic, up);
    }
    if constexpr (kP2) {  // requantize, as _quant.quantize_m / quantize_v
      float um = u0m + kWeyl.w[i];
      um = um >= 1.0f ? um - 1.0f : um;
      float ym = std::floor(mbuf_in[i] * m_inv + um);  // y = m * (127 / A), rounded, then + u
      ym = ym < -kMLevels ? -kMLevels : ym;
      ym = ym > kMLevels ? kMLevels : ym;
      qm_out[i] = static_cast<int8_t>(static_cast<int32_t>(ym));

      const float v = vbuf_in[i];
      float lo = std::floor(std::sqrt(std::sqrt(v) * v_inv));  // 255 * sqrt(sqrt(v) / S)
      lo = lo > 254.0f ? 254.0f : lo;  // (and lo >= 0, or NaN: a square root)
      const float hi = lo + 1.0f;
      const float s_lo = (lo * lo) * v_step, s_hi = (hi * hi) * v_step;
      const float v_lo = s_lo * s_lo, v_hi = s_hi * s_hi;
      float uv = u0v + kWeyl.w[i];
      uv = uv >= 1.0f ? uv - 1.0f : uv;
      float qf = lo + (uv * (v_hi - v_lo) < v - v_lo ? 1.0f : 0.0f);  // unbiased in v
      qf = (v > 0.0f) & (qf < 1.0f) ? 1.0f : qf;  // no zero code for a nonzero v
      qv_out[i] = static_cast<uint8_t>(static_cast<int32_t>(qf));
    }
  }
  if constexpr (kP1) {
    a.amax = amax;
    a.vmax = vmax;
  }
}

template <typename P, bool kCoupled, bool kSmallWeight, bool kNesterov>
void run_blocks(const std::vector<Tensor8>& ts, const Hyper& h) {
  const int64_t count = static_cast<int64_t>(ts.size());
  std::vector<int64_t> offsets(count + 1, 0);  // block offsets of each tensor
  for (int64_t k = 0; k < count; ++k) {
    offsets[k + 1] = offsets[k] + (ts[k].n + kBlock - 1) / kBlock;
  }
  // 512 blocks (128K elements, ~2 MB of traffic) per task.
  at::parallel_for(0, offsets[count], 512, [&](int64_t begin, int64_t end) {
    alignas(64) float mbuf[2][kBlock];  // the new m and v of two blocks (double-buffered)
    alignas(64) float vbuf[2][kBlock];
    const Pass2 none{};
    int64_t k = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    Pass2 prev{};       // pass 2 of the block before this one
    int64_t prev_len = 0;
    for (int64_t blk = begin; blk < end; ++blk) {
      while (blk >= offsets[k + 1]) {
        ++k;
      }
      const Tensor8& t = ts[k];
      const int64_t b = blk - offsets[k], len = block_len(t, b), slot = blk & 1;
      Pass1 a = pass1_of(t, b, sizeof(P), mbuf[slot], vbuf[slot]);
      if (prev_len == kBlock && len == kBlock) {
        block_loop<P, kCoupled, kSmallWeight, kNesterov, true, true>(a, prev, kBlock, h);
      } else {
        if (prev_len > 0) {
          block_loop<P, kCoupled, kSmallWeight, kNesterov, false, true>(a, prev, prev_len, h);
        }
        block_loop<P, kCoupled, kSmallWeight, kNesterov, true, false>(a, none, len, h);
      }
      prev = pass2_of(t, b, a);
      prev_len = len;
    }
    if (prev_len > 0) {
      Pass1 unused{};
      block_loop<P, kCoupled, kSmallWeight, kNesterov, false, true>(unused, prev, prev_len, h);
    }
  });
}

template <typename P>
void dispatch(const std::vector<Tensor8>& ts, const Hyper& h) {
  const int choice = (h.coupled ? 4 : 0) + (h.small_weight ? 2 : 0) + (h.nesterov ? 1 : 0);
  switch (choice) {
    case 0: run_blocks<P, false, false, false>(ts, h); break;
    case 1: run_blocks<P, false, false, true>(ts, h); break;
    case 2: run_blocks<P, false, true, false>(ts, h); break;
    case 3: run_blocks<P, false, true, true>(ts, h); break;
    case 4: run_blocks<P, true, false, false>(ts, h); break;
    case 5: run_blocks<P, true, false, true>(ts, h); break;
    case 6: run_blocks<P, true, true, false>(ts, h); break;
    default: run_blocks<P, true, true, true>(ts, h); break;
  }
}

void fused_adopt_8bit_(at::TensorList params, at::TensorList grads, at::TensorList m_codes,
                       at::TensorList m_scales, at::TensorList v_codes, at::TensorList v_scales,
                       at::TensorList steps, const at::Tensor& scalars,
                       double lr, double beta1, double beta2, double eps, double weight_decay,
                       bool coupled, bool maximize, double grad_scale, bool stochastic,
                       bool nesterov) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && m_codes.size() == count && m_scales.size() == count &&
                  v_codes.size() == count && v_scales.size() == count && steps.size() == count,
              "fused_adopt_8bit_: tensor lists differ in length");
  TORCH_CHECK(scalars.scalar_type() == at::kDouble && scalars.is_contiguous() &&
                  scalars.numel() == static_cast<int64_t>(3 * count),
              "fused_adopt_8bit_: scalars must be a contiguous float64 tensor of shape (3, n)");
  if (count == 0) {
    return;
  }
  const auto p_type = params[0].scalar_type();
  const double* sc = scalars.data_ptr<double>();
  std::vector<Tensor8> ts(count);
  for (size_t k = 0; k < count; ++k) {
    const int64_t n = params[k].numel();
    TORCH_CHECK(params[k].device().is_cpu() && grads[k].device().is_cpu(),
                "fused_adopt_8bit_: CPU tensors only");
    TORCH_CHECK(params[k].scalar_type() == p_type && grads[k].scalar_type() == p_type,
                "fused_adopt_8bit_: parameters and gradients must share one dtype");
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
    TORCH_CHECK(steps[k].device().is_cpu() && steps[k].scalar_type() == at::kFloat &&
                    steps[k].numel() == 1,
                "fused_adopt_8bit_: step ", k, " must be a one-element float32 CPU tensor");
    Tensor8& t = ts[k];
    t.p = params[k].data_ptr();
    t.g = grads[k].data_ptr();
    t.qm = m_codes[k].data_ptr<int8_t>();
    t.sm = m_scales[k].data_ptr<float>();
    t.qv = v_codes[k].data_ptr<uint8_t>();
    t.sv = v_scales[k].data_ptr<float>();
    t.n = n;
    t.seed = state_seed(*steps[k].data_ptr<float>(), n);
    // the same float32 values the for-loop path's clamp/mul/addcmul receive
    t.bound = static_cast<float>(sc[k]);
    t.sq_weight = static_cast<float>(sc[count + k]);
    t.decay = static_cast<float>(sc[2 * count + k]);
  }
  Hyper h;
  h.lr = static_cast<float>(lr);
  h.w1 = static_cast<float>(1.0 - beta1);
  h.one_minus_w1 = 1.0f - h.w1;
  h.small_weight = h.w1 < 0.5f;
  h.beta2 = static_cast<float>(beta2);
  h.eps = static_cast<float>(eps);
  h.coupled = coupled && weight_decay != 0.0;
  h.wd = static_cast<float>(weight_decay);
  h.gmul = static_cast<float>((maximize ? -1.0 : 1.0) / grad_scale);
  h.nesterov = nesterov;
  h.stochastic = stochastic;

  if (p_type == at::kFloat) {
    dispatch<float>(ts, h);
  } else if (p_type == at::kBFloat16) {
    dispatch<c10::BFloat16>(ts, h);
  } else if (p_type == at::kHalf) {
    dispatch<c10::Half>(ts, h);
  } else {
    TORCH_CHECK(false, "fused_adopt_8bit_: unsupported parameter dtype ", p_type,
                " (float32, bfloat16, float16)");
  }
  for (size_t k = 0; k < count; ++k) {  // each tensor's call count, as step_t += 1
    *steps[k].data_ptr<float>() += 1.0f;
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adoptim, m) {
  m.def(
      "fused_adopt_8bit_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] m_codes, "
      "Tensor(c!)[] m_scales, Tensor(d!)[] v_codes, Tensor(e!)[] v_scales, "
      "Tensor(f!)[] steps, Tensor scalars, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool coupled, bool maximize, float grad_scale, "
      "bool stochastic, bool nesterov) -> ()");
}

TORCH_LIBRARY_IMPL(adoptim, CPU, m) { m.impl("fused_adopt_8bit_", &fused_adopt_8bit_); }
