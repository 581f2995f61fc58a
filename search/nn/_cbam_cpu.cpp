// Hand-written CPU kernels for CBAM's channel-then-spatial path (search/cbam_fused.py).
//
// Why a hand-written kernel: CBAM is memory-bound, and as torch ops even the fused autograd
// function makes ~20 passes over the feature map plus ~60 small ops, transposing copies and
// index searches. Here every sample's slice (C*H*W values, 64-256 KB at CIFAR sizes) is handled
// while it sits in the core's L2 cache: forward reads x twice and writes out once, backward reads
// g and x twice and writes dx once (re-reads within a sample come from cache). Only
// BatchNorm(1) (its statistics span the whole batch), the sigmoid of the spatial logits and the
// parameter-gradient products run as short single-threaded loops between the per-sample loops.
// The k x k convolution over the two pooled maps keeps output rows in SIMD registers across its
// taps.
//
// Supported: arrangement channel-spatial, channel pools avg and/or max (any order), spatial pool
// max & mean (either order), any odd kernel, spatial BatchNorm or none, MLP bias or none, float32
// and float64, NCHW-contiguous or channels_last input. Ties in a max go to the first index, as
// in the torch path.

#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
// c10::optional: std::optional on torch >= 2.4, and what autograd.Function counts as a possibly
// absent input on earlier versions too (their own optional type).
using OptTensor = c10::optional<Tensor>;

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// exp for float in a form GCC vectorises (std::exp stays scalar without -ffast-math): 2^n * p(r)
// with n = round(v / ln 2), r = v - n ln 2 in two parts, p a degree-6 polynomial (Cephes' expf
// coefficients, ~1 ulp on the range used here).
inline float exp_simd(float v) {
  v = std::min(std::max(v, -87.0f), 88.0f);
  const float n = std::nearbyint(v * 1.44269504088896341f);
  const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// v[i] = sigmoid(v[i] * scale + shift), vectorised for float.
inline void sigmoid_inplace(float* v, int64_t n, float scale = 1.0f, float shift = 0.0f) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = 1.0f / (1.0f + exp_simd(-(v[i] * scale + shift)));
}

inline void sigmoid_inplace(double* v, int64_t n, double scale = 1.0, double shift = 0.0) {
  for (int64_t i = 0; i < n; ++i) v[i] = sigmoid(v[i] * scale + shift);
}

struct Shape {
  int64_t B, C, H, W, HW, T, Hd, K, pad, Hp, Wr, Ws;  // Wr, Ws: padded row strides
  bool cl;  // channels_last: a sample is (HW, C) in memory, else (C, HW)
};

// One 64-byte SIMD register of T (GCC vector extension): the k x k convolution keeps a row
// segment of its output in registers across all taps.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using V = typename Vec<T>::type;
// The integer vector that a comparison of two V<T> gives (same lane count and width).
template <typename T>
struct IVec;
template <>
struct IVec<float> {
  typedef int32_t type __attribute__((vector_size(64)));
};
template <>
struct IVec<double> {
  typedef int64_t type __attribute__((vector_size(64)));
};
template <typename T>
using VI = typename IVec<T>::type;
template <typename T>
constexpr int64_t lanes = 64 / sizeof(T);

template <typename T>
inline V<T> loadu(const T* p) {
  V<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

Shape shape_of(const Tensor& x, const Tensor& fc1_w, const Tensor& conv_w, int64_t pools) {
  Shape s{};
  s.B = x.size(0);
  s.C = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.HW = s.H * s.W;
  s.T = pools;
  s.Hd = fc1_w.size(0);
  s.K = conv_w.size(-1);
  s.pad = s.K / 2;
  s.Hp = s.H + 2 * s.pad;
  const int64_t n = x.scalar_type() == at::kDouble ? lanes<double> : lanes<float>;
  s.Wr = (s.W + n - 1) / n * n;  // output rows, whole registers
  s.Ws = s.Wr + s.K - 1;          // padded input rows: every tap's register load stays inside
  s.cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return s;
}

const Tensor& dense_like(const Tensor& t, const Tensor& like, Tensor& holder) {
  // ``t`` in the memory order of ``like`` (contiguous or channels_last).
  bool cl = !like.is_contiguous() && like.is_contiguous(at::MemoryFormat::ChannelsLast);
  auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (t.is_contiguous(fmt) && t.strides() == like.strides()) return t;
  holder = t.contiguous(fmt);
  if (holder.strides() != like.strides()) holder = at::empty_like(like).copy_(t);
  return holder;
}

// Zero-padded copy of M (H, W) maps into (M, Hp, Ws) rows (p zeros before each row, zeros after).
template <typename T>
void pad_maps(const Shape& s, int64_t maps, const T* src, T* dst) {
  std::fill(dst, dst + maps * s.Hp * s.Ws, T(0));
  for (int64_t m = 0; m < maps; ++m)
    for (int64_t h = 0; h < s.H; ++h)
      std::copy(src + (m * s.H + h) * s.W, src + (m * s.H + h + 1) * s.W,
                dst + (m * s.Hp + h + s.pad) * s.Ws + s.pad);
}

// out (H, W) = sum over maps of the k x k cross-correlation of padded input (M, Hp, Ws) with
// weight (M, K, K). K and M are template arguments so that the tap loops unroll completely and
// the accumulators stay in registers: one per kernel row, so that the M K^2 multiply-adds of an
// output register are K chains, not one (a single chain was latency-bound: ~10x its arithmetic).
template <typename T, int K, int M>
void conv_rows_k(const Shape& s, const T* in, const T* wt, T* out) {
  constexpr int64_t N = lanes<T>;
  T tail[N];
  for (int64_t h = 0; h < s.H; ++h)
    for (int64_t w0 = 0; w0 < s.Wr; w0 += N) {
      V<T> part[K] = {};
#pragma GCC unroll 2
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 9
        for (int i = 0; i < K; ++i) {
          const T* row = in + (m * s.Hp + h + i) * s.Ws + w0;
          const T* wr = wt + (m * K + i) * K;
#pragma GCC unroll 9
          for (int j = 0; j < K; ++j) part[i] += wr[j] * loadu(row + j);
        }
      V<T> acc = part[0];
#pragma GCC unroll 9
      for (int i = 1; i < K; ++i) acc += part[i];
      const int64_t n = std::min(N, s.W - w0);
      std::memcpy(tail, &acc, sizeof(acc));
      std::copy(tail, tail + n, out + h * s.W + w0);
    }
}

// d_weight (M, K, K) = sum_{h,w} padded maps (M, Hp, Ws)[m, h+i, w+j] * d_out (H, Wr)[h, w], with
// d_out's columns past W zero.
template <typename T, int K>
void conv_weight_grad_k(const Shape& s, const T* in, int64_t maps, const T* d_out, T* d_wt) {
  constexpr int64_t N = lanes<T>;
  T tail[N];
  for (int64_t m = 0; m < maps; ++m)
    for (int i = 0; i < K; ++i) {
      V<T> acc[K] = {};
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t w0 = 0; w0 < s.Wr; w0 += N) {
          const V<T> d = loadu(d_out + h * s.Wr + w0);
          const T* row = in + (m * s.Hp + h + i) * s.Ws + w0;
          for (int j = 0; j < K; ++j) acc[j] += loadu(row + j) * d;
        }
      for (int j = 0; j < K; ++j) {
        std::memcpy(tail, &acc[j], sizeof(acc[j]));
        T total = 0;
        for (int64_t l = 0; l < N; ++l) total += tail[l];
        d_wt[(m * K + i) * K + j] = total;
      }
    }
}

#define CBAM_DISPATCH_K(K, CALL) \
  switch (K) {                   \
    case 1: CALL(1); break;      \
    case 3: CALL(3); break;      \
    case 5: CALL(5); break;      \
    case 7: CALL(7); break;      \
    default: CALL(9); break;     \
  }

