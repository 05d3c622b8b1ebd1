// Decode attention read in place from the paged KV pools: one query token per sequence, every head of a
// KV group against that group's blocks, online softmax one block at a time. Pools are
// [num_blocks, num_kv_heads, block_size, head_dim] in size, laid out as vLLM's CPU kernels write them
// (cpu_attn_reshape_and_cache): a block's K transposed, [head_dim][block_size], its V as
// [block_size][head_dim]; float32 or bfloat16, block_size a multiple of 16. An 8-bit cache (int8 pools in
// the same layout, written by agent/layers/attention/cpu_backend.py) brings one scale per token and head,
// [num_blocks, num_kv_heads, block_size], for K and for V: K's scales multiply the scores, V's the
// probabilities. Work is split over OpenMP threads by (sequence, KV head). Registered as
// torch.ops.llmserve.paged_decode_attention.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <omp.h>

#include "simd.h"

#include <cmath>
#include <limits>
#include <vector>

namespace {

using namespace llmserve_simd;

// exp of kWidth floats (Cephes' polynomial after splitting off the power of two; relative error ~2e-7).
inline Vec vexp(Vec x) {
#if defined(__AVX512F__)
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365447504f));
  Vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
#else
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447504f));
  Vec n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
#endif
  Vec r = vfma(n, vset(-0.693359375f), x);
  r = vfma(n, vset(2.12194440e-4f), r);
  Vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), r);
  p = vadd(p, vset(1.f));
#if defined(__AVX512F__)
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
#else
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
#endif
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }
}  // namespace

namespace llmserve_simd {  // beside the float overloads, so one lookup finds them all
inline Vec vload(const int8_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
}
}  // namespace llmserve_simd

namespace {

// x[t0:t1] *= factors[t0:t1]
inline void multiply(float* x, const float* factors, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + kWidth <= t1; t += kWidth) vstore(x + t, vmul(vload(x + t), vload(factors + t)));
  for (; t < t1; ++t) x[t] *= factors[t];
}

// scores[t:t + N * kWidth] = q . K[t'] for the tokens t' of N vector chunks of a block whose K is stored
// transposed, [head_dim][block_size] (vLLM's CPU layout): 2N independent accumulators hide the FMA latency
template <int N, typename T>
inline void scores_tile(const float* q, const T* k_t, int64_t D, int64_t block_size, int64_t t, float* scores) {
  Vec a[N], b[N];
  for (int c = 0; c < N; ++c) a[c] = b[c] = vzero();
  int64_t d = 0;
  for (; d + 2 <= D; d += 2) {
    const Vec q0 = vset(q[d]), q1 = vset(q[d + 1]);
    const T* r0 = k_t + d * block_size + t;
    const T* r1 = r0 + block_size;
    for (int c = 0; c < N; ++c) {
      a[c] = vfma(q0, vload(r0 + c * kWidth), a[c]);
      b[c] = vfma(q1, vload(r1 + c * kWidth), b[c]);
    }
  }
  for (; d < D; ++d) {
    const Vec q0 = vset(q[d]);
    for (int c = 0; c < N; ++c) a[c] = vfma(q0, vload(k_t + d * block_size + t + c * kWidth), a[c]);
  }
  for (int c = 0; c < N; ++c) vstore(scores + t + c * kWidth, vadd(a[c], b[c]));
}

// scores[0:block_size] = q . K[t] for every token of the block; block_size is a multiple of kWidth
template <typename T>
inline void block_scores(const float* q, const T* k_t, int64_t D, int64_t block_size, float* scores) {
  int64_t t = 0;
  for (; t + 4 * kWidth <= block_size; t += 4 * kWidth) scores_tile<4>(q, k_t, D, block_size, t, scores);
  switch ((block_size - t) / kWidth) {
    case 3: scores_tile<3>(q, k_t, D, block_size, t, scores); break;
    case 2: scores_tile<2>(q, k_t, D, block_size, t, scores); break;
    case 1: scores_tile<1>(q, k_t, D, block_size, t, scores); break;
    default: break;
  }
}

// out[d:d + N * kWidth] += sum over tokens t0..t1 of p[t] * V[t], the accumulators held in registers
template <int N, typename T>
inline void values_tile(float* out, const float* p, const T* v, int64_t t0, int64_t t1, int64_t D, int64_t d) {
  Vec acc[N];
  for (int c = 0; c < N; ++c) acc[c] = vload(out + d + c * kWidth);
  for (int64_t t = t0; t < t1; ++t) {
    const Vec pv = vset(p[t]);
    const T* row = v + t * D + d;
    for (int c = 0; c < N; ++c) acc[c] = vfma(pv, vload(row + c * kWidth), acc[c]);
  }
  for (int c = 0; c < N; ++c) vstore(out + d + c * kWidth, acc[c]);
}

