// CUDA binding of rope3d and rope3d_shift_: checks inputs, builds the float64-derived tables,
// fills the params struct and launches the torch-free kernels of csrc/kernels/rope3d.cu.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/rope3d.h"
#include "rope3d_common.h"
#include "cuda/binding_common.h"

namespace vidstream {
namespace {


void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

at::Tensor rope3d_cuda(const at::Tensor& x_in, int64_t frames, int64_t height, int64_t width,
                       double frame_offset, double theta, const std::optional<at::Tensor>& t_theta) {
  check_pool_like(x_in, "x");
  TORCH_CHECK(x_in.is_cuda(), "x must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK(frames >= 0 && height > 0 && width > 0 && frames * height * width == x_in.size(1),
              "grid (F, h, w) = (", frames, ", ", height, ", ", width,
              ") must have F*h*w == L = ", x_in.size(1));
  check_t_theta(t_theta, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  // clone, not contiguous(): a contiguous tensor may still start misaligned.
  const at::Tensor x = pair_aligned(x_in) ? x_in : x_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  const Rope3dTables tab =
      rope3d_tables(frames, height, width, frame_offset, theta, t_theta, x.size(3), x.device());
  const RopeBands bands = rope_bands(x.size(3));
  Rope3dParams p{};
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.dtype = elem_type(x);
  p.batch = x.size(0);
  p.tokens = x.size(1);
  p.heads = x.size(2);
  p.head_dim = x.size(3);
  p.x_stride_b = x.stride(0);
  p.x_stride_l = x.stride(1);
  p.x_stride_h = x.stride(2);
  p.o_stride_b = out.stride(0);
  p.o_stride_l = out.stride(1);
  p.o_stride_h = out.stride(2);
  p.height = height;
  p.width = width;
  p.c_t = static_cast<int>(bands.c_t);
  p.c_h = static_cast<int>(bands.c_h);
  p.c_w = static_cast<int>(bands.c_w);
  p.table_t = tab.temporal.data_ptr<float>();
  p.table_h = tab.height.data_ptr<float>();
  p.table_w = tab.width.data_ptr<float>();
  p.t_heads = static_cast<int>(tab.temporal.size(1));
  p.vec_pairs = (x.size(3) % 4 == 0 && rows_aligned(x, 4) && rows_aligned(out, 4)) ? 2 : 1;
  check_launch(launch_rope3d(p, c10::cuda::getCurrentCUDAStream().stream()), "rope3d");
  return out;
}

void rope3d_shift_cuda(at::Tensor& k_pool, const at::Tensor& ranges, const at::Tensor& delta_frames,
                       double theta, const std::optional<at::Tensor>& t_theta) {
  check_pool_like(k_pool, "k_pool");
  TORCH_CHECK(k_pool.is_cuda(), "k_pool must be a CUDA tensor for the CUDA kernel");
  check_writable(k_pool);
  TORCH_CHECK(pair_aligned(k_pool),
              "k_pool must have even strides and an address aligned to two elements "
              "(the kernel rotates pairs in place with vector loads)");
  check_t_theta(t_theta, k_pool);
  const c10::cuda::CUDAGuard guard(k_pool.device());
  const auto host_ranges = checked_ranges(ranges, k_pool.size(1));
  const int64_t num_ranges = static_cast<int64_t>(host_ranges.size());
  const at::Tensor table =
      shift_table(delta_frames, num_ranges, theta, t_theta, k_pool.size(3), k_pool.device());
  int64_t max_len = 0;
  for (const auto& r : host_ranges) max_len = std::max<int64_t>(max_len, r.second - r.first);
  if (k_pool.numel() == 0 || max_len == 0) return;
  TORCH_CHECK(num_ranges < 65536, "at most 65535 ranges, got ", num_ranges);
  const at::Tensor dev_ranges = ranges.to(k_pool.device(), at::kInt).contiguous();
  Rope3dShiftParams p{};
  p.pool = k_pool.data_ptr();
  p.dtype = elem_type(k_pool);
  p.batch = k_pool.size(0);
  p.heads = k_pool.size(2);
  p.head_dim = k_pool.size(3);
  p.stride_b = k_pool.stride(0);
  p.stride_l = k_pool.stride(1);
  p.stride_h = k_pool.stride(2);
  p.ranges = dev_ranges.data_ptr<int32_t>();
  p.num_ranges = static_cast<int>(num_ranges);
  p.max_range_len = max_len;
  p.c_t = static_cast<int>(rope_bands(k_pool.size(3)).c_t);
  p.table = table.data_ptr<float>();
  p.t_heads = static_cast<int>(table.size(1));
  p.vec_pairs = (p.c_t % 2 == 0 && rows_aligned(k_pool, 4)) ? 2 : 1;
  check_launch(launch_rope3d_shift(p, c10::cuda::getCurrentCUDAStream().stream()), "rope3d_shift_");
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CUDA, m) {
  m.impl("rope3d", &rope3d_cuda);
  m.impl("rope3d_shift_", &rope3d_shift_cuda);
}

}  // namespace vidstream
