// Fused scaled dot-product attention for the CPU, as XLA FFI custom calls (float32).
//
// XLA's CPU backend runs attention as separate library matmuls and loop fusions over score tiles in
// memory. These kernels keep one block of queries against all keys in the L2 cache from the q k^T
// product through the softmax to the product with v (forward), and to dq, dk, dv (backward, recomputing
// the probabilities from the saved log-sum-exp, as flash attention does).
//
// Layout: q [..., T, D], k and v [..., S, D], with the leading axes flattened into P (batch * heads)
// and D a multiple of 16 (the caller pads). q arrives already scaled by 1/sqrt(D_original).
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

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // floats per vector (one AVX-512 register; two AVX2 or four NEON ones)
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef float UVec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));  // unaligned access

constexpr int kVecsPerBlock = 2;                  // a block of queries: 2 vectors of lanes
constexpr int kBlock = kLanes * kVecsPerBlock;    // 32 queries

// A broadcast (`Vec{} + x` would compute 0.0 + x first, an add on the multiply ports).
inline Vec Splat(float x) { return Vec{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline Vec LoadU(const float* p) { return *reinterpret_cast<const UVec*>(p); }
inline void StoreU(float* p, Vec x) { *reinterpret_cast<UVec*>(p) = x; }

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

// out[j, :] = sum_d rows[j, d] * colsT[d, :] for j < S, lanes of one block: [S, D] x [D, kBlock].
// `epilogue(j, acc)` receives each row's kVecsPerBlock vectors and stores them.
template <typename Epilogue>
inline void RowsTimesBlock(const float* rows, int64_t s, int64_t d, const float* cols_t, Epilogue&& epilogue) {
  constexpr int kRows = 4;  // independent accumulator chains
  int64_t j = 0;
  for (; j + kRows <= s; j += kRows) {
    Vec acc[kRows][kVecsPerBlock] = {};
    for (int64_t e = 0; e < d; ++e) {
      const Vec* c = reinterpret_cast<const Vec*>(cols_t + e * kBlock);
      for (int r = 0; r < kRows; ++r) {
        const Vec a = Splat(rows[(j + r) * d + e]);
        for (int v = 0; v < kVecsPerBlock; ++v) acc[r][v] += a * c[v];
      }
    }
    for (int r = 0; r < kRows; ++r) epilogue(j + r, acc[r]);
  }
  for (; j < s; ++j) {
    Vec acc[kVecsPerBlock] = {};
    for (int64_t e = 0; e < d; ++e) {
      const Vec* c = reinterpret_cast<const Vec*>(cols_t + e * kBlock);
      const Vec a = Splat(rows[j * d + e]);
      for (int v = 0; v < kVecsPerBlock; ++v) acc[v] += a * c[v];
    }
    epilogue(j, acc);
  }
}

// out_t[e, :] = sum_j rows[j, e] * block[j, :] for e < D: [S, D]^T x [S, kBlock] -> [D, kBlock].
inline void RowsTransposedTimesBlock(const float* rows, int64_t s, int64_t d, const float* block, float* out_t) {
  constexpr int kCols = 8;  // D is a multiple of 16
  for (int64_t e0 = 0; e0 < d; e0 += kCols) {
    Vec acc[kCols][kVecsPerBlock] = {};
    for (int64_t j = 0; j < s; ++j) {
      const Vec* b = reinterpret_cast<const Vec*>(block + j * kBlock);
      const float* row = rows + j * d + e0;
      for (int c = 0; c < kCols; ++c) {
        const Vec a = Splat(row[c]);
        for (int v = 0; v < kVecsPerBlock; ++v) acc[c][v] += a * b[v];
      }
    }
    for (int c = 0; c < kCols; ++c)
      for (int v = 0; v < kVecsPerBlock; ++v) reinterpret_cast<Vec*>(out_t + (e0 + c) * kBlock)[v] = acc[c][v];
  }
}

// acc[j, :] += sum_i block[j, i] * rows[i, :] for j < S: [S, kBlock] x [kBlock, D] -> [S, D], D = 16 * kChunk.
template <int kChunk>
inline void BlockTimesRowsChunk(const float* block, int64_t s, const float* rows, int64_t d, int64_t e0, float* acc) {
  constexpr int kRows = kChunk == 1 ? 8 : 4;
  int64_t j = 0;
  for (; j + kRows <= s; j += kRows) {
    Vec sum[kRows][kChunk] = {};
    for (int i = 0; i < kBlock; ++i) {
      Vec x[kChunk];
      for (int c = 0; c < kChunk; ++c) x[c] = reinterpret_cast<const Vec*>(rows + i * d + e0)[c];
      for (int r = 0; r < kRows; ++r) {
        const Vec a = Splat(block[(j + r) * kBlock + i]);
        for (int c = 0; c < kChunk; ++c) sum[r][c] += a * x[c];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < kChunk; ++c) {
        float* out = acc + (j + r) * d + e0 + c * kLanes;
        StoreU(out, LoadU(out) + sum[r][c]);
      }
  }
  for (; j < s; ++j) {
    Vec sum[kChunk] = {};
    for (int i = 0; i < kBlock; ++i) {
      const Vec a = Splat(block[j * kBlock + i]);
      for (int c = 0; c < kChunk; ++c) sum[c] += a * reinterpret_cast<const Vec*>(rows + i * d + e0)[c];
    }
    for (int c = 0; c < kChunk; ++c) {
      float* out = acc + j * d + e0 + c * kLanes;
      StoreU(out, LoadU(out) + sum[c]);
    }
  }
}

inline void BlockTimesRows(const float* block, int64_t s, const float* rows, int64_t d, float* acc) {
  for (int64_t e0 = 0; e0 < d; e0 += 4 * kLanes) {
    switch (std::min<int64_t>(4, (d - e0) / kLanes)) {
      case 1: BlockTimesRowsChunk<1>(block, s, rows, d, e0, acc); break;
      case 2: BlockTimesRowsChunk<2>(block, s, rows, d, e0, acc); break;
      case 3: BlockTimesRowsChunk<3>(block, s, rows, d, e0, acc); break;
      default: BlockTimesRowsChunk<4>(block, s, rows, d, e0, acc); break;
    }
  }
}

// Copies rows [i0, i0 + n) of x [T, D] into a block: transposed [D, kBlock] and/or as rows [kBlock, D],
// zero beyond n.
inline void LoadBlockTransposed(const float* x, int64_t i0, int64_t n, int64_t d, float* out_t) {
  std::memset(out_t, 0, sizeof(float) * d * kBlock);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = 0; e < d; ++e) out_t[e * kBlock + i] = x[(i0 + i) * d + e];
}
inline void LoadBlockRows(const float* x, int64_t i0, int64_t n, int64_t d, float* out) {
  std::memset(out, 0, sizeof(float) * d * kBlock);
  std::memcpy(out, x + i0 * d, sizeof(float) * n * d);
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
    for (int64_t item; (item = state->next.fetch_add(1)) < n; ++finished) {
      if (!scratch) scratch = std::make_unique<Scratch>(scratch_floats);
      (*body_ptr)(item, scratch->data);
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
  int64_t p, t, s, d;
};

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v, Shape* shape) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() < 2 || kd.size() != qd.size() || vd.size() != qd.size())
    return ffi::Error::InvalidArgument("attention: q, k, v must be [..., T, D], [..., S, D], [..., S, D]");
  const size_t r = qd.size();
  shape->t = qd[r - 2];
  shape->s = kd[r - 2];
  shape->d = qd[r - 1];
  shape->p = 1;
  for (size_t i = 0; i + 2 < r; ++i) {
    if (kd[i] != qd[i] || vd[i] != qd[i]) return ffi::Error::InvalidArgument("attention: leading axes differ");
    shape->p *= qd[i];
  }
  if (kd[r - 1] != shape->d || vd[r - 1] != shape->d || vd[r - 2] != shape->s)
    return ffi::Error::InvalidArgument("attention: k and v must be [..., S, D] with q's D");
  if (shape->d % kLanes != 0) return ffi::Error::InvalidArgument("attention: head size must be a multiple of 16");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Shape sh;
  if (ffi::Error error = CheckShapes(q, k, v, &sh); error.failure()) return error;
  const int64_t blocks = (sh.t + kBlock - 1) / kBlock;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  // Scratch: q block transposed [D, kBlock], probabilities [S, kBlock], output transposed [D, kBlock].
  const size_t scratch = 2 * sh.d * kBlock + sh.s * kBlock;
  ParallelFor(pool, sh.p * blocks, scratch, [&](int64_t item, float* buf) {
    const int64_t pair = item / blocks, i0 = (item % blocks) * kBlock, n = std::min<int64_t>(kBlock, sh.t - i0);
    float *q_t = buf, *probs = buf + sh.d * kBlock, *out_t = probs + sh.s * kBlock;
    const float *kk = kp + pair * sh.s * sh.d, *vv = vp + pair * sh.s * sh.d;
    LoadBlockTransposed(qp + pair * sh.t * sh.d, i0, n, sh.d, q_t);
    Vec m[kVecsPerBlock];
    for (auto& x : m) x = Splat(-INFINITY);
    RowsTimesBlock(kk, sh.s, sh.d, q_t, [&](int64_t j, const Vec* acc) {
      Vec* row = reinterpret_cast<Vec*>(probs + j * kBlock);
      for (int c = 0; c < kVecsPerBlock; ++c) {
        row[c] = acc[c];
        m[c] = m[c] > acc[c] ? m[c] : acc[c];
      }
    });
    Vec l[kVecsPerBlock] = {};
    for (int64_t j = 0; j < sh.s; ++j) {
      Vec* row = reinterpret_cast<Vec*>(probs + j * kBlock);
      for (int c = 0; c < kVecsPerBlock; ++c) {
        row[c] = Exp(row[c] - m[c]);
        l[c] += row[c];
      }
    }
    RowsTransposedTimesBlock(vv, sh.s, sh.d, probs, out_t);
    float* o = op + (pair * sh.t + i0) * sh.d;
    float* ls = lp + pair * sh.t + i0;
    for (int64_t i = 0; i < n; ++i) {
      const float li = l[i / kLanes][i % kLanes], inv = 1.0f / li;
      for (int64_t e = 0; e < sh.d; ++e) o[i * sh.d + e] = out_t[e * kBlock + i] * inv;
      ls[i] = m[i / kLanes][i % kLanes] + std::log(li);
    }
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  Shape sh;
  if (ffi::Error error = CheckShapes(q, k, v, &sh); error.failure()) return error;
  const int64_t blocks = (sh.t + kBlock - 1) / kBlock;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = d_out.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  // Scratch: q and d_out blocks transposed and as rows (4 x [D, kBlock]), dq transposed [D, kBlock],
  // probabilities and score gradients (2 x [S, kBlock]).
  const size_t scratch = 5 * sh.d * kBlock + 2 * sh.s * kBlock;
  // One item per (batch, head) pair: it owns that pair's dk and dv and sums them over its query blocks.
  ParallelFor(pool, sh.p, scratch, [&](int64_t pair, float* buf) {
    float *q_t = buf, *q_rows = q_t + sh.d * kBlock, *g_t = q_rows + sh.d * kBlock, *g_rows = g_t + sh.d * kBlock;
    float *dq_t = g_rows + sh.d * kBlock, *probs = dq_t + sh.d * kBlock, *dscores = probs + sh.s * kBlock;
    const int64_t kv = pair * sh.s * sh.d;
    const float *kk = kp + kv, *vv = vp + kv;
    float *dkk = dkp + kv, *dvv = dvp + kv;
    std::memset(dkk, 0, sizeof(float) * sh.s * sh.d);
    std::memset(dvv, 0, sizeof(float) * sh.s * sh.d);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i0 = b * kBlock, n = std::min<int64_t>(kBlock, sh.t - i0), row0 = pair * sh.t;
      LoadBlockTransposed(qp + row0 * sh.d, i0, n, sh.d, q_t);
      LoadBlockRows(qp + row0 * sh.d, i0, n, sh.d, q_rows);
      LoadBlockTransposed(gp + row0 * sh.d, i0, n, sh.d, g_t);
      LoadBlockRows(gp + row0 * sh.d, i0, n, sh.d, g_rows);
      alignas(64) float lse_block[kBlock] = {}, delta_block[kBlock] = {};
      for (int64_t i = 0; i < n; ++i) {
        lse_block[i] = lp[row0 + i0 + i];
        float dot = 0.0f;
        for (int64_t e = 0; e < sh.d; ++e) dot += gp[(row0 + i0 + i) * sh.d + e] * op[(row0 + i0 + i) * sh.d + e];
        delta_block[i] = dot;
      }
      const Vec* lse_v = reinterpret_cast<const Vec*>(lse_block);
      const Vec* delta_v = reinterpret_cast<const Vec*>(delta_block);
      // probabilities [S, kBlock] = exp(k q^T - lse)
      RowsTimesBlock(kk, sh.s, sh.d, q_t, [&](int64_t j, const Vec* acc) {
        Vec* row = reinterpret_cast<Vec*>(probs + j * kBlock);
        for (int c = 0; c < kVecsPerBlock; ++c) row[c] = Exp(acc[c] - lse_v[c]);
      });
      // score gradients = probabilities * (v d_out^T - delta)
      RowsTimesBlock(vv, sh.s, sh.d, g_t, [&](int64_t j, const Vec* acc) {
        const Vec* p = reinterpret_cast<const Vec*>(probs + j * kBlock);
        Vec* row = reinterpret_cast<Vec*>(dscores + j * kBlock);
        for (int c = 0; c < kVecsPerBlock; ++c) row[c] = p[c] * (acc[c] - delta_v[c]);
      });
      RowsTransposedTimesBlock(kk, sh.s, sh.d, dscores, dq_t);  // dq^T [D, kBlock]
      for (int64_t i = 0; i < n; ++i)
        for (int64_t e = 0; e < sh.d; ++e) dqp[(row0 + i0 + i) * sh.d + e] = dq_t[e * kBlock + i];
      BlockTimesRows(probs, sh.s, g_rows, sh.d, dvv);    // dv += p d_out
      BlockTimesRows(dscores, sh.s, q_rows, sh.d, dkk);  // dk += ds q
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffusionJaxAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [..., T, D], scaled
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [..., S, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [..., S, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [..., T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // log-sum-exp [..., T]
);

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
);
