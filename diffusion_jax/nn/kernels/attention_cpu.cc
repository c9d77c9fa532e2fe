// Fused scaled dot-product attention for the CPU, as XLA FFI custom calls (float32).
//
// XLA's CPU backend runs attention as separate library matmuls and loop fusions over score tiles in
// memory. These kernels keep one block of queries in the cache from the q k^T product through the
// softmax to the product with v (forward, over chunks of keys with an online softmax), and to dq, dk,
// dv (backward, recomputing the probabilities from the saved log-sum-exp, as flash attention does).
//
// Layout: q [..., T, N, D], k and v [..., S, N, D] (the projections' own layout: no transposes), the
// log-sum-exp [..., N, T]; the leading axes are flattened into the batch. `scale` multiplies the
// scores (1/sqrt(D)). Any head size D works; blocks of it are padded with zeros in the scratch buffers.
//
// Inside a block the vector lanes run over queries: scores are stored transposed, [S, lanes], so the
// softmax's maximum and sum over keys are lane-wise, and every product broadcasts one element of k or v
// in its natural [S, D] layout.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Floats per vector and vector registers, for the instruction set this is compiled for (-march=native).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRegisters = 16;
#else  // SSE, NEON
constexpr int kLanes = 4, kRegisters = 16;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

constexpr int kVecsPerBlock = 2;                  // a block of queries: 2 vectors of lanes
constexpr int kBlock = kLanes * kVecsPerBlock;    // 32 queries with AVX-512
constexpr int kAccumulators = kRegisters / 2;     // vectors summed in registers at once (the rest: operands)
// The forward pass takes the keys in chunks of this many, with an online softmax: a chunk's scores stay
// in the cache where a whole row of SD 1.5's 4096 keys would not (benchmarks/attention.py).
constexpr int64_t kKeyChunk = 256;

// A broadcast, as one instruction (`Vec{} + x` would compute 0.0 + x first, an add on the multiply ports).
template <size_t... I>
inline Vec SplatOf(float x, std::index_sequence<I...>) { return Vec{((void)I, x)...}; }
inline Vec Splat(float x) { return SplatOf(x, std::make_index_sequence<kLanes>()); }