template <typename T>
void conv_rows(const Shape& s, const T* in, int64_t maps, const T* wt, T* out) {
#define CBAM_CALL_1(k) conv_rows_k<T, k, 1>(s, in, wt, out)
#define CBAM_CALL_2(k) conv_rows_k<T, k, 2>(s, in, wt, out)
  if (maps == 1) {
    CBAM_DISPATCH_K(s.K, CBAM_CALL_1)
  } else {
    CBAM_DISPATCH_K(s.K, CBAM_CALL_2)
  }
#undef CBAM_CALL_1
#undef CBAM_CALL_2
}

template <typename T>
void conv_weight_grad(const Shape& s, const T* in, int64_t maps, const T* d_out, T* d_wt) {
#define CBAM_CALL(k) conv_weight_grad_k<T, k>(s, in, maps, d_out, d_wt)
  CBAM_DISPATCH_K(s.K, CBAM_CALL)
#undef CBAM_CALL
}

// Sum, max and first index of the max of v[i] = row[i] * scale[i] (scale may be null: 1): a
// vectorised reduction, then a search for the max (the row is in L1 by then): one vectorised
// min-index pass on short rows, else blocks of 16 with an early exit.
template <typename T>
inline void sum_max_arg(const T* row, const T* scale, int64_t n, T& sum, T& max, int64_t& arg) {
  T s = 0, m = -std::numeric_limits<T>::infinity();
  if (scale) {
#pragma omp simd reduction(+ : s) reduction(max : m)
    for (int64_t i = 0; i < n; ++i) {
      const T v = row[i] * scale[i];
      s += v;
      m = v > m ? v : m;
    }
  } else {
#pragma omp simd reduction(+ : s) reduction(max : m)
    for (int64_t i = 0; i < n; ++i) {
      s += row[i];
      m = row[i] > m ? row[i] : m;
    }
  }
  sum = s;
  max = m;
  if (n <= 256) {
    // Short rows (8x8 and 16x16 maps, up to 256 channels): one vectorised pass for the smallest
    // index holding the max beats a block search ending in a scalar loop (the whole forward at
    // 64x256x8x8: 0.71 -> 0.46 ms). The index is 32-bit: as many SIMD lanes as the float compare.
    const int32_t len = static_cast<int32_t>(n);
    int32_t first = len;
    if (scale) {
#pragma omp simd reduction(min : first)
      for (int32_t l = 0; l < len; ++l) first = row[l] * scale[l] == m && l < first ? l : first;
    } else {
#pragma omp simd reduction(min : first)
      for (int32_t l = 0; l < len; ++l) first = row[l] == m && l < first ? l : first;
    }
    arg = first < len ? first : 0;
    return;
  }
  constexpr int64_t L = 16;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    int hit = 0;
    if (scale) {
#pragma omp simd reduction(| : hit)
      for (int64_t l = i; l < i + L; ++l) hit |= row[l] * scale[l] == m;
    } else {
#pragma omp simd reduction(| : hit)
      for (int64_t l = i; l < i + L; ++l) hit |= row[l] == m;
    }
    if (hit) break;
  }
  for (; i < n; ++i)
    if ((scale ? row[i] * scale[i] : row[i]) == m) break;
  arg = i < n ? i : 0;
}

// Whole registers of T covering n values.
template <typename T>
int64_t padded(int64_t n) {
  return (n + lanes<T> - 1) / lanes<T> * lanes<T>;
}

// A (rows, cols) row-major matrix, or its transpose, as rows of padded<T>(cols) (zeros past cols).
template <typename T>
std::vector<T> padded_rows(const T* m, int64_t rows, int64_t cols, bool transpose) {
  const int64_t r_out = transpose ? cols : rows, c_out = transpose ? rows : cols;
  const int64_t ld = padded<T>(c_out);
  std::vector<T> t(r_out * ld, T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      t[transpose ? c * ld + r : r * ld + c] = m[r * cols + c];
  return t;
}

// Mean, max and first index of the max across channels of y = x * A (NCHW), over positions
// [i0, HW): an accumulator array in memory walked once per channel.
template <typename T>
void spatial_pool_rows(const T* xs, const T* a, int64_t C, int64_t HW, int64_t i0, T* mean, T* mx,
                       int32_t* arg) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::fill(mean + i0, mean + HW, T(0));
  std::fill(mx + i0, mx + HW, neg_inf);
  std::fill(arg + i0, arg + HW, 0);
  for (int64_t c = 0; c < C; ++c) {
    const T* row = xs + c * HW;
    const T ac = a[c];
    const int32_t cc = static_cast<int32_t>(c);
#pragma omp simd
    for (int64_t i = i0; i < HW; ++i) {
      const T v = row[i] * ac;
      mean[i] += v;
      const bool gt = v > mx[i];
      mx[i] = gt ? v : mx[i];
      arg[i] = gt ? cc : arg[i];
    }
  }
  for (int64_t i = i0; i < HW; ++i) mean[i] /= static_cast<T>(C);
}

// The same, with blocks of kPoolRegs registers of positions held in registers across the whole
// channel loop: in memory, every channel was a store-to-load round trip per accumulator (the
// spatial pooling took a third of the forward at 64x256x8x8).
constexpr int kPoolRegs = 4;

template <typename T>
void spatial_pool_nchw(const T* xs, const T* a, int64_t C, int64_t HW, T* mean, T* mx,
                       int32_t* arg) {
  constexpr int64_t N = lanes<T>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  int64_t i0 = 0;
  for (; i0 + kPoolRegs * N <= HW; i0 += kPoolRegs * N) {
    V<T> sum[kPoolRegs], best[kPoolRegs];
    VI<T> at[kPoolRegs];
    for (int r = 0; r < kPoolRegs; ++r) {
      sum[r] = V<T>{};
      best[r] = V<T>{} + neg_inf;
      at[r] = VI<T>{};
    }
    for (int64_t c = 0; c < C; ++c) {
      const T ac = a[c];
      const VI<T> cc = VI<T>{} + static_cast<decltype(VI<T>{}[0])>(c);
      const T* row = xs + c * HW + i0;
      for (int r = 0; r < kPoolRegs; ++r) {
        const V<T> y = loadu(row + r * N) * ac;
        sum[r] += y;
        const VI<T> gt = y > best[r];
        best[r] = gt ? y : best[r];
        at[r] = gt ? cc : at[r];
      }
    }
    for (int r = 0; r < kPoolRegs; ++r)
      for (int64_t l = 0; l < N; ++l) {
        mean[i0 + r * N + l] = sum[r][l] / static_cast<T>(C);
        mx[i0 + r * N + l] = best[r][l];
        arg[i0 + r * N + l] = static_cast<int32_t>(at[r][l]);
      }
  }
  if (i0 < HW) spatial_pool_rows<T>(xs, a, C, HW, i0, mean, mx, arg);
}

// Calls block(std::integral_constant<int, R>, c0) over the channels [0, C) in runs of R
// registers (kPoolRegs, then one run of 1-3 for the rest), so that each run's accumulators are
// a compile-time number of registers; returns where the last C % lanes channels begin.
template <typename T, typename Block>
int64_t for_register_blocks(int64_t C, Block&& block) {
  constexpr int64_t N = lanes<T>;
  int64_t c0 = 0;
  for (; c0 + kPoolRegs * N <= C; c0 += kPoolRegs * N)
    block(std::integral_constant<int, kPoolRegs>{}, c0);
  switch ((C - c0) / N) {
    case 3: block(std::integral_constant<int, 3>{}, c0); break;
    case 2: block(std::integral_constant<int, 2>{}, c0); break;
    case 1: block(std::integral_constant<int, 1>{}, c0); break;
    default: break;
  }
  return c0 + (C - c0) / N * N;
}

