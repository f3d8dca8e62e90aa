// Torch-free interface of the select_blocks CUDA kernels (docs/spec.md §5): a params struct and
// a launcher. Included by the torch binding (host compiler) and by select_blocks.cu (nvcc).
#pragma once

#include <cstdint>

#include "elem_type.h"

namespace vidstream {

// Maximum head dim: each lane of a warp keeps D / 32 running sums in registers.
constexpr int kSelectMaxHeadDim = 256;
// Sampled queries are split over this many thread blocks per (batch, head); the partial sums
// are added in a fixed order by the scoring kernel, so results do not depend on scheduling.
constexpr int kSelectQuerySplit = 8;
// Most query heads one call scores: the head list travels inside the params struct, by value,
// so a call copies nothing to the device before its launch.
constexpr int kSelectMaxHeads = 256;

struct SelectBlocksParams {
  const void* q;  // [B, Lq, H, D], head dim contiguous
  const void* k;  // [B, P, H_kv, D], head dim contiguous
  ElemType dtype;
  int64_t batch, q_len, head_dim, pool_tokens, kv_group;  // kv_group = H / H_kv
  int64_t q_stride_b, q_stride_l, q_stride_h;  // in elements
  int64_t k_stride_b, k_stride_l, k_stride_h;
  int32_t heads[kSelectMaxHeads];  // the Hs query heads, each in [0, H)
  int num_heads;                   // Hs
  // device [M, 2], unchecked values: the kernels clamp them to the pool.
  const int32_t* ranges;
  int num_blocks;         // M >= 1
  int64_t query_stride, sampled;
  bool mean;                  // score "mean" (else "max")
  const float* key_sums;      // optional device [B, M, H_kv, D] float32 ("mean" only)
  int64_t s_stride_b, s_stride_m, s_stride_h;
  // block_deltas (rot == nullptr: none): device float32 (cos, sin) pairs of block m and kv head
  // h at rot + m * rot_sm + h * rot_sh (temporal_table(); rot_sh = 0 for one table head);
  // block m is scored as if its keys' first 2 * rot_pairs channels were rotated by them.
  const float* rot;
  int64_t rot_sm, rot_sh;
  int rot_pairs;
  float scale;                // applied to each q.k ("max") or folded into norm ("mean")
  double norm;                // "mean": scale / (B * Hs * |S|); "max": 1 / (B * Hs)
  double* qpart;              // workspace [B * Hs, kSelectQuerySplit, D] float64 sums
  unsigned int* counter;      // workspace [1], zeroed by the first kernel
  float* scores;              // out [M]
  int64_t* indices;           // out [min(k, M)], ascending
  int top_k;               // min(k, M)
};

// Two launches: sampled-query partial sums, then one block per mid block that scores it; the
// last block to finish ranks all scores. Returns 0 or a cudaError_t value.
int launch_select_blocks(const SelectBlocksParams& p, void* stream);

}  // namespace vidstream
