// C++ CPU kernel of select_blocks (docs/spec.md §5). "mean" never forms QK^T: it reduces the
// sampled queries to one sum per (batch, head) and each block's keys to one sum per (batch,
// kv head), then takes D-long dot products. "max" reduces the queries to their mean and takes one dot
// product per key. Sums run in float64: they are O((|S| + tokens) * D) adds, cheap next to the
// memory traffic, and keep the scores at least as accurate as eager float32.
// block_deltas (keys scored where attention will see them) rotate, per block, the key sum
// ("mean") or the mean query, backwards ("max"): never each key (see the loops).
// Work is split over blocks; per-block arithmetic is fixed, so equal blocks score equally.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <limits>

#include "ranges.h"
#include "select_common.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

// acc[0, D) += the n rows base + r * row_stride. Float partial sums over runs of kRun rows
// vectorise; folding each run into float64 keeps long sums (thousands of queries) accurate.
constexpr int64_t kRun = 32;

// Items per parallel chunk so that a chunk holds about 2M element operations: waking a second
// thread costs more than the whole selection when there is less (and far more on a busy host).
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(1, work_per_item));
}

template <typename T>
inline void add_rows(double* acc, const T* base, int64_t row_stride, int64_t n, int64_t D,
                     float* tmp) {
  for (int64_t r0 = 0; r0 < n; r0 += kRun) {
    std::fill(tmp, tmp + D, 0.f);
    const int64_t r1 = std::min(n, r0 + kRun);
    int64_t r = r0;
    // Four rows per pass over tmp: one load and store of tmp per four rows read.
    for (; r + 4 <= r1; r += 4) {
      const T* a = base + r * row_stride;
      const T* b = a + row_stride;
      const T* c = b + row_stride;
      const T* e = c + row_stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d)
        tmp[d] += (static_cast<float>(a[d]) + static_cast<float>(b[d])) +
                  (static_cast<float>(c[d]) + static_cast<float>(e[d]));
    }
    for (; r < r1; ++r) {
      const T* row = base + r * row_stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) tmp[d] += static_cast<float>(row[d]);
    }
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<double>(tmp[d]);
  }
}

// max(a, b), NaN when either is: a block holding a NaN key scores NaN under "max" (docs/spec.md,
// NaN and Inf), wherever the key sits; std::max would keep or drop it by its position.
inline double max_nan(double a, double b) { return a > b || a != a ? a : b; }

template <typename T>
inline float dot_f(const float* a, const T* b, int64_t D) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += a[d] * static_cast<float>(b[d]);
  return acc;
}

