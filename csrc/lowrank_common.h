// Input checks shared by the CPU and CUDA bindings of the low-rank (latent) KV ops (SPEC §4).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "ranges_common.h"

namespace vidstream {

struct LowRankDims {
  int64_t batch, pool, d_c, heads, d_nope, d_v, d_r;
};

inline void check_kernel_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), nb, " must have the dtype of ", na, " (",
              a.scalar_type(), "), got ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), nb, " must be on the device of ", na, " (", a.device(),
              "), got ", b.device());
}

inline LowRankDims check_lowrank(const at::Tensor& c_pool, const at::Tensor& w_uk,
                                 const at::Tensor& w_uv, const std::optional<at::Tensor>& k_r_pool) {
  TORCH_CHECK(c_pool.dim() == 3, "c_pool must be 3-D [B, P, d_c], got ", c_pool.sizes());
  TORCH_CHECK(w_uk.dim() == 3, "w_uk must be 3-D [H, d_c, d_nope], got ", w_uk.sizes());
  TORCH_CHECK(w_uv.dim() == 3, "w_uv must be 3-D [H, d_c, d_v], got ", w_uv.sizes());
  check_kernel_dtype(c_pool, "c_pool");
  check_same(c_pool, "c_pool", w_uk, "w_uk");
  check_same(c_pool, "c_pool", w_uv, "w_uv");
  LowRankDims d{c_pool.size(0), c_pool.size(1), c_pool.size(2), w_uk.size(0), w_uk.size(2),
                w_uv.size(2), 0};
  TORCH_CHECK(w_uk.size(1) == d.d_c, "w_uk must have shape [H, d_c=", d.d_c, ", d_nope], got ",
              w_uk.sizes());
  TORCH_CHECK(w_uv.size(0) == d.heads && w_uv.size(1) == d.d_c, "w_uv must have shape [H=", d.heads,
              ", d_c=", d.d_c, ", d_v], got ", w_uv.sizes());
  if (k_r_pool) {
    TORCH_CHECK(k_r_pool->dim() == 3, "k_r_pool must be 3-D [B, P, d_r], got ", k_r_pool->sizes());
    check_same(c_pool, "c_pool", *k_r_pool, "k_r_pool");
    TORCH_CHECK(k_r_pool->size(0) == d.batch && k_r_pool->size(1) == d.pool,
                "k_r_pool must have the batch and tokens of c_pool (", d.batch, ", ", d.pool,
                "), got ", k_r_pool->sizes());
    d.d_r = k_r_pool->size(2);
  }
  return d;
}

inline void check_lowrank_query(const at::Tensor& q, const at::Tensor& c_pool, const LowRankDims& d) {
  TORCH_CHECK(q.dim() == 4, "q must be 4-D [B, Lq, H, d_nope + d_r], got ", q.sizes());
  check_same(c_pool, "c_pool", q, "q");
  TORCH_CHECK(q.size(0) == d.batch && q.size(2) == d.heads && q.size(3) == d.d_nope + d.d_r,
              "q must have shape [B=", d.batch, ", Lq, H=", d.heads,
              ", d_nope + d_r = ", d.d_nope + d.d_r, "], got ", q.sizes());
}

inline std::vector<std::pair<int32_t, int32_t>> checked_kv_ranges(const at::Tensor& ranges,
                                                                  int64_t pool_len) {
  return checked_ranges(ranges, pool_len, "kv_ranges");
}

// Pool position of every token of the ranges, in range order (the row order of K and V).
inline std::vector<int32_t> range_tokens(const std::vector<std::pair<int32_t, int32_t>>& ranges) {
  std::vector<int32_t> idx;
  for (const auto& r : ranges)
    for (int32_t i = r.first; i < r.second; ++i) idx.push_back(i);
  return idx;
}

// [d_c, H * (d_nope + d_v)] float32: head h's columns are its K up-projection then its V
// up-projection, so one GEMM of a latent tile yields every head's K and V side by side.
inline at::Tensor stacked_up_projection(const at::Tensor& w_uk, const at::Tensor& w_uv) {
  return at::cat({w_uk, w_uv}, 2).to(at::kFloat).permute({1, 0, 2}).reshape(
      {w_uk.size(1), -1}).contiguous();
}

}  // namespace vidstream
