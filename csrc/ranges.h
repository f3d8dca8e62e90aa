// Index tensors as the C++ ops take them: token ranges [R, 2] and frame slots [F], int32 on the
// device of the data they index. Their values are checked once, in Python; here only what keeps
// a kernel inside its tensors. A CUDA binding checks the tensor's metadata and hands the device
// pointer to a kernel that clamps every value it reads: no host copy, so no host round-trip per
// call. A CPU binding reads the values here, where bounds are memory safety and reading is free.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <utility>
#include <vector>

namespace vidstream {

using TokenRange = std::pair<int64_t, int64_t>;  // half-open [start, end)

// The metadata of an index tensor; returns it contiguous (a copy only for a strided view, on
// its own device).
inline at::Tensor index_tensor(const at::Tensor& idx, const char* name, const at::Tensor& data) {
  TORCH_CHECK(idx.scalar_type() == at::kInt, name, " must be int32, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == data.device(), name, " must be on the device of the tensors it ",
              "indexes (", data.device(), "), got ", idx.device());
  return idx.contiguous();
}

// ranges [R, 2] into a pool of pool_len tokens, which the kernels index in int32.
inline at::Tensor ranges_tensor(const at::Tensor& ranges, int64_t pool_len, const char* name,
                                const at::Tensor& data) {
  TORCH_CHECK(ranges.dim() == 2 && ranges.size(1) == 2, name, " must have shape [R, 2], got ",
              ranges.sizes());
  TORCH_CHECK(pool_len <= INT32_MAX, "pools of more than 2^31 - 1 tokens are not supported");
  return index_tensor(ranges, name, data);
}

// CPU: every range in the given order, each checked 0 <= start <= end <= pool_len.
inline std::vector<TokenRange> read_ranges(const at::Tensor& ranges, int64_t pool_len,
                                           const char* name, const at::Tensor& data) {
  const at::Tensor host = ranges_tensor(ranges, pool_len, name, data);
  const int32_t* p = host.data_ptr<int32_t>();
  std::vector<TokenRange> out;
  for (int64_t r = 0; r < host.size(0); ++r) {
    const int64_t s = p[2 * r], e = p[2 * r + 1];
    TORCH_CHECK(s >= 0 && e <= pool_len && s <= e, name, "[", r, "] = [", s, ", ", e,
                ") must satisfy 0 <= start <= end <= ", pool_len);
    out.emplace_back(s, e);
  }
  return out;
}

// The non-empty ranges, ascending by start: the order the CPU attention plans key blocks in.
inline std::vector<TokenRange> sorted_nonempty(const std::vector<TokenRange>& ranges) {
  std::vector<TokenRange> out;
  for (const auto& r : ranges)
    if (r.first < r.second) out.push_back(r);
  std::sort(out.begin(), out.end());
  return out;
}

// A non-empty range and its row in the given order (its row of per-range tables: kv_deltas).
struct IndexedRange {
  TokenRange range;
  int64_t index;
};

// sorted_nonempty's order, each range keeping its index in `ranges`.
inline std::vector<IndexedRange> sorted_nonempty_indexed(const std::vector<TokenRange>& ranges) {
  std::vector<IndexedRange> out;
  for (size_t r = 0; r < ranges.size(); ++r)
    if (ranges[r].first < ranges[r].second)
      out.push_back({ranges[r], static_cast<int64_t>(r)});
  std::sort(out.begin(), out.end(), [](const IndexedRange& a, const IndexedRange& b) {
    return a.range < b.range;
  });
  return out;
}

// Per-range temporal offsets (kv_deltas, block_deltas): float64 [R] host values, one per row of
// the ranges; a kernel indexes its angle table by range, so the count is memory safety.
inline void check_range_deltas(const at::Tensor& deltas, int64_t num_ranges, const char* name) {
  TORCH_CHECK(deltas.dim() == 1 && deltas.size(0) == num_ranges, name, " must have shape [R] = [",
              num_ranges, "], got ", deltas.sizes());
  TORCH_CHECK(deltas.scalar_type() == at::kDouble, name, " must be float64, got ",
              deltas.scalar_type());
  TORCH_CHECK(deltas.device().is_cpu(), name, " must be a CPU tensor (host values), got ",
              deltas.device());
}

// frame_slots [F]: frame f goes to pool tokens [slot, slot + frame_tokens).
inline at::Tensor slots_tensor(const at::Tensor& frame_slots, const at::Tensor& pool) {
  TORCH_CHECK(frame_slots.dim() == 1, "frame_slots must be 1-D [F], got ", frame_slots.sizes());
  return index_tensor(frame_slots, "frame_slots", pool);
}

// CPU: the slots, each checked 0 <= slot and slot + frame_tokens <= pool_len.
inline std::vector<int64_t> read_frame_slots(const at::Tensor& frame_slots, int64_t frame_tokens,
                                             int64_t pool_len, const at::Tensor& pool) {
  const at::Tensor host = slots_tensor(frame_slots, pool);
  const int32_t* p = host.data_ptr<int32_t>();
  std::vector<int64_t> out(host.size(0));
  for (int64_t f = 0; f < host.size(0); ++f) {
    out[f] = p[f];
    TORCH_CHECK(out[f] >= 0 && out[f] + frame_tokens <= pool_len, "frame_slots[", f, "] = ",
                out[f], " must satisfy 0 <= slot and slot + frame_tokens (", frame_tokens,
                ") <= ", pool_len);
  }
  return out;
}

}  // namespace vidstream
