// Input checks and host-side planning shared by the CPU and CUDA bindings of chunk_attention
// (SPEC §1) and cached_attention (SPEC §2).
//
// Both forms reduce to one primitive: a block of queries attends the union of a few key token
// ranges. For chunk_attention every query of chunk c sees the same keys,
//   [0, min(sink, end) * frame_tokens)  and  [max(0, end - window) * frame_tokens, end * frame_tokens)
// with end = (c + 1) * chunk_frames, so a query tile that never straddles a chunk boundary needs no
// mask at all: tiles the mask excludes are simply never visited.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "ranges_common.h"

namespace vidstream {

using TokenRange = std::pair<int64_t, int64_t>;  // half-open [start, end)

inline void check_attention_tensor(const at::Tensor& t, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D ", dims, ", got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// q [B, Lq, H, D], k [B, Lk, H_kv, D], v [B, Lk, H_kv, Dv].
inline void check_attention_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const char* k_name, const char* v_name) {
  check_attention_tensor(q, "q", "[B, L, H, D]");
  check_attention_tensor(k, k_name, "[B, L, H_kv, D]");
  check_attention_tensor(v, v_name, "[B, L, H_kv, Dv]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), k_name,
              " and ", v_name, " must have the dtype of q (", q.scalar_type(), "), got ",
              k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), k_name, " and ", v_name,
              " must be on the device of q (", q.device(), ")");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ: q ",
              q.size(0), ", ", k_name, " ", k.size(0), ", ", v_name, " ", v.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), k_name, " head dim must equal q's (", q.size(3), "), got ",
              k.size(3));
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), v_name,
              " must have the tokens and heads of ", k_name, " (", k.size(1), ", ", k.size(2),
              "), got (", v.size(1), ", ", v.size(2), ")");
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, k_name, " has ", k.size(2),
              " heads; the query heads (", q.size(2), ") must be a multiple of it");
}

struct ChunkMaskParams {
  int64_t frame_tokens, chunk_frames, sink_frames;
  std::optional<int64_t> window_frames;
};

inline void check_chunk_params(const at::Tensor& q, const at::Tensor& k, const ChunkMaskParams& c) {
  TORCH_CHECK(k.size(1) == q.size(1), "k must have the tokens of q (", q.size(1), "), got ",
              k.size(1));
  TORCH_CHECK(c.frame_tokens >= 1, "frame_tokens must be >= 1, got ", c.frame_tokens);
  TORCH_CHECK(c.chunk_frames >= 1, "chunk_frames must be >= 1, got ", c.chunk_frames);
  TORCH_CHECK(c.sink_frames >= 0, "sink_frames must be >= 0, got ", c.sink_frames);
  TORCH_CHECK(q.size(1) % c.frame_tokens == 0, "the sequence length L = ", q.size(1),
              " must be a multiple of frame_tokens = ", c.frame_tokens);
  if (c.window_frames) {
    TORCH_CHECK(*c.window_frames >= c.chunk_frames, "window_frames must be >= chunk_frames = ",
                c.chunk_frames, ", got ", *c.window_frames);
  }
}

// The key ranges (at most two, non-empty, disjoint, ascending) every query of chunk `c` attends.
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

// kv_ranges checked (ranges_common.h); the non-empty ones, ascending.
inline std::vector<TokenRange> checked_kv_ranges(const at::Tensor& ranges, int64_t pool_len,
                                                 const char* name = "kv_ranges") {
  std::vector<TokenRange> out;
  for (const auto& r : checked_ranges(ranges, pool_len, name))
    if (r.first < r.second) out.emplace_back(r.first, r.second);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace vidstream
