// C++ CPU kernels of chunk_attention (SPEC §1) and cached_attention (SPEC §2).
//
// Flash-style: a tile of queries streams over key blocks with an online softmax in float32;
// no L x L score matrix is ever formed. Query tiles never straddle a chunk, so each tile has
// one list of key ranges (attention_common.h) and the blocks the mask excludes are never
// visited; the only masking left is the tail of a range that does not fill a key block.
// Work is split over batch x heads x query tiles. The tile kernel (attention_cpu_tile.h) is
// compiled for AVX-512, AVX2 and the baseline, and picked at run time.
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_common.h"

namespace vidstream {
namespace cpu_attention {

constexpr int64_t kBlockQ = 128;  // query rows per tile
constexpr int64_t kBlockK = 64;  // keys per block

struct AttnProblem {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  at::ScalarType dtype;
  int64_t heads, kv_heads, head_dim, v_dim;
  int64_t q_sb, q_sl, q_sh, k_sb, k_sl, k_sh, v_sb, v_sl, v_sh, o_sb, o_sl, o_sh;  // elements
  int64_t lse_sh;  // tokens per (batch, head) row of lse
  double scale;
};

struct WorkItem {
  int64_t b, h, q0, nq;
  int64_t set;  // which key range list
};

using TileFn = void (*)(const AttnProblem&, const WorkItem&, const TokenRange*, int64_t, float*);
using ScratchFn = int64_t (*)(const AttnProblem&);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VIDSTREAM_X86_DISPATCH 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#endif
namespace avx512 {
#define VS 16
#define MR 4
#define NC 4
#include "attention_cpu_tile.h"
#undef VS
#undef MR
#undef NC
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
#define VS 8
#define MR 6
#define NC 2
#include "attention_cpu_tile.h"
#undef VS
#undef MR
#undef NC
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace baseline {
#define VS 4
#define MR 4
#define NC 2
#include "attention_cpu_tile.h"
#undef VS
#undef MR
#undef NC
}  // namespace baseline

struct Kernel {
  TileFn tile;
  ScratchFn scratch;
};

Kernel pick_kernel() {
#ifdef VIDSTREAM_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return {&avx512::attend_tile_any, &avx512::scratch_floats};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {&avx2::attend_tile_any, &avx2::scratch_floats};
#endif
  return {&baseline::attend_tile_any, &baseline::scratch_floats};
}

void run(const AttnProblem& p, const std::vector<WorkItem>& items,
         const std::vector<std::vector<TokenRange>>& range_sets) {
  static const Kernel kernel = pick_kernel();
  const int64_t scratch = kernel.scratch(p);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(scratch);
    for (int64_t n = begin; n < end; ++n) {
      const auto& set = range_sets[items[n].set];
      kernel.tile(p, items[n], set.data(), static_cast<int64_t>(set.size()), w.data());
    }
  });
}

// Splits query rows [lo, hi) into tiles of at most kBlockQ rows and nearly equal size, so a
// chunk of 192 rows gives two tiles of 96 rather than 128 + 64 (balanced threads).
template <typename F>
void for_each_tile(int64_t lo, int64_t hi, F&& f) {
  const int64_t n = hi - lo;
  if (n <= 0) return;
  const int64_t tiles = (n + kBlockQ - 1) / kBlockQ;
  const int64_t size = (n + tiles - 1) / tiles;
  for (int64_t q0 = lo; q0 < hi; q0 += size) f(q0, std::min(size, hi - q0));
}

AttnProblem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         at::Tensor& out, at::Tensor& lse, double scale) {
  AttnProblem p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dtype = q.scalar_type();
  p.heads = q.size(2);
  p.kv_heads = k.size(2);
  p.head_dim = q.size(3);
  p.v_dim = v.size(3);
  p.q_sb = q.stride(0), p.q_sl = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_sl = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_sl = v.stride(1), p.v_sh = v.stride(2);
  p.o_sb = out.stride(0), p.o_sl = out.stride(1), p.o_sh = out.stride(2);
  p.lse_sh = lse.size(2);
  p.scale = scale;
  return p;
}

// The kernel reads rows through strides but needs each head vector contiguous.
at::Tensor inner_contiguous(const at::Tensor& t) {
  return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> allocate(const at::Tensor& q, const at::Tensor& v) {
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> chunk_attention_cpu(const at::Tensor& q_in,
                                                       const at::Tensor& k_in,
                                                       const at::Tensor& v_in, int64_t frame_tokens,
                                                       int64_t chunk_frames, int64_t sink_frames,
                                                       std::optional<int64_t> window_frames,
                                                       double scale) {
  check_attention_qkv(q_in, k_in, v_in, "k", "v");
  TORCH_CHECK(q_in.device().is_cpu(), "q must be a CPU tensor for the CPU kernel");
  const ChunkMaskParams mp{frame_tokens, chunk_frames, sink_frames, window_frames};
  check_chunk_params(q_in, k_in, mp);
  const at::Tensor q = inner_contiguous(q_in), k = inner_contiguous(k_in),
                   v = inner_contiguous(v_in);
  auto [out, lse] = allocate(q, v);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2);
  std::vector<std::vector<TokenRange>> sets;
  std::vector<WorkItem> items;
  const int64_t chunk_tok = chunk_frames * frame_tokens;
  const int64_t chunks = num_chunks(mp, L);
  for (int64_t c = 0; c < chunks; ++c) {
    sets.push_back(chunk_key_ranges(mp, c, L));
    const int64_t lo = c * chunk_tok, hi = std::min(L, lo + chunk_tok);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for_each_tile(lo, hi, [&](int64_t q0, int64_t nq) { items.push_back({b, h, q0, nq, c}); });
  }
  if (!items.empty()) run(make_problem(q, k, v, out, lse, scale), items, sets);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> cached_attention_cpu(const at::Tensor& q_in,
                                                        const at::Tensor& k_in,
                                                        const at::Tensor& v_in,
                                                        const at::Tensor& kv_ranges, double scale) {
  check_attention_qkv(q_in, k_in, v_in, "k_pool", "v_pool");
  TORCH_CHECK(q_in.device().is_cpu(), "q must be a CPU tensor for the CPU kernel");
  std::vector<std::vector<TokenRange>> sets{checked_kv_ranges(kv_ranges, k_in.size(1))};
  const at::Tensor q = inner_contiguous(q_in), k = inner_contiguous(k_in),
                   v = inner_contiguous(v_in);
  auto [out, lse] = allocate(q, v);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2);
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for_each_tile(0, L, [&](int64_t q0, int64_t nq) { items.push_back({b, h, q0, nq, 0}); });
  if (!items.empty()) run(make_problem(q, k, v, out, lse, scale), items, sets);
  return {out, lse};
}

}  // namespace cpu_attention

TORCH_LIBRARY_IMPL(vidstream, CPU, m) {
  m.impl("chunk_attention", &cpu_attention::chunk_attention_cpu);
  m.impl("cached_attention", &cpu_attention::cached_attention_cpu);
}

}  // namespace vidstream
