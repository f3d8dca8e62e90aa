// CUDA kernels of chunk_attention (docs/spec.md §1) and cached_attention (§2): a FlashAttention-2
// style forward on sm_80+ tensor cores (mma.sync.m16n8k16, fp16/bf16 in, fp32 accumulation).
//
// A CTA of 4 warps owns 64 queries of one (batch, head); each warp owns 16 rows and keeps its
// Q fragments, scores and output accumulators in registers. Keys stream through shared memory in
// blocks of 64 (K row-major, V transposed so both MMAs read 32-bit fragment pairs). The key
// ranges and which blocks need the mask follow the same arithmetic as the Triton kernel: for the
// chunk form at most two ranges (sink, window) per query block, interior blocks unmasked; for the
// cached form the given ranges (read on the device and clamped to the pool), only each range's
// tail block masked. With kv_deltas (cached form) each key tile is rotated as it is loaded
// into shared memory (load_rows_rotated): the pool is only read.
//
// NaN and Inf follow docs/spec.md (Conventions): the running max propagates NaN (fmaxf would drop
// it), a +inf score gives NaN (inf - inf) and lse +inf, allowed keys whose scores are all -inf give
// NaN and lse -inf, only an empty key set gives zeros. Keys past a range end are loaded as zeros;
// a masked key's score becomes -inf before the max. Where the rows of one query tile see different
// keys of a block (a tile spanning two chunks), p = 0 does not keep a masked key's NaN/Inf value
// out of the P.V product (0 * NaN = NaN): such values are zeroed in shared memory and added back,
// after the product, to the rows allowed to see them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attention.h"
#include "convert.cuh"
#include "ieee.cuh"
#include "launch.cuh"
#include "ranges.cuh"

namespace vidstream {
namespace {

constexpr int kBlockM = 64;  // queries per CTA (16 per warp)
constexpr int kBlockN = 64;  // keys per shared-memory block
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPad = 8;  // shared-memory row padding (elements): conflict-free fragment reads

// D += A.B of one m16n8k16 tensor-core step; TYPE is the PTX name of the element type.
#define VIDSTREAM_MMA_M16N8K16(TYPE, d, a, b0, b1)                                         \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                      \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

// T is __half or __nv_bfloat16.
template <typename T>
struct Mma {
  static __device__ __forceinline__ PairOf<T> pair(float a, float b) {
    return from_float2<T>(make_float2(a, b));
  }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    auto h = pair(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    if constexpr (std::is_same_v<T, __half>) {
      VIDSTREAM_MMA_M16N8K16("f16", d, a, b0, b1);
    } else {
      VIDSTREAM_MMA_M16N8K16("bf16", d, a, b0, b1);
    }
  }
};

template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Rows [row0, row0 + kBlockN) of a [*, D] operand into shared memory; rows at or past row_end
// become zeros (so a partial block multiplies zeros, never memory outside the range).
// TRANSPOSED stores them [D][keys] (V, so the P.V MMA reads key pairs as 32 bits), else
// [keys][D]. SCRUB stores non-finite elements as zeros and sets bit r of *nonfinite for row r.
template <bool TRANSPOSED, int D, bool SCRUB = false, typename T, typename Dst>
__device__ __forceinline__ void load_rows(Dst dst, const T* src, int64_t stride_l, int64_t row0,
                                          int64_t row_end,
                                          unsigned long long* nonfinite = nullptr) {
  constexpr int kVecs = D / 8;
  for (int c = threadIdx.x; c < kBlockN * kVecs; c += kThreads) {
    const int r = c / kVecs, col = (c % kVecs) * 8;
    const int64_t row = row0 + r;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row < row_end) val = *reinterpret_cast<const uint4*>(src + row * stride_l + col);
    if constexpr (SCRUB) {
      T* e = reinterpret_cast<T*>(&val);
      bool bad = false;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (!is_finite16(e[i])) {
          e[i] = from_float<T>(0.f);
          bad = true;
        }
      }
      if (bad) atomicOr(nonfinite, 1ull << r);
    }
    if constexpr (TRANSPOSED) {
      const T* e = reinterpret_cast<const T*>(&val);
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[col + i][r] = e[i];
    } else {
      *reinterpret_cast<uint4*>(&dst[r][col]) = val;
    }
  }
}

