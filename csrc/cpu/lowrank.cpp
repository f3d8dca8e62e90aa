// C++ CPU kernels of the low-rank latent KV ops (docs/spec.md §4).
//
// lowrank_decompress: tiles of 64 tokens; each tile's latents are gathered once (in range order,
// converted to float32), multiplied by every head's K and V up-projections in one GEMM, and the
// result is scattered straight into K [B, N, H, d_nope + d_r] (with the shared positional key
// appended) and V [B, N, H, d_v].
//
// lowrank_cached_attention: a flash-style attention whose KV tiles come from the latent cache.
//   absorb = false ("tiled"): each KV tile of 512 tokens is decompressed once, for all heads,
//     into a tile-sized buffer that every query block then visits; no K/V of the whole context
//     ever exists. Where K and V heads have one width, chunks of 2,048 tokens go through ATen's
//     CPU flash attention instead and merge by log-sum-exp (same memory bound, faster inner loop).
//   absorb = true: w_uk is folded into the queries (q_lat = q_nope @ w_uk^T) and the attention
//     runs in the latent space against keys concat(c, k_r) and values c shared by all heads
//     (one kv head, so one GEMM serves all H * Lq query rows); w_uv is applied to the output.
//     A NaN gives the NaN outputs decompressing gives; an Inf meets w_uk in another sum than
//     the definition's, so its outputs are NaN alike but its lse may differ (+-inf vs NaN).
// kv_deltas (positions as metadata) rotate the temporal band of each gathered k_r row by its
// range's row of rope3d_shift_'s table, as the tile is gathered; the pools are only read.
// Both keep the online-softmax state (max, sum, accumulator) of every query in float32 between
// tiles, so the cost beyond the attention itself is one pass over the latent.
//
// The matrix products use ATen's GEMM: the extension is built without -march flags, and
// ATen's BLAS picks AVX2/AVX-512 at run time, which hand-written loops here could not.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "lowrank_common.h"
#include "ranges.h"
#include "rope3d_common.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

constexpr int64_t kDecompressTile = 64;
constexpr int64_t kKvTile = 512;
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kFlashChunk = 2048;

// Rows idx[n0 : n0 + nt] of pool[b] ([P, width], any strides) as float32 into dst [nt, width].
template <typename T>
void gather_rows(const at::Tensor& pool, int64_t b, const int32_t* idx, int64_t nt, float* dst) {
  const T* p = pool.data_ptr<T>() + b * pool.stride(0);
  const int64_t sl = pool.stride(1), sc = pool.stride(2), width = pool.size(2);
  for (int64_t i = 0; i < nt; ++i) {
    const T* row = p + static_cast<int64_t>(idx[i]) * sl;
    for (int64_t j = 0; j < width; ++j) dst[i * width + j] = static_cast<float>(row[j * sc]);
  }
}

// kv_deltas of the fused attention: token i of the ranges (in range order) belongs to range
// rows[i], whose temporal rotation of k_r is table + rows[i] * row_stride (temporal_table()
// for head dim d_r, one head). table == nullptr: no offsets.
struct KrShift {
  const float* table = nullptr;
  const int32_t* rows = nullptr;
  int64_t row_stride = 0, pairs = 0;
};

// Rotates the gathered k_r rows [n0, n0 + nt) (dst [nt, width], float32) as rope3d_shift_
// would have rotated them in the pool: its table entries and expression (cpu/rope3d_isa.h),
// so a float32 k_r matches the shifted pool's to float32 rounding (that code is built with
// FMA, this without); 16-bit ones keep the float32 digits.
void shift_gathered(float* dst, int64_t n0, int64_t nt, int64_t width, const KrShift& shift) {
  if (shift.table == nullptr) return;
  for (int64_t i = 0; i < nt; ++i) {
    float* x = dst + i * width;
    const float* cs = shift.table + shift.rows[n0 + i] * shift.row_stride;
    for (int64_t t = 0; t < shift.pairs; ++t) {
      const float a = x[2 * t], b = x[2 * t + 1], c = cs[2 * t], sn = cs[2 * t + 1];
      x[2 * t] = a * c + b * -sn;
      x[2 * t + 1] = b * c + a * sn;
    }
  }
}

