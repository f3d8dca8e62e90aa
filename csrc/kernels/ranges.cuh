// Token ranges [R, 2] as the CUDA kernels read them. The values come from device memory that no
// host code has looked at (reading them would cost a host round-trip per call), so each read
// clamps the range into the pool; an inverted range is empty.
#pragma once

#include <cstdint>

namespace vidstream {

struct TokenSpan {
  int64_t start, end;  // 0 <= start <= end <= pool_len
};

__device__ __forceinline__ TokenSpan clamped_range(const int32_t* ranges, int64_t r,
                                                   int64_t pool_len) {
  const int64_t s = min(max(static_cast<int64_t>(ranges[2 * r]), int64_t(0)), pool_len);
  const int64_t e = min(max(static_cast<int64_t>(ranges[2 * r + 1]), s), pool_len);
  return {s, e};
}

// Pool position of token n of the ranges taken in order, or -1 past their last token.
__device__ __forceinline__ int64_t range_token(const int32_t* ranges, int num_ranges,
                                               int64_t pool_len, int64_t n) {
  for (int r = 0; r < num_ranges; ++r) {
    const TokenSpan s = clamped_range(ranges, r, pool_len);
    if (n < s.end - s.start) return s.start + n;
    n -= s.end - s.start;
  }
  return -1;
}

}  // namespace vidstream