// load_rows<false, D> of keys with kv_deltas: the temporal pairs (channels < 2 * pairs) of
// every row rotated by `cs` ((cos, sin) float32 pairs) in registers, between the global load
// and the shared-memory store, with rope3d_shift_'s expression (kernels/rope3d.cu), and
// rounded to T as rope3d_shift_ rounds its output: the MMA reads T, and a key tile loaded this
// way is the tile of the shifted pool. Rows past row_end stay zeros (a rotated zero is zero).
template <int D, typename T, typename Dst>
__device__ __forceinline__ void load_rows_rotated(Dst dst, const T* src, int64_t stride_l,
                                                  int64_t row0, int64_t row_end,
                                                  const float* cs, int pairs) {
  constexpr int kVecs = D / 8;
  for (int c = threadIdx.x; c < kBlockN * kVecs; c += kThreads) {
    const int r = c / kVecs, col = (c % kVecs) * 8;
    const int64_t row = row0 + r;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row < row_end) val = *reinterpret_cast<const uint4*>(src + row * stride_l + col);
    if (col < 2 * pairs) {  // the vector holds pairs col / 2 .. col / 2 + 3
      T* e = reinterpret_cast<T*>(&val);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = col / 2 + i;
        if (t < pairs) {
          const float a = to_float(e[2 * i]), b = to_float(e[2 * i + 1]);
          const float c_ = cs[2 * t], s_ = cs[2 * t + 1];
          e[2 * i] = from_float<T>(a * c_ - b * s_);
          e[2 * i + 1] = from_float<T>(a * s_ + b * c_);
        }
      }
    }
    *reinterpret_cast<uint4*>(&dst[r][col]) = val;
  }
}

__device__ __forceinline__ bool chunk_allowed(const AttentionParams& p, int64_t i, int64_t j) {
  const int64_t fi = i / p.frame_tokens, fj = j / p.frame_tokens;
  const int64_t ci = fi / p.chunk_frames;
  if (fj / p.chunk_frames > ci) return false;
  if (p.window_frames < 0) return true;
  return fj < p.sink_frames || fj >= (ci + 1) * p.chunk_frames - p.window_frames;
}

template <typename T, int D>
struct Tile {
  static constexpr int kSteps = D / 16;  // k-steps of the score MMA
  static constexpr int kOutTiles = D / 8;  // n8 tiles of the output
  uint32_t qf[kSteps][4];
  float o[kOutTiles][4];
  float m[2], l[2];  // rows g and g + 8 of this lane's quad
};

template <typename T, int D>
struct Smem {
  T k[kBlockN][D + kPad];   // also stages Q before the key loop
  T vt[D][kBlockN + kPad];
  unsigned long long nonfinite;  // keys of the block whose value row holds a NaN/Inf (SCRUB)
};

// After the P.V product of a block whose non-finite values were zeroed (load_rows SCRUB): adds
// p * value for those values to the rows allowed to see the key, so IEEE arithmetic (inf, or NaN
// for NaN and 0 * inf) reaches exactly them. Rare (only blocks holding a NaN/Inf value), so it
// may take two barriers: the probabilities, rounded as the P.V product took them, are staged in
// sm.k (free once every warp's score MMA is done), where any lane can read any key's.
template <typename T, int D>
__device__ __forceinline__ void add_nonfinite_values(Tile<T, D>& t, Smem<T, D>& sm,
                                                     const float (&s)[kBlockN / 8][4],
                                                     const AttentionParams& p, const T* vbase,
                                                     int64_t n0, int64_t m0,
                                                     unsigned long long keys) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int r0 = warp * 16 + g;  // this lane's rows r0 and r0 + 8 of the tile
  __syncthreads();  // every warp is past its score MMA: sm.k is free
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<PairOf<T>*>(&sm.k[r0 + 8 * h][j * 8 + tq * 2]) =
          Mma<T>::pair(s[j][2 * h], s[j][2 * h + 1]);
  }
  __syncthreads();
  for (; keys != 0; keys &= keys - 1) {  // the same keys in every lane
    const int key = __ffsll(static_cast<long long>(keys)) - 1;
    const int64_t kj = n0 + key;  // below the range end: only loaded rows are flagged
    const bool ok0 = chunk_allowed(p, m0 + r0, kj), ok1 = chunk_allowed(p, m0 + r0 + 8, kj);
    const float p0 = to_float(sm.k[r0][key]), p1 = to_float(sm.k[r0 + 8][key]);
    const T* vr = vbase + kj * p.v_sl;
#pragma unroll
    for (int n = 0; n < Tile<T, D>::kOutTiles; ++n) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const T x = vr[n * 8 + tq * 2 + c];
        if (is_finite16(x)) continue;
        if (ok0) t.o[n][c] += p0 * to_float(x);
        if (ok1) t.o[n][2 + c] += p1 * to_float(x);
      }
    }
  }
}

