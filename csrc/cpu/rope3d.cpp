// C++ CPU kernels of rope3d and rope3d_shift_: parallel over tokens, float32 arithmetic,
// rotation angles from the float64-built tables of rope3d_common.h. The per-token loops
// (cpu/rope3d_isa.h) run as AVX2 code where the CPU has it.
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "ranges.h"
#include "rope3d_common.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

// One rope3d call as the loops see it: raw pointers, strides in elements.
struct Rope3dRows {
  at::ScalarType dtype;
  const void* x;
  void* out;
  int64_t tokens, heads, head_dim, height, width;
  int64_t sxb, sxl, sxh, sob, sol, soh;
  RopeBands bands;
  const float* table_t;  // [F, t_heads, c_t, 2]
  const float* table_h;  // [height, c_h, 2]
  const float* table_w;  // [width, c_w, 2]
  int64_t t_heads;
};

// One rope3d_shift_ call: the ranges' tokens flattened, range r holding items
// [offsets[r], offsets[r + 1]).
struct ShiftRows {
  at::ScalarType dtype;
  void* pool;
  int64_t heads, stride_b, stride_l, stride_h, c_t, t_heads;
  const float* cc;  // [R, t_heads, 2 c_t]: (c0, c0, c1, c1, ...)
  const float* ss;  // [R, t_heads, 2 c_t]: (-s0, s0, -s1, s1, ...)
  const TokenRange* ranges;
  const int64_t* offsets;  // [R + 1]
  int64_t num_ranges;
};

struct IsaKernels {
  void (*rope3d_rows)(const Rope3dRows&, int64_t begin, int64_t end);
  void (*shift_rows)(const ShiftRows&, int64_t begin, int64_t end);
};

#define VIDSTREAM_ISA_BODY "cpu/rope3d_isa.h"
#define VIDSTREAM_ISA_AVX512 0  // the loops are tuned for AVX2; wider vectors gain nothing
#include "cpu/isa_dispatch.h"

at::Tensor rope3d_cpu(const at::Tensor& x, int64_t frames, int64_t height, int64_t width,
                      double frame_offset, double theta, const std::optional<at::Tensor>& t_theta,
                      bool inverse) {
  check_rope3d_args(x, frames, height, width, t_theta, at::kCPU);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const Rope3dTables fwd =
      rope3d_tables(frames, height, width, frame_offset, theta, t_theta, x.size(3), x.device());
  const Rope3dTables tab = inverse ? inverse_tables(fwd) : fwd;
  const Rope3dRows a{x.scalar_type(), x.data_ptr(), out.data_ptr(),
                     x.size(1), x.size(2), x.size(3), height, width,
                     x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                     out.stride(2), rope_bands(x.size(3)), tab.temporal.data_ptr<float>(),
                     tab.height.data_ptr<float>(), tab.width.data_ptr<float>(),
                     tab.temporal.size(1)};
  const auto rows = isa_kernels().rope3d_rows;
  at::parallel_for(0, x.size(0) * x.size(1), 64,
                   [&](int64_t begin, int64_t end) { rows(a, begin, end); });
  return out;
}

void rope3d_shift_cpu(at::Tensor& k_pool, const at::Tensor& ranges, const at::Tensor& delta_frames,
                      double theta, const std::optional<at::Tensor>& t_theta) {
  check_rope3d_shift_pool(k_pool, t_theta, at::kCPU);
  const std::vector<TokenRange> host = read_ranges(ranges, k_pool.size(1), "ranges", k_pool);
  const int64_t num_ranges = static_cast<int64_t>(host.size());
  check_positions(delta_frames, num_ranges, "delta_frames", "[R]");
  const at::Tensor table =
      temporal_table(delta_frames, theta, t_theta, k_pool.size(3), k_pool.device());
  if (k_pool.numel() == 0) return;
  // Flatten (range, token) into one index so work splits evenly whatever the range sizes.
  std::vector<int64_t> offsets(host.size() + 1, 0);
  for (size_t r = 0; r < host.size(); ++r)
    offsets[r + 1] = offsets[r] + (host[r].second - host[r].first);
  if (offsets.back() == 0) return;
  // (cos, sin) pairs [R, Ht, c_t, 2] -> cc = (c, c), ss = (-s, s), each [R, Ht, 2 c_t].
  const at::Tensor cos = table.select(-1, 0), sin = table.select(-1, 1);
  const at::Tensor cc = at::stack({cos, cos}, -1).flatten(-2).contiguous();
  const at::Tensor ss = at::stack({-sin, sin}, -1).flatten(-2).contiguous();
  const ShiftRows a{k_pool.scalar_type(), k_pool.data_ptr(), k_pool.size(2), k_pool.stride(0),
                    k_pool.stride(1), k_pool.stride(2), rope_bands(k_pool.size(3)).c_t,
                    table.size(1), cc.data_ptr<float>(), ss.data_ptr<float>(), host.data(),
                    offsets.data(), num_ranges};
  const auto rows = isa_kernels().shift_rows;
  at::parallel_for(0, k_pool.size(0) * offsets.back(), 64,
                   [&](int64_t begin, int64_t end) { rows(a, begin, end); });
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CPU, m) {
  m.impl("rope3d", &rope3d_cpu);
  m.impl("rope3d_shift_", &rope3d_shift_cpu);
}

}  // namespace vidstream
