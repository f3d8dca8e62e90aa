// The C++ ops' own checks of their tensors. Every user-facing check, with its ValueError naming
// the argument, is in Python (vidstream/ops/); an op called directly must still not read or write
// outside its tensors, so here is what the kernels rely on, and no more: ranks, the dtypes a
// kernel serves, devices, the sizes index arithmetic uses, and in-place outputs whose elements
// do not alias. None of these reads tensor data. Index tensors: ranges.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <optional>

namespace vidstream {

// ---------------------------------------------------------------------------- any op

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == rank, name, " must be ", rank, "-D ", dims, ", got ", t.dim(), "-D");
}

// The element types every kernel is compiled for.
inline void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// b is read with a's element type, on a's device.
inline void check_same(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), nb, " must have the dtype of ", na, " (",
              a.scalar_type(), "), got ", b.scalar_type());
  TORCH_CHECK(b.device() == a.device(), nb, " must be on the device of ", na, " (", a.device(),
              "), got ", b.device());
}

// The tensors a CPU kernel is handed are on the CPU, a CUDA kernel's on a GPU.
inline void check_kernel_device(const at::Tensor& t, const char* name, at::DeviceType kernel) {
  const char* kind = kernel == at::kCPU ? "CPU" : "CUDA";
  TORCH_CHECK(t.device().type() == kernel, name, " must be a ", kind, " tensor for the ", kind,
              " kernel");
}

// Parallel writers of an in-place output would race on elements that share memory (an
// expanded view, say).
inline void check_writable(const at::Tensor& t) { at::assert_no_internal_overlap(t); }

inline void check_gqa(int64_t heads, int64_t kv_heads, const char* kv_name) {
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, kv_name, " has ", kv_heads,
              " heads; the query heads (", heads, ") must be a multiple of it");
}

// ---------------------------------------------------------------------------- RoPE family

// x [B, L, H, D]: the kernels rotate (even, odd) pairs along a contiguous head dim.
inline void check_rope_tensor(const at::Tensor& x, const char* name) {
  check_rank(x, 4, name, "[B, L, H, D]");
  TORCH_CHECK(x.size(3) % 2 == 0, name, " head dim D must be even, got ", x.size(3));
  TORCH_CHECK(x.size(3) >= 2, name, " head dim D must be >= 2, got ", x.size(3));
  check_float_dtype(x, name);
  TORCH_CHECK(x.stride(3) == 1, name, " must be contiguous in the head dim (stride(3) == 1)");
}

// A per-head theta builds one temporal table row per head of x.
inline void check_t_theta(const std::optional<at::Tensor>& t_theta, const at::Tensor& x) {
  if (!t_theta) return;
  TORCH_CHECK(t_theta->dim() == 1 && t_theta->size(0) == x.size(2),
              "t_theta must have shape [H] = [", x.size(2), "], got ", t_theta->sizes());
}

// One table row per range or frame.
inline void check_positions(const at::Tensor& pos, int64_t n, const char* name, const char* dims) {
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == n, name, " must have shape ", dims, " = [", n,
              "], got ", pos.sizes());
}

// The grid's frames index the temporal table, its rows and columns the others.
inline void check_rope3d_args(const at::Tensor& x, int64_t frames, int64_t height, int64_t width,
                              const std::optional<at::Tensor>& t_theta, at::DeviceType kernel) {
  check_rope_tensor(x, "x");
  check_kernel_device(x, "x", kernel);
  TORCH_CHECK(frames >= 0 && height > 0 && width > 0 && frames * height * width == x.size(1),
              "grid (F, h, w) = (", frames, ", ", height, ", ", width,
              ") must have F*h*w == L = ", x.size(1));
  check_t_theta(t_theta, x);
}

// rope3d_shift_'s pool, rotated in place; its ranges: ranges.h, delta_frames: check_positions.
inline void check_rope3d_shift_pool(const at::Tensor& k_pool,
                                    const std::optional<at::Tensor>& t_theta,
                                    at::DeviceType kernel) {
  check_rope_tensor(k_pool, "k_pool");
  check_kernel_device(k_pool, "k_pool", kernel);
  check_writable(k_pool);
  check_t_theta(t_theta, k_pool);
}