// o0 = sum over rows r of c0[r] * m[r] (and o1 likewise from c1, sharing the loads), for m
// (rows, ld) row-major: ld a whole number of registers, here R of them, summed in registers with
// two partial sums each (alternate rows), so the adds are not one latency-bound chain. The MLP's
// products W1 p and W2^T dl written this way have no horizontal sums; as one dot product per
// hidden unit they took ~1/5 of the forward's per-sample pass at 64x256x8x8.
template <typename T, int R, bool Two>
void combine_rows_k(const T* m, int64_t ld, int64_t rows, const T* c0, const T* c1, T* o0,
                    T* o1) {
  constexpr int64_t N = lanes<T>;
  V<T> a0[R], b0[R], a1[R], b1[R];
  for (int k = 0; k < R; ++k) a0[k] = b0[k] = a1[k] = b1[k] = V<T>{};
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2)
    for (int k = 0; k < R; ++k) {
      const V<T> w = loadu(m + r * ld + k * N), u = loadu(m + (r + 1) * ld + k * N);
      a0[k] += c0[r] * w;
      b0[k] += c0[r + 1] * u;
      if constexpr (Two) {
        a1[k] += c1[r] * w;
        b1[k] += c1[r + 1] * u;
      }
    }
  for (; r < rows; ++r)
    for (int k = 0; k < R; ++k) {
      const V<T> w = loadu(m + r * ld + k * N);
      a0[k] += c0[r] * w;
      if constexpr (Two) a1[k] += c1[r] * w;
    }
  for (int k = 0; k < R; ++k) {
    const V<T> t0 = a0[k] + b0[k];
    std::memcpy(o0 + k * N, &t0, sizeof(t0));
    if constexpr (Two) {
      const V<T> t1 = a1[k] + b1[k];
      std::memcpy(o1 + k * N, &t1, sizeof(t1));
    }
  }
}

template <typename T>
void combine_rows(const T* m, int64_t ld, int64_t rows, const T* c0, const T* c1, T* o0, T* o1) {
  for_register_blocks<T>(ld, [&](auto regs, int64_t j0) {
    constexpr int R = decltype(regs)::value;
    if (c1)
      combine_rows_k<T, R, true>(m + j0, ld, rows, c0, c1, o0 + j0, o1 + j0);
    else
      combine_rows_k<T, R, false>(m + j0, ld, rows, c0, nullptr, o0 + j0, nullptr);
  });
}

