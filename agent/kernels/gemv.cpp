// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for a few rows of x: weights streamed once, at the memory's
// speed. Rows of w are split over OpenMP threads; each row is read once, in order, for all M rows of x.
// Built twice (AVX2 + FMA, AVX-512) by kernels/__init__.py; registered as torch.ops.llmserve.gemv
// (float32 weights) and torch.ops.llmserve.int8_gemv (int8 weights and activations, W8A8).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include "bias.h"
#include "simd.h"

#include <algorithm>
#include <cmath>

namespace {

using namespace llmserve_simd;

constexpr int kPrefetch = 256;  // floats ahead in the row: a kilobyte, enough to hide the memory's latency

// Row n of w against the M rows of x, two accumulators per x row along K.
template <int M>
inline void row_dot(const float* w_row, const float* x, int64_t K, float* out) {
  Vec a[M], b[M];
  for (int m = 0; m < M; ++m) a[m] = b[m] = vzero();
  int64_t k = 0;
  for (; k + 2 * kWidth <= K; k += 2 * kWidth) {
    _mm_prefetch(reinterpret_cast<const char*>(w_row + k + kPrefetch), _MM_HINT_T0);
    Vec w0 = vload(w_row + k), w1 = vload(w_row + k + kWidth);
    for (int m = 0; m < M; ++m) {
      a[m] = vfma(w0, vload(x + m * K + k), a[m]);
      b[m] = vfma(w1, vload(x + m * K + k + kWidth), b[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    float s = vsum(vadd(a[m], b[m]));
    for (int64_t kk = k; kk < K; ++kk) s += w_row[kk] * x[m * K + kk];
    out[m] = s;
  }
}

template <int M>
void gemv_rows(const float* x, const float* w, const float* bias, float* y, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float out[M];
    if constexpr (M <= 4) {
      row_dot<M>(w + n * K, x, K, out);
    } else {  // 5-8 rows: the first 4, then the rest, with the weight row still in L1. Each row's sums are
      // those of a 1-row call, bit for bit: a step verifying speculative tokens computes every position as a
      // plain decode step would.
      row_dot<4>(w + n * K, x, K, out);
      row_dot<M - 4>(w + n * K, x + 4 * K, K, out + 4);
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = bias ? out[m] + bias[n] : out[m];
  }
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "gemv: float32 only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "gemv: 1 to 8 rows of x");
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = xc.size(0), N = wc.size(0), K = wc.size(1);
  at::Tensor y = at::empty({M, N}, xc.options());
  at::Tensor bc;
  const float* b = llmserve_kernels::bias_data(bias, N, bc, "gemv");
  omp_set_num_threads(at::get_num_threads());  // this library's OpenMP pool, as wide as torch's
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (M) {
    case 1: gemv_rows<1>(xp, wp, b, yp, N, K); break;
    case 2: gemv_rows<2>(xp, wp, b, yp, N, K); break;
    case 3: gemv_rows<3>(xp, wp, b, yp, N, K); break;
    case 4: gemv_rows<4>(xp, wp, b, yp, N, K); break;
    case 5: gemv_rows<5>(xp, wp, b, yp, N, K); break;
    case 6: gemv_rows<6>(xp, wp, b, yp, N, K); break;
    case 7: gemv_rows<7>(xp, wp, b, yp, N, K); break;
    default: gemv_rows<8>(xp, wp, b, yp, N, K); break;
  }
  return y;
}

// ---------------------------------------------------------------- int8 (W8A8), any number of rows
// x is quantized per row here (scale = max |x| / 127, q = round-half-even(x / scale)), the products are
// summed exactly in int32 (int8 widened to int16, pairs multiplied and added by vpmaddwd: no saturation),
// then y = sum * x_scale * w_scale[n] (+ bias): the arithmetic of agent/layers/quantization.py.

#if defined(__AVX512F__)
using IVec = __m512i;
constexpr int kIWidth = 32;  // int8 weights per step
inline IVec izero() { return _mm512_setzero_si512(); }
inline IVec widen(const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline IVec iload16(const int16_t* p) { return _mm512_loadu_si512(p); }
inline IVec madd(IVec a, IVec b) { return _mm512_madd_epi16(a, b); }
inline IVec iadd(IVec a, IVec b) { return _mm512_add_epi32(a, b); }
inline int32_t isum(IVec v) { return _mm512_reduce_add_epi32(v); }
#else
using IVec = __m256i;
constexpr int kIWidth = 16;
inline IVec izero() { return _mm256_setzero_si256(); }
inline IVec widen(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline IVec iload16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline IVec madd(IVec a, IVec b) { return _mm256_madd_epi16(a, b); }
inline IVec iadd(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
inline int32_t isum(IVec v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
}
#endif

// Row n of w_q against the M quantized rows of x (as int16), two accumulators per x row along K.
template <int M>
inline void int8_row_dot(const int8_t* w_row, const int16_t* x, int64_t K, int32_t* out) {
  IVec a[M], b[M];
  for (int m = 0; m < M; ++m) a[m] = b[m] = izero();
  int64_t k = 0;
  for (; k + 2 * kIWidth <= K; k += 2 * kIWidth) {
    _mm_prefetch(reinterpret_cast<const char*>(w_row + k + 4 * kPrefetch), _MM_HINT_T0);
    IVec w0 = widen(w_row + k), w1 = widen(w_row + k + kIWidth);
    for (int m = 0; m < M; ++m) {
      a[m] = iadd(a[m], madd(w0, iload16(x + m * K + k)));
      b[m] = iadd(b[m], madd(w1, iload16(x + m * K + k + kIWidth)));
    }
  }
  for (int m = 0; m < M; ++m) {
    int32_t s = isum(iadd(a[m], b[m]));
    for (int64_t kk = k; kk < K; ++kk) s += int32_t(w_row[kk]) * int32_t(x[m * K + kk]);
    out[m] = s;
  }
}

constexpr int64_t kRowBlock = 64;  // rows of x per pass over the weights: their int16 copy stays in L2

// y[m0:m1] for every output channel: each weight row is read from memory once per block of rows and
// reused from L1 by every group of 4 rows of x.
void int8_block(const int16_t* x, const float* x_scales, const int8_t* w, const float* w_scales, const float* bias,
                float* y, int64_t m0, int64_t m1, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* w_row = w + n * K;
    int32_t out[4];
    for (int64_t m = m0; m < m1; m += 4) {
      const int64_t rows = std::min<int64_t>(4, m1 - m);
      switch (rows) {
        case 1: int8_row_dot<1>(w_row, x + m * K, K, out); break;
        case 2: int8_row_dot<2>(w_row, x + m * K, K, out); break;
        case 3: int8_row_dot<3>(w_row, x + m * K, K, out); break;
        default: int8_row_dot<4>(w_row, x + m * K, K, out); break;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float v = float(out[r]) * x_scales[m + r] * w_scales[n];
        y[(m + r) * N + n] = bias ? v + bias[n] : v;
      }
    }
  }
}

// x's rows quantized: scale = max |x| / 127, q = round-half-even(x / scale), as int16 for vpmaddwd
void quantize_rows(const float* x, int64_t M, int64_t K, int16_t* xq, float* scales) {
#pragma omp parallel for schedule(static) if (M >= 8)
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(row[k]));
    const float scale = std::max(amax, 1e-12f) / 127.f;
    scales[m] = scale;
    for (int64_t k = 0; k < K; ++k) {
      const float q = std::nearbyint(row[k] / scale);  // the default rounding mode: half to even
      xq[m * K + k] = static_cast<int16_t>(std::min(127.f, std::max(-127.f, q)));
    }
  }
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scales,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w_q.dim() == 2 && x.size(1) == w_q.size(1), "int8_gemv: x [M, K] and w_q [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w_q.scalar_type() == at::kChar && w_scales.scalar_type() == at::kFloat,
              "int8_gemv: float32 x, int8 w_q, float32 w_scales");
  TORCH_CHECK(w_scales.numel() == w_q.size(0), "int8_gemv: one weight scale per output channel");
  at::Tensor xc = x.contiguous(), wc = w_q.contiguous(), sc = w_scales.contiguous();
  const int64_t M = xc.size(0), N = wc.size(0), K = wc.size(1);
  at::Tensor y = at::empty({M, N}, xc.options());
  if (M == 0) return y;
  at::Tensor bc;
  const float* b = llmserve_kernels::bias_data(bias, N, bc, "int8_gemv");
  omp_set_num_threads(at::get_num_threads());
  at::Tensor xq = at::empty({M, K}, xc.options().dtype(at::kShort));
  at::Tensor x_scales = at::empty({M}, xc.options());
  quantize_rows(xc.data_ptr<float>(), M, K, xq.data_ptr<int16_t>(), x_scales.data_ptr<float>());
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    int8_block(xq.data_ptr<int16_t>(), x_scales.data_ptr<float>(), wc.data_ptr<int8_t>(), sc.data_ptr<float>(), b,
               y.data_ptr<float>(), m0, std::min(M, m0 + kRowBlock), N, K);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(llmserve, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor w_q, Tensor w_scales, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(llmserve, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("int8_gemv", &int8_gemv);
}
