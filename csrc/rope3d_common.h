// Rotation tables shared by the CPU and CUDA bindings of the rope3d ops (rope3d, rope3d_shift_,
// rope3d_store_). Tables are built in float64 with ATen, then stored as float32 (cos, sin)
// pairs, so every backend rotates by the same correctly rounded angles whatever the position
// magnitude.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace vidstream {

struct RopeBands {
  int64_t c_t, c_h, c_w;  // rotation pairs per band
};

inline RopeBands rope_bands(int64_t head_dim) {
  const int64_t c = head_dim / 2;
  return {c - 2 * (c / 3), c / 3, c / 3};
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

// The inverse rotation (rope3d's backward, rope3d(..., inverse=True)): every angle negated.
inline Rope3dTables inverse_tables(Rope3dTables t) {
  for (at::Tensor* x : {&t.temporal, &t.height, &t.width}) x->select(-1, 1).neg_();
  return t;
}

// [R, Ht, c_t, 2] table of the temporal rotation by positions[r] (float64 host values): the
// re-rotation of rope3d_shift_ by delta_frames, and rope3d_store_'s rotation at frame_pos,
// which so rotates at positions a + t exactly like rope3d with frame_offset a.
inline at::Tensor temporal_table(const at::Tensor& positions, double theta,
                                 const std::optional<at::Tensor>& t_theta, int64_t head_dim,
                                 at::Device device) {
  const RopeBands b = rope_bands(head_dim);
  at::Tensor d = positions.to(device, at::kDouble);
  at::Tensor om_t = band_omega(b.c_t, theta, t_theta, device);
  at::Tensor ang = t_theta ? d.view({-1, 1, 1}) * om_t.unsqueeze(0)
                           : (d.view({-1, 1}) * om_t.unsqueeze(0)).unsqueeze(1);
  return cos_sin_table(ang);
}

// rope3d_store_'s tables: the temporal one at the frame positions, those of rows and columns as
// rope3d's.
inline Rope3dTables rope3d_store_tables(const at::Tensor& frame_pos, int64_t height, int64_t width,
                                        double theta, const std::optional<at::Tensor>& t_theta,
                                        int64_t head_dim, at::Device device) {
  Rope3dTables tab =
      rope3d_tables(0, height, width, 0.0, theta, std::nullopt, head_dim, device);
  tab.temporal = temporal_table(frame_pos, theta, t_theta, head_dim, device);
  return tab;
}

// The band sizes and tables of `tab` as the CUDA params structs name them.
template <typename Params>
void set_rope_tables(Params& p, const Rope3dTables& tab, int64_t head_dim) {
  const RopeBands bands = rope_bands(head_dim);
  p.c_t = static_cast<int>(bands.c_t);
  p.c_h = static_cast<int>(bands.c_h);
  p.c_w = static_cast<int>(bands.c_w);
  p.table_t = tab.temporal.data_ptr<float>();
  p.table_h = tab.height.data_ptr<float>();
  p.table_w = tab.width.data_ptr<float>();
  p.t_heads = static_cast<int>(tab.temporal.size(1));
}

}  // namespace vidstream
