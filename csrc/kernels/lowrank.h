// Torch-free interface of the low-rank KV CUDA kernel (docs/spec.md §4): params struct and
// launcher. Included by the torch binding (host compiler) and by lowrank.cu (nvcc).
#pragma once

#include <cstdint>

#include "elem_type.h"

namespace vidstream {

// K [B, N, H, d_nope + d_r] and V [B, N, H, d_v] (contiguous) of the first N tokens of the
// ranges of the latent pool c_pool [B, P, d_c] (and the shared positional key k_r_pool
// [B, P, d_r]), tokens taken range by range.
struct LowRankDecompressParams {
  const void* c_pool;
  const void* k_r_pool;  // null when d_r == 0
  const void* w_uk;      // [H, d_c, d_nope] contiguous
  const void* w_uv;      // [H, d_c, d_v] contiguous
  // device [R, 2], unchecked values: the kernel clamps them to the pool, and writes zeros for
  // output tokens past the ranges' last token.
  const int32_t* ranges;
  int num_ranges;
  void* k;
  void* v;
  ElemType dtype;
  int64_t batch, tokens, pool_tokens, heads, d_c, d_nope, d_r, d_v;
  int64_t c_stride_b, c_stride_l, c_stride_c;  // in elements
  int64_t r_stride_b, r_stride_l, r_stride_d;
};

// Tokens per thread block; its latent tile lives in shared memory as float32.
constexpr int kLowRankTileTokens = 16;
// Largest d_c whose tile fits the default 48 KiB of shared memory.
constexpr int64_t kLowRankMaxLatent = 48 * 1024 / (4 * kLowRankTileTokens);

// Returns 0 on success or a cudaError_t value.
int launch_lowrank_decompress(const LowRankDecompressParams& p, void* stream);

}  // namespace vidstream
