// Input checks and rotation tables shared by the CPU and CUDA bindings of the rope3d ops.
// Tables are built in float64 with ATen, then stored as float32 (cos, sin) pairs, so every
// backend rotates by the same correctly rounded angles whatever the position magnitude.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "ranges_common.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace vidstream {

struct RopeBands {
  int64_t c_t, c_h, c_w;  // rotation pairs per band
};

inline RopeBands rope_bands(int64_t head_dim) {
  const int64_t c = head_dim / 2;
  return {c - 2 * (c / 3), c / 3, c / 3};
}

inline void check_pool_like(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, " must be 4-D [B, L, H, D], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(3) % 2 == 0, name, " head dim D must be even, got ", x.size(3));
  TORCH_CHECK(x.size(3) >= 2, name, " head dim D must be >= 2, got ", x.size(3));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.stride(3) == 1, name, " must be contiguous in the head dim (stride(3) == 1)");
}

// A pool written in place must not have elements that share memory (an expanded view, say):
// parallel writers would race on them.
inline void check_writable(const at::Tensor& t) { at::assert_no_internal_overlap(t); }

inline void check_t_theta(const std::optional<at::Tensor>& t_theta, const at::Tensor& x) {
  if (!t_theta) return;
  TORCH_CHECK(t_theta->dim() == 1 && t_theta->size(0) == x.size(2),
              "t_theta must have shape [H] = [", x.size(2), "], got ", t_theta->sizes());
  TORCH_CHECK(at::isFloatingType(t_theta->scalar_type()), "t_theta must be floating point, got ",
              t_theta->scalar_type());
}

// omega[p'] = theta^(-2 p' / (2 n)) for p' < n, float64 on `device`; shape [n], or [H, n]
// with a per-head theta.
inline at::Tensor band_omega(int64_t n, double theta, const std::optional<at::Tensor>& per_head,
                             at::Device device) {
  auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor expo = at::arange(n, opts).mul(-2.0 / (2.0 * n));
  if (!per_head) return at::pow(theta, expo);
  at::Tensor th = per_head->to(device, at::kDouble).unsqueeze(1);  // [H, 1]
  return at::pow(th, expo.unsqueeze(0));                           // [H, n]
}

// (cos, sin) of angle, interleaved as float32 in the last dim: [..., n, 2].
inline at::Tensor cos_sin_table(const at::Tensor& angle) {
  return at::stack({at::cos(angle), at::sin(angle)}, -1).to(at::kFloat).contiguous();
}

struct Rope3dTables {
  at::Tensor temporal;  // [F, Ht, c_t, 2], Ht = H with t_theta else 1
  at::Tensor height;    // [h, c_h, 2]
  at::Tensor width;     // [w, c_w, 2]
};

inline Rope3dTables rope3d_tables(int64_t frames, int64_t height, int64_t width,
                                  double frame_offset, double theta,
                                  const std::optional<at::Tensor>& t_theta, int64_t head_dim,
                                  at::Device device) {
  const RopeBands b = rope_bands(head_dim);
  auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor t_pos = at::arange(frames, opts).add(frame_offset);
  at::Tensor om_t = band_omega(b.c_t, theta, t_theta, device);  // [c_t] or [H, c_t]
  at::Tensor ang_t = t_theta ? t_pos.view({-1, 1, 1}) * om_t.unsqueeze(0)
                             : (t_pos.view({-1, 1}) * om_t.unsqueeze(0)).unsqueeze(1);
  at::Tensor ang_h = at::arange(height, opts).view({-1, 1}) *
                     band_omega(b.c_h, theta, std::nullopt, device).unsqueeze(0);
  at::Tensor ang_w = at::arange(width, opts).view({-1, 1}) *
                     band_omega(b.c_w, theta, std::nullopt, device).unsqueeze(0);
  return {cos_sin_table(ang_t), cos_sin_table(ang_h), cos_sin_table(ang_w)};
}

// [R, Ht, c_t, 2] table of the temporal re-rotation by delta_frames[r].
inline at::Tensor shift_table(const at::Tensor& delta_frames, int64_t num_ranges, double theta,
                              const std::optional<at::Tensor>& t_theta, int64_t head_dim,
                              at::Device device) {
  TORCH_CHECK(delta_frames.dim() == 1 && delta_frames.size(0) == num_ranges,
              "delta_frames must have shape [R] = [", num_ranges, "], got ", delta_frames.sizes());
  const RopeBands b = rope_bands(head_dim);
  at::Tensor d = delta_frames.to(device, at::kDouble);
  at::Tensor om_t = band_omega(b.c_t, theta, t_theta, device);
  at::Tensor ang = t_theta ? d.view({-1, 1, 1}) * om_t.unsqueeze(0)
                           : (d.view({-1, 1}) * om_t.unsqueeze(0)).unsqueeze(1);
  return cos_sin_table(ang);
}

}  // namespace vidstream
