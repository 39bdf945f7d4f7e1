// Paged prefill attention for CPUs: a prompt (or a chunk of one) attends causally over its sequence's cached
// prefix and itself, read straight from the block-table KV cache.
//
// Why: torch's CPU path (reference.prefill_one) gathers each prompt's blocks into a new tensor and runs SDPA's
// CPU flash kernel, which reaches 45-60 GFLOP/s at prompt lengths of 128-512 on a Zen4 core pair (bf16 or fp32).
// Here a tile of query rows (kTileQ positions x the query heads of one kv head, so each key tile is read once
// for all of them) runs flash attention over key tiles of kLanes keys: scores vectorized over the keys of a tile
// (keys transposed to [D][kLanes]; bf16 pairs through vdpbf16ps where the CPU has AVX512_BF16, else widened to
// fp32), an online fp32 softmax, values accumulated in fp32 vectorized over the head dim. 120-165 GFLOP/s in
// bf16, 90-120 in fp32 on the same cores (2.5-3x SDPA at 128-512 tokens, 1.5x at 2048 in bf16). The AVX-512
// paths use intrinsics; the plain loops elsewhere are correct but slower than SDPA, so the CPU backend uses this
// kernel only where `paged_prefill_attention_is_vectorized()`.
//
// Layout (model_handler/kernels/reference.py): k_cache, v_cache [num_blocks, block_size, num_kv_heads,
// head_dim]; block_tables [num_seqs, max_blocks] int32; query [T, H, D] with any row stride; out [T, H, D]
// contiguous; prefills [P, 4] int64, one row per prompt: (first query row, query length, sequence length,
// block table row). The query's tokens are the sequence's last `query length` tokens, already in the cache.
// With a sliding window (window > 0) a position p sees keys p - window < k <= p only, and the key tiles before a
// query tile's windows are skipped (their table entries are never read); softcap > 0 maps the scaled logits through
// softcap * tanh(s / softcap) (Gemma 2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "cpu_paged_checks.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sagemaker_llm_cpu {
namespace {

constexpr int64_t kLanes = 16;  // keys per tile: one 512-bit vector of fp32 scores per query row
constexpr int64_t kRows = 8;    // query rows whose scores (or sums) are computed together, sharing each load
constexpr int64_t kTileQ = 32;  // query positions per work item

struct Prompt {
  int64_t start, q_len, seq_len, table_row;
};

struct PrefillShape {
  int64_t num_heads, num_kv_heads, head_dim, block_size, num_blocks, max_blocks, q_row_stride;
};

// Per-thread buffers, sized once per call.
struct Scratch {
  std::vector<float> q, acc, kt, v, m, l, row;
  std::vector<uint32_t> qb, ktb;  // the bf16 dot-product path: query rows and keys as pairs of bf16
  Scratch(int64_t rows, int64_t D)
      : q(rows * D), acc(rows * D), kt(D * kLanes), v(kLanes * D), m(rows), l(rows), row(D), qb(rows * D / 2),
        ktb(D / 2 * kLanes) {}
};

// bf16 caches on a CPU with AVX512_BF16 (Zen4, Sapphire Rapids): scores from bf16 pairs (vdpbf16ps: exact
// products, fp32 sums; half the instructions of widening to fp32), values still summed in fp32.
template <typename T>
constexpr bool bf16_dot() {
#if defined(__AVX512BF16__)
  return std::is_same_v<T, c10::BFloat16>;
#else
  return false;
#endif
}

// s[r][j] = q[r] . k[j] for kRows query rows and the kLanes keys of a tile (kt holds them as [D][kLanes]).
inline void tile_scores(const float* __restrict q, int64_t D, const float* __restrict kt,
                        float (*__restrict s)[kLanes]) {
#if defined(__AVX512F__)
  static_assert(kLanes == 16 && kRows == 8, "one zmm of scores per row");
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k = _mm512_loadu_ps(kt + d * kLanes);
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), k, a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(q[D + d]), k, a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(q[2 * D + d]), k, a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(q[3 * D + d]), k, a3);
    a4 = _mm512_fmadd_ps(_mm512_set1_ps(q[4 * D + d]), k, a4);
    a5 = _mm512_fmadd_ps(_mm512_set1_ps(q[5 * D + d]), k, a5);
    a6 = _mm512_fmadd_ps(_mm512_set1_ps(q[6 * D + d]), k, a6);
    a7 = _mm512_fmadd_ps(_mm512_set1_ps(q[7 * D + d]), k, a7);
  }
  _mm512_storeu_ps(s[0], a0);
  _mm512_storeu_ps(s[1], a1);
  _mm512_storeu_ps(s[2], a2);
  _mm512_storeu_ps(s[3], a3);
  _mm512_storeu_ps(s[4], a4);
  _mm512_storeu_ps(s[5], a5);
  _mm512_storeu_ps(s[6], a6);
  _mm512_storeu_ps(s[7], a7);
