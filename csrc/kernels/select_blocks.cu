// CUDA kernels of select_blocks (docs/spec.md §5). No QK^T: launch 1 sums the sampled queries
// of each chosen head; launch 2 gives each mid block one thread block that reduces its keys against
// those sums ("mean": block key sum, or the cached one; "max": one dot product per key with the
// mean query) and writes s_m. The block that finishes last (threadfence + atomic ticket) ranks
// the M scores and writes the k best indices in ascending order. All sums run in a fixed order.
// block_deltas turn each (block, head)'s query sum back by the block's angles (see below).
// NaN (docs/spec.md): a NaN key or sampled query makes its block's score NaN ("mean": the sums
// carry it; "max": a NaN-propagating max, fmaxf would drop it), and NaN ranks above every number.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "convert.cuh"
#include "ieee.cuh"
#include "launch.cuh"
#include "ranges.cuh"
#include "select_blocks.h"

namespace vidstream {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunks = kSelectMaxHeadDim / 32;  // per-lane registers over the head dim

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// grid (B * Hs, kSelectQuerySplit); warp w of split s sums sampled rows r = s*kWarps + w + t *
// (kSelectQuerySplit*kWarps); the kWarps partials are then added in warp order. float64
// accumulators: the factorised "mean" cancels terms of size |q| |k| down to a small s_m.
template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_queries_kernel(SelectBlocksParams p) {
  __shared__ double part[kWarps][kSelectMaxHeadDim];
  const int bh = blockIdx.x, split = blockIdx.y;
  const int b = bh / p.num_heads, hi = bh % p.num_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(p.head_dim);
  if (bh == 0 && split == 0 && threadIdx.x == 0) *p.counter = 0u;
  const T* base = static_cast<const T*>(p.q) + b * p.q_stride_b + p.heads[hi] * p.q_stride_h;
  double acc[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) acc[c] = 0.0;
  const int64_t lanes = static_cast<int64_t>(kSelectQuerySplit) * kWarps;
  for (int64_t r = split * kWarps + warp; r < p.sampled; r += lanes) {
    const T* row = base + r * p.query_stride * p.q_stride_l;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = lane + 32 * c;
      if (d < D) acc[c] += to_float(row[d]);
    }
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int d = lane + 32 * c;
    if (d < D) part[warp][d] = acc[c];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += kThreads) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += part[w][d];
    p.qpart[(static_cast<int64_t>(bh) * kSelectQuerySplit + split) * D + d] = s;
  }
}

