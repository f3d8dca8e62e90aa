// The tile kernels of the attention backward (csrc/cpu/attention_backward.cpp), written once with
// GCC vector extensions and compiled once per instruction set by cpu/isa_dispatch.h. No include
// guard and no includes but the ISA body's own cpu/vec_isa.h (see isa_dispatch.h).
//
// Two entry points share one recomputation of a (query tile x key block) of probabilities,
//   P = exp(scale q.k - lse),  dP = dout.v,  dS = P (dP - Delta):
// key_block owns a block of keys and sums dK = scale dS^T q, dV = P^T dout over every query tile
// that attends it; query_tile owns a tile of queries and sums dQ = scale dS k over the key blocks
// it attends. Each output element has one owner, so no thread ever adds into another's.
//
// The vector types and helpers are the forward's (cpu/vec_isa.h); the exponential is the
// forward's polynomial reduced in natural units (expv), the GEMM its own (two-level sums in
// registers, optionally A transposed).

#include "cpu/vec_isa.h"

// e^x for x <= 0 (a score minus its row's lse), ~1 ulp; below -87 (and -inf) gives 0, NaN
// gives NaN. The forward's exp2v polynomial, but reduced in natural units (Cody-Waite: n ln2 in
// two parts, the first exact), so P carries only the rounding of x itself: exp2v of
// x * log2(e) would add |x| ulp-sized errors, and P's error sets dq's, which eager PyTorch's
// softmax does not have.
static inline vf expv(vf x) {
  const vi under = x < splat(-87.f);
  x = vmax(splat(-87.f), x);
  const vf n = (x * 1.4426950408889634f + 12582912.f) - 12582912.f;  // round(x / ln2)
  const vf f = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln2, in [-ln2/2, ln2/2]
  return exp_poly(f, n, under);
}

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// C (+)= op(A) . B, row-major float: op(A) = A [M, K] (lda), or with kTransA A^T for A stored
// [K, M] (dV = P^T dout and dK = dS^T q straight from the row-major P and dS tiles). Sums run in
// two levels, runs of `run` products and then the runs, all in registers: a head dim of 64 or
// 128, or a tile of 128 queries, summed in one float32 chain costs digits against eager's
// blocked GEMM, and a score's error is multiplied by dP - Delta in dS (measured: one chain of 32
// doubled the dq error). With `accumulate` the sum is added to C, one rounding per call (a tile):
// the rounding then grows with the number of tiles, not of terms. The register tile (AVX-512 4 x 2,
// AVX2 3 x 2, SSE 2 x 2 vectors) leaves room for the run and the total: 2 MRD NCD accumulators
// beside NCD + 1 operands. M % MRD == 0 (MR is a multiple), N % (VS NCD) == 0 (kCols is).
constexpr int MRD = VS == 16 ? 4 : VS == 8 ? 3 : 2;
constexpr int NCD = 2;
template <bool kTransA>
static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, int64_t run, bool accumulate) {
  for (int64_t i0 = 0; i0 < M; i0 += MRD) {
    for (int64_t j0 = 0; j0 < N; j0 += VS * NCD) {
      vf tot[MRD][NCD];
#pragma GCC unroll 8
      for (int r = 0; r < MRD; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NCD; ++v)
          tot[r][v] = accumulate ? loadv(C + (i0 + r) * ldc + j0 + v * VS) : splat(0.f);
      const float* b = B + j0;
      for (int64_t k0 = 0; k0 < K; k0 += run) {
        const int64_t k1 = imin(K, k0 + run);
        vf c[MRD][NCD];
#pragma GCC unroll 8
        for (int r = 0; r < MRD; ++r)
#pragma GCC unroll 8
          for (int v = 0; v < NCD; ++v) c[r][v] = splat(0.f);
        for (int64_t kk = k0; kk < k1; ++kk) {
          vf bv[NCD];
#pragma GCC unroll 8
          for (int v = 0; v < NCD; ++v) bv[v] = loadv(b + kk * ldb + v * VS);
#pragma GCC unroll 8
          for (int r = 0; r < MRD; ++r) {
            const vf av = splat(kTransA ? A[kk * lda + i0 + r] : A[(i0 + r) * lda + kk]);
#pragma GCC unroll 8
            for (int v = 0; v < NCD; ++v) c[r][v] += av * bv[v];
          }
        }
#pragma GCC unroll 8
        for (int r = 0; r < MRD; ++r)
#pragma GCC unroll 8
          for (int v = 0; v < NCD; ++v) tot[r][v] += c[r][v];
      }
#pragma GCC unroll 8
      for (int r = 0; r < MRD; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NCD; ++v) storev(C + (i0 + r) * ldc + j0 + v * VS, tot[r][v]);
    }
  }
}
constexpr int64_t kRun = 8;

