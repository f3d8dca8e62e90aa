// CUDA kernels of rope3d and rope3d_shift_. Memory-bound, so the layout of the accesses is the
// whole game: each thread rotates VEC adjacent pairs with one 2*VEC-element vector load and
// store (8 bytes for 16-bit types at VEC=2), consecutive threads take consecutive vectors of a
// head, and each thread issues all of its loads before its first store (kUnroll items) so enough
// bytes are in flight to cover the memory latency.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "rope3d.h"

namespace vidstream {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

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
  constexpr int kTokens = 8;
  using V = Vec<T, 2 * VEC>;
  const int slots = static_cast<int>(p.head_dim / (2 * VEC));
  const int64_t per_tok = p.heads * slots;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTokens;
  const int64_t n_total = p.batch * p.tokens;
  const int64_t items = min(static_cast<int64_t>(kTokens), n_total - n0) * per_tok;
  const int64_t hw = p.height * p.width;
  for (int64_t base = threadIdx.x; base < items; base += kThreads * kUnroll) {
    V val[kUnroll];
    float2 cs[kUnroll][VEC];
    T* dst[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * kThreads;
      dst[u] = nullptr;
      if (j >= items) continue;
      const int64_t n = n0 + j / per_tok;
      const int64_t h = (j % per_tok) / slots;
      const int s = static_cast<int>(j % slots);
      const int64_t b = n / p.tokens, i = n % p.tokens;
      const int64_t f = i / hw, y = (i % hw) / p.width, xcol = i % p.width;
      val[u] = *reinterpret_cast<const V*>(static_cast<const T*>(p.x) + b * p.x_stride_b +
                                           i * p.x_stride_l + h * p.x_stride_h + s * 2 * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) cs[u][k] = rope3d_cs(p, s * VEC + k, f, y, xcol, h);
      dst[u] = static_cast<T*>(p.out) + b * p.o_stride_b + i * p.o_stride_l + h * p.o_stride_h +
               s * 2 * VEC;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (dst[u] == nullptr) continue;
      rotate<T, VEC>(val[u], cs[u]);
      *reinterpret_cast<V*>(dst[u]) = val[u];
    }
  }
}

// grid: (ceil(max_range_len / kTokens), num_ranges, batch); threads walk (token, head, vector
// slot of the temporal band) of kTokens tokens of one range.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rope3d_shift_kernel(Rope3dShiftParams p) {
  constexpr int kTokens = 8;
  using V = Vec<T, 2 * VEC>;
  const int r = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t start = p.ranges[2 * r], end = p.ranges[2 * r + 1];
  const int64_t t0 = start + static_cast<int64_t>(blockIdx.x) * kTokens;
  if (t0 >= end) return;
  const int slots = p.c_t / VEC;
  const int64_t per_tok = p.heads * slots;
  const int64_t items = min(static_cast<int64_t>(kTokens), end - t0) * per_tok;
  const float2* table = reinterpret_cast<const float2*>(p.table) +
                        static_cast<int64_t>(r) * p.t_heads * p.c_t;
  T* const base_ptr = static_cast<T*>(p.pool) + b * p.stride_b;
  for (int64_t base = threadIdx.x; base < items; base += kThreads * kUnroll) {
    V val[kUnroll];
    float2 cs[kUnroll][VEC];
    T* ptr[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + u * kThreads;
      ptr[u] = nullptr;
      if (j >= items) continue;
      const int64_t tok = t0 + j / per_tok;
      const int64_t h = (j % per_tok) / slots;
      const int s = static_cast<int>(j % slots);
      ptr[u] = base_ptr + tok * p.stride_l + h * p.stride_h + s * 2 * VEC;
      val[u] = *reinterpret_cast<const V*>(ptr[u]);
      const float2* row = table + (p.t_heads > 1 ? h : 0) * p.c_t + s * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) cs[u][k] = __ldg(row + k);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (ptr[u] == nullptr) continue;
      rotate<T, VEC>(val[u], cs[u]);
      *reinterpret_cast<V*>(ptr[u]) = val[u];
    }
  }
}

template <typename T, int VEC>
int launch_rope3d_t(const Rope3dParams& p, cudaStream_t stream) {
  const int64_t tiles = (p.batch * p.tokens + 7) / 8;
  if (tiles > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  rope3d_kernel<T, VEC><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int VEC>
int launch_rope3d_shift_t(const Rope3dShiftParams& p, cudaStream_t stream) {
  if (p.num_ranges > 65535 || p.batch > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>((p.max_range_len + 7) / 8),
                  static_cast<unsigned>(p.num_ranges), static_cast<unsigned>(p.batch));
  rope3d_shift_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

// Two pairs per thread when the band and the alignment allow it, else one.
template <typename T>
int launch_rope3d_vec(const Rope3dParams& p, cudaStream_t s) {
  return p.vec_pairs == 2 ? launch_rope3d_t<T, 2>(p, s) : launch_rope3d_t<T, 1>(p, s);
}
template <typename T>
int launch_rope3d_shift_vec(const Rope3dShiftParams& p, cudaStream_t s) {
  return p.vec_pairs == 2 ? launch_rope3d_shift_t<T, 2>(p, s) : launch_rope3d_shift_t<T, 1>(p, s);
}

}  // namespace

int launch_rope3d(const Rope3dParams& p, void* stream) {
  if (p.batch == 0 || p.tokens == 0 || p.heads == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ElemType::kFloat32: return launch_rope3d_vec<float>(p, s);
    case ElemType::kFloat16: return launch_rope3d_vec<__half>(p, s);
    case ElemType::kBFloat16: return launch_rope3d_vec<__nv_bfloat16>(p, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_rope3d_shift(const Rope3dShiftParams& p, void* stream) {
  if (p.batch == 0 || p.num_ranges == 0 || p.max_range_len == 0 || p.heads == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ElemType::kFloat32: return launch_rope3d_shift_vec<float>(p, s);
    case ElemType::kFloat16: return launch_rope3d_shift_vec<__half>(p, s);
    case ElemType::kBFloat16: return launch_rope3d_shift_vec<__nv_bfloat16>(p, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace vidstream
