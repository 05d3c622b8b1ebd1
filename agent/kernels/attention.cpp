// Decode attention read in place from the paged KV pools: one query token per sequence, every head of a
// KV group against that group's blocks, online softmax one block at a time. Pools are
// [num_blocks, num_kv_heads, block_size, head_dim] in size, laid out as vLLM's CPU kernels write them
// (cpu_attn_reshape_and_cache): a block's K transposed, [head_dim][block_size], its V as
// [block_size][head_dim]; float32 or bfloat16, block_size a multiple of 16. Work is split over OpenMP
// threads by (sequence, KV head). Registered as torch.ops.llmserve.paged_decode_attention.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kWidth = 16;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {
  __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#else
using Vec = __m256;
constexpr int kWidth = 8;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline float vsum(Vec v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(_mm_hadd_ps(lo, lo));
}
#endif

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

// scores[0:block_size] = q . K[t] for every token t of a block whose K is stored transposed, [head_dim][block_size]
// (vLLM's CPU layout), vectorized over tokens; block_size is a multiple of kWidth
template <typename T>
inline void block_scores(const float* q, const T* k_t, int64_t D, int64_t block_size, float* scores) {
  for (int64_t t = 0; t < block_size; t += kWidth) {
    Vec acc = vzero();
    for (int64_t d = 0; d < D; ++d) acc = vfma(vset(q[d]), vload(k_t + d * block_size + t), acc);
    vstore(scores + t, acc);
  }
}

// acc += p * row
template <typename T>
inline void add_scaled(float* acc, float p, const T* row, int64_t D) {
  Vec pv = vset(p);
  int64_t d = 0;
  for (; d + kWidth <= D; d += kWidth) vstore(acc + d, vfma(pv, vload(row + d), vload(acc + d)));
  for (; d < D; ++d) acc[d] += p * to_float(row[d]);
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

// One (sequence, KV head): the G query heads of the group against its context [start, context_len).
template <typename KV>
void attend_group(const float* q, const KV* k_pool, const KV* v_pool, const int32_t* table, int64_t start,
                  int64_t context_len, int64_t G, int64_t D, int64_t block_size, int64_t kv_head,
                  int64_t num_kv_heads, float* out, std::vector<float>& scores) {
  std::vector<float> max_score(G, -std::numeric_limits<float>::infinity()), denom(G, 0.f);
  std::fill(out, out + G * D, 0.f);
  scores.resize(G * block_size);
  const int64_t block_stride = num_kv_heads * block_size * D;
  for (int64_t first = start - start % block_size; first < context_len; first += block_size) {
    const int64_t block = table[first / block_size];
    const KV* k_block = k_pool + block * block_stride + kv_head * block_size * D;
    const KV* v_block = v_pool + block * block_stride + kv_head * block_size * D;
    const int64_t t0 = std::max(first, start) - first, t1 = std::min(first + block_size, context_len) - first;
    if (first + block_size < context_len) {  // the next block is elsewhere in memory: ask for it now
      const int64_t next = table[first / block_size + 1];
      const char* k_next = reinterpret_cast<const char*>(k_pool + next * block_stride + kv_head * block_size * D);
      const char* v_next = reinterpret_cast<const char*>(v_pool + next * block_stride + kv_head * block_size * D);
      for (int64_t offset = 0; offset < block_size * D * (int64_t)sizeof(KV); offset += 64) {
        _mm_prefetch(k_next + offset, _MM_HINT_T0);
        _mm_prefetch(v_next + offset, _MM_HINT_T0);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores.data() + g * block_size;
      block_scores(q + g * D, k_block, D, block_size, s);
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t t = t0; t < t1; ++t) block_max = std::max(block_max, s[t]);
      const float new_max = std::max(max_score[g], block_max);
      const float correction = std::exp(max_score[g] - new_max);  // 0 on the first block (from -inf)
      max_score[g] = new_max;
      if (correction != 1.f) scale(out + g * D, correction, D);
      denom[g] = denom[g] * correction + exp_in_place(s, t0, t1, new_max);
      for (int64_t t = t0; t < t1; ++t) add_scaled(out + g * D, s[t], v_block + t * D, D);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.f / denom[g];
    for (int64_t d = 0; d < D; ++d) out[g * D + d] *= inv;
  }
}

template <typename KV>
void decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& block_tables,
            const at::Tensor& context_lens, double scale, int64_t window, at::Tensor& out_f32) {
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
  omp_set_num_threads(at::get_num_threads());
#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < S * num_kv_heads; ++task) {
      const int64_t seq = task / num_kv_heads, kv_head = task % num_kv_heads;
      const int64_t context_len = lens[seq];
      const int64_t start = window > 0 ? std::max<int64_t>(0, context_len - window) : 0;
      const int64_t head = kv_head * G;
      attend_group<KV>(qp + (seq * H + head) * D, kp, vp, tables + seq * width, start, context_len, G, D,
                       block_size, kv_head, num_kv_heads, op + (seq * H + head) * D, scores);
    }
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window) {
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
  if (k_pool.scalar_type() == at::kFloat) {
    decode<float>(q, k_pool, v_pool, tables, lens, scale, window, out);
  } else {
    TORCH_CHECK(k_pool.scalar_type() == at::kBFloat16, "paged_decode_attention: float32 or bfloat16 pools");
    decode<c10::BFloat16>(q, k_pool, v_pool, tables, lens, scale, window, out);
  }
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
        "Tensor context_lens, float scale, int window) -> Tensor");
}
TORCH_LIBRARY_IMPL(llmserve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