// One key block [n0, n0 + kBlockN) clipped at range_end; MASKED blocks evaluate the mask.
// ROT: the keys are read through the rotation `cs` (kv_deltas; load_rows_rotated).
template <typename T, int D, bool MASKED, bool CHUNK, bool ROT>
__device__ __forceinline__ void attend_block(Tile<T, D>& t, Smem<T, D>& sm, const AttentionParams& p,
                                             const T* kbase, const T* vbase, int64_t n0,
                                             int64_t range_end, int64_t m0, const float* cs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  // Rows of one tile may differ in the keys of this block they see: see add_nonfinite_values.
  constexpr bool kScrub = MASKED && CHUNK;
  __syncthreads();  // the previous block's readers are done with the buffers
  if constexpr (ROT) {
    load_rows_rotated<D>(sm.k, kbase, p.k_sl, n0, range_end, cs, p.k_rot_pairs);
  } else {
    load_rows<false, D>(sm.k, kbase, p.k_sl, n0, range_end);
  }
  load_rows<true, D, kScrub>(sm.vt, vbase, p.v_sl, n0, range_end, &sm.nonfinite);
  __syncthreads();
  unsigned long long nonfinite = 0;
  if constexpr (kScrub) {
    nonfinite = sm.nonfinite;
    __syncthreads();  // every thread has read it before it is cleared for the next block
    if (threadIdx.x == 0) sm.nonfinite = 0;
  }

  float s[kBlockN / 8][4];
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < Tile<T, D>::kSteps; ++ks) {
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      const uint32_t b0 = ld32(&sm.k[j * 8 + g][ks * 16 + tq * 2]);
      const uint32_t b1 = ld32(&sm.k[j * 8 + g][ks * 16 + 8 + tq * 2]);
      Mma<T>::run(s[j], t.qf[ks], b0, b1);
    }
  }

  const float ninf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t qi = m0 + warp * 16 + g + 8 * h;
    float mx = ninf;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = s[j][2 * h + e] * p.scale_log2;
        if (MASKED) {
          const int64_t kj = n0 + j * 8 + tq * 2 + e;
          const bool ok = kj < range_end && (!CHUNK || chunk_allowed(p, qi, kj));
          x = ok ? x : ninf;
        }
        s[j][2 * h + e] = x;
        mx = max_nan(mx, x);
      }
    }
    mx = max_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = max_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = max_nan(t.m[h], mx);  // NaN stays NaN: every later weight is NaN
    // A row that has seen only -inf (masked keys, -inf logits) takes weights against 0:
    // -inf - -inf would make NaN of a row that has none.
    const float m_use = m_new == ninf ? 0.f : m_new;
    const float alpha = exp2f(t.m[h] - m_use);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pe = exp2f(s[j][2 * h + e] - m_use);
        s[j][2 * h + e] = pe;
        sum += pe;
      }
    }
    t.l[h] = t.l[h] * alpha + sum;  // lane-partial; the quad is summed once at the end
    t.m[h] = m_new;
