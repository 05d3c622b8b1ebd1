// y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with 4-bit weights in groups along K (weight-only int4):
// W[n, k] = q[n, k] * scale[n, g] + min[n, g], q in 0..15, g = k / group_size.
// x is quantized to int8 per row and group (scale = max |x| / 127, round half to even), as llama.cpp pairs
// its 4-bit weights with 8-bit activations; then, per group, the integer dot of q and x_q (u8 x s8 pairs
// summed into int16 by vpmaddubsw: at most 2 * 15 * 127, no saturation; then into int32) times both
// scales, plus min * x_scale * sum(x_q): the arithmetic of agent/layers/quantization.py's Int4Linear.
// Packing: every 64 weights along K are 32 bytes; byte j holds weight j (low nibble) and j + 32 (high),
// so one 32-byte load gives two vectors of 32 weights that meet 32 contiguous activations each.
// 256-bit integer vectors in both builds (AVX2; AVX-512 with VL): at one row the weights' bandwidth
// limits, not the instructions.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include "bias.h"

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kUnit = 64;       // weights per 32 packed bytes
constexpr int64_t kRowBlock = 64;   // rows of x per pass over the weights (their int8 copy stays in L2)
constexpr int kPrefetchBytes = 2048;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

struct QuantizedRows {
  const int8_t* q;      // [M, K]
  const float* scale;   // [M, groups]: x_scale per row and group
  const float* offset;  // [M, groups]: x_scale * sum(x_q) per row and group, for the groups' mins
};

// acc[r] += the integer dot of 64 (kBoth: 128) packed weights and row r of x: the pair sums of two units fit
// int16 together (4 * 15 * 127), so one widening per 128 weights
template <int R, bool kBoth>
inline void add_units(const uint8_t* packed, const int8_t* x, int64_t K, __m256i* acc) {
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  _mm_prefetch(reinterpret_cast<const char*>(packed + kPrefetchBytes), _MM_HINT_T0);
  const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed));
  const __m256i lo0 = _mm256_and_si256(b0, low_nibbles), hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low_nibbles);
  __m256i lo1, hi1;
  if (kBoth) {
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32));
    lo1 = _mm256_and_si256(b1, low_nibbles), hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low_nibbles);
  }
  for (int r = 0; r < R; ++r) {
    const __m256i* xr = reinterpret_cast<const __m256i*>(x + r * K);
    __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, _mm256_loadu_si256(xr)),
                                     _mm256_maddubs_epi16(hi0, _mm256_loadu_si256(xr + 1)));
    if (kBoth) {
      pairs = _mm256_add_epi16(pairs, _mm256_add_epi16(_mm256_maddubs_epi16(lo1, _mm256_loadu_si256(xr + 2)),
                                                       _mm256_maddubs_epi16(hi1, _mm256_loadu_si256(xr + 3))));
    }
    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, ones));
  }
}

// Output channel n for R rows of x (m .. m + R - 1). kUnits: the group's 64-weight units when known at
// compile time (groups of 64 and 128, unrolled: 1.5x the speed of the loop), else 0 (any group size).
template <int R, int kUnits>
inline void row_dot(const uint8_t* w_row, const float* w_scale, const float* w_min, const QuantizedRows& x,
                    int64_t m, int64_t K, int64_t groups, int64_t group_size, float* out) {
  __m256 total[R];
  float mins[R];
  for (int r = 0; r < R; ++r) total[r] = _mm256_setzero_ps(), mins[r] = 0.f;
  const int64_t units = kUnits ? kUnits : group_size / kUnit;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    const uint8_t* packed = w_row + g * group_size / 2;
    const int8_t* xg = x.q + m * K + g * group_size;
    int64_t u = 0;
    for (; u + 2 <= units; u += 2) add_units<R, true>(packed + u * kUnit / 2, xg + u * kUnit, K, acc);
    if (u < units) add_units<R, false>(packed + u * kUnit / 2, xg + u * kUnit, K, acc);
    for (int r = 0; r < R; ++r) {
      const float x_scale = x.scale[(m + r) * groups + g];
      total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(w_scale[g] * x_scale), total[r]);
      mins[r] += w_min[g] * x.offset[(m + r) * groups + g];
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(total[r]) + mins[r];
}

