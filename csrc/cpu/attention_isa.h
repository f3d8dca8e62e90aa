// The tiled online-softmax attention kernel of csrc/cpu/attention.cpp, written once with GCC
// vector extensions and compiled once per instruction set by cpu/isa_dispatch.h. No include
// guard and no includes but the ISA body's own cpu/vec_isa.h (see isa_dispatch.h).

#include "cpu/vec_isa.h"

// 2^x for x <= 0 (scores minus their running max), ~1 ulp; below -126 (and -inf) gives 0, NaN
// gives NaN (the clamp keeps it, as its NaN operand is the second; the polynomial carries it
// whatever the integer conversion makes of it).
// A polynomial rather than std::exp2 so the whole row stays in vector registers.
static inline vf exp2v(vf x) {
  const vi under = x < splat(-126.f);
  x = vmax(splat(-126.f), x);
  const vf n = (x + 12582912.f) - 12582912.f;  // round to nearest integer
  const vf f = (x - n) * 0.69314718055994531f;  // in [-ln2/2, ln2/2]
  return exp_poly(f, n, under);
}

// C[M, N] (+)= A[M, K] . B[K, N], row-major float; M % MR == 0, N % kCols == 0. The MR x NC
// register tile of C stays in registers across the whole K loop.
static void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t i0 = 0; i0 < M; i0 += MR) {
    for (int64_t j0 = 0; j0 < N; j0 += kCols) {
      vf c[MR][NC];
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NC; ++v)
          c[r][v] = accumulate ? loadv(C + (i0 + r) * ldc + j0 + v * VS) : splat(0.f);
      const float* a = A + i0 * lda;
      const float* b = B + j0;
      for (int64_t kk = 0; kk < K; ++kk) {
        vf bv[NC];
#pragma GCC unroll 8
        for (int v = 0; v < NC; ++v) bv[v] = loadv(b + kk * ldb + v * VS);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const vf av = splat(a[r * lda + kk]);
#pragma GCC unroll 8
          for (int v = 0; v < NC; ++v) c[r][v] += av * bv[v];
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NC; ++v) storev(C + (i0 + r) * ldc + j0 + v * VS, c[r][v]);
    }
  }
}

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static inline float fmax1(float a, float b) { return a > b ? a : b; }

// A row whose running max is +inf, which holds a +inf score: weights taken against +inf, as the
// limit of eager softmax's, +inf for a +inf score, 0 for a finite one, NaN for NaN. Lsum then
// ends +inf (NaN with a NaN score) and every column of O non-finite, so the row comes out NaN
// with lse = M + log(Lsum) = +inf (NaN), as torch.softmax / torch.logsumexp give.
static float weights_at_inf(float* srow) {
  const float inf = __builtin_inff();
  float sum = 0.f;
  for (int64_t j = 0; j < kBlockK; ++j) {
    const float x = srow[j];
    srow[j] = x == inf ? inf : x != x ? x : 0.f;
    sum += srow[j];
  }
  return sum;
}

// Floats of per-thread scratch attend_tile needs: Q, K^T, V, S, O tiles and two row vectors.
static int64_t scratch_floats(const AttnProblem& p) {
  const int64_t bq = round_up(kBlockQ, MR), dvp = round_up(p.v_dim, kCols);
  return bq * p.head_dim + p.head_dim * kBlockK + kBlockK * dvp + bq * kBlockK + bq * dvp +
         bq * (dvp > kBlockK ? dvp : kBlockK) + 3 * bq;
}

