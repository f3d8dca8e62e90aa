// The one reader and check of token ranges [R, 2], shared by every binding that takes ranges.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <utility>
#include <vector>

namespace vidstream {

// Fails unless the non-empty ranges [first, second) are pairwise disjoint. Empty ranges are
// dropped before sorting: left in, one sorted between two overlapping ranges would separate
// them and hide the overlap.
inline void check_disjoint(const std::vector<std::pair<int32_t, int32_t>>& ranges, const char* name) {
  std::vector<std::pair<int32_t, int32_t>> nonempty;
  for (const auto& r : ranges)
    if (r.first < r.second) nonempty.push_back(r);
  std::sort(nonempty.begin(), nonempty.end());
  for (size_t i = 1; i < nonempty.size(); ++i) {
    const auto& a = nonempty[i - 1];
    const auto& b = nonempty[i];
    TORCH_CHECK(a.second <= b.first, name, " must not overlap: [", a.first, ", ", a.second,
                ") and [", b.first, ", ", b.second, ")");
  }
}

// Reads ranges [R, 2] int32 (SPEC) to the host and checks them: each within [0, pool_len],
// start <= end, the non-empty ones pairwise disjoint (empty ones allowed anywhere). Returns
// every range, in the given order.
inline std::vector<std::pair<int32_t, int32_t>> checked_ranges(const at::Tensor& ranges,
                                                               int64_t pool_len,
                                                               const char* name = "ranges") {
  TORCH_CHECK(ranges.scalar_type() == at::kInt, name, " must be int32, got ",
              ranges.scalar_type());
  TORCH_CHECK(ranges.dim() == 2 && ranges.size(1) == 2, name, " must have shape [R, 2], got ",
              ranges.sizes());
  TORCH_CHECK(pool_len <= INT32_MAX, "pools of more than 2^31 - 1 tokens are not supported");
  const at::Tensor host = ranges.to(at::kCPU).contiguous();
  const int32_t* p = host.data_ptr<int32_t>();
  std::vector<std::pair<int32_t, int32_t>> out;
  for (int64_t r = 0; r < host.size(0); ++r) {
    const int64_t s = p[2 * r], e = p[2 * r + 1];
    TORCH_CHECK(s >= 0 && e <= pool_len && s <= e, name, "[", r, "] = [", s, ", ", e,
                ") must satisfy 0 <= start <= end <= ", pool_len);
    out.emplace_back(static_cast<int32_t>(s), static_cast<int32_t>(e));
  }
  check_disjoint(out, name);
  return out;
}

}  // namespace vidstream