// rope3d_store_: k [B, L, H, D] and v [B, L, H, Dv] into the pools k_pool [B, P, H, D] and
// v_pool [B, P, H, Dv] at frames of height*width tokens.
inline void check_rope3d_store_args(const at::Tensor& k_pool, const at::Tensor& v_pool,
                                    const at::Tensor& k, const at::Tensor& v, int64_t frames,
                                    const at::Tensor& frame_pos, int64_t height, int64_t width,
                                    const std::optional<at::Tensor>& t_theta,
                                    at::DeviceType kernel) {
  check_rope_tensor(k_pool, "k_pool");
  check_kernel_device(k_pool, "k_pool", kernel);
  check_rope_tensor(k, "k");
  // Both pools are written in place: no element may alias another, nor k_pool v_pool.
  check_writable(k_pool);
  check_writable(v_pool);
  at::assert_no_overlap(k_pool, v_pool);
  check_rank(v_pool, 4, "v_pool", "[B, P, H_kv, Dv]");
  check_rank(v, 4, "v", "[B, L, H_kv, Dv]");
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
              "k must have the heads and head dim of k_pool (", k_pool.size(2), ", ",
              k_pool.size(3), "), got (", k.size(2), ", ", k.size(3), ")");
  TORCH_CHECK(v.size(2) == v_pool.size(2) && v.size(3) == v_pool.size(3),
              "v must have the heads and head dim of v_pool (", v_pool.size(2), ", ",
              v_pool.size(3), "), got (", v.size(2), ", ", v.size(3), ")");
  TORCH_CHECK(v_pool.size(1) == k_pool.size(1) && v_pool.size(2) == k_pool.size(2),
              "v_pool must have the tokens and heads of k_pool (", k_pool.size(1), ", ",
              k_pool.size(2), "), got (", v_pool.size(1), ", ", v_pool.size(2), ")");
  TORCH_CHECK(v.size(1) == k.size(1), "v must have the tokens of k (", k.size(1), "), got ",
              v.size(1));
  TORCH_CHECK(height > 0 && width > 0 && frames * height * width == k.size(1),
              "frame_slots [F] with (height, width) = (", height, ", ", width,
              ") must have F*height*width == L = ", k.size(1), ", got F = ", frames);
  check_t_theta(t_theta, k);
  check_positions(frame_pos, frames, "frame_pos", "[F]");
}

// ---------------------------------------------------------------------------- attention

// q [B, Lq, H, D], k [B, Lk, H_kv, D], v [B, Lk, H_kv, Dv] for a `kernel` kernel.
inline void check_attention_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const char* k_name, const char* v_name, at::DeviceType kernel) {
  check_rank(q, 4, "q", "[B, L, H, D]");
  check_rank(k, 4, k_name, "[B, L, H_kv, D]");
  check_rank(v, 4, v_name, "[B, L, H_kv, Dv]");
  check_float_dtype(q, "q");
  check_kernel_device(q, "q", kernel);
  check_same(q, "q", k, k_name);
  check_same(q, "q", v, v_name);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ: q ",
              q.size(0), ", ", k_name, " ", k.size(0), ", ", v_name, " ", v.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), k_name, " head dim must equal q's (", q.size(3), "), got ",
              k.size(3));
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), v_name,
              " must have the tokens and heads of ", k_name, " (", k.size(1), ", ", k.size(2),
              "), got (", v.size(1), ", ", v.size(2), ")");
  check_gqa(q.size(2), k.size(2), k_name);
}

// The mask arithmetic divides by frame_tokens and chunk_frames and reads keys up to Lq.
inline void check_chunk_attention_args(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, int64_t frame_tokens,
                                       int64_t chunk_frames, at::DeviceType kernel) {
  check_attention_qkv(q, k, v, "k", "v", kernel);
  TORCH_CHECK(k.size(1) == q.size(1), "k must have the tokens of q (", q.size(1), "), got ",
              k.size(1));
  TORCH_CHECK(frame_tokens >= 1, "frame_tokens must be >= 1, got ", frame_tokens);
  TORCH_CHECK(chunk_frames >= 1, "chunk_frames must be >= 1, got ", chunk_frames);
}

// ---------------------------------------------------------------------------- low-rank KV