#else
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t j = 0; j < kLanes; ++j) s[r][j] = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float* k = kt + d * kLanes;
    for (int64_t r = 0; r < kRows; ++r) {
      const float qd = q[r * D + d];
      for (int64_t j = 0; j < kLanes; ++j) s[r][j] += qd * k[j];
    }
  }
#endif
}

#if defined(__AVX512BF16__)
// s[r][j] = scale * q[r] . k[j] from bf16 pairs: q rows as [pairs] words, keys as ktb [pairs][kLanes] words.
inline void tile_scores_bf16(const uint32_t* __restrict q, int64_t pairs, const uint32_t* __restrict ktb, float scale,
                             float (*__restrict s)[kLanes]) {
  static_assert(kLanes == 16 && kRows == 8, "one zmm of scores per row");
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t d = 0; d < pairs; ++d) {
    const __m512bh k = (__m512bh)_mm512_loadu_si512(ktb + d * kLanes);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[d])), k);
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[pairs + d])), k);
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[2 * pairs + d])), k);
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[3 * pairs + d])), k);
    a4 = _mm512_dpbf16_ps(a4, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[4 * pairs + d])), k);
    a5 = _mm512_dpbf16_ps(a5, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[5 * pairs + d])), k);
    a6 = _mm512_dpbf16_ps(a6, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[6 * pairs + d])), k);
    a7 = _mm512_dpbf16_ps(a7, (__m512bh)_mm512_set1_epi32(static_cast<int>(q[7 * pairs + d])), k);
  }
  const __m512 c = _mm512_set1_ps(scale);
  _mm512_storeu_ps(s[0], _mm512_mul_ps(a0, c));
  _mm512_storeu_ps(s[1], _mm512_mul_ps(a1, c));
  _mm512_storeu_ps(s[2], _mm512_mul_ps(a2, c));
  _mm512_storeu_ps(s[3], _mm512_mul_ps(a3, c));
  _mm512_storeu_ps(s[4], _mm512_mul_ps(a4, c));
  _mm512_storeu_ps(s[5], _mm512_mul_ps(a5, c));
  _mm512_storeu_ps(s[6], _mm512_mul_ps(a6, c));
  _mm512_storeu_ps(s[7], _mm512_mul_ps(a7, c));
}
#endif

// acc[r] += sum_j p[r][j] v[j] for kRows rows; v is the tile's values as [kLanes][D].
inline void tile_accumulate(float* __restrict acc, int64_t D, const float* __restrict v,
                            const float (*__restrict p)[kLanes]) {
  int64_t x = 0;
#if defined(__AVX512F__)
  for (; x + 16 <= D; x += 16) {
    __m512 a[kRows];
    for (int64_t r = 0; r < kRows; ++r) a[r] = _mm512_loadu_ps(acc + r * D + x);
    for (int64_t j = 0; j < kLanes; ++j) {
      const __m512 vj = _mm512_loadu_ps(v + j * D + x);
      for (int64_t r = 0; r < kRows; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r][j]), vj, a[r]);
    }
    for (int64_t r = 0; r < kRows; ++r) _mm512_storeu_ps(acc + r * D + x, a[r]);
  }
#endif
  for (; x < D; ++x)
    for (int64_t r = 0; r < kRows; ++r) {
      float a = acc[r * D + x];
      for (int64_t j = 0; j < kLanes; ++j) a += p[r][j] * v[j * D + x];
      acc[r * D + x] = a;
    }
}

#if defined(__AVX512F__)
// Lanes lo..hi-1 of a tile.
inline __mmask16 lanes(int64_t lo, int64_t hi) { return static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1)); }
#endif

// The largest of scores lo..hi-1 (lo < hi) of a row.
inline float tile_max(const float* s, int64_t lo, int64_t hi) {
#if defined(__AVX512F__)
  return _mm512_mask_reduce_max_ps(lanes(lo, hi), _mm512_loadu_ps(s));
#else
  float top = s[lo];
  for (int64_t j = lo + 1; j < hi; ++j) top = std::max(top, s[j]);
  return top;
#endif
}

