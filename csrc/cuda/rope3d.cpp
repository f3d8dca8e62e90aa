// CUDA binding of rope3d and rope3d_shift_: checks inputs, builds the float64-derived tables,
// fills the params struct and launches the torch-free kernels of csrc/kernels/rope3d.cu.
#include <c10/cuda/CUDAGuard.h>

#include "cuda/binding_common.h"
#include "cuda/check_launch.h"
#include "kernels/rope3d.h"
#include "ranges.h"
#include "rope3d_common.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

at::Tensor rope3d_cuda(const at::Tensor& x_in, int64_t frames, int64_t height, int64_t width,
                       double frame_offset, double theta, const std::optional<at::Tensor>& t_theta,
                       bool inverse) {
  check_rope3d_args(x_in, frames, height, width, t_theta, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned_rows(x_in, 2);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  const Rope3dTables fwd =
      rope3d_tables(frames, height, width, frame_offset, theta, t_theta, x.size(3), x.device());
  const Rope3dTables tab = inverse ? inverse_tables(fwd) : fwd;
  Rope3dParams p{};
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  set_bthd(p, x);
  strides3(x, p.x_stride_b, p.x_stride_l, p.x_stride_h);
  strides3(out, p.o_stride_b, p.o_stride_l, p.o_stride_h);
  p.height = height;
  p.width = width;
  set_rope_tables(p, tab, x.size(3));
  p.vec_pairs = (x.size(3) % 4 == 0 && rows_aligned(x, 4) && rows_aligned(out, 4)) ? 2 : 1;
  check_launch(launch_rope3d(p, current_stream()), "rope3d");
  return out;
}

void rope3d_shift_cuda(at::Tensor& k_pool, const at::Tensor& ranges_in,
                       const at::Tensor& delta_frames, double theta,
                       const std::optional<at::Tensor>& t_theta) {
  check_rope3d_shift_pool(k_pool, t_theta, at::kCUDA);
  TORCH_CHECK(pair_aligned(k_pool),
              "k_pool must have even strides and an address aligned to two elements "
              "(the kernel rotates pairs in place with vector loads)");
  const at::Tensor ranges = ranges_tensor(ranges_in, k_pool.size(1), "ranges", k_pool);
  check_positions(delta_frames, ranges.size(0), "delta_frames", "[R]");
  const c10::cuda::CUDAGuard guard(k_pool.device());
  const at::Tensor table =
      temporal_table(delta_frames, theta, t_theta, k_pool.size(3), k_pool.device());
  if (k_pool.numel() == 0 || ranges.size(0) == 0) return;
  Rope3dShiftParams p{};
  p.pool = k_pool.data_ptr();
  set_bthd(p, k_pool);
  strides3(k_pool, p.stride_b, p.stride_l, p.stride_h);
  p.ranges = ranges.data_ptr<int32_t>();
  p.num_ranges = static_cast<int>(ranges.size(0));
  p.c_t = static_cast<int>(rope_bands(k_pool.size(3)).c_t);
  p.table = table.data_ptr<float>();
  p.t_heads = static_cast<int>(table.size(1));
  p.vec_pairs = (p.c_t % 2 == 0 && rows_aligned(k_pool, 4)) ? 2 : 1;
  check_launch(launch_rope3d_shift(p, current_stream()), "rope3d_shift_");
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CUDA, m) {
  m.impl("rope3d", &rope3d_cuda);
  m.impl("rope3d_shift_", &rope3d_shift_cuda);
}

}  // namespace vidstream