#if defined(__AVX512F__)
// exp(x) = 2^n 2^f with n = round(x log2 e), |f| <= 1/2: a degree-5 polynomial for 2^f (relative error
// 2e-7, fitted for this range) and one scalef for the 2^n (0 for n below the float range).
inline Vec Exp(Vec x) {
  const __m512 t = _mm512_mul_ps((__m512)x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3282304862514138e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675589390099049e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550695210695267e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022118747234344e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470036506653e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return (Vec)_mm512_scalef_ps(p, n);
}
#else
// exp(x) for a vector, Cephes' single-precision polynomial on x - n ln 2 (relative error ~2e-7).
// Arguments below -87 give ~1e-38 instead of 0, which the softmax never tells apart.
inline Vec Exp(Vec x) {
  const Vec lo = Splat(-87.0f), hi = Splat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const Vec magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  Vec t = x * 1.44269504088896341f + magic;
  IVec n = (IVec)t - (IVec)magic;
  Vec nf = t - magic;
  Vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  IVec bits = (n + 127) << 23;
  return p * (Vec)bits;
}
#endif

// An aligned scratch buffer of floats.
struct Scratch {
  float* data = nullptr;
  explicit Scratch(size_t n) {
    data = static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
  }
  ~Scratch() { std::free(data); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};


// Subnormal floats make multiplies ~100x slower on x86; the softmax's far tails produce them.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // flush-to-zero and denormals-are-zero
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// out[j, :] = sum_e rows[j, e] * cols_t[e, :] for j < S, lanes of one block: [S, D] x [D, kBlock].
// `rows` has row stride `ld`; `epilogue(j, acc)` receives each row's kVecsPerBlock vectors.
template <typename Epilogue>
inline void RowsTimesBlock(const float* rows, int64_t ld, int64_t s, int64_t d, const float* cols_t,
                           Epilogue&& epilogue) {
  constexpr int kRows = kAccumulators / kVecsPerBlock;  // independent accumulator chains
  int64_t j = 0;
  for (; j + kRows <= s; j += kRows) {
    Vec acc[kRows][kVecsPerBlock] = {};
    for (int64_t e = 0; e < d; ++e) {
      const Vec* c = reinterpret_cast<const Vec*>(cols_t + e * kBlock);
      for (int r = 0; r < kRows; ++r) {
        const Vec a = Splat(rows[(j + r) * ld + e]);
        for (int v = 0; v < kVecsPerBlock; ++v) acc[r][v] += a * c[v];
      }
    }
    for (int r = 0; r < kRows; ++r) epilogue(j + r, acc[r]);
  }
  for (; j < s; ++j) {
    Vec acc[kVecsPerBlock] = {};
    for (int64_t e = 0; e < d; ++e) {
      const Vec* c = reinterpret_cast<const Vec*>(cols_t + e * kBlock);
      const Vec a = Splat(rows[j * ld + e]);
      for (int v = 0; v < kVecsPerBlock; ++v) acc[v] += a * c[v];
    }
    epilogue(j, acc);
  }
}

// out_t[e0 + c, :] = sum_j rows[j, e0 + c] * block[j, :] for c < kCols.
template <int kCols>
inline void RowsTransposedTimesBlockCols(const float* rows, int64_t ld, int64_t s, int64_t e0, const float* block,
                                         float* out_t, bool accumulate) {
  Vec acc[kCols][kVecsPerBlock] = {};
  for (int64_t j = 0; j < s; ++j) {
    const Vec* b = reinterpret_cast<const Vec*>(block + j * kBlock);
    const float* row = rows + j * ld + e0;
    for (int c = 0; c < kCols; ++c) {
      const Vec a = Splat(row[c]);
      for (int v = 0; v < kVecsPerBlock; ++v) acc[c][v] += a * b[v];
    }
  }
  for (int c = 0; c < kCols; ++c)
    for (int v = 0; v < kVecsPerBlock; ++v) {
      Vec* out = reinterpret_cast<Vec*>(out_t + (e0 + c) * kBlock) + v;
      *out = accumulate ? *out + acc[c][v] : acc[c][v];
    }
}

// out_t[e, :] (+)= sum_j rows[j, e] * block[j, :] for e < D: [S, D]^T x [S, kBlock] -> [D, kBlock].
inline void RowsTransposedTimesBlock(const float* rows, int64_t ld, int64_t s, int64_t d, const float* block,
                                     float* out_t, bool accumulate = false) {
  constexpr int kCols = kAccumulators / kVecsPerBlock;
  int64_t e0 = 0;
  for (; e0 + kCols <= d; e0 += kCols) RowsTransposedTimesBlockCols<kCols>(rows, ld, s, e0, block, out_t, accumulate);
  switch (d - e0) {
    case 7: RowsTransposedTimesBlockCols<7>(rows, ld, s, e0, block, out_t, accumulate); break;
    case 6: RowsTransposedTimesBlockCols<6>(rows, ld, s, e0, block, out_t, accumulate); break;
    case 5: RowsTransposedTimesBlockCols<5>(rows, ld, s, e0, block, out_t, accumulate); break;
    case 4: RowsTransposedTimesBlockCols<4>(rows, ld, s, e0, block, out_t, accumulate); break;
    case 3: RowsTransposedTimesBlockCols<3>(rows, ld, s, e0, block, out_t, accumulate); break;
    case 2: RowsTransposedTimesBlockCols<2>(rows, ld, s, e0, block, out_t, accumulate); break;
    case 1: RowsTransposedTimesBlockCols<1>(rows, ld, s, e0, block, out_t, accumulate); break;
    default: break;
  }
}

// acc[j, :] += sum_i block[j, i] * rows[i, :] for j < S: [S, kBlock] x [kBlock, Dp] -> [S, Dp], on the
// 16 * kChunk columns from e0; rows and acc have row stride dp (a multiple of 16).
template <int kChunk>
inline void BlockTimesRowsChunk(const float* block, int64_t s, const float* rows, int64_t dp, int64_t e0, float* acc) {
  constexpr int kRows = kAccumulators / kChunk;
  int64_t j = 0;
  for (; j + kRows <= s; j += kRows) {
    Vec sum[kRows][kChunk] = {};
    for (int i = 0; i < kBlock; ++i) {
      Vec x[kChunk];
      for (int c = 0; c < kChunk; ++c) x[c] = reinterpret_cast<const Vec*>(rows + i * dp + e0)[c];
      for (int r = 0; r < kRows; ++r) {
        const Vec a = Splat(block[(j + r) * kBlock + i]);
        for (int c = 0; c < kChunk; ++c) sum[r][c] += a * x[c];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < kChunk; ++c) reinterpret_cast<Vec*>(acc + (j + r) * dp + e0)[c] += sum[r][c];
  }
  for (; j < s; ++j) {
    Vec sum[kChunk] = {};
    for (int i = 0; i < kBlock; ++i) {
      const Vec a = Splat(block[j * kBlock + i]);
      for (int c = 0; c < kChunk; ++c) sum[c] += a * reinterpret_cast<const Vec*>(rows + i * dp + e0)[c];
    }
    for (int c = 0; c < kChunk; ++c) reinterpret_cast<Vec*>(acc + j * dp + e0)[c] += sum[c];
  }
}

inline void BlockTimesRows(const float* block, int64_t s, const float* rows, int64_t dp, float* acc) {
  constexpr int kMaxChunk = kAccumulators / 4;  // vectors of a row at once, for 4 rows or more
  for (int64_t e0 = 0; e0 < dp; e0 += kMaxChunk * kLanes) {
    switch (std::min<int64_t>(kMaxChunk, (dp - e0) / kLanes)) {
      case 1: BlockTimesRowsChunk<1>(block, s, rows, dp, e0, acc); break;
      case 2: BlockTimesRowsChunk<2>(block, s, rows, dp, e0, acc); break;
      case 3: BlockTimesRowsChunk<3>(block, s, rows, dp, e0, acc); break;
      default: BlockTimesRowsChunk<4>(block, s, rows, dp, e0, acc); break;
    }
  }
}

// Rows [i0, i0 + n) of x (row stride ld, D columns), times `scale`, as a block transposed [D, kBlock]
// or as rows [kBlock, dp]; zero beyond n and D.
inline void LoadBlockTransposed(const float* x, int64_t ld, int64_t i0, int64_t n, int64_t d, float scale,
                                float* out_t) {
  std::memset(out_t, 0, sizeof(float) * d * kBlock);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = 0; e < d; ++e) out_t[e * kBlock + i] = x[(i0 + i) * ld + e] * scale;
}
inline void LoadBlockRows(const float* x, int64_t ld, int64_t i0, int64_t n, int64_t d, int64_t dp, float scale,
                          float* out) {
  std::memset(out, 0, sizeof(float) * dp * kBlock);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = 0; e < d; ++e) out[i * dp + e] = x[(i0 + i) * ld + e] * scale;
}

// Runs body(item, worker_scratch) for item in [0, n) on the calling thread and the pool's threads.
// The caller waits only for the items, not for helpers that start late: those find no work and leave
// without touching the buffers.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, size_t scratch_floats, Body&& body) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto* body_ptr = &body;
  auto work = [state, n, scratch_floats, body_ptr]() {
    std::unique_ptr<Scratch> scratch;
    int64_t finished = 0;
    {
      FlushDenormals flush;
      for (int64_t item; (item = state->next.fetch_add(1)) < n; ++finished) {
        if (!scratch) scratch = std::make_unique<Scratch>(scratch_floats);
        (*body_ptr)(item, scratch->data);
      }
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += finished;
      if (state->done == n) state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == n; });
}

