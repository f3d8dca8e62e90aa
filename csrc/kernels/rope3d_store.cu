// CUDA kernel of rope3d_store_. Memory-bound: one block per (batch, token); its threads first
// rotate the key pairs of every head (coalesced pair loads), then copy the value channels, so the
// chunk's K and V are read once and written once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "launch.cuh"
#include "rope3d_store.h"

namespace vidstream {
namespace {

constexpr int kThreads = 128;

// grid: (batch * tokens); block: kThreads threads striding over heads * D/2 pairs, then
// heads * Dv.
template <typename T>
__global__ void rope3d_store_kernel(Rope3dStoreParams p) {
  using P = PairOf<T>;
  const int64_t i = blockIdx.x % p.tokens;
  const int64_t b = blockIdx.x / p.tokens;
  const int64_t hw = p.height * p.width;
  const int64_t f = i / hw, j = i % hw;
  const int64_t y = j / p.width, xcol = j % p.width;
  const int64_t slot = p.frame_slots[f];
  if (slot < 0 || slot + hw > p.pool_tokens) return;
  const int64_t dst = slot + j;
  const int c = p.c_t + p.c_h + p.c_w;
  const int half_d = static_cast<int>(p.head_dim / 2);
  for (int64_t n = threadIdx.x; n < p.heads * half_d; n += blockDim.x) {
    const int64_t h = n / half_d;
    const int q = static_cast<int>(n % half_d);
    const auto* src = reinterpret_cast<const P*>(static_cast<const T*>(p.k) + b * p.k_stride_b +
                                                 i * p.k_stride_l + h * p.k_stride_h);
    auto* out = reinterpret_cast<P*>(static_cast<T*>(p.k_pool) + b * p.kp_stride_b +
                                     dst * p.kp_stride_l + h * p.kp_stride_h);
    const P val = src[q];
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
    const float2 x = to_float2(val);
    out[q] = from_float2<T>(make_float2(x.x * r.x - x.y * r.y, x.x * r.y + x.y * r.x));
  }
  for (int64_t n = threadIdx.x; n < p.heads * p.v_head_dim; n += blockDim.x) {
    const int64_t h = n / p.v_head_dim, d = n % p.v_head_dim;
    static_cast<T*>(p.v_pool)[b * p.vp_stride_b + dst * p.vp_stride_l + h * p.vp_stride_h + d] =
        static_cast<const T*>(p.v)[b * p.v_stride_b + i * p.v_stride_l + h * p.v_stride_h + d];
  }
}

}  // namespace

int launch_rope3d_store(const Rope3dStoreParams& p, void* stream) {
  if (p.batch == 0 || p.tokens == 0 || p.heads == 0) return 0;
  if (p.batch * p.tokens > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_elem_type(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rope3d_store_kernel<T><<<static_cast<unsigned>(p.batch * p.tokens), kThreads, 0, s>>>(p);
    return launch_status();
  });
}

}  // namespace vidstream