#pragma unroll
    for (int n = 0; n < Tile<T, D>::kOutTiles; ++n) {
      t.o[n][2 * h] *= alpha;
      t.o[n][2 * h + 1] *= alpha;
    }
  }

  // The score accumulators of two adjacent n8 tiles are exactly the A fragment of one k16 step.
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    const uint32_t a[4] = {Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                           Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                           Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                           Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
    for (int n = 0; n < Tile<T, D>::kOutTiles; ++n) {
      const uint32_t b0 = ld32(&sm.vt[n * 8 + g][kk * 16 + tq * 2]);
      const uint32_t b1 = ld32(&sm.vt[n * 8 + g][kk * 16 + 8 + tq * 2]);
      Mma<T>::run(t.o[n], a, b0, b1);
    }
  }
  if constexpr (kScrub) {
    if (nonfinite != 0) add_nonfinite_values(t, sm, s, p, vbase, n0, m0, nonfinite);
  }
}

// Blocks start at rs + i * kBlockN; those wholly inside [fs, fe) skip the mask.
template <typename T, int D, bool CHUNK, bool ROT = false>
__device__ __forceinline__ void attend_range(Tile<T, D>& t, Smem<T, D>& sm,
                                             const AttentionParams& p, const T* kbase,
                                             const T* vbase, int64_t rs, int64_t re, int64_t fs,
                                             int64_t fe, int64_t m0, const float* cs = nullptr) {
  if (re <= rs) return;
  const int64_t n_blocks = (re - rs + kBlockN - 1) / kBlockN;
  const int64_t lo = min(n_blocks, (max(fs - rs, int64_t(0)) + kBlockN - 1) / kBlockN);
  const int64_t hi = min(n_blocks, max(lo, max(fe - rs, int64_t(0)) / kBlockN));
  for (int64_t i = 0; i < lo; ++i)
    attend_block<T, D, true, CHUNK, ROT>(t, sm, p, kbase, vbase, rs + i * kBlockN, re, m0, cs);
  for (int64_t i = lo; i < hi; ++i)
    attend_block<T, D, false, CHUNK, ROT>(t, sm, p, kbase, vbase, rs + i * kBlockN, re, m0, cs);
  for (int64_t i = hi; i < n_blocks; ++i)
    attend_block<T, D, true, CHUNK, ROT>(t, sm, p, kbase, vbase, rs + i * kBlockN, re, m0, cs);
}