struct Shape {
  int64_t b, t, s, n, d, dp;  // batch (all leading axes), queries, keys, heads, head size, padded to 16
  int64_t pairs() const { return b * n; }
  // A (batch, head) pair's first row of q (or of k and v) and the stride between rows.
  int64_t q_offset(int64_t pair) const { return ((pair / n) * t * n + pair % n) * d; }
  int64_t kv_offset(int64_t pair) const { return ((pair / n) * s * n + pair % n) * d; }
  int64_t ld() const { return n * d; }
};

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v, Shape* shape) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() < 3 || kd.size() != qd.size() || vd.size() != qd.size())
    return ffi::Error::InvalidArgument("attention: q, k, v must be [..., T, N, D], [..., S, N, D], [..., S, N, D]");
  const size_t r = qd.size();
  shape->t = qd[r - 3];
  shape->n = qd[r - 2];
  shape->d = qd[r - 1];
  shape->s = kd[r - 3];
  shape->dp = (shape->d + kLanes - 1) / kLanes * kLanes;
  shape->b = 1;
  for (size_t i = 0; i + 3 < r; ++i) {
    if (kd[i] != qd[i] || vd[i] != qd[i]) return ffi::Error::InvalidArgument("attention: leading axes differ");
    shape->b *= qd[i];
  }
  for (size_t i = r - 2; i < r; ++i)
    if (kd[i] != qd[i] || vd[i] != qd[i]) return ffi::Error::InvalidArgument("attention: heads or head size differ");
  if (vd[r - 3] != shape->s) return ffi::Error::InvalidArgument("attention: k and v differ in length");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                       float scale) {
  Shape sh;
  if (ffi::Error error = CheckShapes(q, k, v, &sh); error.failure()) return error;
  const int64_t blocks = (sh.t + kBlock - 1) / kBlock, ld = sh.ld();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  // Scratch: q block transposed [D, kBlock], probabilities [keys, kBlock], output transposed [D, kBlock].
  const int64_t chunk = std::min(sh.s, kKeyChunk);
  const size_t scratch = 2 * sh.dp * kBlock + chunk * kBlock;
  ParallelFor(pool, sh.pairs() * blocks, scratch, [&](int64_t item, float* buf) {
    const int64_t pair = item / blocks, i0 = (item % blocks) * kBlock, n = std::min<int64_t>(kBlock, sh.t - i0);
    float *q_t = buf, *probs = buf + sh.dp * kBlock, *out_t = probs + chunk * kBlock;
    const float *kk = kp + sh.kv_offset(pair), *vv = vp + sh.kv_offset(pair);
    LoadBlockTransposed(qp + sh.q_offset(pair), ld, i0, n, sh.d, scale, q_t);
    // Keys in chunks, with the softmax's maximum and sum carried from chunk to chunk (online softmax):
    // long rows (SD's 4096 keys) then keep a chunk's scores, not the whole row's, beside k and v in L2.
    Vec m[kVecsPerBlock], l[kVecsPerBlock] = {};
    for (auto& x : m) x = Splat(-INFINITY);
    for (int64_t c0 = 0; c0 < sh.s; c0 += chunk) {
      const int64_t keys = std::min(chunk, sh.s - c0);
      Vec m_new[kVecsPerBlock];
      for (int c = 0; c < kVecsPerBlock; ++c) m_new[c] = m[c];
      RowsTimesBlock(kk + c0 * ld, ld, keys, sh.d, q_t, [&](int64_t j, const Vec* acc) {
        Vec* row = reinterpret_cast<Vec*>(probs + j * kBlock);
        for (int c = 0; c < kVecsPerBlock; ++c) {
          row[c] = acc[c];
          m_new[c] = m_new[c] > acc[c] ? m_new[c] : acc[c];
        }
      });
      if (c0 > 0) {  // rescale what the earlier chunks summed to the new maximum
        Vec alpha[kVecsPerBlock];
        for (int c = 0; c < kVecsPerBlock; ++c) {
          alpha[c] = Exp(m[c] - m_new[c]);
          l[c] *= alpha[c];
        }
        for (int64_t e = 0; e < sh.d; ++e)
          for (int c = 0; c < kVecsPerBlock; ++c) reinterpret_cast<Vec*>(out_t + e * kBlock)[c] *= alpha[c];
      }
      for (int c = 0; c < kVecsPerBlock; ++c) m[c] = m_new[c];
      for (int64_t j = 0; j < keys; ++j) {
        Vec* row = reinterpret_cast<Vec*>(probs + j * kBlock);
        for (int c = 0; c < kVecsPerBlock; ++c) {
          row[c] = Exp(row[c] - m[c]);
          l[c] += row[c];
        }
      }
      RowsTransposedTimesBlock(vv + c0 * ld, ld, keys, sh.d, probs, out_t, /*accumulate=*/c0 > 0);
    }
    float* o = op + sh.q_offset(pair);
    float* ls = lp + pair * sh.t + i0;
    for (int64_t i = 0; i < n; ++i) {
      const float li = l[i / kLanes][i % kLanes], inv = 1.0f / li;
      for (int64_t e = 0; e < sh.d; ++e) o[(i0 + i) * ld + e] = out_t[e * kBlock + i] * inv;
      ls[i] = m[i / kLanes][i % kLanes] + std::log(li);
    }
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Shape sh;
  if (ffi::Error error = CheckShapes(q, k, v, &sh); error.failure()) return error;
  const int64_t blocks = (sh.t + kBlock - 1) / kBlock, ld = sh.ld(), dp = sh.dp;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = d_out.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  // Scratch: q and d_out blocks transposed [D, kBlock] and as rows [kBlock, Dp], dq transposed,
  // probabilities and score gradients [S, kBlock], the pair's dk and dv sums [S, Dp].
  const size_t scratch = 5 * dp * kBlock + 2 * sh.s * kBlock + 2 * sh.s * dp;
  // One item per (batch, head) pair: it owns that pair's dk and dv and sums them over its query blocks.
  ParallelFor(pool, sh.pairs(), scratch, [&](int64_t pair, float* buf) {
    float *q_t = buf, *q_rows = q_t + dp * kBlock, *g_t = q_rows + dp * kBlock, *g_rows = g_t + dp * kBlock;
    float *dq_t = g_rows + dp * kBlock, *probs = dq_t + dp * kBlock, *dscores = probs + sh.s * kBlock;
    float *dk_sum = dscores + sh.s * kBlock, *dv_sum = dk_sum + sh.s * dp;
    const float *kk = kp + sh.kv_offset(pair), *vv = vp + sh.kv_offset(pair);
    const float *qq = qp + sh.q_offset(pair), *oo = op + sh.q_offset(pair), *gg = gp + sh.q_offset(pair);
    std::memset(dk_sum, 0, sizeof(float) * 2 * sh.s * dp);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i0 = b * kBlock, n = std::min<int64_t>(kBlock, sh.t - i0);
      LoadBlockTransposed(qq, ld, i0, n, sh.d, scale, q_t);
      LoadBlockRows(qq, ld, i0, n, sh.d, dp, scale, q_rows);
      LoadBlockTransposed(gg, ld, i0, n, sh.d, 1.0f, g_t);
      LoadBlockRows(gg, ld, i0, n, sh.d, dp, 1.0f, g_rows);
      alignas(64) float lse_block[kBlock] = {}, delta_block[kBlock] = {};
      for (int64_t i = 0; i < n; ++i) {
        lse_block[i] = lp[pair * sh.t + i0 + i];
        float dot = 0.0f;
        for (int64_t e = 0; e < sh.d; ++e) dot += gg[(i0 + i) * ld + e] * oo[(i0 + i) * ld + e];
        delta_block[i] = dot;
      }
      const Vec* lse_v = reinterpret_cast<const Vec*>(lse_block);
      const Vec* delta_v = reinterpret_cast<const Vec*>(delta_block);
      // probabilities [S, kBlock] = exp(k (scale q)^T - lse)
      RowsTimesBlock(kk, ld, sh.s, sh.d, q_t, [&](int64_t j, const Vec* acc) {
        Vec* row = reinterpret_cast<Vec*>(probs + j * kBlock);
        for (int c = 0; c < kVecsPerBlock; ++c) row[c] = Exp(acc[c] - lse_v[c]);
      });
      // score gradients = probabilities * (v d_out^T - delta)
      RowsTimesBlock(vv, ld, sh.s, sh.d, g_t, [&](int64_t j, const Vec* acc) {
        const Vec* p = reinterpret_cast<const Vec*>(probs + j * kBlock);
        Vec* row = reinterpret_cast<Vec*>(dscores + j * kBlock);
        for (int c = 0; c < kVecsPerBlock; ++c) row[c] = p[c] * (acc[c] - delta_v[c]);
      });
      RowsTransposedTimesBlock(kk, ld, sh.s, sh.d, dscores, dq_t);  // (dq / scale)^T [D, kBlock]
      for (int64_t i = 0; i < n; ++i)
        for (int64_t e = 0; e < sh.d; ++e) dqp[sh.q_offset(pair) + (i0 + i) * ld + e] = dq_t[e * kBlock + i] * scale;
      BlockTimesRows(probs, sh.s, g_rows, dp, dv_sum);    // dv += p d_out
      BlockTimesRows(dscores, sh.s, q_rows, dp, dk_sum);  // dk += ds (scale q)
    }
    for (int64_t j = 0; j < sh.s; ++j) {
      std::memcpy(dkp + sh.kv_offset(pair) + j * ld, dk_sum + j * dp, sizeof(float) * sh.d);
      std::memcpy(dvp + sh.kv_offset(pair) + j * ld, dv_sum + j * dp, sizeof(float) * sh.d);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffusionJaxAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [..., T, N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [..., S, N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [..., S, N, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [..., T, N, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // log-sum-exp [..., N, T]
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffusionJaxAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // log-sum-exp
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<float>("scale"));
