// The one disjointness check of token ranges, shared by every binding that takes ranges.
#pragma once

#include <torch/library.h>

#include <algorithm>
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

}  // namespace vidstream