// Sum, max and first index of the max over positions per channel (channels_last), for channels
// [c0, c0 + R registers): accumulators in registers across the position loop, as in
// spatial_pool_nchw.
template <typename T, int R>
void channel_pool_cl_block(const T* xs, int64_t C, int64_t HW, int64_t c0, T* sum, T* mx,
                           int32_t* arg) {
  constexpr int64_t N = lanes<T>;
  using Idx = decltype(VI<T>{}[0]);
  V<T> total[R], best[R];
  VI<T> at[R];
  for (int r = 0; r < R; ++r) {
    total[r] = V<T>{};
    best[r] = V<T>{} - std::numeric_limits<T>::infinity();
    at[r] = VI<T>{};
  }
  for (int64_t i = 0; i < HW; ++i) {
    const T* row = xs + i * C + c0;
    const VI<T> ii = VI<T>{} + static_cast<Idx>(i);
    for (int r = 0; r < R; ++r) {
      const V<T> v = loadu(row + r * N);
      total[r] += v;
      const VI<T> gt = v > best[r];
      best[r] = gt ? v : best[r];
      at[r] = gt ? ii : at[r];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t l = 0; l < N; ++l) {
      sum[c0 + r * N + l] = total[r][l];
      mx[c0 + r * N + l] = best[r][l];
      arg[c0 + r * N + l] = static_cast<int32_t>(at[r][l]);
    }
}

template <typename T>
void channel_pool_cl(const T* xs, int64_t C, int64_t HW, T* sum, T* mx, int32_t* arg) {
  const int64_t c0 = for_register_blocks<T>(C, [&](auto regs, int64_t first) {
    channel_pool_cl_block<T, decltype(regs)::value>(xs, C, HW, first, sum, mx, arg);
  });
  if (c0 == C) return;
  // The last C % N channels: accumulators in memory.
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::fill(sum + c0, sum + C, T(0));
  std::fill(mx + c0, mx + C, neg_inf);
  std::fill(arg + c0, arg + C, 0);
  for (int64_t i = 0; i < HW; ++i) {
    const T* row = xs + i * C;
    const int32_t ii = static_cast<int32_t>(i);
#pragma omp simd
    for (int64_t c = c0; c < C; ++c) {
      const T v = row[c];
      sum[c] += v;
      const bool gt = v > mx[c];
      mx[c] = gt ? v : mx[c];
      arg[c] = gt ? ii : arg[c];
    }
  }
}

// Backward, channels_last: dy = g * S + d(mean) into dx, and dA = sum over positions of x * dy,
// for channels [c0, c0 + R registers) with dA in registers across the position loop.
template <typename T, int R>
void dy_cl_block(const T* xs, const T* gs, const T* sg, const T* dm, int64_t C, int64_t HW,
                 int64_t c0, T* ds, T* d_a) {
  constexpr int64_t N = lanes<T>;
  V<T> acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V<T>{};
  for (int64_t i = 0; i < HW; ++i) {
    const int64_t off = i * C + c0;
    const T si = sg[i], mi = dm[i];
    for (int r = 0; r < R; ++r) {
      const V<T> v = loadu(gs + off + r * N) * si + mi;
      std::memcpy(ds + off + r * N, &v, sizeof(v));
      acc[r] += loadu(xs + off + r * N) * v;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t l = 0; l < N; ++l) d_a[c0 + r * N + l] = acc[r][l];
}

// Up to kPoolRegs registers of channels, one sweep over the positions holds dA in registers.
// Wider, the sweeps of register runs strided through the sample once per run and took 1.4-1.6x
// as long at 64x256x8x8 as one position at a time over all channels with dA in memory (L1),
// which in turn is slower at 16 channels, where dA is one register.
template <typename T>
void dy_cl(const T* xs, const T* gs, const T* sg, const T* dm, int64_t C, int64_t HW, T* ds,
           T* d_a) {
  int64_t c0 = 0;
  if (C <= kPoolRegs * lanes<T>) {
    c0 = for_register_blocks<T>(C, [&](auto regs, int64_t first) {
      dy_cl_block<T, decltype(regs)::value>(xs, gs, sg, dm, C, HW, first, ds, d_a);
    });
    if (c0 == C) return;
  }
  std::fill(d_a + c0, d_a + C, T(0));
  for (int64_t i = 0; i < HW; ++i) {
    const T* xr = xs + i * C;
    const T* gr = gs + i * C;
    T* dr = ds + i * C;
    const T si = sg[i], mi = dm[i];
#pragma omp simd
    for (int64_t c = c0; c < C; ++c) {
      const T v = gr[c] * si + mi;
      dr[c] = v;
      d_a[c] += xr[c] * v;
    }
  }
}

// channels_last spatial pooling (float, C a multiple of 16): reducing each position's channels on
// its own ends in three horizontal reductions per position, mostly shuffles, and a second pass
// for the index of the max (3-4x the NCHW pooling's time at 16 and at 256 channels). Instead
// each position's channels are reduced lane-wise into one register each of sums, maxima and
// their indices, four positions at a time (independent chains), and the registers of 16
// positions are transposed so that one vertical pass finishes all 16.
// Swap the off-diagonal KxK blocks of each 2Kx2K block of a 16x16 matrix held as 16 rows: after
// K = 8, 4, 2, 1 the rows hold the transpose.
#define CBAM_LANES(...) __VA_ARGS__
#define CBAM_SWAP_STAGE(K, LO, HI)                                             \
  for (int i = 0; i < 16; ++i)                                                 \
    if ((i & (K)) == 0) {                                                      \
      const V<float> a = r[i], b = r[i + (K)];                                 \
      r[i] = __builtin_shufflevector(a, b, LO);                                \
      r[i + (K)] = __builtin_shufflevector(a, b, HI);                          \
    }

inline void transpose16(V<float> (&r)[16]) {
  CBAM_SWAP_STAGE(8, CBAM_LANES(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                  CBAM_LANES(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
  CBAM_SWAP_STAGE(4, CBAM_LANES(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                  CBAM_LANES(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
  CBAM_SWAP_STAGE(2, CBAM_LANES(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                  CBAM_LANES(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
  CBAM_SWAP_STAGE(1, CBAM_LANES(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                  CBAM_LANES(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}

inline void transpose16(VI<float> (&r)[16]) {
  V<float> f[16];
  std::memcpy(f, r, sizeof(f));  // the same bits, as floats: the shuffles only move lanes
  transpose16(f);
  std::memcpy(r, f, sizeof(f));
}

// 16 rows of lane-wise partial sums, maxima and the maxima's indices, finished: lane l of the
// results is row l's sum, max, and the smallest index holding that max (0 where none does).
struct Pooled16 {
  V<float> sum, max;
  VI<float> arg;
};

inline Pooled16 finish16(V<float> (&total)[16], V<float> (&best)[16], VI<float> (&at)[16]) {
  transpose16(total);
  transpose16(best);
  transpose16(at);
  Pooled16 r{total[0], best[0], {}};
  for (int l = 1; l < 16; ++l) {
    r.sum += total[l];
    r.max = best[l] > r.max ? best[l] : r.max;
  }
  const VI<float> none = VI<float>{} + std::numeric_limits<int32_t>::max();
  VI<float> k = none;
  for (int l = 0; l < 16; ++l) {
    const VI<float> cand = best[l] == r.max ? at[l] : none;
    k = cand < k ? cand : k;
  }
  r.arg = k == none ? VI<float>{} : k;
  return r;
}

// 16 or 32 channels: the 16x16 blocks of x itself are transposed (one or two per 16 positions,
// where the lane-wise partials below need three).
int64_t spatial_pool_cl_narrow(const float* xs, const float* a, int64_t C, int64_t HW, float* mean,
                               float* mx, int32_t* arg) {
  constexpr int64_t N = 16;
  const int64_t blocks = HW / N;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const float* base = xs + blk * N * C;
    V<float> sum = {}, best = V<float>{} - std::numeric_limits<float>::infinity();
    VI<float> at = {};
    for (int64_t c0 = 0; c0 < C; c0 += N) {
      V<float> r[N];
      for (int64_t l = 0; l < N; ++l) r[l] = loadu(base + l * C + c0);
      transpose16(r);
      for (int64_t c = 0; c < N; ++c) {
        const V<float> y = r[c] * a[c0 + c];
        sum += y;
        const VI<float> gt = y > best;
        best = gt ? y : best;
        at = gt ? VI<float>{} + static_cast<int32_t>(c0 + c) : at;
      }
    }
    for (int64_t l = 0; l < N; ++l) {
      mean[blk * N + l] = sum[l] / static_cast<float>(C);
      mx[blk * N + l] = best[l];
      arg[blk * N + l] = at[l];
    }
  }
  return blocks * N;
}

// Mean, max and first index of the max across channels of y = x * A for the leading positions
// in whole blocks of 16; returns how many positions it did (0 where it does not apply).
template <typename T>
int64_t spatial_pool_cl16(const T*, const T*, int64_t, int64_t, T*, T*, int32_t*) {
  return 0;
}

template <>
int64_t spatial_pool_cl16<float>(const float* xs, const float* a, int64_t C, int64_t HW,
                                 float* mean, float* mx, int32_t* arg) {
  constexpr int64_t N = 16, Q = 4;  // lanes; positions in flight
  if (C % N != 0) return 0;
  if (C <= 2 * N) return spatial_pool_cl_narrow(xs, a, C, HW, mean, mx, arg);
  const VI<float> lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const V<float> neg_inf = V<float>{} - std::numeric_limits<float>::infinity();
  const int64_t blocks = HW / N;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    V<float> total[N], best[N];
    VI<float> at[N];  // per position: lane-wise partial sum, max and the max's channel
    for (int64_t p = 0; p < N; p += Q) {
      const float* rows = xs + (blk * N + p) * C;
      V<float> t[Q], m[Q];
      VI<float> k[Q];
      for (int q = 0; q < Q; ++q) {
        t[q] = V<float>{};
        m[q] = neg_inf;
        k[q] = VI<float>{};
      }
      for (int64_t c0 = 0; c0 < C; c0 += N) {
        const V<float> av = loadu(a + c0);
        const VI<float> cc = lane + static_cast<int32_t>(c0);
        for (int q = 0; q < Q; ++q) {
          const V<float> y = loadu(rows + q * C + c0) * av;
          t[q] += y;
          const VI<float> gt = y > m[q];
          m[q] = gt ? y : m[q];
          k[q] = gt ? cc : k[q];
        }
      }
      for (int q = 0; q < Q; ++q) {
        total[p + q] = t[q];
        best[p + q] = m[q];
        at[p + q] = k[q];
      }
    }
    const Pooled16 r = finish16(total, best, at);  // the first channel holding the max
    for (int64_t l = 0; l < N; ++l) {
      mean[blk * N + l] = r.sum[l] / static_cast<float>(C);
      mx[blk * N + l] = r.max[l];
      arg[blk * N + l] = r.arg[l];
    }
  }
  return blocks * N;
}

// NCHW float with H*W a multiple of 16 (8x8 maps and up): per-channel reductions over positions
// for 16 channels at a time, each kept as a register of 16 lane-wise partials and the 16
// registers transposed, so that one vertical pass finishes all 16 channels; reducing each
// channel's 4-register row on its own was mostly horizontal shuffles at 8x8 (256 channels).
//
// Channel pooling: sum, max and first index of the max over positions; returns how many leading
// channels it did (0 where it does not apply).
template <typename T>
int64_t channel_pool_nchw16(const T*, int64_t, int64_t, T*, T*, int32_t*) {
  return 0;
}

template <>
int64_t channel_pool_nchw16<float>(const float* xs, int64_t C, int64_t HW, float* sum, float* mx,
                                   int32_t* arg) {
  constexpr int64_t N = 16;
  if (HW % N != 0) return 0;
  const VI<float> lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  int64_t c0 = 0;
  for (; c0 + N <= C; c0 += N) {
    V<float> total[N], best[N];
    VI<float> at[N];
    for (int64_t c = 0; c < N; ++c) {
      const float* row = xs + (c0 + c) * HW;
      V<float> t = loadu(row), m = t;
      VI<float> k = lane;
      for (int64_t i = N; i < HW; i += N) {
        const V<float> v = loadu(row + i);
        t += v;
        const VI<float> gt = v > m;
        m = gt ? v : m;
        k = gt ? lane + static_cast<int32_t>(i) : k;
      }
      total[c] = t;
      best[c] = m;
      at[c] = k;
    }
    const Pooled16 r = finish16(total, best, at);
    for (int64_t c = 0; c < N; ++c) {
      sum[c0 + c] = r.sum[c];
      mx[c0 + c] = r.max[c];
      arg[c0 + c] = r.arg[c];
    }
  }
  return c0;
}

// Backward: dy = g * S + d(mean) into dx and dA = sum over positions of x * dy, per channel.
template <typename T>
int64_t dy_nchw16(const T*, const T*, const T*, const T*, int64_t, int64_t, T*, T*) {
  return 0;
}

template <>
int64_t dy_nchw16<float>(const float* xs, const float* gs, const float* sg, const float* dm,
                         int64_t C, int64_t HW, float* ds, float* d_a) {
  constexpr int64_t N = 16;
  if (HW % N != 0) return 0;
  int64_t c0 = 0;
  for (; c0 + N <= C; c0 += N) {
    V<float> part[N];
    for (int64_t c = 0; c < N; ++c) {
      const int64_t off = (c0 + c) * HW;
      V<float> acc = {};
      for (int64_t i = 0; i < HW; i += N) {
        const V<float> v = loadu(gs + off + i) * loadu(sg + i) + loadu(dm + i);
        std::memcpy(ds + off + i, &v, sizeof(v));
        acc += loadu(xs + off + i) * v;
      }
      part[c] = acc;
    }
    transpose16(part);
    V<float> total = part[0];
    for (int l = 1; l < N; ++l) total += part[l];
    for (int64_t c = 0; c < N; ++c) d_a[c0 + c] = total[c];
  }
  return c0;
}

template <typename T>
void forward_impl(const Shape& s, const T* x, const T* w1, const T* b1, const T* w2, const T* b2,
                  const T* cw, int64_t avg_slot, int64_t max_slot, bool mean_first, T* pooled,
                  T* hidden, T* gate_c, int32_t* hw_arg, T* maps, int32_t* c_arg, T* conv_out) {
  const int64_t C = s.C, HW = s.HW, Hd = s.Hd, B = s.B;
  const int64_t max_ch = mean_first ? 1 : 0, mean_ch = 1 - max_ch;
  const int64_t ldc = padded<T>(C);
  const std::vector<T> w2t = padded_rows(w2, C, Hd, true);  // fc2's weight as (Hd, ldc)
  const int64_t ldh = padded<T>(Hd);
  const std::vector<T> w1t = padded_rows(w1, Hd, C, true);  // fc1's weight as (C, ldh)
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sum(C), mx(C), act(Hd), smean(HW), smax(HW), padded(2 * s.Hp * s.Ws),
        pre(2 * ldh);
    std::vector<int32_t> arg(C);
    for (int64_t b = begin; b < end; ++b) {
      const T* xs = x + b * C * HW;
      // Channel pooling over H x W: sum, max and its first index.
      if (!s.cl) {
        const int64_t done = channel_pool_nchw16<T>(xs, C, HW, sum.data(), mx.data(), arg.data());
        for (int64_t c = done; c < C; ++c) {
          int64_t i = 0;
          sum_max_arg<T>(xs + c * HW, nullptr, HW, sum[c], mx[c], i);
          arg[c] = static_cast<int32_t>(i);
        }
      } else {
        channel_pool_cl<T>(xs, C, HW, sum.data(), mx.data(), arg.data());
      }
      // Shared MLP on each descriptor, summed, sigmoid.
      for (int64_t t = 0; t < s.T; ++t) {
        T* pt = pooled + (t * B + b) * C;
        if (t == avg_slot)
          for (int64_t c = 0; c < C; ++c) pt[c] = sum[c] / static_cast<T>(HW);
        else
          for (int64_t c = 0; c < C; ++c) pt[c] = mx[c];
      }
      const bool two = s.T > 1;
      combine_rows<T>(w1t.data(), ldh, C, pooled + b * C, two ? pooled + (B + b) * C : nullptr,
                      pre.data(), two ? pre.data() + ldh : nullptr);
      std::fill(act.begin(), act.end(), T(0));
      for (int64_t t = 0; t < s.T; ++t) {
        T* ht = hidden + (t * B + b) * Hd;
        for (int64_t j = 0; j < Hd; ++j) {
          const T v = pre[t * ldh + j] + (b1 ? b1[j] : T(0));
          ht[j] = v;
          act[j] += v > 0 ? v : T(0);
        }
      }
      if (max_slot >= 0)
        for (int64_t c = 0; c < C; ++c) hw_arg[b * C + c] = arg[c];
      // Second layer over all channels at once from the transposed weight (no horizontal sums).
      T* a = gate_c + b * C;
      for (int64_t c = 0; c < C; ++c) a[c] = b2 ? b2[c] * static_cast<T>(s.T) : T(0);
      for (int64_t j = 0; j < Hd; ++j) {
        const T aj = act[j];
        if (aj == T(0)) continue;
        const T* wj = w2t.data() + j * ldc;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) a[c] += wj[c] * aj;
      }
      sigmoid_inplace(a, C);
      // Spatial pooling across channels of y = x * A: max (first index) and mean.
      int32_t* sa = c_arg + b * HW;
      if (!s.cl) {
        spatial_pool_nchw<T>(xs, a, C, HW, smean.data(), smax.data(), sa);
      } else {
        const int64_t done = spatial_pool_cl16<T>(xs, a, C, HW, smean.data(), smax.data(), sa);
        for (int64_t i = done; i < HW; ++i) {
          T acc = 0;
          int64_t c = 0;
          sum_max_arg<T>(xs + i * C, a, C, acc, smax[i], c);
          smean[i] = acc / static_cast<T>(C);
          sa[i] = static_cast<int32_t>(c);
        }
      }
      T* ms = maps + b * 2 * HW;
      std::copy(smax.begin(), smax.end(), ms + max_ch * HW);
      std::copy(smean.begin(), smean.end(), ms + mean_ch * HW);
      // k x k convolution of the two maps (zero padding).
      pad_maps(s, 2, ms, padded.data());
      conv_rows(s, padded.data(), 2, cw, conv_out + b * HW);
    }
  });
}

template <typename T>
void apply_impl(const Shape& s, const T* x, const T* gate_c, const T* gate_s, T* out) {
  const int64_t C = s.C, HW = s.HW;
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* xs = x + b * C * HW;
      T* os = out + b * C * HW;
      const T* a = gate_c + b * C;
      const T* sg = gate_s + b * HW;
      if (!s.cl) {
        for (int64_t c = 0; c < C; ++c) {
          const T ac = a[c];
          const T* row = xs + c * HW;
          T* o = os + c * HW;
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) o[i] = row[i] * ac * sg[i];
        }
      } else {
        for (int64_t i = 0; i < HW; ++i) {
          const T si = sg[i];
          const T* row = xs + i * C;
          T* o = os + i * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = row[c] * a[c] * si;
        }
      }
    }
  });
}

// d(logits of S) = sigmoid'(.) * sum_c g * x * A.
template <typename T>
void spatial_grad_impl(const Shape& s, const T* g, const T* x, const T* gate_c, const T* gate_s,
                       T* d_logits) {
  const int64_t C = s.C, HW = s.HW;
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* xs = x + b * C * HW;
      const T* gs = g + b * C * HW;
      const T* a = gate_c + b * C;
      const T* sg = gate_s + b * HW;
      T* d = d_logits + b * HW;
      if (!s.cl) {
        std::fill(d, d + HW, T(0));
        for (int64_t c = 0; c < C; ++c) {
          const T ac = a[c];
          const T* xr = xs + c * HW;
          const T* gr = gs + c * HW;
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) d[i] += xr[i] * ac * gr[i];
        }
      } else {
        for (int64_t i = 0; i < HW; ++i) {
          const T* xr = xs + i * C;
          const T* gr = gs + i * C;
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t c = 0; c < C; ++c) acc += xr[c] * a[c] * gr[c];
          d[i] = acc;
        }
      }
      for (int64_t i = 0; i < HW; ++i) d[i] *= (T(1) - sg[i]) * sg[i];
    }
  });
}

