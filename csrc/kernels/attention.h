// Torch-free interface of the chunk_attention / cached_attention CUDA kernels (docs/spec.md §1,
// §2).
// Included by the torch binding (host compiler) and by attention.cu (nvcc).
#pragma once

#include <cstdint>

#include "elem_type.h"

namespace vidstream {

struct AttentionParams {
  const void* q;  // [B, Lq, H, D]
  const void* k;  // [B, Lk, H_kv, D]
  const void* v;  // [B, Lk, H_kv, D]
  void* out;      // [B, Lq, H, D], head dim contiguous
  float* lse;     // [B, H, Lq]
  ElemType dtype;  // kFloat16 or kBFloat16
  int batch, heads, kv_heads, head_dim;
  int64_t q_len, kv_len;
  // In elements. Rows (stride_l) and head offsets are multiples of 8 elements, base pointers
  // 16-byte aligned: the kernel moves 8 elements per vector load.
  int64_t q_sb, q_sl, q_sh, k_sb, k_sl, k_sh, v_sb, v_sl, v_sh, o_sb, o_sl, o_sh;
  float scale_log2;  // softmax scale times log2(e)
  // chunk_attention only: the mask of docs/spec.md §1; window_frames < 0 means no window.
  int64_t frame_tokens, chunk_frames, sink_frames, window_frames;
  // cached_attention only: device int32 [num_ranges, 2], unchecked values: the kernel clamps
  // each range to [0, kv_len] and skips empty ones.
  const int32_t* ranges;
  int num_ranges;
  // cached_attention's kv_deltas (k_rot == nullptr: none): device float32 (cos, sin) pairs,
  // those of range r (the r-th row of ranges) and kv head h at k_rot + r * k_rot_sr +
  // h * k_rot_sh (temporal_table(); k_rot_sh = 0 for one table head). Each key's first
  // 2 * k_rot_pairs channels are rotated by its range's pairs as its tile is loaded.
  const float* k_rot;
  int64_t k_rot_sr, k_rot_sh;
  int k_rot_pairs;
};

// Both return 0 on success or a cudaError_t value. Head dims 64 and 128, sm_80+.
int launch_chunk_attention(const AttentionParams& p, void* stream);
int launch_cached_attention(const AttentionParams& p, void* stream);

}  // namespace vidstream