// ROT (cached form with kv_deltas) is a separate instantiation, so the kernel without offsets
// is exactly the one it was.
template <typename T, int D, bool CHUNK, bool ROT>
__global__ void __launch_bounds__(kThreads) attention_kernel(AttentionParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(16) Smem<T, D> sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t b = blockIdx.y / p.heads;
  const int h = blockIdx.y % p.heads;
  const int hk = h / (p.heads / p.kv_heads);
  const T* qbase = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  Tile<T, D> t;
  load_rows<false, D>(sm.k, qbase, p.q_sl, m0, p.q_len);  // kBlockM == kBlockN rows
  if (threadIdx.x == 0) sm.nonfinite = 0;
  __syncthreads();
#pragma unroll
  for (int ks = 0; ks < Tile<T, D>::kSteps; ++ks) {
    const int r = warp * 16 + g, c = ks * 16 + tq * 2;
    t.qf[ks][0] = ld32(&sm.k[r][c]);
    t.qf[ks][1] = ld32(&sm.k[r + 8][c]);
    t.qf[ks][2] = ld32(&sm.k[r][c + 8]);
    t.qf[ks][3] = ld32(&sm.k[r + 8][c + 8]);
  }
#pragma unroll
  for (int n = 0; n < Tile<T, D>::kOutTiles; ++n) t.o[n][0] = t.o[n][1] = t.o[n][2] = t.o[n][3] = 0.f;
  const float ninf = -__int_as_float(0x7f800000);
  t.m[0] = t.m[1] = ninf;
  t.l[0] = t.l[1] = 0.f;

  bool any_keys = CHUNK;  // every query of chunk_attention sees at least its own chunk
  if constexpr (CHUNK) {
    const int64_t L = p.q_len, ft = p.frame_tokens, cf = p.chunk_frames;
    const int64_t last = min(m0 + kBlockM, L) - 1;
    const int64_t end_lo = (m0 / ft / cf + 1) * cf, end_hi = (last / ft / cf + 1) * cf;
    const int64_t keys_end = min(end_hi * ft, L);
    const int64_t all_end = min(end_lo * ft, L);  // keys before it are causal for every row
    if (p.window_frames < 0) {
      attend_range<T, D, true>(t, sm, p, kbase, vbase, 0, keys_end, 0, all_end, m0);
    } else {
      const int64_t W = p.window_frames, sink = p.sink_frames;
      const int64_t sink_end = min(min(sink, end_hi) * ft, keys_end);
      const int64_t sink_all = min(min(sink, end_lo) * ft, L);
      const int64_t win_lo = max(end_lo - W, int64_t(0)) * ft;
      const int64_t win_all = max(end_hi - W, int64_t(0)) * ft;
      if (sink_end >= win_lo) {
        const int64_t fs = win_all <= sink_all ? 0 : win_all;
        attend_range<T, D, true>(t, sm, p, kbase, vbase, 0, keys_end, fs, all_end, m0);
      } else {
        attend_range<T, D, true>(t, sm, p, kbase, vbase, 0, sink_end, 0, sink_all, m0);
        attend_range<T, D, true>(t, sm, p, kbase, vbase, win_lo, keys_end, win_all, all_end, m0);
      }
    }
  } else {
    for (int r = 0; r < p.num_ranges; ++r) {
      const TokenSpan s = clamped_range(p.ranges, r, p.kv_len);
      any_keys |= s.end > s.start;
      const float* cs = ROT ? p.k_rot + r * p.k_rot_sr + hk * p.k_rot_sh : nullptr;
      attend_range<T, D, false, ROT>(t, sm, p, kbase, vbase, s.start, s.end, s.start, s.end, m0,
                                     cs);
    }
  }

  T* obase = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh;
  float* lse = p.lse + (b * p.heads + h) * p.q_len;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float l = t.l[hh];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t row = m0 + warp * 16 + g + 8 * hh;
    if (row >= p.q_len) continue;
    // What torch.softmax / torch.logsumexp give: l == 0 is the empty key set (zeros, lse -inf)
    // or allowed keys whose scores are all -inf (0 / 0: NaN, lse -inf); a NaN l (a NaN or +inf
    // score) propagates, so not `l > 0`; m = +inf (a +inf score, no NaN) has lse +inf.
    const float inv = l == 0.f ? (any_keys ? __int_as_float(0x7fc00000) : 0.f) : 1.f / l;
#pragma unroll
    for (int n = 0; n < Tile<T, D>::kOutTiles; ++n) {
      auto v = Mma<T>::pair(t.o[n][2 * hh] * inv, t.o[n][2 * hh + 1] * inv);
      *reinterpret_cast<decltype(v)*>(obase + row * p.o_sl + n * 8 + tq * 2) = v;
    }
    if (tq == 0)
      lse[row] = l == 0.f ? ninf
                 : t.m[hh] == -ninf ? -ninf
                                    : (t.m[hh] + log2f(l)) * 0.6931471805599453f;
  }
#else
  __trap();  // tensor-core MMA needs sm_80+; the binding refuses older devices first
#endif
}

template <typename T, bool CHUNK, bool ROT>
cudaError_t launch_typed(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.q_len + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>(p.batch * p.heads));
  if (p.head_dim == 128) {
    attention_kernel<T, 128, CHUNK, ROT><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.head_dim == 64) {
    attention_kernel<T, 64, CHUNK, ROT><<<grid, kThreads, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return launch_status();
}

template <bool CHUNK>
int launch(const AttentionParams& p, void* stream) {
  if (p.q_len == 0 || p.batch == 0 || p.heads == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_elem_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // tensor cores take 16-bit inputs only
    } else {
      if constexpr (CHUNK) {
        return launch_typed<T, true, false>(p, s);
      } else {
        return p.k_rot != nullptr ? launch_typed<T, false, true>(p, s)
                                  : launch_typed<T, false, false>(p, s);
      }
    }
  });
}

}  // namespace

int launch_chunk_attention(const AttentionParams& p, void* stream) { return launch<true>(p, stream); }
int launch_cached_attention(const AttentionParams& p, void* stream) { return launch<false>(p, stream); }

}  // namespace vidstream