template <typename T>
void backward_impl(const Shape& s, const T* g, const T* x, const T* gate_c, const T* gate_s,
                   const T* hidden, const int32_t* hw_arg, const T* maps, const int32_t* c_arg,
                   const T* d_conv, const T* w1, const T* w2, const T* cw, int64_t avg_slot,
                   int64_t max_slot, bool mean_first, T* dx, T* d_logits_c, T* d_hidden,
                   T* d_cw_part) {
  const int64_t C = s.C, HW = s.HW, Hd = s.Hd, B = s.B, K = s.K;
  const int64_t max_ch = mean_first ? 1 : 0, mean_ch = 1 - max_ch;
  const int64_t plane = s.Hp * s.Ws;
  std::vector<T> flipped(2 * K * K);  // d(maps) = the weight flipped in both axes over d(out)
  const int64_t ldh = padded<T>(Hd);
  const std::vector<T> w2p = padded_rows(w2, C, Hd, false);  // fc2's weight as (C, ldh)
  for (int64_t m = 0; m < 2; ++m)
    for (int64_t i = 0; i < K * K; ++i) flipped[m * K * K + i] = cw[m * K * K + K * K - 1 - i];
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> padded(2 * plane), d_padded(plane), d_rows(s.H * s.Wr), d_mean(HW),
        d_max(HW), d_a(C), d_act(ldh), d_pool(C), add(C), max_term(C);
    for (int64_t b = begin; b < end; ++b) {
      const T* xs = x + b * C * HW;
      const T* gs = g + b * C * HW;
      T* ds = dx + b * C * HW;
      const T* a = gate_c + b * C;
      const T* sg = gate_s + b * HW;
      const T* dco = d_conv + b * HW;
      const int32_t* sa = c_arg + b * HW;
      // Convolution backward: d(maps) (the flipped kernel over padded d_out) and this sample's
      // share of d(weight).
      pad_maps(s, 2, maps + b * 2 * HW, padded.data());
      pad_maps(s, 1, dco, d_padded.data());
      std::fill(d_rows.begin(), d_rows.end(), T(0));
      for (int64_t h = 0; h < s.H; ++h)
        std::copy(dco + h * s.W, dco + (h + 1) * s.W, d_rows.data() + h * s.Wr);
      conv_weight_grad(s, padded.data(), 2, d_rows.data(), d_cw_part + b * 2 * K * K);
      conv_rows(s, d_padded.data(), 1, flipped.data() + max_ch * K * K, d_max.data());
      conv_rows(s, d_padded.data(), 1, flipped.data() + mean_ch * K * K, d_mean.data());
      for (int64_t i = 0; i < HW; ++i) d_mean[i] /= static_cast<T>(C);
      // dy = g * S + d(mean) / C (+ d(max) at the argmax) into dx; dA = sum_hw x * dy.
      const T* dm = d_mean.data();
      if (!s.cl) {
        const int64_t done = dy_nchw16<T>(xs, gs, sg, dm, C, HW, ds, d_a.data());
        for (int64_t c = done; c < C; ++c) {
          const T* xr = xs + c * HW;
          const T* gr = gs + c * HW;
          T* dr = ds + c * HW;
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < HW; ++i) {
            const T v = gr[i] * sg[i] + dm[i];
            dr[i] = v;
            acc += xr[i] * v;
          }
          d_a[c] = acc;
        }
      } else {
        dy_cl<T>(xs, gs, sg, dm, C, HW, ds, d_a.data());
      }
      const int64_t sc = s.cl ? 1 : HW, sp = s.cl ? C : 1;  // strides of c and hw in a sample
      for (int64_t i = 0; i < HW; ++i) {
        const int64_t c = sa[i], off = c * sc + i * sp;
        ds[off] += d_max[i];
        d_a[c] += xs[off] * d_max[i];
      }
      // MLP backward: d(logits) -> d(hidden) -> d(pooled).
      T* dl = d_logits_c + b * C;
      for (int64_t c = 0; c < C; ++c) dl[c] = d_a[c] * (T(1) - a[c]) * a[c];
      // d(act) = W2^T d(logits).
      combine_rows<T>(w2p.data(), ldh, C, dl, nullptr, d_act.data(), nullptr);
      std::fill(add.begin(), add.end(), T(0));
      for (int64_t t = 0; t < s.T; ++t) {
        const T* ht = hidden + (t * B + b) * Hd;
        T* dh = d_hidden + (t * B + b) * Hd;
        std::fill(d_pool.begin(), d_pool.end(), T(0));
        for (int64_t j = 0; j < Hd; ++j) {
          const T v = ht[j] > 0 ? d_act[j] : T(0);
          dh[j] = v;
          const T* wj = w1 + j * C;
          T* dp = d_pool.data();
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dp[c] += wj[c] * v;
        }
        if (t == avg_slot)
          for (int64_t c = 0; c < C; ++c) add[c] = d_pool[c] / static_cast<T>(HW);
        else
          max_term = d_pool;
      }
      // dx = A * dy + d(avg) / HW (+ d(max) at the argmax).
      if (!s.cl) {
        for (int64_t c = 0; c < C; ++c) {
          const T ac = a[c], ad = add[c];
          T* dr = ds + c * HW;
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) dr[i] = dr[i] * ac + ad;
        }
      } else {
        const T* ad = add.data();
        for (int64_t i = 0; i < HW; ++i) {
          T* dr = ds + i * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dr[c] = dr[c] * a[c] + ad[c];
        }
      }
      if (max_slot >= 0)
        for (int64_t c = 0; c < C; ++c) ds[c * sc + hw_arg[b * C + c] * sp] += max_term[c];
    }
  });
}