template <typename T>
void decompress_kernel(const at::Tensor& c_pool, const std::optional<at::Tensor>& k_r_pool,
                       const at::Tensor& w_cat, const std::vector<int32_t>& idx, at::Tensor& k,
                       at::Tensor& v, const LowRankDims& d) {
  const int64_t N = static_cast<int64_t>(idx.size());
  const int64_t tiles = (N + kDecompressTile - 1) / kDecompressTile;
  const int64_t per_head = d.d_nope + d.d_v, width = d.heads * per_head;
  const int64_t dk = d.d_nope + d.d_r;
  T* kp = k.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  at::parallel_for(0, d.batch * tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor ct = at::empty({kDecompressTile, d.d_c}, at::kFloat);
    at::Tensor kv = at::empty({kDecompressTile, width}, at::kFloat);
    at::Tensor rt = at::empty({kDecompressTile, std::max<int64_t>(d.d_r, 1)}, at::kFloat);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles, n0 = (t % tiles) * kDecompressTile;
      const int64_t nt = std::min(kDecompressTile, N - n0);
      gather_rows<T>(c_pool, b, idx.data() + n0, nt, ct.data_ptr<float>());
      if (d.d_r) gather_rows<T>(*k_r_pool, b, idx.data() + n0, nt, rt.data_ptr<float>());
      at::Tensor kv_t = kv.narrow(0, 0, nt);
      at::mm_out(kv_t, ct.narrow(0, 0, nt), w_cat);
      const float* src = kv.data_ptr<float>();
      const float* rp = rt.data_ptr<float>();
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t row = (b * N + n0 + i) * d.heads;
        for (int64_t h = 0; h < d.heads; ++h) {
          const float* s = src + i * width + h * per_head;
          T* kd = kp + (row + h) * dk;
          T* vd = vp + (row + h) * d.d_v;
          for (int64_t x = 0; x < d.d_nope; ++x) kd[x] = static_cast<T>(s[x]);
          for (int64_t x = 0; x < d.d_r; ++x) kd[d.d_nope + x] = static_cast<T>(rp[i * d.d_r + x]);
          for (int64_t x = 0; x < d.d_v; ++x) vd[x] = static_cast<T>(s[d.d_nope + x]);
        }
      }
    }
  });
}

// Checks and reads the inputs both ops share: the pool position of every token of kv_ranges,
// in range order.
std::vector<int32_t> lowrank_tokens(const at::Tensor& c_pool, const at::Tensor& w_uk,
                                    const at::Tensor& w_uv, const at::Tensor& kv_ranges,
                                    const std::optional<at::Tensor>& k_r_pool) {
  check_lowrank_args(c_pool, w_uk, w_uv, k_r_pool, at::kCPU);
  return range_tokens(read_ranges(kv_ranges, c_pool.size(1), "kv_ranges", c_pool));
}

std::tuple<at::Tensor, at::Tensor> lowrank_decompress_cpu(
    const at::Tensor& c_pool, const at::Tensor& w_uk, const at::Tensor& w_uv,
    const at::Tensor& kv_ranges, int64_t num_tokens, const std::optional<at::Tensor>& k_r_pool) {
  const std::vector<int32_t> idx = lowrank_tokens(c_pool, w_uk, w_uv, kv_ranges, k_r_pool);
  // K and V have num_tokens rows and the kernel writes one per token of the ranges.
  TORCH_CHECK(static_cast<int64_t>(idx.size()) == num_tokens, "num_tokens must equal the ",
              "number of tokens in kv_ranges (", idx.size(), "), got ", num_tokens);
  const LowRankDims d = lowrank_dims(c_pool, w_uk, w_uv, k_r_pool);
  at::Tensor k, v;
  std::tie(k, v) = decompressed_kv(c_pool, d, num_tokens);
  if (k.numel() == 0 && v.numel() == 0) return {k, v};
  const at::Tensor w_cat = stacked_up_projection(w_uk, w_uv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c_pool.scalar_type(),
                                  "lowrank_decompress_cpu", [&] {
                                    decompress_kernel<scalar_t>(c_pool, k_r_pool, w_cat, idx, k, v, d);
                                  });
  return {k, v};
}

