// Paged decode attention for CPUs: one query token per sequence, read straight from the block-table KV cache.
//
// Why: torch's CPU path (reference.py) copies each sequence's blocks into a padded buffer and runs SDPA over
// it; for GQA's few query heads per kv head that kernel runs at a few GB/s. Here each sequence's keys and
// values are read once, in place, all kv heads of a token at a time (one contiguous row of the cache), with
// fp32 scores, softmax and accumulation; rows run in parallel, and when they are too few for the threads each
// row's kv heads are cut into pieces that do (one long conversation: 1.5-2x on 2 cores). Loops written so
// gcc/clang vectorize them at -O3; with AVX-512 the two inner products use intrinsics (each token's keys loaded
// once per kv head, the output accumulated in registers over a block: ~1.8x faster than the plain loops on a
// Zen4 EPYC).
//
// Layout (model_handler/kernels/reference.py): k_cache, v_cache [num_blocks, block_size, num_kv_heads,
// head_dim]; block_tables [num_seqs, max_blocks] int32; seq_lens [num_seqs] int32; query [T, H, D] with any
// row stride; out [T, H, D] contiguous. Row i of `query_rows`/`seq_rows` says which query token attends over
// which sequence's first seq_lens[seq] cached tokens: all of them, or with a sliding window (window > 0) the last
// `window` only, whose blocks alone are read (earlier table entries may be stale: the block manager frees them).
// softcap > 0 maps the scaled logits through softcap * tanh(s / softcap) (Gemma 2). Neither costs the plain path
// anything but a compare per row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_math.h"
#include "cpu_paged_checks.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sagemaker_llm_cpu {
namespace {

constexpr int64_t kLanes = 16;

// Dot product with kLanes independent partial sums, so it vectorizes without reassociating (no -ffast-math).
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t x = 0;
  for (; x + kLanes <= n; x += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += a[x + j] * b[x + j];
  float s = 0.f;
  for (; x < n; ++x) s += a[x] * b[x];
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// The largest of x[0..n), n >= 1, with kLanes independent maxima so the loop vectorizes.
inline float max_of(const float* x, int64_t n) {
  float lanes[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) lanes[j] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] = std::max(lanes[j], x[i + j]);
  float top = x[0];
  for (; i < n; ++i) top = std::max(top, x[i]);
  for (int64_t j = 0; j < kLanes; ++j) top = std::max(top, lanes[j]);
  return top;
}

#if defined(__AVX512F__)
// 16 cache elements as fp32 lanes, converted in registers.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The register-blocked paths: head_dim 64, 128 or 256 (C = 4, 8 or 16 vectors), query heads of a kv head in
// tiles of 16 / C, so a tile's query rows (or accumulators) and one token's keys (or values) fit the 32 registers.
// Kept out of line: inlined into the decode loop, GCC allocated the head-dim-128 tiles' registers worse (15-20%
// slower, measured when the window and soft-cap code grew that loop).
inline bool fast_path(int64_t D) { return D == 64 || D == 128 || D == 256; }

template <int C, typename T>
__attribute__((noinline)) void scores_kv_head(const float* q, const T* k, int64_t row, int64_t num, int64_t kvh,
                                              int64_t group, float* scores, int64_t stride) {
  constexpr int64_t D = 16 * C, tile = 16 / C;
  for (int64_t g0 = 0; g0 < group; g0 += tile) {
    const int64_t gn = std::min(tile, group - g0);
    __m512 qr[tile][C];
    for (int64_t g = 0; g < gn; ++g)
      for (int c = 0; c < C; ++c) qr[g][c] = _mm512_loadu_ps(q + (kvh * group + g0 + g) * D + c * 16);
    for (int64_t t = 0; t < num; ++t) {
      const T* kt = k + t * row + kvh * D;
      __m512 kr[C];
      for (int c = 0; c < C; ++c) kr[c] = load16(kt + c * 16);
      for (int64_t g = 0; g < gn; ++g) {
        __m512 a = _mm512_mul_ps(qr[g][0], kr[0]), b = _mm512_mul_ps(qr[g][1], kr[1]);
        for (int c = 2; c < C; c += 2) {
          a = _mm512_fmadd_ps(qr[g][c], kr[c], a);
          b = _mm512_fmadd_ps(qr[g][c + 1], kr[c + 1], b);
        }
        scores[(kvh * group + g0 + g) * stride + t] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
      }
    }
  }
}

template <int C, typename T>
__attribute__((noinline)) void accumulate_kv_head(float* acc, const T* v, int64_t row, int64_t num, int64_t kvh,
                                                  int64_t group, const float* p, int64_t stride) {
  constexpr int64_t D = 16 * C, tile = 16 / C;
  for (int64_t g0 = 0; g0 < group; g0 += tile) {
    const int64_t gn = std::min(tile, group - g0);
    __m512 a[tile][C];
    for (int64_t g = 0; g < gn; ++g)
      for (int c = 0; c < C; ++c) a[g][c] = _mm512_loadu_ps(acc + (kvh * group + g0 + g) * D + c * 16);
    for (int64_t t = 0; t < num; ++t) {
      const T* vt = v + t * row + kvh * D;
      __m512 vr[C];
      for (int c = 0; c < C; ++c) vr[c] = load16(vt + c * 16);
      for (int64_t g = 0; g < gn; ++g) {
        const __m512 w = _mm512_set1_ps(p[(kvh * group + g0 + g) * stride + t]);
        for (int c = 0; c < C; ++c) a[g][c] = _mm512_fmadd_ps(w, vr[c], a[g][c]);
      }
    }
    for (int64_t g = 0; g < gn; ++g)
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + (kvh * group + g0 + g) * D + c * 16, a[g][c]);
  }
}
#endif