#if defined(__AVX512F__)
// exp(x) for x <= 0, lane by lane: exp_nonpositive (cpu_math.h) in registers, the same arithmetic.
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 v = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(-126.f));
  const __m512i ki = _mm512_cvttps_epi32(_mm512_sub_ps(v, _mm512_set1_ps(0.5f)));
  const __m512 f = _mm512_sub_ps(v, _mm512_cvtepi32_ps(ki));
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i power = _mm512_slli_epi32(_mm512_add_epi32(ki, _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(power));
}
#endif

// Scores -> softmax weights exp(s - top) in place for lanes lo..hi-1, zero elsewhere; returns their sum.
inline float tile_weights(float* s, int64_t lo, int64_t hi, float top) {
#if defined(__AVX512F__)
  const __mmask16 mask = lanes(lo, hi);
  const __m512 x = _mm512_mask_sub_ps(_mm512_set1_ps(-126.f), mask, _mm512_loadu_ps(s), _mm512_set1_ps(top));
  const __m512 p = _mm512_maskz_mov_ps(mask, exp_nonpositive16(x));
  _mm512_storeu_ps(s, p);
  return _mm512_reduce_add_ps(p);
#else
  for (int64_t j = 0; j < kLanes; ++j) s[j] = lo <= j && j < hi ? s[j] - top : -126.f;
  exp_nonpositive(s, kLanes);
  float sum = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) {
    s[j] = lo <= j && j < hi ? s[j] : 0.f;
    sum += s[j];
  }
  return sum;
#endif
}

// Keys t0..t0+n of kv head `kvh`: values widened to fp32 into v [kLanes][D]; keys transposed, either widened to
// fp32 into kt [D][kLanes] or, with `pairs`, kept as bf16 pairs in ktb [D / 2][kLanes] (32-bit words). Lanes
// past n are zero.
template <typename T>
__attribute__((always_inline)) inline void load_tile(const T* k_cache, const T* v_cache, const int32_t* table,
                                                     int64_t t0, int64_t n, int64_t kvh, const PrefillShape& s,
                                                     bool pairs, Scratch& w) {
  const int64_t D = s.head_dim;
  float* kt = w.kt.data();
  uint32_t* ktb = w.ktb.data();
  float* v = w.v.data();
  float* row = w.row.data();
  for (int64_t j = 0; j < kLanes; ++j) {
    if (j < n) {
      const int64_t t = t0 + j;
      const int64_t slot = static_cast<int64_t>(table[t / s.block_size]) * s.block_size + t % s.block_size;
      const int64_t offset = (slot * s.num_kv_heads + kvh) * D;
      if (pairs) {
        for (int64_t d = 0; d < D / 2; ++d) std::memcpy(ktb + d * kLanes + j, k_cache + offset + 2 * d, 4);
      } else {
        to_float(k_cache + offset, row, D);
        for (int64_t d = 0; d < D; ++d) kt[d * kLanes + j] = row[d];
      }
      to_float(v_cache + offset, v + j * D, D);
    } else {
      if (pairs) {
        for (int64_t d = 0; d < D / 2; ++d) ktb[d * kLanes + j] = 0;
      } else {
        for (int64_t d = 0; d < D; ++d) kt[d * kLanes + j] = 0.f;
      }
      for (int64_t d = 0; d < D; ++d) v[j * D + d] = 0.f;
    }
  }
}