// One KV tile against a block of query rows: S = Q K^T, then the online-softmax update of
// (m, l, acc) of those rows. Q rows are pre-scaled, so S is already in natural-log units. The
// element-wise steps are ATen ops: vectorised at run time, and the row sums are cascaded.
// NaN and Inf as in eager softmax (docs/spec.md): amax and maximum keep a NaN, so m stays NaN;
// a +inf score makes m = +inf and its weight inf - inf = NaN (lowrank_cached_attention_cpu
// turns (m, l, acc) into out and lse at the end).
void attend_tile(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor m,
                 at::Tensor l, at::Tensor acc) {
  at::Tensor s = at::mm(q, k.t());
  const at::Tensor m_new = at::maximum(m, s.amax(1));
  // Rows that have seen only -inf scores so far take weights against 0: -inf - -inf would
  // make NaN of a row that has none.
  const at::Tensor m_use = m_new.masked_fill(m_new == -std::numeric_limits<float>::infinity(), 0.f);
  const at::Tensor alpha = (m - m_use).exp_();  // 0 on the first finite tile (m = -inf)
  s.sub_(m_use.unsqueeze(1)).exp_();
  l.mul_(alpha).add_(s.sum(1));
  acc.mul_(alpha.unsqueeze(1)).addmm_(s, v);
  m.copy_(m_new);
}

// qg [B, G, R, Dq] pre-scaled queries; group g attends K_g [N, Dq] and V_g [N, Dv'].
//   absorb: G = 1, R = H * Lq, K = concat(c, k_r), V = c (shared by all heads).
//   tiled:  G = H, R = Lq, K_h = concat(c @ w_uk[h], k_r), V_h = c @ w_uv[h].
template <typename T>
void attention_kernel(const at::Tensor& c_pool, const std::optional<at::Tensor>& k_r_pool,
                      const at::Tensor& w_cat, const std::vector<int32_t>& idx, const at::Tensor& qg,
                      bool absorb, const LowRankDims& d, const KrShift& shift, at::Tensor& m,
                      at::Tensor& l, at::Tensor& acc) {
  const int64_t N = static_cast<int64_t>(idx.size());
  const int64_t G = qg.size(1), R = qg.size(2);
  const int64_t per_head = d.d_nope + d.d_v, dk = d.d_nope + d.d_r;
  const int64_t blocks = (R + kQueryBlock - 1) / kQueryBlock;
  at::Tensor ct = at::empty({kKvTile, d.d_c}, at::kFloat);
  at::Tensor rt = at::empty({kKvTile, std::max<int64_t>(d.d_r, 1)}, at::kFloat);
  at::Tensor k_heads = absorb ? at::Tensor() : at::empty({d.heads, kKvTile, dk}, at::kFloat);
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t n0 = 0; n0 < N; n0 += kKvTile) {
      const int64_t nt = std::min(kKvTile, N - n0);
      gather_rows<T>(c_pool, b, idx.data() + n0, nt, ct.data_ptr<float>());
      if (d.d_r) {
        gather_rows<T>(*k_r_pool, b, idx.data() + n0, nt, rt.data_ptr<float>());
        shift_gathered(rt.data_ptr<float>(), n0, nt, d.d_r, shift);
      }
      const at::Tensor c_t = ct.narrow(0, 0, nt);
      const at::Tensor r_t = rt.narrow(0, 0, nt).narrow(1, 0, d.d_r);
      at::Tensor k_t, kv;
      if (absorb) {
        k_t = d.d_r ? at::cat({c_t, r_t}, 1) : c_t;
      } else {
        // Outside the parallel region, so ATen's GEMM may use every thread for the decompression.
        kv = at::mm(c_t, w_cat);  // [nt, H * (d_nope + d_v)]
        k_t = k_heads.narrow(1, 0, nt);
        k_t.narrow(2, 0, d.d_nope)
            .copy_(kv.view({nt, d.heads, per_head}).narrow(2, 0, d.d_nope).transpose(0, 1));
        if (d.d_r) k_t.narrow(2, d.d_nope, d.d_r).copy_(r_t.unsqueeze(0).expand({d.heads, nt, d.d_r}));
      }
      at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t w = begin; w < end; ++w) {
          const int64_t g = w / blocks, r0 = (w % blocks) * kQueryBlock;
          const int64_t rows = std::min(kQueryBlock, R - r0);
          const at::Tensor k = absorb ? k_t : k_t[g];
          const at::Tensor v = absorb ? c_t : kv.narrow(1, g * per_head + d.d_nope, d.d_v);
          attend_tile(qg[b][g].narrow(0, r0, rows), k, v, m[b][g].narrow(0, r0, rows),
                      l[b][g].narrow(0, r0, rows), acc[b][g].narrow(0, r0, rows));
        }
      });
    }
  }
}

// Whether every element of t is finite (no NaN, no +-Inf).
bool all_finite(const at::Tensor& t) { return at::isfinite(t).all().item<bool>(); }