// BatchNorm(1) over the (B, H*W) conv output, then the sigmoid: S. In training, the batch's
// statistics (kept for backward) and the running statistics' update, as nn.BatchNorm2d does.
// Plain loops: on CIFAR-sized maps ATen's batch_norm, sigmoid and their dispatch cost more
// than the arithmetic (~60 us of a 0.6 ms forward at 64x256x8x8).
template <typename T>
void spatial_gate_impl(int64_t n, const T* z, bool has_bn, bool training, double momentum,
                       double eps, const T* w, const T* b, T* running_mean, T* running_var,
                       T* save_mean, T* save_invstd, T* gate) {
  double mean = 0, invstd = 1, scale = 1, shift = 0;
  if (has_bn) {
    if (training) {
      double sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += z[i];
      mean = sum / n;
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += (z[i] - mean) * (z[i] - mean);
      const double var = ss / n;
      invstd = 1.0 / std::sqrt(var + eps);
      *save_mean = static_cast<T>(mean);
      *save_invstd = static_cast<T>(invstd);
      if (running_mean) {
        const double unbiased = n > 1 ? ss / (n - 1) : var;
        *running_mean = static_cast<T>((1 - momentum) * *running_mean + momentum * mean);
        *running_var = static_cast<T>((1 - momentum) * *running_var + momentum * unbiased);
      }
    } else {
      mean = *running_mean;
      invstd = 1.0 / std::sqrt(static_cast<double>(*running_var) + eps);
    }
    scale = (w ? static_cast<double>(*w) : 1.0) * invstd;
    shift = (b ? static_cast<double>(*b) : 0.0) - mean * scale;
  }
  std::copy(z, z + n, gate);
  sigmoid_inplace(gate, n, static_cast<T>(scale), static_cast<T>(shift));
}

// BatchNorm(1) backward in place: d (d logits) becomes d(conv output); d_w, d_b its parameters'.
template <typename T>
void spatial_gate_backward_impl(int64_t n, T* d, const T* z, bool has_bn, bool training,
                                double eps, const T* w, const T* running_mean,
                                const T* running_var, const T* save_mean, const T* save_invstd,
                                T* d_w, T* d_b) {
  if (!has_bn) return;
  const double mean = training ? *save_mean : *running_mean;
  const double invstd =
      training ? *save_invstd : 1.0 / std::sqrt(static_cast<double>(*running_var) + eps);
  double sum_d = 0, sum_dx = 0;
  for (int64_t i = 0; i < n; ++i) {
    sum_d += d[i];
    sum_dx += d[i] * (z[i] - mean);
  }
  const double gamma = w ? static_cast<double>(*w) : 1.0;
  if (d_w) *d_w = static_cast<T>(sum_dx * invstd);
  if (d_b) *d_b = static_cast<T>(sum_d);
  if (!training) {
    const T k = static_cast<T>(gamma * invstd);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] *= k;
    return;
  }
  // d z = gamma * invstd * (d - mean(d) - xhat * mean(d * xhat))
  const double k = gamma * invstd, md = sum_d / n, mdx = sum_dx * invstd * invstd / n;
  const T a = static_cast<T>(k), c0 = static_cast<T>(-k * (md - mean * mdx)),
          c1 = static_cast<T>(-k * mdx);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = a * d[i] + c1 * z[i] + c0;
}

