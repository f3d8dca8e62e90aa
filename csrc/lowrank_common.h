// Host-side helpers shared by the CPU and CUDA bindings of the low-rank (latent) KV ops
// (docs/spec.md §4).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "ranges.h"

namespace vidstream {

struct LowRankDims {
  int64_t batch, pool, d_c, heads, d_nope, d_v, d_r;
};

// The sizes of inputs tensor_checks.h's check_lowrank_args has passed.
inline LowRankDims lowrank_dims(const at::Tensor& c_pool, const at::Tensor& w_uk,
                                const at::Tensor& w_uv, const std::optional<at::Tensor>& k_r_pool) {
  return {c_pool.size(0), c_pool.size(1), c_pool.size(2), w_uk.size(0), w_uk.size(2),
          w_uv.size(2), k_r_pool ? k_r_pool->size(2) : 0};
}

// lowrank_decompress's outputs: K [B, N, H, d_nope + d_r] and V [B, N, H, d_v].
inline std::pair<at::Tensor, at::Tensor> decompressed_kv(const at::Tensor& c_pool,
                                                         const LowRankDims& d, int64_t num_tokens) {
  return {at::empty({d.batch, num_tokens, d.heads, d.d_nope + d.d_r}, c_pool.options()),
          at::empty({d.batch, num_tokens, d.heads, d.d_v}, c_pool.options())};
}

// Pool position of every token of the ranges, in range order (the row order of K and V).
inline std::vector<int32_t> range_tokens(const std::vector<TokenRange>& ranges) {
  std::vector<int32_t> idx;
  for (const auto& r : ranges)
    for (int64_t i = r.first; i < r.second; ++i) idx.push_back(static_cast<int32_t>(i));
  return idx;
}

// The range of every token of range_tokens(ranges), as its index in `ranges`: the row of its
// per-range table (kv_deltas).
inline std::vector<int32_t> range_token_rows(const std::vector<TokenRange>& ranges) {
  std::vector<int32_t> rows;
  for (size_t r = 0; r < ranges.size(); ++r) {
    const int64_t len = std::max<int64_t>(0, ranges[r].second - ranges[r].first);
    rows.insert(rows.end(), static_cast<size_t>(len), static_cast<int32_t>(r));
  }
  return rows;
}

// [d_c, H * (d_nope + d_v)] float32: head h's columns are its K up-projection then its V
// up-projection, so one GEMM of a latent tile yields every head's K and V side by side.
inline at::Tensor stacked_up_projection(const at::Tensor& w_uk, const at::Tensor& w_uv) {
  return at::cat({w_uk, w_uv}, 2).to(at::kFloat).permute({1, 0, 2}).reshape(
      {w_uk.size(1), -1}).contiguous();
}

}  // namespace vidstream