// "tiled" when K and V heads have one width (Wan: 128 and 128): each decompressed chunk goes
// through ATen's CPU flash attention (blocked and vectorised, faster than attend_tile's ATen
// calls per block), and the chunks' outputs merge by their log-sum-exp. Only one chunk of K/V
// ever exists. qh [B, H, Lq, D] float32 (unscaled); acc [B, H, Lq, D], lse [B, H, Lq] float32.
// ATen's flash kernel does not follow eager softmax on non-finite scores (a +inf score gives
// lse NaN, all -inf gives zeros and lse 0), and a merge by lse could not either: with finite
// q (checked by the caller) a chunk whose keys are not all finite stops it, returning false,
// and the caller attends through attention_kernel instead (one pass over K per chunk here).
template <typename T>
bool tiled_flash_kernel(const at::Tensor& c_pool, const std::optional<at::Tensor>& k_r_pool,
                        const at::Tensor& w_cat, const std::vector<int32_t>& idx,
                        const at::Tensor& qh, double scale, const LowRankDims& d,
                        const KrShift& shift, at::Tensor& acc, at::Tensor& lse) {
  const int64_t N = static_cast<int64_t>(idx.size());
  const int64_t per_head = d.d_nope + d.d_v, dk = d.d_nope + d.d_r;
  at::Tensor ct = at::empty({kFlashChunk, d.d_c}, at::kFloat);
  at::Tensor rt = at::empty({kFlashChunk, std::max<int64_t>(d.d_r, 1)}, at::kFloat);
  at::Tensor k_heads = at::empty({d.heads, kFlashChunk, dk}, at::kFloat);
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t n0 = 0; n0 < N; n0 += kFlashChunk) {
      const int64_t nt = std::min(kFlashChunk, N - n0);
      gather_rows<T>(c_pool, b, idx.data() + n0, nt, ct.data_ptr<float>());
      if (d.d_r) {
        gather_rows<T>(*k_r_pool, b, idx.data() + n0, nt, rt.data_ptr<float>());
        shift_gathered(rt.data_ptr<float>(), n0, nt, d.d_r, shift);
      }
      const at::Tensor kv = at::mm(ct.narrow(0, 0, nt), w_cat).view({nt, d.heads, per_head});
      at::Tensor k_t = k_heads.narrow(1, 0, nt);
      k_t.narrow(2, 0, d.d_nope).copy_(kv.narrow(2, 0, d.d_nope).transpose(0, 1));
      if (d.d_r)
        k_t.narrow(2, d.d_nope, d.d_r)
            .copy_(rt.narrow(0, 0, nt).narrow(1, 0, d.d_r).unsqueeze(0).expand({d.heads, nt, d.d_r}));
      if (!all_finite(k_t)) return false;
      const at::Tensor v_t = kv.narrow(2, d.d_nope, d.d_v).transpose(0, 1);
      const auto res = at::_scaled_dot_product_flash_attention_for_cpu(
          qh[b].unsqueeze(0), k_t.unsqueeze(0), v_t.unsqueeze(0), 0.0, false, std::nullopt, scale);
      const at::Tensor o_c = std::get<0>(res)[0], l_c = std::get<1>(res)[0];
      at::Tensor acc_b = acc[b], lse_b = lse[b];
      if (n0 == 0) {
        acc_b.copy_(o_c);
        lse_b.copy_(l_c);
        continue;
      }
      const at::Tensor mx = at::maximum(lse_b, l_c);
      const at::Tensor wa = (lse_b - mx).exp_(), wc = (l_c - mx).exp_();
      const at::Tensor total = wa + wc;
      acc_b.mul_((wa / total).unsqueeze(-1)).add_(o_c * (wc / total).unsqueeze(-1));
      lse_b.copy_(mx.add_(total.log()));
    }
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> lowrank_cached_attention_cpu(
    const at::Tensor& q, const at::Tensor& c_pool, const at::Tensor& w_uk, const at::Tensor& w_uv,
    const at::Tensor& kv_ranges, const std::optional<at::Tensor>& k_r_pool, double scale,
    bool absorb, const std::optional<at::Tensor>& kv_deltas, double theta) {
  check_lowrank_args(c_pool, w_uk, w_uv, k_r_pool, at::kCPU);
  const std::vector<TokenRange> ranges =
      read_ranges(kv_ranges, c_pool.size(1), "kv_ranges", c_pool);
  const std::vector<int32_t> idx = range_tokens(ranges);
  check_lowrank_query(q, c_pool, w_uk, k_r_pool);
  const LowRankDims d = lowrank_dims(c_pool, w_uk, w_uv, k_r_pool);
  // kv_deltas move k_r only (the latents carry no position); without k_r there is nothing to
  // rotate and the offsets change nothing.
  at::Tensor table;
  std::vector<int32_t> token_rows;
  KrShift shift;
  if (kv_deltas) {
    check_range_deltas(*kv_deltas, static_cast<int64_t>(ranges.size()), "kv_deltas");
    if (d.d_r > 0) {
      table = temporal_table(*kv_deltas, theta, std::nullopt, d.d_r, c_pool.device());
      token_rows = range_token_rows(ranges);
      shift = {table.data_ptr<float>(), token_rows.data(), table.stride(0), table.size(2)};
    }
  }
  const int64_t B = d.batch, Lq = q.size(1), H = d.heads;
  at::Tensor out = at::empty({B, Lq, H, d.d_v}, q.options());
  at::Tensor lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  if (idx.empty() || out.numel() == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const at::Tensor w_cat = absorb ? at::Tensor() : stacked_up_projection(w_uk, w_uv);
  if (!absorb && d.d_nope + d.d_r == d.d_v && all_finite(q)) {
    const at::Tensor qh = q.to(at::kFloat).permute({0, 2, 1, 3});
    at::Tensor acc = at::empty({B, H, Lq, d.d_v}, at::kFloat);
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c_pool.scalar_type(),
                                    "lowrank_cached_attention_cpu", [&] {
                                      done = tiled_flash_kernel<scalar_t>(
                                          c_pool, k_r_pool, w_cat, idx, qh, scale, d, shift, acc,
                                          lse);
                                    });
    if (done) {
      out.copy_(acc.permute({0, 2, 1, 3}));
      return {out, lse};
    }
  }
  // Scaled float32 queries, head-major: [B, H, Lq, d_nope + d_r].
  const at::Tensor qf = q.to(at::kFloat).mul(scale).permute({0, 2, 1, 3});
  at::Tensor qg;
  int64_t dv = d.d_v;
  if (absorb) {
    // q_lat[b, h, i] = q_nope[b, i, h] @ w_uk[h]^T: the latent-space query of each head.
    const at::Tensor q_lat =
        at::matmul(qf.narrow(3, 0, d.d_nope), w_uk.to(at::kFloat).transpose(1, 2).unsqueeze(0));
    qg = at::cat({q_lat, qf.narrow(3, d.d_nope, d.d_r)}, 3).reshape({B, 1, H * Lq, d.d_c + d.d_r});
    dv = d.d_c;
  } else {
    qg = qf.contiguous();
  }
  const int64_t G = qg.size(1), R = qg.size(2);
  at::Tensor m = at::full({B, G, R}, -std::numeric_limits<float>::infinity(), at::kFloat);
  at::Tensor l = at::zeros({B, G, R}, at::kFloat);
  at::Tensor acc = at::zeros({B, G, R, dv}, at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c_pool.scalar_type(),
                                  "lowrank_cached_attention_cpu", [&] {
                                    attention_kernel<scalar_t>(c_pool, k_r_pool, w_cat, idx, qg,
                                                               absorb, d, shift, m, l, acc);
                                  });
  // What torch.softmax / torch.logsumexp give (docs/spec.md). The key set is not
  // empty here, so l == 0 means every score was -inf: acc / l = 0 / 0 = NaN, lse -inf. A NaN
  // score left m and l NaN; a +inf score (and no NaN) left m = +inf, l NaN: out NaN, lse +inf.
  at::Tensor o = acc.div_(l.unsqueeze(-1)).reshape({B, H, Lq, dv});
  if (absorb) o = at::matmul(o, w_uv.to(at::kFloat).unsqueeze(0));  // [B, H, Lq, d_v]
  out.copy_(o.permute({0, 2, 1, 3}));
  const float inf = std::numeric_limits<float>::infinity();
  at::Tensor lse_rows = m + l.log_();
  lse_rows.masked_fill_(m == inf, inf);
  lse.copy_(lse_rows.reshape({B, H, Lq}));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CPU, m) {
  m.impl("lowrank_decompress", &lowrank_decompress_cpu);
  m.impl("lowrank_cached_attention", &lowrank_cached_attention_cpu);
}

}  // namespace vidstream