// Block a ranks before block b: larger score, or equal and smaller index; NaN above numbers.
__device__ __forceinline__ bool ranks_before(float sa, int a, float sb, int b) {
  const bool na = isnan(sa), nb = isnan(sb);
  if (na != nb) return na;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

// The whole block: keep block i when fewer than k blocks rank before it; write kept indices in
// index order (block-wide exclusive scan per tile of kThreads).
__device__ void topk_tail(const SelectBlocksParams& p) {
  __shared__ int warp_count[kWarps];
  __shared__ int base;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const volatile float* s = p.scores;  // written by other blocks: bypass stale L1 lines
  if (threadIdx.x == 0) base = 0;
  __syncthreads();
  for (int t0 = 0; t0 < p.num_blocks; t0 += kThreads) {
    const int i = t0 + threadIdx.x;
    bool keep = false;
    if (i < p.num_blocks) {
      const float si = s[i];
      int rank = 0;
      for (int j = 0; j < p.num_blocks && rank < p.top_k; ++j) rank += ranks_before(s[j], j, si, i);
      keep = rank < p.top_k;
    }
    const unsigned mask = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_count[warp] = __popc(mask);
    __syncthreads();
    int offset = base;
    for (int w = 0; w < warp; ++w) offset += warp_count[w];
    offset += __popc(mask & ((1u << lane) - 1u));
    if (keep && offset < p.top_k) p.indices[offset] = i;
    __syncthreads();
    if (threadIdx.x == 0)
      for (int w = 0; w < kWarps; ++w) base += warp_count[w];
    __syncthreads();
  }
}

// grid (M); one thread block per mid block.
template <typename T>
__global__ void __launch_bounds__(kThreads) block_scores_kernel(SelectBlocksParams p) {
  __shared__ double warp_val[kWarps];
  __shared__ bool is_last;
  const int m = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int D = static_cast<int>(p.head_dim);
  const TokenSpan span = clamped_range(p.ranges, m, p.pool_tokens);
  const bool use_sums = p.mean && p.key_sums != nullptr;
  const double inv_s = 1.0 / static_cast<double>(p.sampled);
  double total = 0.0;  // meaningful in thread 0
  for (int b = 0; b < p.batch; ++b) {
    for (int hi = 0; hi < p.num_heads; ++hi) {
      const int64_t kvh = p.heads[hi] / p.kv_group;
      // This head's query sum (or mean, for "max"), added over the splits in order.
      double qv[kChunks];
      const double* qp = p.qpart + static_cast<int64_t>(b * p.num_heads + hi) * kSelectQuerySplit * D;
      // block_deltas: scoring the keys rotated by R (block m's angles) against the query sum
      // ("mean", with or without key sums: R is linear, R sum k = sum R k) or the mean query
      // ("max") equals scoring the keys as stored against R^T q, in float64 here: one rotation
      // per (block, head) instead of one per key, and a key's NaN or Inf reaches the score as
      // without offsets. Each lane also sums its channel's pair partner d ^ 1.
      const float* cs = p.rot != nullptr ? p.rot + m * p.rot_sm + kvh * p.rot_sh : nullptr;
      const int band = cs != nullptr ? 2 * p.rot_pairs : 0;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int d = lane + 32 * c;
        double v = 0.0;
        if (d < D)
          for (int sp = 0; sp < kSelectQuerySplit; ++sp) v += qp[sp * D + d];
        if (d < band) {
          double w = 0.0;  // the partner's sum, added in the same order
          for (int sp = 0; sp < kSelectQuerySplit; ++sp) w += qp[sp * D + (d ^ 1)];
          const double co = cs[d & ~1], sn = cs[d | 1];
          // R^T (a, b) = (a c + b s, b c - a s); v is a for even d, b for odd d.
          v = (d & 1) ? v * co - w * sn : v * co + w * sn;
        }
        qv[c] = p.mean ? v : v * inv_s;
      }
      const T* kb = static_cast<const T*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h;
      double mine;  // this warp's contribution
      if (use_sums) {
        const float* ks = p.key_sums + b * p.s_stride_b + m * p.s_stride_m + kvh * p.s_stride_h;
        double dot = 0.0;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int d = lane + 32 * c;
          if (d < D && warp == 0) dot += qv[c] * ks[d];
        }
        mine = warp_sum(dot);
      } else if (p.mean) {
        double acc[kChunks];
#pragma unroll
        for (int c = 0; c < kChunks; ++c) acc[c] = 0.0;
        for (int64_t j = span.start + warp; j < span.end; j += kWarps) {
          const T* row = kb + j * p.k_stride_l;
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            const int d = lane + 32 * c;
            if (d < D) acc[c] += to_float(row[d]);
          }
        }
        double dot = 0.0;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) dot += acc[c] * qv[c];
        mine = warp_sum(dot);
      } else {
        // One float32 dot product per key, as eager float32 takes it.
        float qf[kChunks];
#pragma unroll
        for (int c = 0; c < kChunks; ++c) qf[c] = static_cast<float>(qv[c]);
        float best = -INFINITY;
        for (int64_t j = span.start + warp; j < span.end; j += kWarps) {
          const T* row = kb + j * p.k_stride_l;
          float dot = 0.f;
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            const int d = lane + 32 * c;
            if (d < D) dot += qf[c] * to_float(row[d]);
          }
          best = max_nan(best, p.scale * warp_sum(dot));
        }
        mine = best;
      }
      if (lane == 0) warp_val[warp] = mine;
      __syncthreads();
      if (threadIdx.x == 0) {
        double v = warp_val[0];
        for (int w = 1; w < kWarps; ++w) v = p.mean ? v + warp_val[w] : max_nan(v, warp_val[w]);
        total += v;
      }
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) {
    // "mean" over an empty block sums no (query, key) pair: 0, even where a sampled query
    // holds a NaN (the factorised form would give NaN . 0); given key sums are not read for it.
    if (p.mean && span.end == span.start) total = 0.0;
    p.scores[m] = static_cast<float>(total * p.norm);
    __threadfence();
    is_last = atomicAdd(p.counter, 1u) == static_cast<unsigned>(p.num_blocks - 1);
  }
  __syncthreads();
  if (is_last) {
    __threadfence();
    topk_tail(p);
  }
}

template <typename T>
cudaError_t launch_typed(const SelectBlocksParams& p, cudaStream_t stream) {
  const dim3 g1(static_cast<unsigned>(p.batch * p.num_heads), kSelectQuerySplit);
  reduce_queries_kernel<T><<<g1, kThreads, 0, stream>>>(p);
  const cudaError_t err = launch_status();
  if (err != cudaSuccess) return err;
  block_scores_kernel<T><<<p.num_blocks, kThreads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace

int launch_select_blocks(const SelectBlocksParams& p, void* stream) {
  if (p.num_heads < 1 || p.num_heads > kSelectMaxHeads)
    return static_cast<int>(cudaErrorInvalidValue);
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_elem_type(p.dtype, [&](auto tag) {
    return launch_typed<typename decltype(tag)::type>(p, s);
  });
}

}  // namespace vidstream
