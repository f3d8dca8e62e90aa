// C++ CPU backward of chunk_attention (docs/spec.md §1) and cached_attention (§2),
// FlashAttention-2 style: from the forward's out and lse, the probabilities are recomputed tile
// by tile,
//   P = exp(scale q.k - lse), dP = dout.v, dS = P (dP - Delta), Delta = rowsum(dout * out),
//   dV = P^T dout, dK = scale dS^T q, dQ = scale dS k,
// in float32, and no L x L matrix is ever formed: per thread a few tiles of scratch, beside the
// outputs and Delta [B, H, L].
//
// Two passes, so that every output element has one owner and no thread adds into another's:
// pass 1 is parallel over (batch, kv head, key block), each block summing dK and dV over every
// query head of its group and every query that attends it; pass 2 is parallel over (batch,
// head, query tile) for dQ, over the key ranges the tile attends. The price is that scores and
// dP are formed twice (7 tile products per pair instead of 5), with no atomics and no per-thread
// dQ copies.
//
// Masks: the key ranges of each query span are the forward's (attention_common.h for
// chunk_attention, the kv_ranges for cached_attention). Pass 1 cuts the keys at every range end
// into segments, so that all keys of a segment are attended by the same query rows; a key block
// never straddles a segment, and the blocks a span's mask excludes are never paired with it
// (a NaN in a key no query reads reaches no gradient). Keys outside every range keep a zero
// gradient.
//
// Non-finite inputs: a NaN or Inf that a probability reads makes that P or dS NaN, which
// reaches the gradients of the rows and keys it touches (float64 autograd of the reference does
// the same where it is NaN); a row with lse = -inf (no key) gives nothing and gets dq = 0.
// The tile kernels (cpu/attention_backward_isa.h) are compiled per ISA (cpu/isa_dispatch.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "attention_common.h"
#include "ranges.h"
#include "rope3d_common.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

constexpr int64_t kBlockQ = 128;  // query rows per tile
constexpr int64_t kBlockK = 64;   // keys per block

struct BwdParams {
  const void *q, *k, *v, *dout, *out;
  const float* lse;  // [B, H, lq]
  float* delta;      // [B, H, lq]
  void *dq, *dk, *dv;
  const float* table;  // [R, t_heads, c_t, 2] temporal (cos, sin) per key range, or null
  int64_t t_heads, c_t;
  at::ScalarType dtype;
  int64_t heads, kv_heads, head_dim, v_dim, lq;
  int64_t q_sb, q_sl, q_sh, k_sb, k_sl, k_sh, v_sb, v_sl, v_sh;  // elements
  int64_t do_sb, do_sl, do_sh, o_sb, o_sl, o_sh;
  int64_t dq_sb, dq_sl, dq_sh, dk_sb, dk_sl, dk_sh, dv_sb, dv_sl, dv_sh;
  double scale;
};

struct KeyRange {
  int64_t lo, hi;
  int64_t rot;  // row of the rotation table, -1: none
};
struct QueryInterval {
  int64_t lo, hi;
};
// Pass 1: keys [j0, j0 + nk) of (b, hk), attended by the query intervals of segment `seg`.
struct KeyItem {
  int64_t b, hk, j0, nk, rot, seg;
};
// Pass 2: query rows [q0, q0 + nq) of (b, h), attending key range list `set`.
struct QueryItem {
  int64_t b, h, q0, nq, set;
};

struct IsaKernels {
  void (*delta)(const BwdParams&, int64_t begin, int64_t end);
  void (*key_block)(const BwdParams&, const KeyItem&, const QueryInterval*, int64_t, float*);
  void (*query_tile)(const BwdParams&, const QueryItem&, const KeyRange*, int64_t, float*);
  int64_t (*scratch)(const BwdParams&);
};

#define VIDSTREAM_ISA_BODY "cpu/attention_backward_isa.h"
#define VIDSTREAM_ISA_AVX512 1
#include "cpu/isa_dispatch.h"

// Query rows [lo, hi), every one attending the key ranges of list `set`.
struct QuerySpan {
  int64_t lo, hi, set;
};

// A run of keys attended by one fixed set of query rows (intervals ascending; a span that
// attends it twice, through overlapping ranges only a direct call can pass, is listed twice as
// the forward counts it twice).
struct Segment {
  int64_t lo, hi, rot;
  std::vector<QueryInterval> queries;
};

