// CUDA binding of rope3d_store_: checks inputs, builds the float64-derived tables at the frame
// positions, fills the params struct and launches the kernel of csrc/kernels/kv_store.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/kv_store.h"
#include "kv_store_common.h"
#include "cuda/binding_common.h"

namespace vidstream {
namespace {

void rope3d_store_cuda(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k_in,
                       const at::Tensor& v_in, const at::Tensor& frame_slots,
                       const at::Tensor& frame_pos, int64_t height, int64_t width, double theta,
                       const std::optional<at::Tensor>& t_theta) {
  TORCH_CHECK(frame_slots.dim() == 1, "frame_slots must be 1-D [F], got ", frame_slots.sizes());
  const int64_t frames = frame_slots.size(0);
  check_store_args(k_pool, v_pool, k_in, v_in, frames, height, width);
  TORCH_CHECK(k_pool.is_cuda(), "k_pool must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK(pair_aligned(k_pool),
              "k_pool must have even strides and an address aligned to two elements");
  check_t_theta(t_theta, k_in);
  const c10::cuda::CUDAGuard guard(k_pool.device());
  checked_frame_slots(frame_slots, height * width, k_pool.size(1));
  const at::Tensor tab_t =
      temporal_table_at(frame_pos, frames, theta, t_theta, k_in.size(3), k_pool.device());
  if (k_in.numel() == 0) return;
  // clone, not contiguous(): a contiguous tensor may still start misaligned.
  const at::Tensor k = pair_aligned(k_in) ? k_in : k_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor v = v_in;
  const Rope3dTables hw_tab =
      rope3d_tables(0, height, width, 0.0, theta, std::nullopt, k.size(3), k.device());
  const at::Tensor dev_slots = frame_slots.to(k.device(), at::kInt).contiguous();
  const RopeBands bands = rope_bands(k.size(3));
  Rope3dStoreParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_pool = k_pool.data_ptr();
  p.v_pool = v_pool.data_ptr();
  p.dtype = elem_type(k);
  p.batch = k.size(0);
  p.tokens = k.size(1);
  p.heads = k.size(2);
  p.head_dim = k.size(3);
  p.v_head_dim = v.size(3);
  p.k_stride_b = k.stride(0);
  p.k_stride_l = k.stride(1);
  p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0);
  p.v_stride_l = v.stride(1);
  p.v_stride_h = v.stride(2);
  p.kp_stride_b = k_pool.stride(0);
  p.kp_stride_l = k_pool.stride(1);
  p.kp_stride_h = k_pool.stride(2);
  p.vp_stride_b = v_pool.stride(0);
  p.vp_stride_l = v_pool.stride(1);
  p.vp_stride_h = v_pool.stride(2);
  p.height = height;
  p.width = width;
  p.frame_slots = dev_slots.data_ptr<int32_t>();
  p.c_t = static_cast<int>(bands.c_t);
  p.c_h = static_cast<int>(bands.c_h);
  p.c_w = static_cast<int>(bands.c_w);
  p.table_t = tab_t.data_ptr<float>();
  p.table_h = hw_tab.height.data_ptr<float>();
  p.table_w = hw_tab.width.data_ptr<float>();
  p.t_heads = static_cast<int>(tab_t.size(1));
  const int err = launch_rope3d_store(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "rope3d_store_ launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CUDA, m) { m.impl("rope3d_store_", &rope3d_store_cuda); }

}  // namespace vidstream