// out (M, K) = A^T B for A (rows, M) and B (rows, K), row-major with leading dimensions lda,
// ldb and ldo, K a whole number of registers: 8 output rows by one register at a time, summed in
// registers over all rows, so that each register of B is loaded once for 8 multiply-adds.
template <typename T>
void gemm_tn(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t rows, int64_t M,
             int64_t K, T* out, int64_t ldo) {
  constexpr int64_t N = lanes<T>, I = 8;
  for (int64_t i0 = 0; i0 < M; i0 += I) {
    const int64_t ni = std::min(I, M - i0);
    for (int64_t k0 = 0; k0 < K; k0 += N) {
      V<T> acc[I];
      for (int64_t i = 0; i < I; ++i) acc[i] = V<T>{};
      for (int64_t r = 0; r < rows; ++r) {
        const V<T> v = loadu(b + r * ldb + k0);
        const T* ar = a + r * lda + i0;
        if (ni == I) {
          for (int64_t i = 0; i < I; ++i) acc[i] += ar[i] * v;
        } else {
          for (int64_t i = 0; i < ni; ++i) acc[i] += ar[i] * v;
        }
      }
      for (int64_t i = 0; i < ni; ++i)
        std::memcpy(out + (i0 + i) * ldo + k0, &acc[i], sizeof(acc[i]));
    }
  }
}

// The MLP's and the convolution's parameter gradients from backward's per-sample results:
// products of (C x B) by (B x Hd) and (Hd x 2B) by (2B x C), too small for BLAS to beat its own
// dispatch, as gemm_tn. As rank-1 updates of the whole output per sample, they were bound by the
// output's loads and stores (~45 us a call at 64x256x8x8).
template <typename T>
void param_grads_impl(const Shape& s, const T* d_logits_c, const T* hidden, const T* d_hidden,
                      const T* pooled, const T* d_cw_part, T* d_w1, T* d_b1, T* d_w2, T* d_b2,
                      T* d_cw) {
  const int64_t B = s.B, C = s.C, Hd = s.Hd, TB = s.T * s.B, KK = 2 * s.K * s.K;
  const int64_t ldh = padded<T>(Hd), ldc = padded<T>(C);
  std::vector<T> act(B * ldh, T(0));  // per sample, the summed ReLU of the hidden layer
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < Hd; ++j) {
        const T h = hidden[(t * B + b) * Hd + j];
        act[b * ldh + j] += h > 0 ? h : T(0);
      }
  std::vector<T> w2_rows(C * ldh);
  gemm_tn<T>(d_logits_c, C, act.data(), ldh, B, C, ldh, w2_rows.data(), ldh);
  for (int64_t c = 0; c < C; ++c)
    std::copy(w2_rows.begin() + c * ldh, w2_rows.begin() + c * ldh + Hd, d_w2 + c * Hd);
  std::vector<T> p_padded, w1_rows;
  const T* p = pooled;
  T* w1_out = d_w1;
  if (ldc != C) {  // whole registers of channels: padded copies in and out
    p_padded.assign(TB * ldc, T(0));
    for (int64_t r = 0; r < TB; ++r)
      std::copy(pooled + r * C, pooled + (r + 1) * C, p_padded.begin() + r * ldc);
    w1_rows.resize(Hd * ldc);
    p = p_padded.data();
    w1_out = w1_rows.data();
  }
  gemm_tn<T>(d_hidden, Hd, p, ldc, TB, Hd, ldc, w1_out, ldc);
  if (ldc != C)
    for (int64_t j = 0; j < Hd; ++j)
      std::copy(w1_rows.begin() + j * ldc, w1_rows.begin() + j * ldc + C, d_w1 + j * C);
  if (d_b2) {
    std::fill(d_b2, d_b2 + C, T(0));
    for (int64_t b = 0; b < B; ++b)
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) d_b2[c] += d_logits_c[b * C + c];
    for (int64_t c = 0; c < C; ++c) d_b2[c] *= static_cast<T>(s.T);
  }
  if (d_b1) {
    std::fill(d_b1, d_b1 + Hd, T(0));
    for (int64_t r = 0; r < TB; ++r)
      for (int64_t j = 0; j < Hd; ++j) d_b1[j] += d_hidden[r * Hd + j];
  }
  std::fill(d_cw, d_cw + KK, T(0));
  for (int64_t b = 0; b < B; ++b)
#pragma omp simd
    for (int64_t i = 0; i < KK; ++i) d_cw[i] += d_cw_part[b * KK + i];
}

void check_input(const Tensor& x, const Tensor& conv_w) {
  TORCH_CHECK(conv_w.size(-1) <= 9 && conv_w.size(-1) % 2 == 1, "cbam_cpu: odd kernel <= 9");
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "cbam_cpu: a 4-d CPU tensor expected");
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "cbam_cpu: contiguous or channels_last input expected");
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->contiguous().data_ptr<T>() : nullptr;
}

// The running statistics are updated in place: their own storage (1-element, contiguous).
template <typename T>
T* mutable_or_null(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

}  // namespace

// The forward's small arrays, kept for its backward, carved from one tensor of T and one of
// int32, so that forward and backward pass two tensors of state, not eleven.
struct Layout {
  int64_t gate_c, pooled, hidden, maps, conv_out, gate_s, bn, floats;  // offsets in T
  int64_t hw_arg, c_arg, ints;                                          // offsets in int32

  explicit Layout(const Shape& s) {
    int64_t end = 0;
    auto take = [&end](int64_t n) {
      const int64_t at = end;
      end += n;
      return at;
    };
    gate_c = take(s.B * s.C);            // A
    pooled = take(s.T * s.B * s.C);      // the pooled descriptors
    hidden = take(s.T * s.B * s.Hd);     // the MLP's pre-activations
    maps = take(2 * s.B * s.HW);         // the spatial pooling's maps
    conv_out = take(s.B * s.HW);         // their convolution
    gate_s = take(s.B * s.HW);           // S
    bn = take(2);                        // the BatchNorm's batch mean and 1 / std
    floats = end;
    end = 0;
    hw_arg = take(s.B * s.C);   // the channel max pooling's argmax
    c_arg = take(s.B * s.HW);   // the spatial max pooling's argmax
    ints = end;
  }
};

int64_t pool_count(int64_t avg_slot, int64_t max_slot) {
  return (avg_slot >= 0) + (max_slot >= 0);
}

// out, and the state its backward reads (floats, int32s)
std::vector<Tensor> forward(const Tensor& x, const Tensor& fc1_w, const OptTensor& fc1_b,
                            const Tensor& fc2_w, const OptTensor& fc2_b, const Tensor& conv_w,
                            const OptTensor& bn_w, const OptTensor& bn_b, const OptTensor& bn_rm,
                            const OptTensor& bn_rv, int64_t avg_slot, int64_t max_slot,
                            bool mean_first, bool has_bn, bool bn_training, double momentum,
                            double eps, const OptTensor& num_batches_tracked) {
  check_input(x, conv_w);
  TORCH_CHECK(!has_bn || bn_training || (defined(bn_rm) && defined(bn_rv)),
              "cbam_cpu: BatchNorm in eval mode needs running statistics");
  const Shape s = shape_of(x, fc1_w, conv_w, pool_count(avg_slot, max_slot));
  const Layout L(s);
  Tensor state = at::empty({L.floats}, x.options());
  Tensor ints = at::empty({L.ints}, x.options().dtype(at::kInt));
  Tensor w1 = fc1_w.contiguous(), w2 = fc2_w.contiguous(), cw = conv_w.contiguous();
  Tensor out = at::empty_like(x);
  if (defined(num_batches_tracked)) num_batches_tracked->data_ptr<int64_t>()[0] += 1;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_forward", [&] {
    using T = scalar_t;
    T* f = state.data_ptr<T>();
    int32_t* i = ints.data_ptr<int32_t>();
    forward_impl<T>(s, x.data_ptr<T>(), w1.data_ptr<T>(), ptr_or_null<T>(fc1_b),
                    w2.data_ptr<T>(), ptr_or_null<T>(fc2_b), cw.data_ptr<T>(), avg_slot,
                    max_slot, mean_first, f + L.pooled, f + L.hidden, f + L.gate_c,
                    i + L.hw_arg, f + L.maps, i + L.c_arg, f + L.conv_out);
    spatial_gate_impl<T>(s.B * s.HW, f + L.conv_out, has_bn, bn_training, momentum, eps,
                         ptr_or_null<T>(bn_w), ptr_or_null<T>(bn_b), mutable_or_null<T>(bn_rm),
                         mutable_or_null<T>(bn_rv), f + L.bn, f + L.bn + 1, f + L.gate_s);
    apply_impl<T>(s, x.data_ptr<T>(), f + L.gate_c, f + L.gate_s, out.data_ptr<T>());
  });
  return {out, state, ints};
}

