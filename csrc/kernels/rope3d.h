// Torch-free interface of the rope3d CUDA kernels: one params struct per op and a launcher.
// Included by the torch bindings (compiled by the host compiler) and by rope3d.cu (nvcc).
#pragma once

#include <cstdint>

#include "elem_type.h"

namespace vidstream {

// Out-of-place 3D RoPE of x [B, L, H, D] into out (same shape).
struct Rope3dParams {
  const void* x;
  void* out;
  ElemType dtype;
  int64_t batch, tokens, heads, head_dim;
  int64_t x_stride_b, x_stride_l, x_stride_h;  // in elements; head dim is contiguous
  int64_t o_stride_b, o_stride_l, o_stride_h;
  int64_t height, width;      // token grid of one frame
  int c_t, c_h, c_w;          // rotation pairs per band
  const float* table_t;       // [F, t_heads, c_t, 2] (cos, sin)
  const float* table_h;       // [height, c_h, 2]
  const float* table_w;       // [width, c_w, 2]
  int t_heads;                // 1, or heads when each head has its own temporal theta
  int vec_pairs;              // pairs per vector access: 2 when D/2 is even and x, out are
                              // aligned to 4 elements, else 1
};

// In-place temporal re-rotation of the token ranges of pool [B, P, H, D].
struct Rope3dShiftParams {
  void* pool;
  ElemType dtype;
  int64_t batch, tokens, heads, head_dim;  // tokens: the pool's P
  int64_t stride_b, stride_l, stride_h;     // in elements
  const int32_t* ranges;  // device [R, 2], unchecked values: the kernel clamps them to the pool
  int num_ranges;
  int c_t;
  const float* table;  // [R, t_heads, c_t, 2] (cos, sin)
  int t_heads;
  int vec_pairs;  // pairs per vector access: 2 when c_t is even and the pool is aligned to 4
                  // elements, else 1
};

// Both return 0 on success or a cudaError_t value.
int launch_rope3d(const Rope3dParams& p, void* stream);
int launch_rope3d_shift(const Rope3dShiftParams& p, void* stream);

}  // namespace vidstream
