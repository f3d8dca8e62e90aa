// CUDA kernel of lowrank_decompress. Grid (token tiles, heads, batch): a block gathers the
// latents of kLowRankTileTokens tokens once into shared memory (float32), then each thread owns
// one output column of the head (K's d_nope columns, then V's d_v) and accumulates it for every
// token of the tile, so a weight element is loaded once per tile and weight loads are coalesced
// across threads. The shared positional key is copied behind K's columns.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lowrank.h"
#include "convert.cuh"

namespace vidstream {
namespace {


template <typename T>
__global__ void lowrank_decompress_kernel(LowRankDecompressParams p) {
  constexpr int TOK = kLowRankTileTokens;
  extern __shared__ float c_tile[];  // [TOK, d_c]
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * TOK;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int nt = static_cast<int>(min(static_cast<int64_t>(TOK), p.tokens - n0));
  const int64_t d_c = p.d_c, dk = p.d_nope + p.d_r;
  const T* c = static_cast<const T*>(p.c_pool) + b * p.c_stride_b;
  for (int64_t j = threadIdx.x; j < TOK * d_c; j += blockDim.x) {
    const int i = static_cast<int>(j / d_c);
    float x = 0.f;  // rows past the last token stay zero: the FMA loop runs all TOK rows
    if (i < nt) x = to_float(c[p.token_idx[n0 + i] * p.c_stride_l + (j % d_c) * p.c_stride_c]);
    c_tile[j] = x;
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
  for (int64_t j = threadIdx.x; j < nt * p.d_r; j += blockDim.x) {
    const int64_t i = j / p.d_r, x = j % p.d_r;
    const int64_t row = ((b * p.tokens) + n0 + i) * p.heads + h;
    k[row * dk + p.d_nope + x] = r[p.token_idx[n0 + i] * p.r_stride_l + x * p.r_stride_d];
  }
}

template <typename T>
int launch_t(const LowRankDecompressParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.tokens + kLowRankTileTokens - 1) / kLowRankTileTokens),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  const size_t smem = sizeof(float) * kLowRankTileTokens * p.d_c;
  lowrank_decompress_kernel<T><<<grid, 128, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_lowrank_decompress(const LowRankDecompressParams& p, void* stream) {
  if (p.batch == 0 || p.tokens == 0 || p.heads == 0) return 0;
  if (p.d_c > kLowRankMaxLatent || p.heads > 65535 || p.batch > 65535)
    return static_cast<int>(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ElemType::kFloat32: return launch_t<float>(p, s);
    case ElemType::kFloat16: return launch_t<__half>(p, s);
    case ElemType::kBFloat16: return launch_t<__nv_bfloat16>(p, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace vidstream