// scores[h * stride + t] = q[h] . k[t * row + (h / group) * D] for the `num` tokens of one block (row = the
// kv heads of one token) and the query heads h of kv heads [kv0, kv1). Fast path: a tile of a kv head's query rows
// stays in registers while its tokens stream by, read straight from the cache; otherwise the block is widened
// into `scratch` first.
template <typename T>
void block_scores(const float* q, const T* k, float* scratch, int64_t row, int64_t num, int64_t kv0, int64_t kv1,
                  int64_t group, int64_t D, float* scores, int64_t stride) {
#if defined(__AVX512F__)
  if (fast_path(D)) {
    for (int64_t kvh = kv0; kvh < kv1; ++kvh) {
      if (D == 64) scores_kv_head<4>(q, k, row, num, kvh, group, scores, stride);
      if (D == 128) scores_kv_head<8>(q, k, row, num, kvh, group, scores, stride);
      if (D == 256) scores_kv_head<16>(q, k, row, num, kvh, group, scores, stride);
    }
    return;
  }
#endif
  to_float(k, scratch, num * row);
  for (int64_t t = 0; t < num; ++t)
    for (int64_t h = kv0 * group; h < kv1 * group; ++h)
      scores[h * stride + t] = dot(q + h * D, scratch + t * row + (h / group) * D, D);
}

// acc[h] += sum_t p[h * stride + t] * v[t * row + (h / group) * D] over the `num` tokens of one block, for the
// query heads h of kv heads [kv0, kv1). Fast path: a tile of a kv head's accumulators stays in registers and each
// value row is read once per tile of the query heads that share it.
template <typename T>
void block_accumulate(float* acc, const T* v, float* scratch, int64_t row, int64_t num, int64_t kv0, int64_t kv1,
                      int64_t group, int64_t D, const float* p, int64_t stride) {
#if defined(__AVX512F__)
  if (fast_path(D)) {
    for (int64_t kvh = kv0; kvh < kv1; ++kvh) {
      if (D == 64) accumulate_kv_head<4>(acc, v, row, num, kvh, group, p, stride);
      if (D == 128) accumulate_kv_head<8>(acc, v, row, num, kvh, group, p, stride);
      if (D == 256) accumulate_kv_head<16>(acc, v, row, num, kvh, group, p, stride);
    }
    return;
  }
#endif
  to_float(v, scratch, num * row);
  for (int64_t h = kv0 * group; h < kv1 * group; ++h) {
    float* a = acc + h * D;
    for (int64_t t = 0; t < num; ++t) {
      const float w = p[h * stride + t];
      const float* vt = scratch + t * row + (h / group) * D;
      for (int64_t x = 0; x < D; ++x) a[x] += w * vt[x];
    }
  }
}