template <int R>
inline void rows_dot_r(int64_t group_size, const uint8_t* w_row, const float* w_scale, const float* w_min,
                       const QuantizedRows& x, int64_t m, int64_t K, int64_t groups, float* out) {
  switch (group_size) {
    case kUnit: row_dot<R, 1>(w_row, w_scale, w_min, x, m, K, groups, group_size, out); break;
    case 2 * kUnit: row_dot<R, 2>(w_row, w_scale, w_min, x, m, K, groups, group_size, out); break;
    default: row_dot<R, 0>(w_row, w_scale, w_min, x, m, K, groups, group_size, out); break;
  }
}

// row_dot for `count` (1 to 4) rows
inline void rows_dot(int64_t count, int64_t group_size, const uint8_t* w_row, const float* w_scale, const float* w_min,
                     const QuantizedRows& x, int64_t m, int64_t K, int64_t groups, float* out) {
  switch (count) {
    case 1: rows_dot_r<1>(group_size, w_row, w_scale, w_min, x, m, K, groups, out); break;
    case 2: rows_dot_r<2>(group_size, w_row, w_scale, w_min, x, m, K, groups, out); break;
    case 3: rows_dot_r<3>(group_size, w_row, w_scale, w_min, x, m, K, groups, out); break;
    default: rows_dot_r<4>(group_size, w_row, w_scale, w_min, x, m, K, groups, out); break;
  }
}

void quantize_rows(const float* x, int64_t M, int64_t K, int64_t group_size, int8_t* q, float* scales, float* offsets) {
  const int64_t groups = K / group_size;
#pragma omp parallel for schedule(static) if (M >= 8)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* part = x + m * K + g * group_size;
      float amax = 0.f;
      for (int64_t k = 0; k < group_size; ++k) amax = std::max(amax, std::abs(part[k]));
      const float scale = std::max(amax, 1e-12f) / 127.f;
      int32_t sum = 0;
      for (int64_t k = 0; k < group_size; ++k) {
        const int8_t v = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(part[k] / scale))));
        q[m * K + g * group_size + k] = v;
        sum += v;
      }
      scales[m * groups + g] = scale;
      offsets[m * groups + g] = scale * float(sum);
    }
  }
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                     int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int4_gemm: x float32 [M, K]");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.size(1) * 2 == x.size(1),
              "int4_gemm: qweight uint8 [N, K / 2]");
  const int64_t M = x.size(0), N = qweight.size(0), K = x.size(1);
  TORCH_CHECK(group_size > 0 && group_size % kUnit == 0 && K % group_size == 0,
              "int4_gemm: the group size is a multiple of 64 that divides K");
  const int64_t groups = K / group_size;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && mins.scalar_type() == at::kFloat && scales.numel() == N * groups &&
              mins.numel() == N * groups, "int4_gemm: scales and mins float32 [N, K / group_size]");
  at::Tensor xc = x.contiguous(), wc = qweight.contiguous(), sc = scales.contiguous(), mc = mins.contiguous();
  at::Tensor y = at::empty({M, N}, xc.options());
  if (M == 0) return y;
  at::Tensor bc;
  const float* b = llmserve_kernels::bias_data(bias, N, bc, "int4_gemm");
  omp_set_num_threads(at::get_num_threads());
  at::Tensor xq = at::empty({M, K}, xc.options().dtype(at::kChar));
  at::Tensor x_scales = at::empty({M, groups}, xc.options()), x_offsets = at::empty({M, groups}, xc.options());
  quantize_rows(xc.data_ptr<float>(), M, K, group_size, xq.data_ptr<int8_t>(), x_scales.data_ptr<float>(),
                x_offsets.data_ptr<float>());
  const QuantizedRows rows{xq.data_ptr<int8_t>(), x_scales.data_ptr<float>(), x_offsets.data_ptr<float>()};
  const uint8_t* w = wc.data_ptr<uint8_t>();
  const float *ws = sc.data_ptr<float>(), *wm = mc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    const int64_t m1 = std::min(M, m0 + kRowBlock);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* w_row = w + n * (K / 2);
      float out[4];
      for (int64_t m = m0; m < m1; m += 4) {
        const int64_t count = std::min<int64_t>(4, m1 - m);
        rows_dot(count, group_size, w_row, ws + n * groups, wm + n * groups, rows, m, K, groups, out);
        for (int64_t r = 0; r < count; ++r) yp[(m + r) * N + n] = b ? out[r] + b[n] : out[r];
      }
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmserve, m) {
  m.def("int4_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int group_size, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(llmserve, CPU, m) { m.impl("int4_gemm", &int4_gemm); }