// dx, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b, d_conv_w, d_bn_w, d_bn_b (undefined where absent)
std::vector<Tensor> backward(const Tensor& grad, const Tensor& x, const Tensor& state,
                             const Tensor& ints, const Tensor& fc1_w, bool fc1_bias,
                             const Tensor& fc2_w, bool fc2_bias, const Tensor& conv_w,
                             const OptTensor& bn_w, const OptTensor& bn_b, const OptTensor& bn_rm,
                             const OptTensor& bn_rv, int64_t avg_slot, int64_t max_slot,
                             bool mean_first, bool has_bn, bool bn_training, double eps) {
  check_input(x, conv_w);
  Tensor holder;
  const Tensor& g = dense_like(grad, x, holder);
  const Shape s = shape_of(x, fc1_w, conv_w, pool_count(avg_slot, max_slot));
  const Layout L(s);
  auto opts = x.options();
  const int64_t KK = 2 * s.K * s.K;
  // Scratch: d(spatial logits), d(channel logits), d(hidden), per-sample d(conv weight).
  const int64_t d_logits = 0, d_logits_c = s.B * s.HW, d_hidden = d_logits_c + s.B * s.C,
                d_cw_part = d_hidden + s.T * s.B * s.Hd;
  Tensor work = at::empty({d_cw_part + s.B * KK}, opts);
  Tensor dx = at::empty_like(x);
  Tensor d_bn_w = has_bn && defined(bn_w) ? at::empty({1}, opts) : Tensor();
  Tensor d_bn_b = has_bn && defined(bn_b) ? at::empty({1}, opts) : Tensor();
  Tensor d_fc2_w = at::empty({s.C, s.Hd}, opts);
  Tensor d_fc2_b = fc2_bias ? at::empty({s.C}, opts) : Tensor();
  Tensor d_fc1_w = at::empty({s.Hd, s.C}, opts);
  Tensor d_fc1_b = fc1_bias ? at::empty({s.Hd}, opts) : Tensor();
  Tensor d_conv_w = at::empty_like(conv_w, at::MemoryFormat::Contiguous);
  Tensor w1 = fc1_w.contiguous(), w2 = fc2_w.contiguous(), cw = conv_w.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_backward", [&] {
    using T = scalar_t;
    const T* f = state.data_ptr<T>();
    const int32_t* i = ints.data_ptr<int32_t>();
    T* w = work.data_ptr<T>();
    auto out_or_null = [](Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    spatial_grad_impl<T>(s, g.data_ptr<T>(), x.data_ptr<T>(), f + L.gate_c, f + L.gate_s,
                         w + d_logits);
    spatial_gate_backward_impl<T>(s.B * s.HW, w + d_logits, f + L.conv_out, has_bn,
                                  bn_training, eps, ptr_or_null<T>(bn_w), ptr_or_null<T>(bn_rm),
                                  ptr_or_null<T>(bn_rv), f + L.bn, f + L.bn + 1,
                                  out_or_null(d_bn_w), out_or_null(d_bn_b));
    backward_impl<T>(s, g.data_ptr<T>(), x.data_ptr<T>(), f + L.gate_c, f + L.gate_s,
                     f + L.hidden, i + L.hw_arg, f + L.maps, i + L.c_arg, w + d_logits,
                     w1.data_ptr<T>(), w2.data_ptr<T>(), cw.data_ptr<T>(), avg_slot, max_slot,
                     mean_first, dx.data_ptr<T>(), w + d_logits_c, w + d_hidden, w + d_cw_part);
    param_grads_impl<T>(s, w + d_logits_c, f + L.hidden, w + d_hidden, f + L.pooled,
                        w + d_cw_part, d_fc1_w.data_ptr<T>(), out_or_null(d_fc1_b),
                        d_fc2_w.data_ptr<T>(), out_or_null(d_fc2_b), d_conv_w.data_ptr<T>());
  });
  return {dx, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b, d_conv_w, d_bn_w, d_bn_b};
}

// forward and backward as one autograd function in C++: the Python autograd.Function around
// them (its context, the Python backward, re-reading the module's flags, marshalling ~30
// arguments) took ~0.1 ms a call hot and 2-3x that with cold caches, as much as the kernels
// themselves at 64x256x8x8.
struct CbamFunction : public torch::autograd::Function<CbamFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                        const Tensor& fc1_w, const OptTensor& fc1_b, const Tensor& fc2_w,
                        const OptTensor& fc2_b, const Tensor& conv_w, const OptTensor& bn_w,
                        const OptTensor& bn_b, const OptTensor& bn_rm, const OptTensor& bn_rv,
                        int64_t avg_slot, int64_t max_slot, bool mean_first, bool has_bn,
                        bool bn_training, double momentum, double eps,
                        const OptTensor& num_batches_tracked) {
    auto r = ::forward(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b, bn_rm, bn_rv, avg_slot,
                       max_slot, mean_first, has_bn, bn_training, momentum, eps,
                       num_batches_tracked);
    ctx->save_for_backward({x});
    auto value = [](const OptTensor& t) { return t.has_value() ? *t : Tensor(); };
    // The rest as it is now, as the Python function kept it: the forward's state, the weights,
    // the BatchNorm's parameters and running statistics.
    ctx->saved_data["state"] = std::vector<Tensor>{
        r[1], r[2], fc1_w, fc2_w, conv_w, value(bn_w), value(bn_b), value(bn_rm), value(bn_rv)};
    ctx->saved_data["flags"] = std::vector<int64_t>{
        avg_slot, max_slot, mean_first, has_bn, bn_training, defined(fc1_b), defined(fc2_b)};
    ctx->saved_data["eps"] = eps;
    return r[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The backward's kernels are not differentiable themselves: refuse rather than return
    // gradients that silently lack their second-order part.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "CBAM's CPU kernels have no double backward (create_graph=True); "
                "search.cbam.reference_forward(module, x) computes the same function with one");
    const Tensor x = ctx->get_saved_variables()[0];
    const auto st = ctx->saved_data["state"].toTensorVector();
    const auto f = ctx->saved_data["flags"].toIntVector();
    const double eps = ctx->saved_data["eps"].toDouble();
    auto optional = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    auto g = ::backward(grads[0], x, st[0], st[1], st[2], f[5] != 0, st[3], f[6] != 0, st[4],
                        optional(st[5]), optional(st[6]), optional(st[7]), optional(st[8]), f[0],
                        f[1], f[2] != 0, f[3] != 0, f[4] != 0, eps);
    torch::autograd::variable_list out(18);  // one per forward argument; flags get none
    std::copy(g.begin(), g.end(), out.begin());
    return out;
  }
};

Tensor forward_autograd(const Tensor& x, const Tensor& fc1_w, const OptTensor& fc1_b,
                        const Tensor& fc2_w, const OptTensor& fc2_b, const Tensor& conv_w,
                        const OptTensor& bn_w, const OptTensor& bn_b, const OptTensor& bn_rm,
                        const OptTensor& bn_rv, int64_t avg_slot, int64_t max_slot,
                        bool mean_first, bool has_bn, bool bn_training, double momentum,
                        double eps, const OptTensor& num_batches_tracked) {
  return CbamFunction::apply(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b, bn_rm, bn_rv,
                             avg_slot, max_slot, mean_first, has_bn, bn_training, momentum, eps,
                             num_batches_tracked);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "CBAM channel-spatial forward (CPU)");
  m.def("forward_autograd", &forward_autograd,
        "CBAM channel-spatial forward (CPU), differentiable: its backward runs in C++");
}