struct Shape {
  int64_t num_rows, num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks, q_row_stride;
};

// How many pieces each row's kv heads are cut into: 1 while the rows alone give every thread work; with fewer
// rows (one long conversation) a row's kv heads go to several threads, or its attention would run on one core.
inline int64_t kv_splits(int64_t num_rows, int64_t num_kv_heads) {
  const int64_t wanted = 4 * static_cast<int64_t>(at::get_num_threads());
  if (num_rows >= wanted) return 1;
  return std::clamp<int64_t>((wanted + num_rows - 1) / num_rows, 1, num_kv_heads);
}

template <typename T>
bool decode(const T* query, const T* k_cache, const T* v_cache, const int32_t* block_tables, const int32_t* seq_lens,
            const int64_t* query_rows, const int64_t* seq_rows, T* out, const Shape& s, float scale, int64_t window,
            float cap) {
  const int64_t H = s.num_heads, D = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const int64_t row = s.num_kv_heads * D;  // one token's keys (or values) for every kv head: contiguous
  const int64_t splits = kv_splits(s.num_rows, s.num_kv_heads);
  std::atomic<bool> ok{true};
  // Work item: one row's kv heads [kv0, kv1) (all of them unless split).
  at::parallel_for(0, s.num_rows * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(H * D), acc(H * D), kv(s.block_size * row), scores, inv(H);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / splits, piece = item % splits;
      const int64_t kv0 = piece * s.num_kv_heads / splits, kv1 = (piece + 1) * s.num_kv_heads / splits;
      const int64_t h0 = kv0 * group, h1 = kv1 * group;
      const int64_t q_row = query_rows[i], seq = seq_rows[i];
      const int64_t len = seq_lens[seq];
      const int32_t* table = block_tables + seq * s.max_blocks;
      if (len <= 0 || len > s.max_blocks * s.block_size) {
        ok = false;
        return;
      }
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;  // the first key this row sees
      const int64_t n = len - first;
      for (int64_t t = first - first % s.block_size; t < len; t += s.block_size) {
        if (table[t / s.block_size] < 0 || table[t / s.block_size] >= s.num_blocks) {
          ok = false;
          return;
        }
      }
      to_float(query + q_row * s.q_row_stride + h0 * D, q.data() + h0 * D, (h1 - h0) * D);
      for (int64_t x = h0 * D; x < h1 * D; ++x) q[x] *= scale;
      scores.resize(H * n);  // [H, n]: keys first..len-1
      // Pieces of blocks: from `first` (maybe mid-block) to the end of its block, then whole blocks.
      for (int64_t t0 = first; t0 < len;) {
        const int64_t offset = t0 % s.block_size, num = std::min(s.block_size - offset, len - t0);
        const int64_t block = table[t0 / s.block_size];
        // A block's rows are contiguous in the cache.
        block_scores(q.data(), k_cache + (block * s.block_size + offset) * row, kv.data(), row, num, kv0, kv1, group,
                     D, scores.data() + (t0 - first), n);
        t0 += num;
      }
      for (int64_t h = h0; h < h1; ++h) {
        float* p = scores.data() + h * n;
        if (cap > 0.f) softcap(p, n, cap);
        const float top = max_of(p, n);
        for (int64_t t = 0; t < n; ++t) p[t] -= top;
        exp_nonpositive(p, n);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) sum += p[t];
        inv[h] = 1.f / sum;
      }
      std::fill(acc.begin() + h0 * D, acc.begin() + h1 * D, 0.f);
      for (int64_t t0 = first; t0 < len;) {
        const int64_t offset = t0 % s.block_size, num = std::min(s.block_size - offset, len - t0);
        const int64_t block = table[t0 / s.block_size];
        block_accumulate(acc.data(), v_cache + (block * s.block_size + offset) * row, kv.data(), row, num, kv0, kv1,
                         group, D, scores.data() + (t0 - first), n);
        t0 += num;
      }
      T* o = out + q_row * H * D;
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t x = 0; x < D; ++x) o[h * D + x] = static_cast<T>(acc[h * D + x] * inv[h]);
    }
  });
  return ok.load();
}

