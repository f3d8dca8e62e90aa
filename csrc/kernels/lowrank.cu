// CUDA kernel of lowrank_decompress. Grid (token tiles, heads, batch): a block finds the pool
// position of each of its kLowRankTileTokens tokens by walking the ranges (a few per call, read
// on the device: the host never sees them), gathers their latents once into shared memory
// (float32), then each thread owns one output column of the head (K's d_nope columns, then V's
// d_v) and accumulates it for every token of the tile, so a weight element is loaded once per
// tile and weight loads are coalesced across threads. The shared positional key is copied
// behind K's columns.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "launch.cuh"
#include "lowrank.h"
#include "ranges.cuh"

namespace vidstream {
namespace {

// Pool position of the tile's token i, looked up only when i changes: consecutive items of a
// thread mostly share their token, and the lookup walks the ranges.
struct TokenCursor {
  int i = -1;
  int64_t pos = -1;
  __device__ __forceinline__ int64_t at(const LowRankDecompressParams& p, int64_t n0, int row) {
    if (row != i) {
      i = row;
      pos = range_token(p.ranges, p.num_ranges, p.pool_tokens, n0 + row);
    }
    return pos;
  }
};

template <typename T>
__global__ void lowrank_decompress_kernel(LowRankDecompressParams p) {
  constexpr int TOK = kLowRankTileTokens;
  extern __shared__ float c_tile[];  // [TOK, d_c]
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * TOK;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int nt = static_cast<int>(min(static_cast<int64_t>(TOK), p.tokens - n0));
  const int64_t d_c = p.d_c, dk = p.d_nope + p.d_r;
  const T* c = static_cast<const T*>(p.c_pool) + b * p.c_stride_b;
  TokenCursor gather;
  for (int64_t j = threadIdx.x; j < TOK * d_c; j += blockDim.x) {
    const int i = static_cast<int>(j / d_c);
    // Rows past the last token, or of no token, stay zero: the FMA loop runs all TOK rows.
    const int64_t pos = i < nt ? gather.at(p, n0, i) : -1;
    c_tile[j] = pos >= 0 ? to_float(c[pos * p.c_stride_l + (j % d_c) * p.c_stride_c]) : 0.f;
  }
  __syncthreads();
  T* k = static_cast<T*>(p.k);
  T* v = static_cast<T*>(p.v);
  const int64_t cols = p.d_nope + p.d_v;
  for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) {
    const bool is_k = col < p.d_nope;
    const int64_t ld = is_k ? p.d_nope : p.d_v;
    const T* w = is_k ? static_cast<const T*>(p.w_uk) + h * d_c * p.d_nope + col
                      : static_cast<const T*>(p.w_uv) + h * d_c * p.d_v + (col - p.d_nope);
    float acc[TOK];
#pragma unroll
    for (int i = 0; i < TOK; ++i) acc[i] = 0.f;
    for (int64_t x = 0; x < d_c; ++x) {
      const float wx = to_float(w[x * ld]);
#pragma unroll
      for (int i = 0; i < TOK; ++i) acc[i] += c_tile[i * d_c + x] * wx;  // smem broadcast
    }
#pragma unroll
    for (int i = 0; i < TOK; ++i) {
      if (i >= nt) break;
      const int64_t row = ((b * p.tokens) + n0 + i) * p.heads + h;
      if (is_k) k[row * dk + col] = from_float<T>(acc[i]);
      else v[row * p.d_v + (col - p.d_nope)] = from_float<T>(acc[i]);
    }
  }
  if (p.d_r == 0) return;
  const T* r = static_cast<const T*>(p.k_r_pool) + b * p.r_stride_b;
  TokenCursor cur;
  for (int64_t j = threadIdx.x; j < nt * p.d_r; j += blockDim.x) {
    const int i = static_cast<int>(j / p.d_r);
    const int64_t x = j % p.d_r, pos = cur.at(p, n0, i);
    const int64_t row = ((b * p.tokens) + n0 + i) * p.heads + h;
    k[row * dk + p.d_nope + x] =
        pos >= 0 ? r[pos * p.r_stride_l + x * p.r_stride_d] : from_float<T>(0.f);
  }
}

}  // namespace

int launch_lowrank_decompress(const LowRankDecompressParams& p, void* stream) {
  if (p.batch == 0 || p.tokens == 0 || p.heads == 0) return 0;
  if (p.d_c > kLowRankMaxLatent || p.heads > 65535 || p.batch > 65535)
    return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>((p.tokens + kLowRankTileTokens - 1) / kLowRankTileTokens),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  const size_t smem = sizeof(float) * kLowRankTileTokens * p.d_c;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_elem_type(p.dtype, [&](auto tag) {
    lowrank_decompress_kernel<typename decltype(tag)::type><<<grid, 128, smem, s>>>(p);
    return launch_status();
  });
}

}  // namespace vidstream