// The per-thread scratch, one layout for both entry points. Row strides: queries and keys
// padded to the register tile (MR rows), head dims and key columns to kCols.
struct Scratch {
  int64_t Dp, Dvp, ldk, total;
  float *Qs, *dO, *Kt, *Vt, *Kn, *S, *dP, *accA, *accB, *row, *lse, *delta;
};

// base == nullptr: only the sizes (total floats).
static Scratch layout(const BwdParams& p, float* base) {
  Scratch s;
  s.Dp = round_up(p.head_dim, kCols);
  s.Dvp = round_up(p.v_dim, kCols);
  s.ldk = round_up(round_up(kBlockK, MR), kCols);  // >= every M and N a key block pads to
  const int64_t qp = round_up(kBlockQ, MR), kp = round_up(kBlockK, MR);
  int64_t off = 0;
  auto take = [&](int64_t n) {
    float* r = base ? base + off : nullptr;
    off += n;
    return r;
  };
  s.Qs = take(qp * s.Dp);
  s.dO = take(qp * s.Dvp);
  s.Kt = take(p.head_dim * s.ldk);
  s.Vt = take(p.v_dim * s.ldk);
  s.Kn = take(kp * s.Dp);
  s.S = take(qp * s.ldk);
  s.dP = take(qp * s.ldk);
  s.accA = take(imax(qp, kp) * s.Dp);
  s.accB = take(kp * s.Dvp);
  s.row = take(s.Dp);
  s.lse = take(qp);
  s.delta = take(qp);
  s.total = off;
  return s;
}

static int64_t scratch_floats(const BwdParams& p) { return layout(p, nullptr).total; }

// The (cos, sin) pairs of the temporal band of key range `rot` for kv head hk, or null.
static inline const float* rotation(const BwdParams& p, int64_t rot, int64_t hk) {
  if (!p.table || rot < 0) return nullptr;
  return p.table + (rot * p.t_heads + (p.t_heads > 1 ? hk : 0)) * p.c_t * 2;
}

// Query rows [i0, i0 + nq) of (b, h): q scaled, dout, lse and Delta, zero-padded to MR rows.
// A row with lse = -inf (no key: an empty union) is loaded as zeros with lse = +inf, so its P
// and dS are 0 and it adds nothing anywhere (its dq comes out 0); padding rows likewise.
template <typename T>
static void load_queries(const BwdParams& p, int64_t b, int64_t h, int64_t i0, int64_t nq,
                         const Scratch& s) {
  const int64_t D = p.head_dim, Dv = p.v_dim, nqp = round_up(nq, MR);
  const float scale = static_cast<float>(p.scale), inf = __builtin_inff();
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* gb = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const float* lb = p.lse + (b * p.heads + h) * p.lq;
  const float* db = p.delta + (b * p.heads + h) * p.lq;
  for (int64_t i = 0; i < nqp; ++i) {
    float* qr = s.Qs + i * s.Dp;
    float* gr = s.dO + i * s.Dvp;
    const float l = i < nq ? lb[i0 + i] : -inf;
    if (l == -inf) {
      for (int64_t d = 0; d < s.Dp; ++d) qr[d] = 0.f;
      for (int64_t e = 0; e < s.Dvp; ++e) gr[e] = 0.f;
      s.lse[i] = inf;
      s.delta[i] = 0.f;
      continue;
    }
    const T* qs = qb + (i0 + i) * p.q_sl;
    const T* gs = gb + (i0 + i) * p.do_sl;
    for (int64_t d = 0; d < D; ++d) qr[d] = static_cast<float>(qs[d]) * scale;
    for (int64_t d = D; d < s.Dp; ++d) qr[d] = 0.f;
    for (int64_t e = 0; e < Dv; ++e) gr[e] = static_cast<float>(gs[e]);
    for (int64_t e = Dv; e < s.Dvp; ++e) gr[e] = 0.f;
    s.lse[i] = l;
    s.delta[i] = db[i0 + i];
  }
}