void paged_decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            const at::Tensor& query_rows, const at::Tensor& seq_rows, double scale, int64_t window,
                            double softcap) {
  check_paged_attention_args(out, query, k_cache, v_cache);
  TORCH_CHECK(window >= 0 && softcap >= 0, "window and softcap: 0 (none) or positive");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables");
  TORCH_CHECK(query_rows.scalar_type() == at::kLong && seq_rows.scalar_type() == at::kLong, "int64 rows");
  TORCH_CHECK(query_rows.sizes() == seq_rows.sizes() && query_rows.dim() == 1, "one seq per query row");
  const auto tables = block_tables.contiguous();
  const auto lens = seq_lens.contiguous();
  const auto q_rows = query_rows.contiguous();
  const auto s_rows = seq_rows.contiguous();
  const int64_t n = q_rows.size(0), num_seqs = lens.size(0), num_tokens = query.size(0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t qr = q_rows.data_ptr<int64_t>()[i], sr = s_rows.data_ptr<int64_t>()[i];
    TORCH_CHECK(0 <= qr && qr < num_tokens && 0 <= sr && sr < num_seqs && sr < tables.size(0), "row out of range");
  }
  const Shape shape{n,
                    query.size(1),
                    k_cache.size(2),
                    query.size(2),
                    k_cache.size(1),
                    k_cache.size(0),
                    tables.size(1),
                    query.stride(0)};
  bool ok = true;
  const float s = static_cast<float>(scale), cap = static_cast<float>(softcap);
  switch (query.scalar_type()) {
    case at::kFloat:
      ok = decode<float>(query.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                         tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), q_rows.data_ptr<int64_t>(),
                         s_rows.data_ptr<int64_t>(), out.data_ptr<float>(), shape, s, window, cap);
      break;
    case at::kBFloat16:
      ok = decode<c10::BFloat16>(query.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                                 v_cache.data_ptr<c10::BFloat16>(), tables.data_ptr<int32_t>(),
                                 lens.data_ptr<int32_t>(), q_rows.data_ptr<int64_t>(), s_rows.data_ptr<int64_t>(),
                                 out.data_ptr<c10::BFloat16>(), shape, s, window, cap);
      break;
    case at::kHalf:
      ok = decode<c10::Half>(query.data_ptr<c10::Half>(), k_cache.data_ptr<c10::Half>(),
                             v_cache.data_ptr<c10::Half>(), tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(),
                             q_rows.data_ptr<int64_t>(), s_rows.data_ptr<int64_t>(), out.data_ptr<c10::Half>(), shape,
                             s, window, cap);
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", query.scalar_type());
  }
  TORCH_CHECK(ok, "paged_decode_attention: a sequence length or block id outside the cache");
}

}  // namespace
}  // namespace sagemaker_llm_cpu

TORCH_LIBRARY_FRAGMENT(sagemaker_llm_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_rows, Tensor seq_rows, float scale, int window=0, float softcap=0.) -> ()");
}

TORCH_LIBRARY_IMPL(sagemaker_llm_cpu, CPU, m) {
  m.impl("paged_decode_attention", &sagemaker_llm_cpu::paged_decode_attention);
}
