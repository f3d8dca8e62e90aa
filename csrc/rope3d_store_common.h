// Input checks and tables shared by the CPU and CUDA bindings of rope3d_store_ (SPEC §6): the
// fused "rotate K by 3D RoPE at given frame positions, write K and V into pool slots" a streaming
// cache does once per chunk and layer instead of rope3d + two index copies.
#pragma once

#include "rope3d_common.h"

namespace vidstream {

inline void check_store_args(const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& k,
                             const at::Tensor& v, int64_t frames, int64_t height, int64_t width) {
  check_pool_like(k_pool, "k_pool");
  check_pool_like(k, "k");
  // Both pools are written in place: no element may alias another, nor k_pool v_pool.
  check_writable(k_pool);
  check_writable(v_pool);
  at::assert_no_overlap(k_pool, v_pool);
  TORCH_CHECK(v_pool.dim() == 4, "v_pool must be 4-D [B, P, H_kv, Dv], got ", v_pool.dim(), "-D");
  TORCH_CHECK(v.dim() == 4, "v must be 4-D [B, L, H_kv, Dv], got ", v.dim(), "-D");
  TORCH_CHECK(v_pool.stride(3) == 1 && v.stride(3) == 1,
              "v and v_pool must be contiguous in the head dim (stride(3) == 1)");
  for (const at::Tensor* t : {&v_pool, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == k_pool.scalar_type(), "k, v and v_pool must have the dtype of "
                "k_pool (", k_pool.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == k_pool.device(), "k, v and v_pool must be on the device of k_pool");
  }
  TORCH_CHECK(k.size(0) == k_pool.size(0) && v.size(0) == k_pool.size(0) &&
                  v_pool.size(0) == k_pool.size(0),
              "k, v, k_pool and v_pool must have the same batch size, got ", k.size(0), ", ",
              v.size(0), ", ", k_pool.size(0), ", ", v_pool.size(0));
  TORCH_CHECK(k.size(2) == k_pool.size(2) && k.size(3) == k_pool.size(3),
              "k must have the heads and head dim of k_pool (", k_pool.size(2), ", ", k_pool.size(3),
              "), got (", k.size(2), ", ", k.size(3), ")");
  TORCH_CHECK(v.size(2) == v_pool.size(2) && v.size(3) == v_pool.size(3),
              "v must have the heads and head dim of v_pool (", v_pool.size(2), ", ", v_pool.size(3),
              "), got (", v.size(2), ", ", v.size(3), ")");
  TORCH_CHECK(v_pool.size(1) == k_pool.size(1) && v_pool.size(2) == k_pool.size(2),
              "v_pool must have the tokens and heads of k_pool (", k_pool.size(1), ", ",
              k_pool.size(2), "), got (", v_pool.size(1), ", ", v_pool.size(2), ")");
  TORCH_CHECK(v.size(1) == k.size(1), "v must have the tokens of k (", k.size(1), "), got ", v.size(1));
  TORCH_CHECK(height > 0 && width > 0 && frames * height * width == k.size(1),
              "frame_slots [F] with (height, width) = (", height, ", ", width,
              ") must have F*height*width == L = ", k.size(1), ", got F = ", frames);
}

// frame_slots int32 [F]: the first pool token of each frame's height*width tokens. Each
// destination must lie inside the pool and no two may overlap (the kernels write them in
// parallel). Returns the slots on the host.
inline std::vector<int64_t> checked_frame_slots(const at::Tensor& frame_slots, int64_t frame_tokens,
                                                int64_t pool_len) {
  TORCH_CHECK(frame_slots.scalar_type() == at::kInt, "frame_slots must be int32, got ",
              frame_slots.scalar_type());
  TORCH_CHECK(frame_slots.dim() == 1, "frame_slots must be 1-D [F], got ", frame_slots.sizes());
  at::Tensor host = frame_slots.to(at::kCPU).contiguous();
  const int32_t* p = host.data_ptr<int32_t>();
  std::vector<int64_t> out(host.size(0));
  for (int64_t f = 0; f < host.size(0); ++f) {
    out[f] = p[f];
    TORCH_CHECK(out[f] >= 0 && out[f] + frame_tokens <= pool_len, "frame_slots[", f, "] = ", out[f],
                " must satisfy 0 <= slot and slot + frame_tokens (", frame_tokens, ") <= ", pool_len);
  }
  std::vector<int64_t> sorted = out;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 1; i < sorted.size(); ++i)
    TORCH_CHECK(sorted[i] >= sorted[i - 1] + frame_tokens, "frame_slots must not overlap: slots ",
                sorted[i - 1], " and ", sorted[i], " are closer than frame_tokens = ", frame_tokens);
  return out;
}

// Temporal (cos, sin) table [F, Ht, c_t, 2] at the float64 positions frame_pos[f]: the same
// construction as a shift by frame_pos, so rope3d_store_ at positions a + t rotates exactly
// like rope3d with frame_offset a.
inline at::Tensor temporal_table_at(const at::Tensor& frame_pos, int64_t frames, double theta,
                                    const std::optional<at::Tensor>& t_theta, int64_t head_dim,
                                    at::Device device) {
  TORCH_CHECK(frame_pos.dim() == 1 && frame_pos.size(0) == frames,
              "frame_pos must have shape [F] = [", frames, "], got ", frame_pos.sizes());
  return shift_table(frame_pos, frames, theta, t_theta, head_dim, device);
}

}  // namespace vidstream