// out[0:D] += sum over tokens t0..t1 of p[t] * V[t], V a block's [block_size][head_dim]
template <typename T>
inline void block_values(float* out, const float* p, const T* v, int64_t t0, int64_t t1, int64_t D) {
  int64_t d = 0;
  for (; d + 8 * kWidth <= D; d += 8 * kWidth) values_tile<8>(out, p, v, t0, t1, D, d);
  switch ((D - d) / kWidth) {
    case 7: values_tile<7>(out, p, v, t0, t1, D, d); break;
    case 6: values_tile<6>(out, p, v, t0, t1, D, d); break;
    case 5: values_tile<5>(out, p, v, t0, t1, D, d); break;
    case 4: values_tile<4>(out, p, v, t0, t1, D, d); break;
    case 3: values_tile<3>(out, p, v, t0, t1, D, d); break;
    case 2: values_tile<2>(out, p, v, t0, t1, D, d); break;
    case 1: values_tile<1>(out, p, v, t0, t1, D, d); break;
    default: break;
  }
  for (d += (D - d) / kWidth * kWidth; d < D; ++d) {
    for (int64_t t = t0; t < t1; ++t) out[d] += p[t] * to_float(v[t * D + d]);
  }
}

inline void scale(float* acc, float factor, int64_t D) {
  Vec f = vset(factor);
  int64_t d = 0;
  for (; d + kWidth <= D; d += kWidth) vstore(acc + d, vmul(f, vload(acc + d)));
  for (; d < D; ++d) acc[d] *= factor;
}

// scores[t0:t1] = exp(scores - max); their sum
inline float exp_in_place(float* scores, int64_t t0, int64_t t1, float max_score) {
  Vec m = vset(max_score), total = vzero();
  int64_t t = t0;
  for (; t + kWidth <= t1; t += kWidth) {
    Vec e = vexp(vadd(vload(scores + t), vmul(m, vset(-1.f))));
    vstore(scores + t, e);
    total = vadd(total, e);
  }
  float sum = vsum(total);
  for (; t < t1; ++t) {
    scores[t] = std::exp(scores[t] - max_score);
    sum += scores[t];
  }
  return sum;
}

// One sequence's KV heads [h0, h1), each with the G query heads of its group, against its context
// [start, context_len). Blocks outer, heads inner: a block's heads lie side by side in the pool, so each
// block is one contiguous read the hardware prefetcher follows; the next block is prefetched by hand.
template <typename KV>
void attend_heads(const float* q, const KV* k_pool, const KV* v_pool, const float* k_scales, const float* v_scales,
                  const int32_t* table, int64_t start,
                  int64_t context_len, int64_t G, int64_t D, int64_t block_size, int64_t h0, int64_t h1,
                  int64_t num_kv_heads, float* out, std::vector<float>& scores, std::vector<float>& max_score,
                  std::vector<float>& denom) {
  const int64_t rows = (h1 - h0) * G;  // query heads handled here; q and out point at the first
  max_score.assign(rows, -std::numeric_limits<float>::infinity());
  denom.assign(rows, 0.f);
  std::fill(out, out + rows * D, 0.f);
  scores.resize(block_size);
  const int64_t block_stride = num_kv_heads * block_size * D, head_stride = block_size * D;
  const int64_t span_bytes = (h1 - h0) * head_stride * (int64_t)sizeof(KV);
  for (int64_t first = start - start % block_size; first < context_len; first += block_size) {
    const int64_t block = table[first / block_size];
    const int64_t t0 = std::max(first, start) - first, t1 = std::min(first + block_size, context_len) - first;
    if (first + block_size < context_len) {  // the next block is elsewhere in memory: ask for it now
      const int64_t next = table[first / block_size + 1];
      const char* k_next = reinterpret_cast<const char*>(k_pool + next * block_stride + h0 * head_stride);
      const char* v_next = reinterpret_cast<const char*>(v_pool + next * block_stride + h0 * head_stride);
      for (int64_t offset = 0; offset < span_bytes; offset += 64) {
        _mm_prefetch(k_next + offset, _MM_HINT_T0);
        _mm_prefetch(v_next + offset, _MM_HINT_T0);
      }
    }
    for (int64_t h = h0; h < h1; ++h) {
      const KV* k_block = k_pool + block * block_stride + h * head_stride;
      const KV* v_block = v_pool + block * block_stride + h * head_stride;
      const int64_t scale_offset = (block * num_kv_heads + h) * block_size;  // 8-bit pools: this block's scales
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = (h - h0) * G + g;
        float* s = scores.data();
        block_scores(q + row * D, k_block, D, block_size, s);
        if (k_scales) multiply(s, k_scales + scale_offset, t0, t1);
        float block_max = -std::numeric_limits<float>::infinity();
        for (int64_t t = t0; t < t1; ++t) block_max = std::max(block_max, s[t]);
        const float new_max = std::max(max_score[row], block_max);
        const float correction = std::exp(max_score[row] - new_max);  // 0 on the first block (from -inf)
        max_score[row] = new_max;
        if (correction != 1.f) scale(out + row * D, correction, D);
        denom[row] = denom[row] * correction + exp_in_place(s, t0, t1, new_max);
        if (v_scales) multiply(s, v_scales + scale_offset, t0, t1);
        block_values(out + row * D, s, v_block, t0, t1, D);
      }
    }
  }
  for (int64_t row = 0; row < rows; ++row) {
    const float inv = 1.f / denom[row];
    for (int64_t d = 0; d < D; ++d) out[row * D + d] *= inv;
  }
}

