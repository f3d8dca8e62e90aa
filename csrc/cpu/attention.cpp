// C++ CPU kernels of chunk_attention (docs/spec.md §1) and cached_attention (§2).
//
// Flash-style: a tile of queries streams over key blocks with an online softmax in float32;
// no L x L score matrix is ever formed. Query tiles never straddle a chunk, so each tile has
// one list of key ranges (attention_common.h) and the blocks the mask excludes are never
// visited; the only masking left is the tail of a range that does not fill a key block. Keys
// past a range end are never loaded (their scores are -inf, their value rows stay out of the
// P.V product), so a NaN or Inf there reaches no output; one that a query reads propagates as
// in eager softmax (docs/spec.md, NaN and Inf; attention_isa.h).
// cached_attention's kv_deltas (positions as metadata) rotate each key's temporal band as its
// block is loaded, by the per-range rows of rope3d_shift_'s own table; the pool is only read.
// Work is split over batch x heads x query tiles. The tile kernel (cpu/attention_isa.h) is
// compiled for AVX-512, AVX2 and the baseline, and picked at run time (cpu/isa_dispatch.h).
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_common.h"
#include "ranges.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

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
  // cached_attention's kv_deltas: each key of a range has its temporal band (the first
  // 2 * rot_pairs channels) rotated by its range's row of temporal_table() while its block is
  // loaded. The rows reach the tile kernel per range (TileFn's `rot`); a row holds one run of
  // rot_pairs (cos, sin) pairs per table head (H_kv with t_theta, else one), rot_sh floats apart
  // (0 with one table head, which every kv head then reads).
  int64_t rot_pairs, rot_sh;
};

struct WorkItem {
  int64_t b, h, q0, nq;
  int64_t set;  // which key range list
};

// `rot`: nullptr (no offsets), or per range its table row (docs: AttnProblem::rot_pairs).
using TileFn = void (*)(const AttnProblem&, const WorkItem&, const TokenRange*,
                        const float* const* rot, int64_t, float*);
using ScratchFn = int64_t (*)(const AttnProblem&);

struct IsaKernels {
  TileFn tile;
  ScratchFn scratch;
};

#define VIDSTREAM_ISA_BODY "cpu/attention_isa.h"
#define VIDSTREAM_ISA_AVX512 1
#include "cpu/isa_dispatch.h"

// A list of key ranges and, with offsets, each range's rotation table row (else empty).
struct KeySet {
  std::vector<TokenRange> ranges;
  std::vector<const float*> rot;
};

void run(const AttnProblem& p, const std::vector<WorkItem>& items,
         const std::vector<KeySet>& sets) {
  const IsaKernels& kernel = isa_kernels();
  const int64_t scratch = kernel.scratch(p);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(scratch);
    for (int64_t n = begin; n < end; ++n) {
      const KeySet& set = sets[items[n].set];
      kernel.tile(p, items[n], set.ranges.data(), set.rot.empty() ? nullptr : set.rot.data(),
                  static_cast<int64_t>(set.ranges.size()), w.data());
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
  set_attention_views(p, q, k, v, out, lse);
  p.dtype = q.scalar_type();
  p.v_dim = v.size(3);
  p.lse_sh = lse.size(2);
  p.scale = scale;
  return p;
}

// The kernel reads rows through strides but needs each head vector contiguous.
at::Tensor inner_contiguous(const at::Tensor& t) {
  return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous();
}

// Query rows [lo, hi), every one attending the key ranges of list `set`.
struct QuerySpan {
  int64_t lo, hi, set;
};

// Both ops: every (batch, head) of each span of query rows against its list of key ranges.
// `table` (with offsets): temporal_table()'s [R, Ht, c_t, 2] float32, which the sets' `rot`
// rows point into.
std::tuple<at::Tensor, at::Tensor> attend(const at::Tensor& q_in, const at::Tensor& k_in,
                                          const at::Tensor& v_in, double scale,
                                          const std::vector<QuerySpan>& spans,
                                          const std::vector<KeySet>& sets,
                                          const at::Tensor& table = at::Tensor()) {
  const at::Tensor q = inner_contiguous(q_in), k = inner_contiguous(k_in),
                   v = inner_contiguous(v_in);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  std::vector<WorkItem> items;
  for (const QuerySpan& span : spans)
    for (int64_t b = 0; b < q.size(0); ++b)
      for (int64_t h = 0; h < q.size(2); ++h)
        for_each_tile(span.lo, span.hi,
                      [&](int64_t q0, int64_t nq) { items.push_back({b, h, q0, nq, span.set}); });
  if (items.empty()) return {out, lse};
  AttnProblem p = make_problem(q, k, v, out, lse, scale);
  if (table.defined()) {
    p.rot_pairs = table.size(2);
    p.rot_sh = table.size(1) > 1 ? 2 * table.size(2) : 0;
  }
  run(p, items, sets);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> chunk_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t frame_tokens,
    int64_t chunk_frames, int64_t sink_frames, std::optional<int64_t> window_frames, double scale) {
  check_chunk_attention_args(q, k, v, frame_tokens, chunk_frames, at::kCPU);
  const ChunkMaskParams mp{frame_tokens, chunk_frames, sink_frames, window_frames};
  const int64_t L = q.size(1), chunk_tok = chunk_frames * frame_tokens;
  std::vector<KeySet> sets;
  std::vector<QuerySpan> spans;
  for (int64_t c = 0; c < num_chunks(mp, L); ++c) {
    sets.push_back({chunk_key_ranges(mp, c, L), {}});
    spans.push_back({c * chunk_tok, std::min(L, (c + 1) * chunk_tok), c});
  }
  return attend(q, k, v, scale, spans, sets);
}

std::tuple<at::Tensor, at::Tensor> cached_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_ranges,
    double scale, const std::optional<at::Tensor>& kv_deltas, double theta,
    const std::optional<at::Tensor>& t_theta) {
  check_attention_qkv(q, k, v, "k_pool", "v_pool", at::kCPU);
  const std::vector<TokenRange> given = read_ranges(kv_ranges, k.size(1), "kv_ranges", q);
  if (!kv_deltas)
    return attend(q, k, v, scale, {{0, q.size(1), 0}}, {{sorted_nonempty(given), {}}});
  // Keys are visited in pool order (sorted_nonempty's), but each range keeps its own table row.
  const at::Tensor table = key_shift_table(*kv_deltas, t_theta, given.size(), k, theta);
  KeySet set;
  for (const IndexedRange& r : sorted_nonempty_indexed(given)) {
    set.ranges.push_back(r.range);
    set.rot.push_back(table.data_ptr<float>() + r.index * table.stride(0));
  }
  return attend(q, k, v, scale, {{0, q.size(1), 0}}, {set}, table);
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CPU, m) {
  m.impl("chunk_attention", &chunk_attention_cpu);
  m.impl("cached_attention", &cached_attention_cpu);
}

}  // namespace vidstream