// Four rows against one vector, sharing its loads.
template <typename T>
inline void dot4_f(const float* a, const T* r0, const T* r1, const T* r2, const T* r3, int64_t D,
                   float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t d = 0; d < D; ++d) {
    const float x = a[d];
    s0 += x * static_cast<float>(r0[d]);
    s1 += x * static_cast<float>(r1[d]);
    s2 += x * static_cast<float>(r2[d]);
    s3 += x * static_cast<float>(r3[d]);
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// q . (R k) over the head dim, R rotating the first 2 * pairs channels of k in adjacent pairs
// by cs's (cos, sin): block_deltas' "mean" with the key sum rotated on the fly in float64 (the
// rotation is linear, so it moves a block's key sum as it moves each key).
template <typename K>
inline double dot_rotated(const double* q, const K* k, const float* cs, int64_t pairs, int64_t D) {
  double acc = 0.0;
  for (int64_t t = 0; t < pairs; ++t) {
    const double a = static_cast<double>(k[2 * t]), b = static_cast<double>(k[2 * t + 1]);
    const double c = cs[2 * t], sn = cs[2 * t + 1];
    acc += q[2 * t] * (a * c - b * sn) + q[2 * t + 1] * (a * sn + b * c);
  }
  for (int64_t d = 2 * pairs; d < D; ++d) acc += q[d] * static_cast<double>(k[d]);
  return acc;
}

// dst = R^T q: q's first 2 * pairs channels rotated by minus cs's angles (sin negated, exact).
inline void rotate_back(const float* q, const float* cs, int64_t pairs, int64_t D, float* dst) {
  for (int64_t t = 0; t < pairs; ++t) {
    const float a = q[2 * t], b = q[2 * t + 1], c = cs[2 * t], sn = cs[2 * t + 1];
    dst[2 * t] = a * c + b * sn;
    dst[2 * t + 1] = b * c - a * sn;
  }
  for (int64_t d = 2 * pairs; d < D; ++d) dst[d] = q[d];
}

// block_deltas as the scoring loops read them: block m's (cos, sin) pairs for kv head h are
// rows + m * row_stride + h * head_stride (temporal_table()); rows == nullptr: no offsets.
struct BlockShift {
  const float* rows = nullptr;
  int64_t row_stride = 0, head_stride = 0, pairs = 0;
  const float* at(int64_t m, int64_t kv_head) const {
    return rows + m * row_stride + kv_head * head_stride;
  }
};

template <typename T>
void select_scores_cpu(const at::Tensor& q, const at::Tensor& k_pool, const SelectProblem& p,
                       const std::vector<TokenRange>& ranges, int64_t query_stride,
                       const std::vector<int64_t>& heads,
                       const std::vector<int64_t>& kv_of, double scale, const at::Tensor& sums,
                       const BlockShift& shift, float* out) {
  const int64_t B = p.batch, D = p.head_dim, Hs = static_cast<int64_t>(heads.size());
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const int64_t sqb = q.stride(0), sql = q.stride(1), sqh = q.stride(2);
  const int64_t skb = k_pool.stride(0), skl = k_pool.stride(1), skh = k_pool.stride(2);

  // qred[b, hi, :] = sum over sampled queries i of q[b, i, heads[hi], :].
  std::vector<double> qred(B * Hs * D, 0.0);
  at::parallel_for(0, B * Hs, grain_for(p.sampled * D), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / Hs, hi = n % Hs;
      std::vector<float> tmp(D);
      add_rows(qred.data() + n * D, qp + b * sqb + heads[hi] * sqh, query_stride * sql, p.sampled,
               D, tmp.data());
    }
  });

  // The distinct kv heads the chosen query heads read, so grouped heads sum a block once.
  std::vector<int64_t> kv_used(kv_of);
  std::sort(kv_used.begin(), kv_used.end());
  kv_used.erase(std::unique(kv_used.begin(), kv_used.end()), kv_used.end());
  const int64_t U = static_cast<int64_t>(kv_used.size());
  std::vector<int64_t> slot_of(Hs);
  for (int64_t hi = 0; hi < Hs; ++hi)
    slot_of[hi] = std::lower_bound(kv_used.begin(), kv_used.end(), kv_of[hi]) - kv_used.begin();

  if (p.mean) {
    const double norm = scale / static_cast<double>(B * Hs * p.sampled);
    const float* sp = sums.defined() ? sums.data_ptr<float>() : nullptr;
    const int64_t avg_len = p.blocks ? p.pool_len / p.blocks + 1 : 1;
    const int64_t per_block = B * (Hs * D + (sp ? 0 : U * D * avg_len));
    at::parallel_for(0, p.blocks, grain_for(per_block), [&](int64_t begin, int64_t end) {
      std::vector<double> ksum(U * D);
      std::vector<float> tmp(D);
      for (int64_t m = begin; m < end; ++m) {
        if (ranges[m].second == ranges[m].first) {
          // A sum over no (query, key) pair: 0, even where a sampled query holds a NaN (the
          // factorised form would give NaN . 0 = NaN); given key sums are not read for it.
          out[m] = 0.f;
          continue;
        }
        double total = 0.0;
        for (int64_t b = 0; b < B; ++b) {
          if (sp == nullptr) {
            std::fill(ksum.begin(), ksum.end(), 0.0);
            const int64_t s = ranges[m].first, len = ranges[m].second - s;
            for (int64_t u = 0; u < U; ++u)
              add_rows(ksum.data() + u * D, kp + b * skb + s * skl + kv_used[u] * skh, skl, len,
                       D, tmp.data());
          }
          for (int64_t hi = 0; hi < Hs; ++hi) {
            const double* qv = qred.data() + (b * Hs + hi) * D;
            double acc = 0.0;
            if (sp != nullptr) {
              const float* kv = sp + ((b * p.blocks + m) * p.kv_heads + kv_of[hi]) * D;
              if (shift.rows != nullptr) {
                acc = dot_rotated(qv, kv, shift.at(m, kv_of[hi]), shift.pairs, D);
              } else {
                for (int64_t d = 0; d < D; ++d) acc += qv[d] * static_cast<double>(kv[d]);
              }
            } else {
              const double* kv = ksum.data() + slot_of[hi] * D;
              if (shift.rows != nullptr) {
                acc = dot_rotated(qv, kv, shift.at(m, kv_of[hi]), shift.pairs, D);
              } else {
                for (int64_t d = 0; d < D; ++d) acc += qv[d] * kv[d];
              }
            }
            total += acc;
          }
        }
        out[m] = static_cast<float>(total * norm);
      }
    });
    return;
  }

  // qbar in float: one float32 dot product per key, as eager float32 takes it.
  const double inv_s = 1.0 / static_cast<double>(p.sampled);
  std::vector<float> qbar(qred.size());
  for (size_t i = 0; i < qred.size(); ++i) qbar[i] = static_cast<float>(qred[i] * inv_s);
  const int64_t avg_len = p.blocks ? p.pool_len / p.blocks + 1 : 1;
  at::parallel_for(0, p.blocks, grain_for(B * Hs * D * avg_len), [&](int64_t begin, int64_t end) {
    std::vector<double> best(Hs);
    std::vector<float> qrot(shift.rows != nullptr ? D : 0);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t s = ranges[m].first, e = ranges[m].second;
      if (s == e) {
        out[m] = -std::numeric_limits<float>::infinity();
        continue;
      }
      double total = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        std::fill(best.begin(), best.end(), -std::numeric_limits<double>::infinity());
        for (int64_t hi = 0; hi < Hs; ++hi) {
          const float* qv = qbar.data() + (b * Hs + hi) * D;
          if (shift.rows != nullptr) {
            // block_deltas: (R q) . k = q . (R^T k), so the mean query turns back by the
            // block's angles once, instead of every key of the block turning forward: one
            // rotation per (block, head), not per key, with the same float32 table entries
            // (R^T negates sin, exactly) and one float32 rounding of the band either way. A
            // key is read as stored, so its NaN or Inf reaches the score as without offsets.
            rotate_back(qv, shift.at(m, kv_of[hi]), shift.pairs, D, qrot.data());
            qv = qrot.data();
          }
          const T* k0 = kp + b * skb + kv_of[hi] * skh;
          float d4[4];
          int64_t j = s;
          for (; j + 4 <= e; j += 4) {
            const T* r = k0 + j * skl;
            dot4_f(qv, r, r + skl, r + 2 * skl, r + 3 * skl, D, d4);
            for (int u = 0; u < 4; ++u)
              best[hi] = max_nan(best[hi], scale * static_cast<double>(d4[u]));
          }
          for (; j < e; ++j)
            best[hi] = max_nan(best[hi], scale * static_cast<double>(dot_f(qv, k0 + j * skl, D)));
        }
        for (int64_t hi = 0; hi < Hs; ++hi) total += best[hi];
      }
      out[m] = static_cast<float>(total / static_cast<double>(B * Hs));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> select_blocks_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& block_ranges, int64_t k,
    int64_t query_stride, at::IntArrayRef heads, c10::string_view score, double scale,
    const std::optional<at::Tensor>& block_key_sums, const std::optional<at::Tensor>& block_deltas,
    double theta, const std::optional<at::Tensor>& t_theta) {
  check_select_blocks_args(q_in, k_in, k, query_stride, heads, at::kCPU);
  const std::vector<TokenRange> ranges =
      read_ranges(block_ranges, k_in.size(1), "block_ranges", q_in);
  const int64_t blocks = static_cast<int64_t>(ranges.size());
  check_block_key_sums(block_key_sums, q_in, k_in, blocks);
  const at::Tensor table =
      block_deltas ? block_shift_table(*block_deltas, t_theta, blocks, k_in, theta) : at::Tensor();
  BlockShift shift;
  if (table.defined()) {
    shift.rows = table.data_ptr<float>();
    shift.row_stride = table.stride(0);
    shift.head_stride = table.size(1) > 1 ? table.stride(1) : 0;
    shift.pairs = table.size(2);
  }
  const SelectProblem p = select_problem(q_in, k_in, blocks, query_stride, score);
  // The inner loops walk the head dim with unit stride.
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k_pool = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  // A no-op for the float32 sums block_key_sums() makes; an ATen conversion of anything else.
  const at::Tensor sums = (block_key_sums && p.mean)
                              ? block_key_sums->to(at::kFloat).contiguous()
                              : at::Tensor();
  std::vector<int64_t> hv(heads.begin(), heads.end()), kv_of(heads.size());
  const int64_t group = p.heads / p.kv_heads;
  for (size_t i = 0; i < hv.size(); ++i) kv_of[i] = hv[i] / group;
  at::Tensor scores = at::empty({p.blocks}, q.options().dtype(at::kFloat));
  float* sp = scores.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "select_blocks_cpu",
                                  [&] {
                                    select_scores_cpu<scalar_t>(q, k_pool, p, ranges,
                                                                query_stride, hv, kv_of, scale,
                                                                sums, shift, sp);
                                  });
  const std::vector<int64_t> top = topk_ascending(sp, p.blocks, k);
  at::Tensor idx = at::empty({static_cast<int64_t>(top.size())}, q.options().dtype(at::kLong));
  std::copy(top.begin(), top.end(), idx.data_ptr<int64_t>());
  return {scores, idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CPU, m) { m.impl("select_blocks", &select_blocks_cpu); }

}  // namespace vidstream
