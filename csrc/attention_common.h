// Host-side planning shared by the CPU and CUDA bindings of chunk_attention (docs/spec.md §1) and
// cached_attention (§2).
//
// Both forms reduce to one primitive: a block of queries attends the union of a few key token
// ranges. For chunk_attention every query of chunk c sees the same keys,
//   [0, min(sink, end) * frame_tokens)  and  [max(0, end - window) * frame_tokens, end * frame_tokens)
// with end = (c + 1) * chunk_frames, so a query tile that never straddles a chunk boundary needs no
// mask at all: tiles the mask excludes are simply never visited.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "ranges.h"
#include "rope3d_common.h"

namespace vidstream {

struct ChunkMaskParams {
  int64_t frame_tokens, chunk_frames, sink_frames;
  std::optional<int64_t> window_frames;
};

// The key ranges every query of chunk `c` attends, ascending: at most two, disjoint; for
// parameters Python would refuse (a window shorter than a chunk, say) one may be empty or
// inverted, which the kernels skip.
inline std::vector<TokenRange> chunk_key_ranges(const ChunkMaskParams& p, int64_t c,
                                                int64_t seq_len) {
  const int64_t end = (c + 1) * p.chunk_frames;  // first frame after the chunk
  const int64_t end_tok = std::min(end * p.frame_tokens, seq_len);
  if (!p.window_frames) return {{0, end_tok}};
  const int64_t sink_tok = std::min(std::min(p.sink_frames, end) * p.frame_tokens, end_tok);
  const int64_t win_tok = std::max<int64_t>(0, end - *p.window_frames) * p.frame_tokens;
  if (sink_tok >= win_tok) return {{0, end_tok}};
  std::vector<TokenRange> out;
  if (sink_tok > 0) out.emplace_back(0, sink_tok);
  out.emplace_back(win_tok, end_tok);
  return out;
}

inline int64_t num_chunks(const ChunkMaskParams& p, int64_t seq_len) {
  const int64_t chunk_tok = p.chunk_frames * p.frame_tokens;
  return (seq_len + chunk_tok - 1) / chunk_tok;
}

// cached_attention's kv_deltas as the kernels read them: temporal_table()'s float32 (cos, sin)
// [R, Ht, c_t, 2] on k_pool's device, Ht = H_kv with t_theta, else 1: the angles rope3d_shift_
// rotates by, so reading a key through its row equals reading it after rope3d_shift_.
inline at::Tensor key_shift_table(const at::Tensor& kv_deltas,
                                  const std::optional<at::Tensor>& t_theta, size_t num_ranges,
                                  const at::Tensor& k_pool, double theta) {
  check_range_deltas(kv_deltas, static_cast<int64_t>(num_ranges), "kv_deltas");
  TORCH_CHECK(!t_theta || (t_theta->dim() == 1 && t_theta->size(0) == k_pool.size(2)),
              "t_theta must have shape [H_kv] = [", k_pool.size(2), "]");
  return temporal_table(kv_deltas, theta, t_theta, k_pool.size(3), k_pool.device());
}

// Points a kernel's params struct (CPU AttnProblem or CUDA AttentionParams: the same field
// names) at q [B, Lq, H, D], k, v [B, Lk, H_kv, *], out [B, Lq, H, Dv] and lse [B, H, Lq].
template <typename Params>
void set_attention_views(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         at::Tensor& out, at::Tensor& lse) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.heads = static_cast<decltype(p.heads)>(q.size(2));
  p.kv_heads = static_cast<decltype(p.kv_heads)>(k.size(2));
  p.head_dim = static_cast<decltype(p.head_dim)>(q.size(3));
  p.q_sb = q.stride(0), p.q_sl = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_sl = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_sl = v.stride(1), p.v_sh = v.stride(2);
  p.o_sb = out.stride(0), p.o_sl = out.stride(1), p.o_sh = out.stride(2);
}

}  // namespace vidstream
