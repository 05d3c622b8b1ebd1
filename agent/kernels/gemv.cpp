// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) for a few rows of x: float32 weights streamed once, at the
// memory's speed. Rows of w are split over OpenMP threads; each row is read once, in order, for all M
// rows of x. Built twice (AVX2 + FMA, AVX-512) by kernels/__init__.py; registered as torch.ops.llmserve.gemv.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

namespace {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kWidth = 16;
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float sum(Vec v) { return _mm512_reduce_add_ps(v); }
#else
using Vec = __m256;
constexpr int kWidth = 8;
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline float sum(Vec v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(_mm_hadd_ps(lo, lo));
}
#endif

constexpr int kPrefetch = 256;  // floats ahead in the row: a kilobyte, enough to hide the memory's latency

// Row n of w against the M rows of x, two accumulators per x row along K.
template <int M>
inline void row_dot(const float* w_row, const float* x, int64_t K, float* out) {
  Vec a[M], b[M];
  for (int m = 0; m < M; ++m) a[m] = b[m] = zero();
  int64_t k = 0;
  for (; k + 2 * kWidth <= K; k += 2 * kWidth) {
    _mm_prefetch(reinterpret_cast<const char*>(w_row + k + kPrefetch), _MM_HINT_T0);
    Vec w0 = load(w_row + k), w1 = load(w_row + k + kWidth);
    for (int m = 0; m < M; ++m) {
      a[m] = fma(w0, load(x + m * K + k), a[m]);
      b[m] = fma(w1, load(x + m * K + k + kWidth), b[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    float s = sum(add(a[m], b[m]));
    for (int64_t kk = k; kk < K; ++kk) s += w_row[kk] * x[m * K + kk];
    out[m] = s;
  }
}

template <int M>
void gemv_rows(const float* x, const float* w, const float* bias, float* y, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float out[M];
    row_dot<M>(w + n * K, x, K, out);
    for (int m = 0; m < M; ++m) y[m * N + n] = bias ? out[m] + bias[n] : out[m];
  }
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "gemv: float32 only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 4, "gemv: 1 to 4 rows of x");
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = xc.size(0), N = wc.size(0), K = wc.size(1);
  at::Tensor y = at::empty({M, N}, xc.options());
  const float* b = nullptr;
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.numel() == N && bc.scalar_type() == at::kFloat, "gemv: bias [N] float32");
    b = bc.data_ptr<float>();
  }
  omp_set_num_threads(at::get_num_threads());  // this library's OpenMP pool, as wide as torch's
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (M) {
    case 1: gemv_rows<1>(xp, wp, b, yp, N, K); break;
    case 2: gemv_rows<2>(xp, wp, b, yp, N, K); break;
    case 3: gemv_rows<3>(xp, wp, b, yp, N, K); break;
    default: gemv_rows<4>(xp, wp, b, yp, N, K); break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(llmserve, m) { m.def("gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(llmserve, CPU, m) { m.impl("gemv", &gemv); }