// c_pool [B, P, d_c], w_uk [H, d_c, d_nope], w_uv [H, d_c, d_v], k_r_pool [B, P, d_r] for a
// `kernel` kernel.
inline void check_lowrank_args(const at::Tensor& c_pool, const at::Tensor& w_uk,
                               const at::Tensor& w_uv, const std::optional<at::Tensor>& k_r_pool,
                               at::DeviceType kernel) {
  check_rank(c_pool, 3, "c_pool", "[B, P, d_c]");
  check_rank(w_uk, 3, "w_uk", "[H, d_c, d_nope]");
  check_rank(w_uv, 3, "w_uv", "[H, d_c, d_v]");
  check_float_dtype(c_pool, "c_pool");
  check_kernel_device(c_pool, "c_pool", kernel);
  check_same(c_pool, "c_pool", w_uk, "w_uk");
  check_same(c_pool, "c_pool", w_uv, "w_uv");
  TORCH_CHECK(w_uk.size(1) == c_pool.size(2), "w_uk must have shape [H, d_c=", c_pool.size(2),
              ", d_nope], got ", w_uk.sizes());
  TORCH_CHECK(w_uv.size(0) == w_uk.size(0) && w_uv.size(1) == c_pool.size(2),
              "w_uv must have shape [H=", w_uk.size(0), ", d_c=", c_pool.size(2), ", d_v], got ",
              w_uv.sizes());
  if (!k_r_pool) return;
  check_rank(*k_r_pool, 3, "k_r_pool", "[B, P, d_r]");
  check_same(c_pool, "c_pool", *k_r_pool, "k_r_pool");
  TORCH_CHECK(k_r_pool->size(0) == c_pool.size(0) && k_r_pool->size(1) == c_pool.size(1),
              "k_r_pool must have the batch and tokens of c_pool (", c_pool.size(0), ", ",
              c_pool.size(1), "), got ", k_r_pool->sizes());
}

// q [B, Lq, H, d_nope + d_r] against the latent cache.
inline void check_lowrank_query(const at::Tensor& q, const at::Tensor& c_pool,
                                const at::Tensor& w_uk, const std::optional<at::Tensor>& k_r_pool) {
  check_rank(q, 4, "q", "[B, Lq, H, d_nope + d_r]");
  check_same(c_pool, "c_pool", q, "q");
  const int64_t dq = w_uk.size(2) + (k_r_pool ? k_r_pool->size(2) : 0);
  TORCH_CHECK(q.size(0) == c_pool.size(0) && q.size(2) == w_uk.size(0) && q.size(3) == dq,
              "q must have shape [B=", c_pool.size(0), ", Lq, H=", w_uk.size(0),
              ", d_nope + d_r = ", dq, "], got ", q.sizes());
}

// ---------------------------------------------------------------------------- select_blocks

// q [B, Lq, H, D], k_pool [B, P, H_kv, D] for a `kernel` kernel; `heads` index q's heads,
// query_stride and k size the sampled rows and the index output.
inline void check_select_blocks_args(const at::Tensor& q, const at::Tensor& k_pool, int64_t k,
                                     int64_t query_stride, at::IntArrayRef heads,
                                     at::DeviceType kernel) {
  check_rank(q, 4, "q", "[B, Lq, H, D]");
  check_rank(k_pool, 4, "k_pool", "[B, P, H_kv, D]");
  check_float_dtype(q, "q");
  check_same(q, "q", k_pool, "k_pool");
  TORCH_CHECK(k_pool.size(0) == q.size(0) && k_pool.size(3) == q.size(3),
              "k_pool must have q's batch and head dim (", q.size(0), ", ", q.size(3), "), got (",
              k_pool.size(0), ", ", k_pool.size(3), ")");
  check_gqa(q.size(2), k_pool.size(2), "k_pool");
  TORCH_CHECK(k >= 0, "k must be >= 0, got ", k);
  TORCH_CHECK(query_stride >= 1, "query_stride must be >= 1, got ", query_stride);
  for (const int64_t h : heads)
    TORCH_CHECK(h >= 0 && h < q.size(2), "heads must be query head indices in [0, ", q.size(2),
                "), got ", h);
  check_kernel_device(q, "q", kernel);
}

// block_key_sums [B, M, H_kv, D], one row per block of keys.
inline void check_block_key_sums(const std::optional<at::Tensor>& key_sums, const at::Tensor& q,
                                 const at::Tensor& k_pool, int64_t blocks) {
  if (!key_sums) return;
  const at::Tensor& s = *key_sums;
  TORCH_CHECK(s.dim() == 4 && s.size(0) == q.size(0) && s.size(1) == blocks &&
                  s.size(2) == k_pool.size(2) && s.size(3) == q.size(3),
              "block_key_sums must have shape [B, M, H_kv, D] = [", q.size(0), ", ", blocks, ", ",
              k_pool.size(2), ", ", q.size(3), "], got ", s.sizes());
  TORCH_CHECK(s.device() == q.device(), "block_key_sums must be on the device of q");
}

}  // namespace vidstream
