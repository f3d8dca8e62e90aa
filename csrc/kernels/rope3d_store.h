// Torch-free interface of the rope3d_store_ CUDA kernel (docs/spec.md §6, the cache write).
#pragma once

#include <cstdint>

#include "elem_type.h"

namespace vidstream {

// Rotates k [B, L, H, D] (token grid F x height x width) by the 3D RoPE, frame f at the
// temporal table row f, and writes it and v [B, L, H, Dv] to pool tokens frame_slots[f] + j.
struct Rope3dStoreParams {
  const void* k;
  const void* v;
  void* k_pool;
  void* v_pool;
  ElemType dtype;
  int64_t batch, tokens, heads, head_dim, v_head_dim, pool_tokens;
  int64_t k_stride_b, k_stride_l, k_stride_h;  // in elements; the head dim is contiguous
  int64_t v_stride_b, v_stride_l, v_stride_h;
  int64_t kp_stride_b, kp_stride_l, kp_stride_h;
  int64_t vp_stride_b, vp_stride_l, vp_stride_h;
  int64_t height, width;
  // device [F], unchecked values: a frame whose slot does not fit in the pool is not written.
  const int32_t* frame_slots;
  int c_t, c_h, c_w;
  const float* table_t;  // [F, t_heads, c_t, 2] (cos, sin) at the frame positions
  const float* table_h;  // [height, c_h, 2]
  const float* table_w;  // [width, c_w, 2]
  int t_heads;
};

// Returns 0 on success or a cudaError_t value.
int launch_rope3d_store(const Rope3dStoreParams& p, void* stream);

}  // namespace vidstream