// One query tile (rows [q0, q0 + nq) of batch b, head h) against the union of `ranges`.
// Only raw pointers cross this boundary: no std template is instantiated under the target
// pragma, so no ISA-specific copy of one can leak to the baseline code through the linker.
// `rot` (kv_deltas): nullptr, or per range the row of its temporal rotation (AttnProblem).
template <typename T>
static void attend_tile(const AttnProblem& p, const WorkItem& it, const TokenRange* ranges,
                        const float* const* rot, int64_t num_ranges, float* scratch) {
  const int64_t b = it.b, h = it.h, q0 = it.q0, nq = it.nq;
  const int64_t D = p.head_dim, Dv = p.v_dim;
  const int64_t dvp = round_up(Dv, kCols);
  const int64_t nqp = round_up(nq, MR);
  const int64_t bq = round_up(kBlockQ, MR);
  const int64_t hk = h / (p.heads / p.kv_heads);
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  // Scores stay in natural units (a power-of-two scale, e.g. 64**-0.5, then rounds nothing);
  // only the non-positive differences from the running max are taken to log2 units for exp2.
  const float qscale = static_cast<float>(p.scale);
  const float kLog2e = 1.4426950408889634f;
  const float kSlack = 8.f;
  constexpr int64_t kDotRun = 32;
  float* Q = scratch;
  float* Kt = Q + bq * D;
  float* V = Kt + D * kBlockK;
  float* S = V + kBlockK * dvp;
  float* O = S + bq * kBlockK;
  float* Ob = O + bq * dvp;  // one block's P.V (or a partial score tile) before it is added
  float* M = Ob + bq * (dvp > kBlockK ? dvp : kBlockK);
  float* Lsum = M + bq;
  float* Alpha = Lsum + bq;  // per-row rescale of O for the current block
  for (int64_t i = 0; i < nqp; ++i)
    for (int64_t d = 0; d < D; ++d)
      Q[i * D + d] = i < nq ? static_cast<float>(qb[(q0 + i) * p.q_sl + d]) * qscale : 0.f;
  const float ninf = -__builtin_inff();
  for (int64_t x = 0; x < nqp * dvp; ++x) O[x] = 0.f;
  for (int64_t i = 0; i < nqp; ++i) {
    M[i] = ninf;
    Lsum[i] = 0.f;
  }

  for (int64_t r = 0; r < num_ranges; ++r) {
    const TokenRange rg = ranges[r];
    // This range's (cos, sin) pairs for kv head hk, or nullptr: decided once per range.
    const float* cs = rot != nullptr ? rot[r] + hk * p.rot_sh : nullptr;
    const int64_t band = cs != nullptr ? 2 * p.rot_pairs : 0;
    for (int64_t j0 = rg.first; j0 < rg.second; j0 += kBlockK) {
      const int64_t nk = rg.second - j0 < kBlockK ? rg.second - j0 : kBlockK;
      // K^T (zero-padded to a full block) so the score GEMM walks contiguous rows of keys.
      if (cs == nullptr) {
        for (int64_t j = 0; j < nk; ++j) {
          const T* kr = kb + (j0 + j) * p.k_sl;
          for (int64_t d = 0; d < D; ++d) Kt[d * kBlockK + j] = static_cast<float>(kr[d]);
        }
      } else {
        // The key as rope3d_shift_ would leave it: its temporal pairs rotated in float32 by
        // the same table entries, in rope3d_shift_'s expression (x cc + x' ss, rotate_interleaved
        // in cpu/rope3d_isa.h), so a float32 key matches the shifted pool's to float32 rounding
        // (bit for bit where the compiler contracts both into the same FMAs). Not rounded back
        // to T: a 16-bit key keeps the rotation's float32 digits. The block is loaded once per
        // query tile (up to kBlockQ rows), so the rotation costs little beside the score GEMM.
        for (int64_t j = 0; j < nk; ++j) {
          const T* kr = kb + (j0 + j) * p.k_sl;
          for (int64_t d = 0; d < band; d += 2) {
            const float a = static_cast<float>(kr[d]), b = static_cast<float>(kr[d + 1]);
            const float c = cs[d], sn = cs[d + 1];
            Kt[d * kBlockK + j] = a * c + b * -sn;
            Kt[(d + 1) * kBlockK + j] = b * c + a * sn;
          }
          for (int64_t d = band; d < D; ++d) Kt[d * kBlockK + j] = static_cast<float>(kr[d]);
        }
      }
      if (nk < kBlockK)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = nk; j < kBlockK; ++j) Kt[d * kBlockK + j] = 0.f;
      for (int64_t j = 0; j < nk; ++j) {
        const T* vr = vb + (j0 + j) * p.v_sl;
        float* dst = V + j * dvp;
        for (int64_t e = 0; e < Dv; ++e) dst[e] = static_cast<float>(vr[e]);
        for (int64_t e = Dv; e < dvp; ++e) dst[e] = 0.f;
      }
      // Scores summed in two levels (runs of kDotRun products, then the runs), as a blocked
      // BLAS GEMM does: a head dim of 128 summed in one chain costs float32 digits.
      gemm_nn(nqp, kBlockK, D < kDotRun ? D : kDotRun, Q, D, Kt, kBlockK, S, kBlockK, false);
      for (int64_t d0 = kDotRun; d0 < D; d0 += kDotRun) {
        const int64_t nd = D - d0 < kDotRun ? D - d0 : kDotRun;
        gemm_nn(nqp, kBlockK, nd, Q + d0, D, Kt + d0 * kBlockK, kBlockK, Ob, kBlockK, false);
        for (int64_t x = 0; x < nqp * kBlockK; x += VS) storev(S + x, loadv(S + x) + loadv(Ob + x));
      }
      for (int64_t i = 0; i < nqp; ++i) {
        float* srow = S + i * kBlockK;
        for (int64_t j = nk; j < kBlockK; ++j) srow[j] = ninf;
        vf mx = loadv(srow);
        for (int64_t j = VS; j < kBlockK; j += VS) mx = vmax(mx, loadv(srow + j));
        float row_max = mx[0];
        for (int t = 1; t < VS; ++t) row_max = fmax1(row_max, mx[t]);
        // Lazy rescaling: the running max moves only when a block beats it by more than
        // kSlack, so later blocks (weights up to e^kSlack, far from overflow) rarely pay a
        // rescale of O, and O collects fewer roundings than one rescale per block would add.
        // NaN (docs/spec.md, NaN and Inf) is carried by the sums, not by the max: this max may
        // drop a NaN score (and M is never NaN), but that score's weight exp2v(NaN) is NaN,
        // which makes Lsum and every column of O NaN for good (NaN * alpha, even 0, is NaN).
        const float m_new = row_max > M[i] + kSlack ? row_max : M[i];
        float m_use = m_new, alpha, row_sum = 0.f;
        if (__builtin_expect(m_new - m_new != 0.f, 0)) {  // m_new = +-inf: rare
          if (m_new > 0.f) {  // a +inf score
            alpha = M[i] == m_new ? 1.f : 0.f;
            row_sum = weights_at_inf(srow);
            M[i] = m_new;
            Lsum[i] = Lsum[i] * alpha + row_sum;
            Alpha[i] = alpha;
            continue;
          }
          // Only -inf scores so far (e.g. -inf in a key): weights against 0, not -inf, as
          // -inf - -inf would make NaN of a row that has none.
          m_use = 0.f;
        }
        alpha = __builtin_exp2f((M[i] - m_use) * kLog2e);  // 0 on the first finite block (M = -inf)
        M[i] = m_new;
        vf sum = splat(0.f);
        for (int64_t j = 0; j < kBlockK; j += VS) {
          const vf pj = exp2v((loadv(srow + j) - m_use) * kLog2e);
          storev(srow + j, pj);
          sum += pj;
        }
        for (int t = 0; t < VS; ++t) row_sum += sum[t];
        Lsum[i] = Lsum[i] * alpha + row_sum;
        Alpha[i] = alpha;
      }
      // Two-level sums: each block's P.V is formed on its own, then added to O, so O's rounding
      // grows with the number of blocks, not of keys (eager's blocked GEMM sums about as well).
      gemm_nn(nqp, dvp, nk, S, kBlockK, V, dvp, Ob, dvp, false);
      for (int64_t i = 0; i < nqp; ++i) {
        const vf a = splat(Alpha[i]);
        float* orow = O + i * dvp;
        const float* brow = Ob + i * dvp;
        for (int64_t e = 0; e < dvp; e += VS) storev(orow + e, loadv(orow + e) * a + loadv(brow + e));
      }
    }
  }

  // What torch.softmax / torch.logsumexp make of each row (docs/spec.md, NaN and Inf). A NaN
  // score left Lsum and O NaN: out and lse NaN; a +inf score (and no NaN) left M and Lsum +inf
  // and O non-finite: out NaN, lse +inf. Lsum == 0 with keys allowed: every score was -inf,
  // softmax's 0/0 (NaN), lse -inf. Only the empty set of keys gives zeros.
  bool any_keys = false;
  for (int64_t r = 0; r < num_ranges; ++r) any_keys |= ranges[r].second > ranges[r].first;
  const float empty_out = any_keys ? __builtin_nanf("") : 0.f;
  T* ob = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh;
  float* lb = p.lse + (b * p.heads + h) * p.lse_sh;
  for (int64_t i = 0; i < nq; ++i) {
    T* orow = ob + (q0 + i) * p.o_sl;
    const float l = Lsum[i];
    if (l > 0.f || l != l) {
      // A true division, not a reciprocal and a multiply: one rounding fewer per output.
      for (int64_t e = 0; e < Dv; ++e) orow[e] = static_cast<T>(O[i * dvp + e] / l);
      lb[q0 + i] = M[i] + __builtin_logf(l);
    } else {
      for (int64_t e = 0; e < Dv; ++e) orow[e] = static_cast<T>(empty_out);
      lb[q0 + i] = ninf;
    }
  }
}

static void attend_tile_any(const AttnProblem& p, const WorkItem& it, const TokenRange* ranges,
                            const float* const* rot, int64_t num_ranges, float* scratch) {
  switch (p.dtype) {
    case at::kFloat: return attend_tile<float>(p, it, ranges, rot, num_ranges, scratch);
    case at::kHalf: return attend_tile<at::Half>(p, it, ranges, rot, num_ranges, scratch);
    default: return attend_tile<at::BFloat16>(p, it, ranges, rot, num_ranges, scratch);
  }
}

const IsaKernels kKernels = {&attend_tile_any, &scratch_floats};
