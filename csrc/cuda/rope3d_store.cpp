// CUDA binding of rope3d_store_: checks inputs, builds the float64-derived tables at the frame
// positions, fills the params struct and launches the kernel of csrc/kernels/rope3d_store.cu.
#include <c10/cuda/CUDAGuard.h>

#include "cuda/binding_common.h"
#include "cuda/check_launch.h"
#include "kernels/rope3d_store.h"
#include "ranges.h"
#include "rope3d_common.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

void rope3d_store_cuda(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k_in,
                       const at::Tensor& v, const at::Tensor& frame_slots,
                       const at::Tensor& frame_pos, int64_t height, int64_t width, double theta,
                       const std::optional<at::Tensor>& t_theta) {
  const at::Tensor slots = slots_tensor(frame_slots, k_pool);
  check_rope3d_store_args(k_pool, v_pool, k_in, v, slots.size(0), frame_pos, height, width,
                          t_theta, at::kCUDA);
  TORCH_CHECK(pair_aligned(k_pool),
              "k_pool must have even strides and an address aligned to two elements");
  const c10::cuda::CUDAGuard guard(k_pool.device());
  if (k_in.numel() == 0) return;
  const at::Tensor k = aligned_rows(k_in, 2);
  const Rope3dTables tab =
      rope3d_store_tables(frame_pos, height, width, theta, t_theta, k.size(3), k.device());
  Rope3dStoreParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_pool = k_pool.data_ptr();
  p.v_pool = v_pool.data_ptr();
  set_bthd(p, k);
  p.v_head_dim = v.size(3);
  p.pool_tokens = k_pool.size(1);
  strides3(k, p.k_stride_b, p.k_stride_l, p.k_stride_h);
  strides3(v, p.v_stride_b, p.v_stride_l, p.v_stride_h);
  strides3(k_pool, p.kp_stride_b, p.kp_stride_l, p.kp_stride_h);
  strides3(v_pool, p.vp_stride_b, p.vp_stride_l, p.vp_stride_h);
  p.height = height;
  p.width = width;
  p.frame_slots = slots.data_ptr<int32_t>();
  set_rope_tables(p, tab, k.size(3));
  check_launch(launch_rope3d_store(p, current_stream()), "rope3d_store_");
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CUDA, m) { m.impl("rope3d_store_", &rope3d_store_cuda); }

}  // namespace vidstream