// Keys [j0, j0 + nk) of (b, hk) as K^T and V^T (columns padded with zeros to ldk) and, with
// `rows`, also as rows in Kn (for dQ = dS K); with a rotation, each key's temporal band is turned
// as the forward reads it.
template <typename T>
static void load_keys(const BwdParams& p, int64_t b, int64_t hk, int64_t j0, int64_t nk,
                      const float* cs, const Scratch& s, bool rows) {
  const int64_t D = p.head_dim, Dv = p.v_dim, ldk = s.ldk;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  for (int64_t j = 0; j < nk; ++j) {
    const T* kr = kb + (j0 + j) * p.k_sl;
    float* r = rows ? s.Kn + j * s.Dp : s.row;
    for (int64_t d = 0; d < D; ++d) r[d] = static_cast<float>(kr[d]);
    for (int64_t d = D; d < s.Dp; ++d) r[d] = 0.f;
    if (cs)
      for (int64_t t = 0; t < p.c_t; ++t) {
        const float a = r[2 * t], c = r[2 * t + 1], co = cs[2 * t], si = cs[2 * t + 1];
        r[2 * t] = a * co - c * si;
        r[2 * t + 1] = a * si + c * co;
      }
    for (int64_t d = 0; d < D; ++d) s.Kt[d * ldk + j] = r[d];
    const T* vr = vb + (j0 + j) * p.v_sl;
    for (int64_t e = 0; e < Dv; ++e) s.Vt[e * ldk + j] = static_cast<float>(vr[e]);
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = nk; j < ldk; ++j) s.Kt[d * ldk + j] = 0.f;
  for (int64_t e = 0; e < Dv; ++e)
    for (int64_t j = nk; j < ldk; ++j) s.Vt[e * ldk + j] = 0.f;
}

// S <- P = exp(S - lse) and dP <- dS = P (dP - Delta), rows [0, nqp); columns past nk set to 0 so
// the transposed products can run over the padded key rows. NaN anywhere in a row's inputs
// reaches its P or dS and so every gradient that row feeds.
static void softmax_grad(int64_t nqp, int64_t nk, const Scratch& s) {
  const int64_t ncols = round_up(nk, kCols);
  for (int64_t i = 0; i < nqp; ++i) {
    float* srow = s.S + i * s.ldk;
    float* drow = s.dP + i * s.ldk;
    const vf l = splat(s.lse[i]), dl = splat(s.delta[i]);
    for (int64_t j = 0; j < ncols; j += VS) {
      const vf pj = expv(loadv(srow + j) - l);
      storev(drow + j, pj * (loadv(drow + j) - dl));
      storev(srow + j, pj);
    }
    for (int64_t j = nk; j < s.ldk; ++j) srow[j] = drow[j] = 0.f;
  }
}