std::vector<Segment> key_segments(const std::vector<QuerySpan>& spans,
                                  const std::vector<std::vector<KeyRange>>& sets) {
  std::vector<int64_t> cuts;
  for (const auto& set : sets)
    for (const KeyRange& r : set)
      if (r.hi > r.lo) cuts.insert(cuts.end(), {r.lo, r.hi});
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<Segment> segs;
  for (size_t n = 0; n + 1 < cuts.size(); ++n) segs.push_back({cuts[n], cuts[n + 1], -1, {}});
  for (const QuerySpan& span : spans) {
    if (span.hi <= span.lo) continue;
    for (const KeyRange& r : sets[span.set]) {
      if (r.hi <= r.lo) continue;
      const size_t first = std::lower_bound(cuts.begin(), cuts.end(), r.lo) - cuts.begin();
      for (size_t n = first; n < segs.size() && segs[n].lo < r.hi; ++n) {
        Segment& sg = segs[n];
        if (sg.rot < 0) sg.rot = r.rot;
        if (!sg.queries.empty() && sg.queries.back().hi == span.lo)
          sg.queries.back().hi = span.hi;
        else
          sg.queries.push_back({span.lo, span.hi});
      }
    }
  }
  return segs;
}

// Splits [lo, hi) into pieces of at most `block` of nearly equal size (balanced threads).
template <typename F>
void for_each_piece(int64_t lo, int64_t hi, int64_t block, F&& f) {
  const int64_t n = hi - lo;
  if (n <= 0) return;
  const int64_t pieces = (n + block - 1) / block, size = (n + pieces - 1) / pieces;
  for (int64_t x = lo; x < hi; x += size) f(x, std::min(size, hi - x));
}

// Runs `f(item, scratch)` over items, heaviest first, handed out one at a time: the costs are
// far from even (a sink key block is attended by every query), and at::parallel_for's static
// split would leave threads idle.
template <typename Item, typename F>
void run_items(std::vector<std::pair<int64_t, Item>>& items, int64_t scratch_floats, F&& f) {
  if (items.empty()) return;
  std::stable_sort(items.begin(), items.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.size()));
  // One allocation for all threads, through ATen's allocator (so profilers see it).
  at::Tensor scratch = at::empty({threads, std::max<int64_t>(scratch_floats, 1)},
                                 at::TensorOptions().dtype(at::kFloat));
  float* base = scratch.data_ptr<float>();
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* w = base + t * scratch.size(1);
      for (size_t n; (n = next.fetch_add(1)) < items.size();) f(items[n].second, w);
    }
  });
}

// The kernels read rows through strides but need each head vector contiguous.
at::Tensor inner_contiguous(const at::Tensor& t) {
  return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous();
}

void check_grad_inputs(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                       const at::Tensor& q, const at::Tensor& v) {
  const auto want = std::vector<int64_t>{q.size(0), q.size(1), q.size(2), v.size(3)};
  for (const auto* t : {&dout, &out}) {
    const char* name = t == &dout ? "dout" : "out";
    TORCH_CHECK(t->sizes() == at::IntArrayRef(want), name, " must have shape [B, L, H, Dv] = ",
                at::IntArrayRef(want), ", got ", t->sizes());
    check_same(q, "q", *t, name);
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), "lse must be on the device of q");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) &&
                  lse.size(2) == q.size(1),
              "lse must have shape [B, H, L] = [", q.size(0), ", ", q.size(2), ", ", q.size(1),
              "], got ", lse.sizes());
}