template <typename KV>
void decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& block_tables,
            const at::Tensor& context_lens, double scale, int64_t window, const float* k_scales, const float* v_scales,
            at::Tensor& out_f32) {
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_kv_heads = k_pool.size(1), block_size = k_pool.size(2), G = H / num_kv_heads;
  const int64_t width = block_tables.size(1);
  at::Tensor q_scaled = (q.to(at::kFloat) * scale).contiguous();
  const float* qp = q_scaled.data_ptr<float>();
  const KV* kp = k_pool.data_ptr<KV>();
  const KV* vp = v_pool.data_ptr<KV>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  float* op = out_f32.data_ptr<float>();
  const int threads = at::get_num_threads();
  // each sequence's KV heads in as few pieces as keep every thread busy (4 tasks per thread)
  const int64_t pieces = std::min<int64_t>(num_kv_heads, std::max<int64_t>(1, (4 * threads + S - 1) / S));
  const int64_t heads_per_piece = (num_kv_heads + pieces - 1) / pieces;
  omp_set_num_threads(threads);
#pragma omp parallel
  {
    std::vector<float> scores, max_score, denom;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < S * pieces; ++task) {
      const int64_t seq = task / pieces, h0 = (task % pieces) * heads_per_piece;
      const int64_t h1 = std::min(num_kv_heads, h0 + heads_per_piece);
      if (h0 >= h1) continue;
      const int64_t context_len = lens[seq];
      const int64_t start = window > 0 ? std::max<int64_t>(0, context_len - window) : 0;
      attend_heads<KV>(qp + (seq * H + h0 * G) * D, kp, vp, k_scales, v_scales, tables + seq * width, start, context_len, G, D,
                       block_size, h0, h1, num_kv_heads, op + (seq * H + h0 * G) * D, scores, max_score, denom);
    }
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, const c10::optional<at::Tensor>& k_scales,
                                  const c10::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
              "paged_decode_attention: q [seqs, heads, dim], pools [blocks, kv_heads, block_size, dim]");
  TORCH_CHECK(q.size(2) == k_pool.size(3) && q.size(1) % k_pool.size(1) == 0, "paged_decode_attention: head shapes");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "paged_decode_attention: contiguous pools");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "paged_decode_attention: int32 block tables and context lengths");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0), "paged_decode_attention: rows");
  TORCH_CHECK(k_pool.size(2) % 16 == 0, "paged_decode_attention: block_size a multiple of 16");
  at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const int32_t* len_data = lens.data_ptr<int32_t>();
  const int32_t* table_data = tables.data_ptr<int32_t>();
  const int64_t block_size = k_pool.size(2), width = tables.size(1), num_blocks = k_pool.size(0);
  for (int64_t s = 0; s < lens.numel(); ++s) {  // every block read is one of the pool's
    TORCH_CHECK(len_data[s] >= 1 && len_data[s] <= width * block_size,
                "paged_decode_attention: context lengths within the block tables");
    for (int64_t b = 0; b < (len_data[s] + block_size - 1) / block_size; ++b) {
      const int32_t block = table_data[s * width + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "paged_decode_attention: block ids within the pools");
    }
  }
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  if (k_pool.scalar_type() == at::kChar) {
    TORCH_CHECK(k_scales.has_value() && v_scales.has_value(), "paged_decode_attention: int8 pools need their scales");
    const std::vector<int64_t> scale_shape{num_blocks, k_pool.size(1), block_size};
    for (const at::Tensor& scales : {*k_scales, *v_scales}) {
      TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.sizes() == scale_shape,
                  "paged_decode_attention: float32 scales [blocks, kv_heads, block_size]");
    }
    decode<int8_t>(q, k_pool, v_pool, tables, lens, scale, window, k_scales->data_ptr<float>(),
                   v_scales->data_ptr<float>(), out);
  } else if (k_pool.scalar_type() == at::kFloat) {
    decode<float>(q, k_pool, v_pool, tables, lens, scale, window, nullptr, nullptr, out);
  } else {
    TORCH_CHECK(k_pool.scalar_type() == at::kBFloat16, "paged_decode_attention: float32, bfloat16 or int8 pools");
    decode<c10::BFloat16>(q, k_pool, v_pool, tables, lens, scale, window, nullptr, nullptr, out);
  }
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
        "Tensor context_lens, float scale, int window, Tensor? k_scales=None, Tensor? v_scales=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(llmserve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