// Scores and dP of the loaded query tile (nqp rows) against the loaded key block (nk keys).
static void probabilities(const BwdParams& p, int64_t nqp, int64_t nk, const Scratch& s) {
  const int64_t ncols = round_up(nk, kCols);
  gemm<false>(nqp, ncols, p.head_dim, s.Qs, s.Dp, s.Kt, s.ldk, s.S, s.ldk, kRun, false);
  gemm<false>(nqp, ncols, p.v_dim, s.dO, s.Dvp, s.Vt, s.ldk, s.dP, s.ldk, kRun, false);
  softmax_grad(nqp, nk, s);
}

// Splits rows [lo, hi) into tiles of at most kBlockQ rows of nearly equal size.
template <typename F>
static inline void tiles(int64_t lo, int64_t hi, F&& f) {
  const int64_t n = hi - lo;
  if (n <= 0) return;
  const int64_t t = (n + kBlockQ - 1) / kBlockQ, size = (n + t - 1) / t;
  for (int64_t i0 = lo; i0 < hi; i0 += size) f(i0, imin(size, hi - i0));
}

// dK and dV of keys [j0, j0 + nk) of (b, hk): every query head of the group, every query row of
// the intervals, one query tile at a time (each tile's sum is added to the accumulators once).
template <typename T>
static void key_block(const BwdParams& p, const KeyItem& it, const QueryInterval* iv,
                      int64_t n_iv, float* scratch) {
  const Scratch s = layout(p, scratch);
  const int64_t D = p.head_dim, Dv = p.v_dim, nk = it.nk, nkp = round_up(nk, MR);
  const int64_t G = p.heads / p.kv_heads;
  const float* cs = rotation(p, it.rot, it.hk);
  load_keys<T>(p, it.b, it.hk, it.j0, nk, cs, s, false);
  for (int64_t x = 0; x < nkp * s.Dp; ++x) s.accA[x] = 0.f;
  for (int64_t x = 0; x < nkp * s.Dvp; ++x) s.accB[x] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = it.hk * G + g;
    for (int64_t n = 0; n < n_iv; ++n)
      tiles(iv[n].lo, iv[n].hi, [&](int64_t i0, int64_t nq) {
        load_queries<T>(p, it.b, h, i0, nq, s);
        probabilities(p, round_up(nq, MR), nk, s);
        gemm<true>(nkp, s.Dvp, nq, s.S, s.ldk, s.dO, s.Dvp, s.accB, s.Dvp, kRun, true);
        gemm<true>(nkp, s.Dp, nq, s.dP, s.ldk, s.Qs, s.Dp, s.accA, s.Dp, kRun, true);
      });
  }
  // q was scaled on load, so accA already is dK of the rotated keys; the stored key's gradient
  // is R^T dK (the inverse rotation: sin negated).
  T* dkb = static_cast<T*>(p.dk) + it.b * p.dk_sb + it.hk * p.dk_sh;
  T* dvb = static_cast<T*>(p.dv) + it.b * p.dv_sb + it.hk * p.dv_sh;
  for (int64_t j = 0; j < nk; ++j) {
    float* a = s.accA + j * s.Dp;
    if (cs)
      for (int64_t t = 0; t < p.c_t; ++t) {
        const float g0 = a[2 * t], g1 = a[2 * t + 1], co = cs[2 * t], si = cs[2 * t + 1];
        a[2 * t] = g0 * co + g1 * si;
        a[2 * t + 1] = g1 * co - g0 * si;
      }
    T* dk = dkb + (it.j0 + j) * p.dk_sl;
    for (int64_t d = 0; d < D; ++d) dk[d] = static_cast<T>(a[d]);
    T* dv = dvb + (it.j0 + j) * p.dv_sl;
    for (int64_t e = 0; e < Dv; ++e) dv[e] = static_cast<T>(s.accB[j * s.Dvp + e]);
  }
}