// Both ops: the gradients of every (batch, head) of each query span against its key ranges.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale,
    const std::vector<QuerySpan>& spans, const std::vector<std::vector<KeyRange>>& sets,
    const at::Tensor& table) {
  const at::Tensor q = inner_contiguous(q_in), k = inner_contiguous(k_in),
                   v = inner_contiguous(v_in), dout = inner_contiguous(dout_in),
                   out = inner_contiguous(out_in), lse = lse_in.contiguous();
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), Hkv = k.size(2);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  // Zeros: keys outside every range (pool tokens, or none for chunk_attention) are not visited.
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  at::Tensor delta = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  if (B == 0 || Lq == 0 || H == 0) return {dq, dk, dv};

  BwdParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.dout = dout.data_ptr(), p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>(), p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  if (table.defined()) {
    p.table = table.data_ptr<float>();
    p.t_heads = table.size(1);
    p.c_t = table.size(2);
  }
  p.dtype = q.scalar_type();
  p.heads = H, p.kv_heads = Hkv, p.head_dim = q.size(3), p.v_dim = v.size(3), p.lq = Lq;
  p.q_sb = q.stride(0), p.q_sl = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_sl = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_sl = v.stride(1), p.v_sh = v.stride(2);
  p.do_sb = dout.stride(0), p.do_sl = dout.stride(1), p.do_sh = dout.stride(2);
  p.o_sb = out.stride(0), p.o_sl = out.stride(1), p.o_sh = out.stride(2);
  p.dq_sb = dq.stride(0), p.dq_sl = dq.stride(1), p.dq_sh = dq.stride(2);
  p.dk_sb = dk.stride(0), p.dk_sl = dk.stride(1), p.dk_sh = dk.stride(2);
  p.dv_sb = dv.stride(0), p.dv_sl = dv.stride(1), p.dv_sh = dv.stride(2);
  p.scale = scale;

  const IsaKernels& kernel = isa_kernels();
  at::parallel_for(0, B * Lq, 64, [&](int64_t begin, int64_t end) { kernel.delta(p, begin, end); });
  const int64_t scratch = kernel.scratch(p);
  const int64_t G = H / Hkv;

  const std::vector<Segment> segs = key_segments(spans, sets);
  std::vector<std::pair<int64_t, KeyItem>> key_items;
  for (size_t n = 0; n < segs.size(); ++n) {
    int64_t rows = 0;
    for (const QueryInterval& iv : segs[n].queries) rows += iv.hi - iv.lo;
    if (rows == 0) continue;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hk = 0; hk < Hkv; ++hk)
        for_each_piece(segs[n].lo, segs[n].hi, kBlockK, [&](int64_t j0, int64_t nk) {
          key_items.push_back({rows * G * nk, {b, hk, j0, nk, segs[n].rot,
                                               static_cast<int64_t>(n)}});
        });
  }
  run_items(key_items, scratch, [&](const KeyItem& it, float* w) {
    const auto& iv = segs[it.seg].queries;
    kernel.key_block(p, it, iv.data(), static_cast<int64_t>(iv.size()), w);
  });

  std::vector<std::pair<int64_t, QueryItem>> query_items;
  for (const QuerySpan& span : spans) {
    int64_t keys = 0;
    for (const KeyRange& r : sets[span.set]) keys += std::max<int64_t>(0, r.hi - r.lo);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for_each_piece(span.lo, span.hi, kBlockQ, [&](int64_t q0, int64_t nq) {
          query_items.push_back({nq * (keys + 1), {b, h, q0, nq, span.set}});
        });
  }
  run_items(query_items, scratch, [&](const QueryItem& it, float* w) {
    const auto& set = sets[it.set];
    kernel.query_tile(p, it, set.data(), static_cast<int64_t>(set.size()), w);
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t frame_tokens, int64_t chunk_frames,
    int64_t sink_frames, std::optional<int64_t> window_frames, double scale) {
  check_chunk_attention_args(q, k, v, frame_tokens, chunk_frames, at::kCPU);
  check_grad_inputs(dout, out, lse, q, v);
  const ChunkMaskParams mp{frame_tokens, chunk_frames, sink_frames, window_frames};
  const int64_t L = q.size(1), chunk_tok = chunk_frames * frame_tokens;
  std::vector<std::vector<KeyRange>> sets;
  std::vector<QuerySpan> spans;
  for (int64_t c = 0; c < num_chunks(mp, L); ++c) {
    std::vector<KeyRange> set;
    for (const TokenRange& r : chunk_key_ranges(mp, c, L))
      if (r.second > r.first) set.push_back({r.first, r.second, -1});
    sets.push_back(std::move(set));
    spans.push_back({c * chunk_tok, std::min(L, (c + 1) * chunk_tok), c});
  }
  return backward(dout, q, k, v, out, lse, scale, spans, sets, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cached_attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& kv_ranges, double scale,
    const std::optional<at::Tensor>& kv_deltas, double theta,
    const std::optional<at::Tensor>& t_theta) {
  check_attention_qkv(q, k, v, "k_pool", "v_pool", at::kCPU);
  check_grad_inputs(dout, out, lse, q, v);
  const std::vector<TokenRange> ranges = read_ranges(kv_ranges, k.size(1), "kv_ranges", q);
  at::Tensor table;
  if (kv_deltas) {
    check_positions(*kv_deltas, static_cast<int64_t>(ranges.size()), "kv_deltas", "[R]");
    check_t_theta(t_theta, k);
    table = temporal_table(*kv_deltas, theta, t_theta, q.size(3), q.device());
  }
  std::vector<KeyRange> set;
  for (size_t r = 0; r < ranges.size(); ++r)
    if (ranges[r].second > ranges[r].first)
      set.push_back({ranges[r].first, ranges[r].second, kv_deltas ? static_cast<int64_t>(r) : -1});
  std::sort(set.begin(), set.end(),
            [](const KeyRange& a, const KeyRange& b) { return a.lo < b.lo; });
  return backward(dout, q, k, v, out, lse, scale, {{0, q.size(1), 0}}, {set}, table);
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CPU, m) {
  m.impl("chunk_attention_backward", &chunk_attention_backward_cpu);
  m.impl("cached_attention_backward", &cached_attention_backward_cpu);
}

}  // namespace vidstream
