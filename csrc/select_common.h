// Host-side helpers of select_blocks shared by the CPU and CUDA bindings: the problem's sizes,
// and the top-k with the docs/spec.md §5 tie rule (equal scores go to the smaller block index).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "ranges.h"
#include "rope3d_common.h"

namespace vidstream {

// block_deltas as the kernels read them: temporal_table()'s float32 (cos, sin) [M, Ht, c_t, 2]
// on k_pool's device (Ht = H_kv with t_theta, else 1), rope3d_shift_'s angles.
inline at::Tensor block_shift_table(const at::Tensor& block_deltas,
                                    const std::optional<at::Tensor>& t_theta, int64_t blocks,
                                    const at::Tensor& k_pool, double theta) {
  check_range_deltas(block_deltas, blocks, "block_deltas");
  TORCH_CHECK(!t_theta || (t_theta->dim() == 1 && t_theta->size(0) == k_pool.size(2)),
              "t_theta must have shape [H_kv] = [", k_pool.size(2), "]");
  return temporal_table(block_deltas, theta, t_theta, k_pool.size(3), k_pool.device());
}

struct SelectProblem {
  int64_t batch, q_len, heads, head_dim, pool_len, kv_heads, blocks;
  int64_t sampled;  // |S| = ceil(Lq / query_stride)
  bool mean;        // score == "mean" (else "max")
};

// The sizes of inputs tensor_checks.h's check_select_blocks_args has passed.
inline SelectProblem select_problem(const at::Tensor& q, const at::Tensor& k_pool, int64_t blocks,
                                    int64_t query_stride, c10::string_view score) {
  SelectProblem p;
  p.batch = q.size(0);
  p.q_len = q.size(1);
  p.heads = q.size(2);
  p.head_dim = q.size(3);
  p.pool_len = k_pool.size(1);
  p.kv_heads = k_pool.size(2);
  p.blocks = blocks;
  p.sampled = (p.q_len + query_stride - 1) / query_stride;
  p.mean = score == "mean";
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