// One work item: query positions [i0, i0 + nq) of one prompt, the query heads of kv head `kvh`. The window and the
// soft-cap are compile-time switches, so a layer with neither runs the loop it ran before they existed. Kept out of
// line, with `load_tile` inlined into it: the other way round GCC called load_tile once per key tile (prompts 2-6%
// slower in bf16, measured).
template <typename T, bool kWindow, bool kSoftcap>
__attribute__((noinline)) void attend_tile(const T* query, const T* k_cache, const T* v_cache, const int32_t* table,
                                          const Prompt& p, int64_t i0, int64_t nq, int64_t kvh, const PrefillShape& s,
                                          float scale, int64_t window, float cap, T* out, Scratch& w) {
  const int64_t D = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const int64_t rows = nq * group, padded = (rows + kRows - 1) / kRows * kRows;
  const int64_t context = p.seq_len - p.q_len;
  const bool pairs = bf16_dot<T>() && D % 2 == 0;
  // Row r: position i0 + r / group, query head kvh * group + r % group. Padding rows repeat the last row.
  for (int64_t r = 0; r < padded; ++r) {
    const int64_t rr = std::min(r, rows - 1);
    const int64_t token = p.start + i0 + rr / group, head = kvh * group + rr % group;
    const T* source = query + token * s.q_row_stride + head * D;
    if (pairs) {  // bf16 as it is; the scale goes on the scores
      std::memcpy(w.qb.data() + r * (D / 2), source, D * sizeof(T));
      continue;
    }
    float* q = w.q.data() + r * D;
    to_float(source, q, D);
    for (int64_t d = 0; d < D; ++d) q[d] *= scale;
  }
  std::fill(w.acc.begin(), w.acc.begin() + padded * D, 0.f);
  std::fill(w.m.begin(), w.m.begin() + padded, -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.begin() + padded, 0.f);
  const int64_t end = context + i0 + nq;  // keys the tile's last position sees
  // The first key the tile's first position sees: key tiles start there (no alignment needed: keys are read one by
  // one through the table).
  const int64_t begin = kWindow ? std::max<int64_t>(0, context + i0 - window + 1) : 0;
  for (int64_t t0 = begin; t0 < end; t0 += kLanes) {
    const int64_t n = std::min(kLanes, end - t0);
    load_tile(k_cache, v_cache, table, t0, n, kvh, s, pairs, w);
    for (int64_t r0 = 0; r0 < padded; r0 += kRows) {
      // Keys of this tile each row sees, lanes lo..hi-1: position i sees keys up to context + i (and with a window
      // from context + i - window + 1).
      int64_t lo[kRows], hi[kRows];
      bool any = false;
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t rr = std::min(r0 + r, rows - 1);
        const int64_t pos = context + i0 + rr / group;
        hi[r] = std::clamp<int64_t>(pos + 1 - t0, 0, n);
        lo[r] = kWindow ? std::clamp<int64_t>(pos - window + 1 - t0, 0, n) : 0;
        any = any || lo[r] < hi[r];
      }
      if (!any) continue;  // rows at earlier positions than the tile's keys (or past their windows)
      float sc[kRows][kLanes];
#if defined(__AVX512BF16__)
      if (pairs)
        tile_scores_bf16(w.qb.data() + r0 * (D / 2), D / 2, w.ktb.data(), scale, sc);
      else
#endif
        tile_scores(w.q.data() + r0 * D, D, w.kt.data(), sc);
      if constexpr (kSoftcap)
        for (int64_t r = 0; r < kRows; ++r) softcap(sc[r], kLanes, cap);
      for (int64_t r = 0; r < kRows; ++r) {
        float* m = w.m.data() + r0 + r;
        float* l = w.l.data() + r0 + r;
        if (lo[r] >= hi[r]) {
          for (int64_t j = 0; j < kLanes; ++j) sc[r][j] = 0.f;  // weights of zero: the row's sums stay
          continue;
        }
        const float top = std::max(*m, tile_max(sc[r], lo[r], hi[r]));
        const float sum = tile_weights(sc[r], lo[r], hi[r], top);
        if (top != *m) {  // a new maximum: rescale what the row has summed so far
          float correction = *m - top;
          exp_nonpositive(&correction, 1);
          *l *= correction;
          float* a = w.acc.data() + (r0 + r) * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= correction;
          *m = top;
        }
        *l += sum;
      }
      tile_accumulate(w.acc.data() + r0 * D, D, w.v.data(), sc);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = p.start + i0 + r / group, head = kvh * group + r % group;
    float* a = w.acc.data() + r * D;
    const float inv = 1.f / w.l[r];
    for (int64_t d = 0; d < D; ++d) a[d] *= inv;
    from_float(a, out + (token * s.num_heads + head) * D, D);
  }
}

template <typename T>
void prefill(const T* query, const T* k_cache, const T* v_cache, const int32_t* block_tables,
             const std::vector<Prompt>& prompts, T* out, const PrefillShape& s, float scale, int64_t window,
             float cap) {
  // Work items: (prompt, kv head, query tile), taken in turn by the threads (tiles late in a prompt see more
  // keys, so a static split would leave one thread the long ones).
  struct Item {
    int64_t prompt, kvh, i0;
  };
  std::vector<Item> items;
  for (int64_t p = 0; p < static_cast<int64_t>(prompts.size()); ++p)
    for (int64_t i0 = prompts[p].q_len - 1 - (prompts[p].q_len - 1) % kTileQ; i0 >= 0; i0 -= kTileQ)
      for (int64_t kvh = 0; kvh < s.num_kv_heads; ++kvh) items.push_back({p, kvh, i0});
  // Longest first (the last tiles of each prompt), so the threads finish together.
  std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
    return prompts[a.prompt].seq_len - prompts[a.prompt].q_len + a.i0 >
           prompts[b.prompt].seq_len - prompts[b.prompt].q_len + b.i0;
  });
  const int64_t group = s.num_heads / s.num_kv_heads;
  std::atomic<int64_t> next{0};
  const int64_t num_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_items), 1, [&](int64_t, int64_t) {
    Scratch w(kTileQ * group + kRows, s.head_dim);
    for (int64_t i = next++; i < num_items; i = next++) {
      const Item& item = items[i];
      const Prompt& p = prompts[item.prompt];
      const int32_t* table = block_tables + p.table_row * s.max_blocks;
      const int64_t nq = std::min(kTileQ, p.q_len - item.i0);
      const auto run = [&](auto tile) {
        tile(query, k_cache, v_cache, table, p, item.i0, nq, item.kvh, s, scale, window, cap, out, w);
      };
      if (window > 0 && cap > 0.f)
        run(attend_tile<T, true, true>);
      else if (window > 0)
        run(attend_tile<T, true, false>);
      else if (cap > 0.f)
        run(attend_tile<T, false, true>);
      else
        run(attend_tile<T, false, false>);
    }
  });
}

