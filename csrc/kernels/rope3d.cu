// CUDA kernels of rope3d and rope3d_shift_. Memory-bound: one thread rotates one pair,
// consecutive threads take consecutive pairs of a head so loads stay coalesced.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rope3d.h"

namespace vidstream {
namespace {

template <typename T>
struct Pair;
template <>
struct Pair<float> {
  using V = float2;
  static __device__ float2 to_float(V v) { return v; }
  static __device__ V from_float(float2 f) { return f; }
};
template <>
struct Pair<__half> {
  using V = __half2;
  static __device__ float2 to_float(V v) { return __half22float2(v); }
  static __device__ V from_float(float2 f) { return __float22half2_rn(f); }
};
template <>
struct Pair<__nv_bfloat16> {
  using V = __nv_bfloat162;
  static __device__ float2 to_float(V v) { return __bfloat1622float2(v); }
  static __device__ V from_float(float2 f) { return __float22bfloat162_rn(f); }
};

__device__ __forceinline__ float2 rotate(float2 v, float2 cs) {
  return make_float2(v.x * cs.x - v.y * cs.y, v.x * cs.y + v.y * cs.x);
}

// grid: (batch * tokens, ceil(heads * D/2 / blockDim)); each thread one pair of one head.
template <typename T>
__global__ void rope3d_kernel(Rope3dParams p) {
  using P = Pair<T>;
  const int c = p.c_t + p.c_h + p.c_w;
  const int64_t i = blockIdx.x % p.tokens;
  const int64_t b = blockIdx.x / p.tokens;
  const int64_t hw = p.height * p.width;
  const int64_t f = i / hw, y = (i % hw) / p.width, xcol = i % p.width;
  const int half_d = static_cast<int>(p.head_dim / 2);
  for (int64_t j = blockIdx.y * blockDim.x + threadIdx.x; j < p.heads * half_d;
       j += gridDim.y * blockDim.x) {
    const int64_t h = j / half_d;
    const int q = static_cast<int>(j % half_d);
    const auto* src = reinterpret_cast<const typename P::V*>(
        static_cast<const T*>(p.x) + b * p.x_stride_b + i * p.x_stride_l + h * p.x_stride_h);
    auto* dst = reinterpret_cast<typename P::V*>(static_cast<T*>(p.out) + b * p.o_stride_b +
                                                 i * p.o_stride_l + h * p.o_stride_h);
    const typename P::V v = src[q];
    if (q >= c) {  // the bands cover all D/2 pairs; guard against a caller's inconsistent counts
      dst[q] = v;
      continue;
    }
    const float2* cs;
    if (q < p.c_t) {
      const int th = p.t_heads > 1 ? static_cast<int>(h) : 0;
      cs = reinterpret_cast<const float2*>(p.table_t) + (f * p.t_heads + th) * p.c_t + q;
    } else if (q < p.c_t + p.c_h) {
      cs = reinterpret_cast<const float2*>(p.table_h) + y * p.c_h + (q - p.c_t);
    } else {
      cs = reinterpret_cast<const float2*>(p.table_w) + xcol * p.c_w + (q - p.c_t - p.c_h);
    }
    dst[q] = P::from_float(rotate(P::to_float(v), __ldg(cs)));
  }
}

// grid: (ceil(max_range_len / TOKENS), num_ranges, batch); block: 256 threads over
// (TOKENS tokens x heads x c_t pairs) of one range.
template <typename T>
__global__ void rope3d_shift_kernel(Rope3dShiftParams p) {
  using P = Pair<T>;
  constexpr int kTokens = 8;
  const int r = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t start = p.ranges[2 * r], end = p.ranges[2 * r + 1];
  const int64_t t0 = start + static_cast<int64_t>(blockIdx.x) * kTokens;
  if (t0 >= end) return;
  const int64_t n_tok = min(static_cast<int64_t>(kTokens), end - t0);
  const int64_t per_tok = p.heads * p.c_t;
  const float2* table = reinterpret_cast<const float2*>(p.table) + static_cast<int64_t>(r) * p.t_heads * p.c_t;
  for (int64_t j = threadIdx.x; j < n_tok * per_tok; j += blockDim.x) {
    const int64_t tok = t0 + j / per_tok;
    const int64_t h = (j % per_tok) / p.c_t;
    const int q = static_cast<int>(j % p.c_t);
    auto* x = reinterpret_cast<typename P::V*>(static_cast<T*>(p.pool) + b * p.stride_b +
                                               tok * p.stride_l + h * p.stride_h);
    const float2 cs = __ldg(table + (p.t_heads > 1 ? h : 0) * p.c_t + q);
    x[q] = P::from_float(rotate(P::to_float(x[q]), cs));
  }
}

template <typename T>
int launch_rope3d_t(const Rope3dParams& p, cudaStream_t stream) {
  const int64_t work = p.heads * (p.head_dim / 2);
  const int threads = 128;
  const int64_t col_blocks = (work + threads - 1) / threads;
  const dim3 grid(static_cast<unsigned>(p.batch * p.tokens),
                  static_cast<unsigned>(col_blocks < 65535 ? col_blocks : 65535));
  rope3d_kernel<T><<<grid, threads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_rope3d_shift_t(const Rope3dShiftParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.max_range_len + 7) / 8),
                  static_cast<unsigned>(p.num_ranges), static_cast<unsigned>(p.batch));
  rope3d_shift_kernel<T><<<grid, 256, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_rope3d(const Rope3dParams& p, void* stream) {
  if (p.batch == 0 || p.tokens == 0 || p.heads == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ElemType::kFloat32: return launch_rope3d_t<float>(p, s);
    case ElemType::kFloat16: return launch_rope3d_t<__half>(p, s);
    case ElemType::kBFloat16: return launch_rope3d_t<__nv_bfloat16>(p, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_rope3d_shift(const Rope3dShiftParams& p, void* stream) {
  if (p.batch == 0 || p.num_ranges == 0 || p.max_range_len == 0 || p.heads == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ElemType::kFloat32: return launch_rope3d_shift_t<float>(p, s);
    case ElemType::kFloat16: return launch_rope3d_shift_t<__half>(p, s);
    case ElemType::kBFloat16: return launch_rope3d_shift_t<__nv_bfloat16>(p, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace vidstream
