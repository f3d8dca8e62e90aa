// Input checks of select_blocks shared by the CPU and CUDA bindings, and the host-side top-k
// with the SPEC §5 tie rule (equal scores go to the smaller block index).
#pragma once

#include "ranges_common.h"
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace vidstream {

struct SelectProblem {
  int64_t batch, q_len, heads, head_dim, pool_len, kv_heads, blocks;
  int64_t sampled;  // |S| = ceil(Lq / query_stride)
  bool mean;        // score == "mean" (else "max")
  std::vector<std::pair<int32_t, int32_t>> ranges;  // host copy of block_ranges
};

inline void check_select_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline SelectProblem check_select_inputs(const at::Tensor& q, const at::Tensor& k_pool,
                                         const at::Tensor& block_ranges, int64_t k,
                                         int64_t query_stride, at::IntArrayRef heads,
                                         c10::string_view score,
                                         const std::optional<at::Tensor>& key_sums) {
  check_select_float(q, "q [B, Lq, H, D]");
  check_select_float(k_pool, "k_pool [B, P, H_kv, D]");
  TORCH_CHECK(k_pool.scalar_type() == q.scalar_type(), "k_pool must have the dtype of q (",
              q.scalar_type(), "), got ", k_pool.scalar_type());
  TORCH_CHECK(k_pool.device() == q.device(), "k_pool must be on the device of q");
  SelectProblem p;
  p.batch = q.size(0);
  p.q_len = q.size(1);
  p.heads = q.size(2);
  p.head_dim = q.size(3);
  p.pool_len = k_pool.size(1);
  p.kv_heads = k_pool.size(2);
  TORCH_CHECK(k_pool.size(0) == p.batch && k_pool.size(3) == p.head_dim,
              "k_pool must have q's batch and head dim (", p.batch, ", ", p.head_dim, "), got (",
              k_pool.size(0), ", ", k_pool.size(3), ")");
  TORCH_CHECK(p.kv_heads >= 1 && p.heads % p.kv_heads == 0, "k_pool has ", p.kv_heads,
              " heads; the query heads (", p.heads, ") must be a multiple of it");
  TORCH_CHECK(p.q_len >= 1, "q must have at least one query token (Lq >= 1)");
  TORCH_CHECK(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK(query_stride >= 1, "query_stride must be >= 1, got ", query_stride);
  TORCH_CHECK(score == "mean" || score == "max", "score must be 'mean' or 'max', got '",
              std::string(score), "'");
  p.mean = score == "mean";
  p.sampled = (p.q_len + query_stride - 1) / query_stride;
  TORCH_CHECK(!heads.empty(), "heads must name at least one query head");
  std::vector<int64_t> seen(heads.begin(), heads.end());
  std::sort(seen.begin(), seen.end());
  for (size_t i = 0; i < seen.size(); ++i) {
    TORCH_CHECK(seen[i] >= 0 && seen[i] < p.heads, "heads must be query head indices in [0, ",
                p.heads, "), got ", seen[i]);
    TORCH_CHECK(i == 0 || seen[i] != seen[i - 1], "heads must be distinct, got ", seen[i], " twice");
  }
  p.ranges = checked_ranges(block_ranges, p.pool_len, "block_ranges");
  p.blocks = static_cast<int64_t>(p.ranges.size());
  if (key_sums) {
    const at::Tensor& s = *key_sums;
    TORCH_CHECK(s.dim() == 4 && s.size(0) == p.batch && s.size(1) == p.blocks &&
                    s.size(2) == p.kv_heads && s.size(3) == p.head_dim,
                "block_key_sums must have shape [B, M, H_kv, D] = [", p.batch, ", ", p.blocks,
                ", ", p.kv_heads, ", ", p.head_dim, "], got ", s.sizes());
    TORCH_CHECK(at::isFloatingType(s.scalar_type()), "block_key_sums must be floating point, got ",
                s.scalar_type());
    TORCH_CHECK(s.device() == q.device(), "block_key_sums must be on the device of q");
  }
  return p;
}

// Orders block a before b when its score is larger, or equal and a < b. NaN counts as larger
// than any number, as in torch.sort, so a block with NaN keys is selected and shows up.
struct ScoreOrder {
  const float* s;
  bool operator()(int64_t a, int64_t b) const {
    const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
    if (na != nb) return na;
    if (!na && s[a] != s[b]) return s[a] > s[b];
    return a < b;
  }
};

// Indices of the k best of scores[0, M), ascending.
inline std::vector<int64_t> topk_ascending(const float* scores, int64_t M, int64_t k) {
  const int64_t n = std::min(k, M);
  std::vector<int64_t> idx(M);
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), ScoreOrder{scores});
  idx.resize(n);
  std::sort(idx.begin(), idx.end());
  return idx;
}

}  // namespace vidstream