void paged_prefill_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& prefills,
                             double scale, int64_t window, double softcap) {
  check_paged_attention_args(out, query, k_cache, v_cache);
  TORCH_CHECK(window >= 0 && softcap >= 0, "window and softcap: 0 (none) or positive");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2, "block tables: int32 [seqs, blocks]");
  TORCH_CHECK(prefills.scalar_type() == at::kLong && prefills.dim() == 2 && prefills.size(1) == 4,
              "prefills: int64 [P, 4] (query start, query length, sequence length, table row)");
  const auto tables = block_tables.contiguous();
  const auto rows = prefills.contiguous();
  const PrefillShape shape{query.size(1), k_cache.size(2), query.size(2), k_cache.size(1),
                           k_cache.size(0), tables.size(1), query.stride(0)};
  std::vector<Prompt> prompts;
  const int64_t* r = rows.data_ptr<int64_t>();
  const int32_t* table_data = tables.data_ptr<int32_t>();
  for (int64_t i = 0; i < rows.size(0); ++i) {
    const Prompt p{r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3]};
    TORCH_CHECK(p.q_len >= 1 && p.start >= 0 && p.start + p.q_len <= query.size(0), "prefill rows outside the query");
    TORCH_CHECK(p.seq_len >= p.q_len && p.seq_len <= shape.max_blocks * shape.block_size,
                "a sequence length outside its block table");
    TORCH_CHECK(p.table_row >= 0 && p.table_row < tables.size(0), "a block table row out of range");
    const int32_t* table = table_data + p.table_row * shape.max_blocks;
    const int64_t first = window > 0 ? std::max<int64_t>(0, p.seq_len - p.q_len - window + 1) : 0;  // first key read
    for (int64_t b = first / shape.block_size; b * shape.block_size < p.seq_len; ++b)
      TORCH_CHECK(table[b] >= 0 && table[b] < shape.num_blocks, "a block id outside the cache");
    prompts.push_back(p);
  }
  if (prompts.empty()) return;
  const float s = static_cast<float>(scale), cap = static_cast<float>(softcap);
  switch (query.scalar_type()) {
    case at::kFloat:
      prefill<float>(query.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), table_data,
                     prompts, out.data_ptr<float>(), shape, s, window, cap);
      break;
    case at::kBFloat16:
      prefill<c10::BFloat16>(query.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                             v_cache.data_ptr<c10::BFloat16>(), table_data, prompts,
                             out.data_ptr<c10::BFloat16>(), shape, s, window, cap);
      break;
    case at::kHalf:
      prefill<c10::Half>(query.data_ptr<c10::Half>(), k_cache.data_ptr<c10::Half>(), v_cache.data_ptr<c10::Half>(),
                         table_data, prompts, out.data_ptr<c10::Half>(), shape, s, window, cap);
      break;
    default:
      TORCH_CHECK(false, "paged_prefill_attention: unsupported dtype ", query.scalar_type());
  }
}

// Whether this build has the AVX-512 tiles. Without them the plain loops run at a third to a ninth of SDPA's speed
// (x86-64-v3 build on the Zen4 EPYC), so the CPU backend leaves prompts to SDPA there (correct, only slower).
bool paged_prefill_attention_is_vectorized() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace sagemaker_llm_cpu

TORCH_LIBRARY_FRAGMENT(sagemaker_llm_cpu, m) {
  m.def(
      "paged_prefill_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor prefills, float scale, int window=0, float softcap=0.) -> ()");
  m.def("paged_prefill_attention_is_vectorized() -> bool", &sagemaker_llm_cpu::paged_prefill_attention_is_vectorized);
}

TORCH_LIBRARY_IMPL(sagemaker_llm_cpu, CPU, m) {
  m.impl("paged_prefill_attention", &sagemaker_llm_cpu::paged_prefill_attention);
}