// dQ of query rows [q0, q0 + nq) of (b, h) over the key ranges they attend.
template <typename T>
static void query_tile(const BwdParams& p, const QueryItem& it, const KeyRange* ranges,
                       int64_t n_ranges, float* scratch) {
  const Scratch s = layout(p, scratch);
  const int64_t D = p.head_dim, nq = it.nq, nqp = round_up(nq, MR);
  const int64_t hk = it.h / (p.heads / p.kv_heads);
  load_queries<T>(p, it.b, it.h, it.q0, nq, s);
  for (int64_t x = 0; x < nqp * s.Dp; ++x) s.accA[x] = 0.f;
  for (int64_t r = 0; r < n_ranges; ++r) {
    const float* cs = rotation(p, ranges[r].rot, hk);
    for (int64_t j0 = ranges[r].lo; j0 < ranges[r].hi; j0 += kBlockK) {
      const int64_t nk = imin(kBlockK, ranges[r].hi - j0);
      load_keys<T>(p, it.b, hk, j0, nk, cs, s, true);
      probabilities(p, nqp, nk, s);
      gemm<false>(nqp, s.Dp, nk, s.dP, s.ldk, s.Kn, s.Dp, s.accA, s.Dp, kRun, true);
    }
  }
  const float scale = static_cast<float>(p.scale);
  T* qb = static_cast<T*>(p.dq) + it.b * p.dq_sb + it.h * p.dq_sh;
  for (int64_t i = 0; i < nq; ++i) {
    T* dq = qb + (it.q0 + i) * p.dq_sl;
    for (int64_t d = 0; d < D; ++d) dq[d] = static_cast<T>(s.accA[i * s.Dp + d] * scale);
  }
}

// Delta = rowsum(dout * out), stored as float32, for the flattened (batch, query) rows
// [begin, end). Summed in float64: eager's softmax backward takes Delta from the same P and dP
// it multiplies, so their errors cancel; here Delta comes from out, and with few keys per row
// (a one-frame window of one-token frames) its float32 rounding decided the dq error (measured).
// O(L H Dv), outside the tile loops.
template <typename T>
static void delta_rows(const BwdParams& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / p.lq, i = r % p.lq;
    for (int64_t h = 0; h < p.heads; ++h) {
      const T* g = static_cast<const T*>(p.dout) + b * p.do_sb + i * p.do_sl + h * p.do_sh;
      const T* o = static_cast<const T*>(p.out) + b * p.o_sb + i * p.o_sl + h * p.o_sh;
      double sum = 0.;
      for (int64_t e = 0; e < p.v_dim; ++e)
        sum += static_cast<double>(static_cast<float>(g[e])) * static_cast<float>(o[e]);
      p.delta[(b * p.heads + h) * p.lq + i] = static_cast<float>(sum);
    }
  }
}

static void delta_any(const BwdParams& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case at::kFloat: return delta_rows<float>(p, begin, end);
    case at::kHalf: return delta_rows<at::Half>(p, begin, end);
    default: return delta_rows<at::BFloat16>(p, begin, end);
  }
}

static void key_block_any(const BwdParams& p, const KeyItem& it, const QueryInterval* iv,
                          int64_t n, float* scratch) {
  switch (p.dtype) {
    case at::kFloat: return key_block<float>(p, it, iv, n, scratch);
    case at::kHalf: return key_block<at::Half>(p, it, iv, n, scratch);
    default: return key_block<at::BFloat16>(p, it, iv, n, scratch);
  }
}

static void query_tile_any(const BwdParams& p, const QueryItem& it, const KeyRange* ranges,
                           int64_t n, float* scratch) {
  switch (p.dtype) {
    case at::kFloat: return query_tile<float>(p, it, ranges, n, scratch);
    case at::kHalf: return query_tile<at::Half>(p, it, ranges, n, scratch);
    default: return query_tile<at::BFloat16>(p, it, ranges, n, scratch);
  }
}

const IsaKernels kKernels = {&delta_any, &key_block_any, &query_tile_any, &scratch_floats};
