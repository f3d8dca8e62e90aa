// CUDA kernels of rope3d and rope3d_shift_. Memory-bound, so the layout of the accesses is the
// whole game: each thread rotates VEC adjacent pairs with one 2*VEC-element vector load and
// store (8 bytes for 16-bit types at VEC=2), consecutive threads take consecutive vectors of a
// head, and each thread issues all of its loads before its first store (kUnroll items) so enough
// bytes are in flight to cover the memory latency.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "launch.cuh"
#include "ranges.cuh"
#include "rope3d.h"

namespace vidstream {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kTokens = 8;  // tokens per tile of a thread block

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Rotates the VEC pairs of `x` in registers by the (cos, sin) pairs `cs`.
template <typename T, int VEC>
__device__ __forceinline__ void rotate(Vec<T, 2 * VEC>& x, const float2 (&cs)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float a = to_float(x.v[2 * k]), b = to_float(x.v[2 * k + 1]);
    x.v[2 * k] = from_float<T>(a * cs[k].x - b * cs[k].y);
    x.v[2 * k + 1] = from_float<T>(a * cs[k].y + b * cs[k].x);
  }
}

// The block's threads rotate work items [0, items), kUnroll each in flight: all loads, then all
// stores. locate(j, src, dst, cs) gives item j's source and destination vectors and its VEC
// (cos, sin) pairs; src == dst rotates in place.
template <typename T, int VEC, typename Locate>
__device__ __forceinline__ void rotate_items(int64_t items, Locate&& locate) {
  using V = Vec<T, 2 * VEC>;
  for (int64_t base = threadIdx.x; base < items; base += kThreads * kUnroll) {
    V val[kUnroll];
    float2 cs[kUnroll][VEC];
    T* dst[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * kThreads;
      dst[u] = nullptr;
      if (j >= items) continue;
      const T* src;
      locate(j, src, dst[u], cs[u]);
      val[u] = *reinterpret_cast<const V*>(src);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (dst[u] == nullptr) continue;
      rotate<T, VEC>(val[u], cs[u]);
      *reinterpret_cast<V*>(dst[u]) = val[u];
    }
  }
}

// The (cos, sin) of pair q of a token at (f, y, xcol), head h.
__device__ __forceinline__ float2 rope3d_cs(const Rope3dParams& p, int q, int64_t f, int64_t y,
                                            int64_t xcol, int64_t h) {
  if (q < p.c_t) {
    const int64_t th = p.t_heads > 1 ? h : 0;
    return __ldg(reinterpret_cast<const float2*>(p.table_t) + (f * p.t_heads + th) * p.c_t + q);
  }
  if (q < p.c_t + p.c_h)
    return __ldg(reinterpret_cast<const float2*>(p.table_h) + y * p.c_h + (q - p.c_t));
  if (q < p.c_t + p.c_h + p.c_w)
    return __ldg(reinterpret_cast<const float2*>(p.table_w) + xcol * p.c_w + (q - p.c_t - p.c_h));
  return make_float2(1.f, 0.f);  // no band: identity
}

// grid.x: tiles of kTokens tokens of the flattened (batch, token) index; threads walk
// (token, head, vector slot) of the tile.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rope3d_kernel(Rope3dParams p) {
  const int slots = static_cast<int>(p.head_dim / (2 * VEC));
  const int64_t per_tok = p.heads * slots;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTokens;
  const int64_t items = min(static_cast<int64_t>(kTokens), p.batch * p.tokens - n0) * per_tok;
  const int64_t hw = p.height * p.width;
  rotate_items<T, VEC>(items, [&](int64_t j, const T*& src, T*& dst, float2(&cs)[VEC]) {
    const int64_t n = n0 + j / per_tok;
    const int64_t h = (j % per_tok) / slots;
    const int s = static_cast<int>(j % slots);
    const int64_t b = n / p.tokens, i = n % p.tokens;
    const int64_t f = i / hw, y = (i % hw) / p.width, xcol = i % p.width;
    src = static_cast<const T*>(p.x) + b * p.x_stride_b + i * p.x_stride_l + h * p.x_stride_h +
          s * 2 * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) cs[k] = rope3d_cs(p, s * VEC + k, f, y, xcol, h);
    dst = static_cast<T*>(p.out) + b * p.o_stride_b + i * p.o_stride_l + h * p.o_stride_h +
          s * 2 * VEC;
  });
}

// grid.x strides over tiles of kTokens pool tokens of every batch entry; a tile rotates, range
// by range, its tokens that lie in a range. Tiling the pool rather than each range needs no
// range length on the host and keeps the work even whatever the lengths are.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rope3d_shift_kernel(Rope3dShiftParams p) {
  const int slots = p.c_t / VEC;
  const int64_t per_tok = p.heads * slots;
  const int64_t tiles = (p.tokens + kTokens - 1) / kTokens;
  for (int64_t tile = blockIdx.x; tile < tiles * p.batch; tile += gridDim.x) {
    const int64_t t0 = (tile % tiles) * kTokens;
    T* const base = static_cast<T*>(p.pool) + (tile / tiles) * p.stride_b;
    for (int r = 0; r < p.num_ranges; ++r) {
      const TokenSpan span = clamped_range(p.ranges, r, p.tokens);
      const int64_t lo = max(t0, span.start), hi = min(t0 + kTokens, span.end);
      if (lo >= hi) continue;
      const float2* table = reinterpret_cast<const float2*>(p.table) +
                            static_cast<int64_t>(r) * p.t_heads * p.c_t;
      rotate_items<T, VEC>((hi - lo) * per_tok, [&](int64_t j, const T*& src, T*& dst,
                                                    float2(&cs)[VEC]) {
        const int64_t h = (j % per_tok) / slots;
        const int s = static_cast<int>(j % slots);
        dst = base + (lo + j / per_tok) * p.stride_l + h * p.stride_h + s * 2 * VEC;
        src = dst;
        const float2* row = table + (p.t_heads > 1 ? h : 0) * p.c_t + s * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) cs[k] = __ldg(row + k);
      });
    }
  }
}

template <typename T, int VEC>
cudaError_t launch_rope3d_t(const Rope3dParams& p, cudaStream_t stream) {
  const int64_t tiles = (p.batch * p.tokens + kTokens - 1) / kTokens;
  if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  rope3d_kernel<T, VEC><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(p);
  return launch_status();
}

template <typename T, int VEC>
cudaError_t launch_rope3d_shift_t(const Rope3dShiftParams& p, cudaStream_t stream) {
  const int64_t tiles = (p.tokens + kTokens - 1) / kTokens * p.batch;
  rope3d_shift_kernel<T, VEC><<<grid_stride_blocks(tiles), kThreads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace

// Two pairs per thread when the band and the alignment allow it, else one.
int launch_rope3d(const Rope3dParams& p, void* stream) {
  if (p.batch == 0 || p.tokens == 0 || p.heads == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_elem_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return p.vec_pairs == 2 ? launch_rope3d_t<T, 2>(p, s) : launch_rope3d_t<T, 1>(p, s);
  });
}

int launch_rope3d_shift(const Rope3dShiftParams& p, void* stream) {
  if (p.batch == 0 || p.num_ranges == 0 || p.tokens == 0 || p.heads == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_elem_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return p.vec_pairs == 2 ? launch_rope3d_shift_t<T, 2>(p, s)
                            : launch_rope3d_shift_t<T, 1>(p, s);
  });
}

}  // namespace vidstream
