// CUDA kernel of rope3d_store_. Memory-bound: one block per (batch, token); its threads first
// rotate the key pairs of every head (coalesced pair loads), then copy the value channels, so the
// chunk's K and V are read once and written once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kv_store.h"

namespace vidstream {
namespace {

template <typename T>
struct StorePair;
template <>
struct StorePair<float> {
  using V = float2;
  static __device__ float2 to_float(V v) { return v; }
  static __device__ V from_float(float2 f) { return f; }
};
template <>
struct StorePair<__half> {
  using V = __half2;
  static __device__ float2 to_float(V v) { return __half22float2(v); }
  static __device__ V from_float(float2 f) { return __float22half2_rn(f); }
};
template <>
struct StorePair<__nv_bfloat16> {
  using V = __nv_bfloat162;
  static __device__ float2 to_float(V v) { return __bfloat1622float2(v); }
  static __device__ V from_float(float2 f) { return __float22bfloat162_rn(f); }
};

// grid: (batch * tokens); block: 128 threads striding over heads * D/2 pairs, then heads * Dv.
template <typename T>
__global__ void rope3d_store_kernel(Rope3dStoreParams p) {
  using P = StorePair<T>;
  const int64_t i = blockIdx.x % p.tokens;
  const int64_t b = blockIdx.x / p.tokens;
  const int64_t hw = p.height * p.width;
  const int64_t f = i / hw, j = i % hw;
  const int64_t y = j / p.width, xcol = j % p.width;
  const int64_t dst = static_cast<int64_t>(p.frame_slots[f]) + j;
  const int c = p.c_t + p.c_h + p.c_w;
  const int half_d = static_cast<int>(p.head_dim / 2);
  for (int64_t n = threadIdx.x; n < p.heads * half_d; n += blockDim.x) {
    const int64_t h = n / half_d;
    const int q = static_cast<int>(n % half_d);
    const auto* src = reinterpret_cast<const typename P::V*>(
        static_cast<const T*>(p.k) + b * p.k_stride_b + i * p.k_stride_l + h * p.k_stride_h);
    auto* out = reinterpret_cast<typename P::V*>(static_cast<T*>(p.k_pool) + b * p.kp_stride_b +
                                                 dst * p.kp_stride_l + h * p.kp_stride_h);
    const typename P::V val = src[q];
    if (q >= c) {
      out[q] = val;
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
    const float2 r = __ldg(cs);
    const float2 x = P::to_float(val);
    out[q] = P::from_float(make_float2(x.x * r.x - x.y * r.y, x.x * r.y + x.y * r.x));
  }
  for (int64_t n = threadIdx.x; n < p.heads * p.v_head_dim; n += blockDim.x) {
    const int64_t h = n / p.v_head_dim, d = n % p.v_head_dim;
    static_cast<T*>(p.v_pool)[b * p.vp_stride_b + dst * p.vp_stride_l + h * p.vp_stride_h + d] =
        static_cast<const T*>(p.v)[b * p.v_stride_b + i * p.v_stride_l + h * p.v_stride_h + d];
  }
}

template <typename T>
int launch_t(const Rope3dStoreParams& p, cudaStream_t stream) {
  rope3d_store_kernel<T><<<static_cast<unsigned>(p.batch * p.tokens), 128, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_rope3d_store(const Rope3dStoreParams& p, void* stream) {
  if (p.batch == 0 || p.tokens == 0 || p.heads == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ElemType::kFloat32: return launch_t<float>(p, s);
    case ElemType::kFloat16: return launch_t<__half>(p, s);
    case ElemType::kBFloat16: return launch_t<__nv_bfloat16>(p, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace vidstream
