// C++ CPU kernels of rope3d and rope3d_shift_: parallel over tokens, float32 arithmetic,
// rotation angles from the float64-built tables of rope3d_common.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "cpu/multiversion.h"
#include "rope3d_common.h"

namespace vidstream {
namespace {

// Conversions to and from float32. c10's bfloat16 rounding branches on NaN, which keeps the
// compiler from vectorizing the loop; this select-based version rounds to nearest even with the
// same results, NaN included.
template <typename T>
struct Convert {
  static VIDSTREAM_INLINE float load(T v) { return static_cast<float>(v); }
  static VIDSTREAM_INLINE T store(float f) { return static_cast<T>(f); }
};
template <>
struct Convert<c10::BFloat16> {
  static VIDSTREAM_INLINE float load(c10::BFloat16 v) {
    const uint32_t u = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static VIDSTREAM_INLINE c10::BFloat16 store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = f != f ? 0x7FC0u : r;
    return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
  }
};

// Rotates n adjacent pairs (x[2p], x[2p+1]) by the (cos, sin) pairs of `cs`. The pairs go
// through local float buffers: in place (src == dst) a direct loop would fail the compiler's
// run-time overlap check and fall back to scalar code.
template <typename T>
VIDSTREAM_INLINE void rotate_pairs(const T* src, T* dst, const float* __restrict__ cs, int64_t n) {
  using C = Convert<T>;
  constexpr int64_t kChunk = 64;
  float a[kChunk], b[kChunk];
  for (int64_t p0 = 0; p0 < n; p0 += kChunk) {
    const int64_t m = std::min(kChunk, n - p0);
    const T* s = src + 2 * p0;
    const float* t = cs + 2 * p0;
    for (int64_t p = 0; p < m; ++p) {
      a[p] = C::load(s[2 * p]);
      b[p] = C::load(s[2 * p + 1]);
    }
    T* d = dst + 2 * p0;
    for (int64_t p = 0; p < m; ++p) {
      d[2 * p] = C::store(a[p] * t[2 * p] - b[p] * t[2 * p + 1]);
      d[2 * p + 1] = C::store(a[p] * t[2 * p + 1] + b[p] * t[2 * p]);
    }
  }
}

// One token, every head: the three bands, each with its own row of the tables.
template <typename T>
VIDSTREAM_MULTIVERSION void rope3d_token(const T* src, T* dst, int64_t heads, int64_t src_stride_h,
                                         int64_t dst_stride_h, int64_t head_dim, RopeBands bands,
                                         const float* cs_t, int64_t cs_t_head_stride,
                                         const float* cs_h, const float* cs_w) {
  const int64_t o_h = 2 * bands.c_t, o_w = 2 * (bands.c_t + bands.c_h);
  const int64_t o_end = 2 * (bands.c_t + bands.c_h + bands.c_w);
  for (int64_t h = 0; h < heads; ++h) {
    const T* s = src + h * src_stride_h;
    T* d = dst + h * dst_stride_h;
    rotate_pairs(s, d, cs_t + h * cs_t_head_stride, bands.c_t);
    rotate_pairs(s + o_h, d + o_h, cs_h, bands.c_h);
    rotate_pairs(s + o_w, d + o_w, cs_w, bands.c_w);
    for (int64_t k = o_end; k < head_dim; ++k) d[k] = s[k];
  }
}

// Rotates the n2 (even) interleaved values of x in place: out[k] = x[k] cc[k] + x[k^1] ss[k],
// with cc = (c0, c0, c1, c1, ...) and ss = (-s0, s0, -s1, s1, ...). Unlike the pair loop this
// form has no de-interleave, so the whole band runs as full-width vector code.
template <typename T>
VIDSTREAM_INLINE void rotate_interleaved(T* x, const float* __restrict__ cc, const float* __restrict__ ss,
                               int64_t n2) {
  using C = Convert<T>;
  constexpr int64_t kChunk = 128;
  float buf[kChunk];
  for (int64_t k0 = 0; k0 < n2; k0 += kChunk) {
    const int64_t m = std::min(kChunk, n2 - k0);
    T* xs = x + k0;
    for (int64_t k = 0; k < m; ++k) buf[k] = C::load(xs[k]);
    const float* c = cc + k0;
    const float* s = ss + k0;
    for (int64_t k = 0; k < m; k += 2) {
      xs[k] = C::store(buf[k] * c[k] + buf[k + 1] * s[k]);
      xs[k + 1] = C::store(buf[k + 1] * c[k + 1] + buf[k] * s[k + 1]);
    }
  }
}

// One token of a range, every head: the temporal band only, in place. The band is a few cache
// lines out of each head row, a pattern the hardware prefetcher follows poorly, so the same
// lines of a token `ahead` strides later are requested now.
template <typename T>
VIDSTREAM_MULTIVERSION void shift_token(T* x, int64_t heads, int64_t stride_h, const float* cc,
                                        const float* ss, int64_t head_stride, int64_t c_t,
                                        int64_t ahead) {
  const int64_t band_bytes = 2 * c_t * static_cast<int64_t>(sizeof(T));
  for (int64_t h = 0; h < heads; ++h) {
    const char* next = reinterpret_cast<const char*>(x + h * stride_h + ahead);
    for (int64_t off = 0; off < band_bytes; off += 64) __builtin_prefetch(next + off, 1, 3);
    rotate_interleaved(x + h * stride_h, cc + h * head_stride, ss + h * head_stride, 2 * c_t);
  }
}

template <typename T>
void rope3d_cpu_kernel(const at::Tensor& x, at::Tensor& out, const Rope3dTables& tab,
                       int64_t height, int64_t width) {
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3);
  const RopeBands bands = rope_bands(D);
  const int64_t hw = height * width;
  const int64_t t_heads = tab.temporal.size(1);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float* tt = tab.temporal.data_ptr<float>();
  const float* th = tab.height.data_ptr<float>();
  const float* tw = tab.width.data_ptr<float>();
  const int64_t sxb = x.stride(0), sxl = x.stride(1), sxh = x.stride(2);
  const int64_t sob = out.stride(0), sol = out.stride(1), soh = out.stride(2);
  at::parallel_for(0, B * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / L, i = n % L;
      const int64_t f = i / hw, y = (i % hw) / width, c = i % width;
      rope3d_token(xp + b * sxb + i * sxl, op + b * sob + i * sol, H, sxh, soh, D, bands,
                   tt + f * t_heads * bands.c_t * 2, t_heads > 1 ? bands.c_t * 2 : 0,
                   th + y * bands.c_h * 2, tw + c * bands.c_w * 2);
    }
  });
}

constexpr int64_t kPrefetchTokens = 4;

template <typename T>
void rope3d_shift_cpu_kernel(at::Tensor& pool, const std::vector<std::pair<int32_t, int32_t>>& ranges,
                             const at::Tensor& table) {
  const int64_t B = pool.size(0), H = pool.size(2);
  const int64_t c_t = rope_bands(pool.size(3)).c_t;
  const int64_t t_heads = table.size(1);
  T* pp = pool.data_ptr<T>();
  // (cos, sin) pairs [R, Ht, c_t, 2] -> cc = (c, c), ss = (-s, s), each [R, Ht, 2 c_t].
  const at::Tensor cos = table.select(-1, 0), sin = table.select(-1, 1);
  const at::Tensor cc = at::stack({cos, cos}, -1).flatten(-2).contiguous();
  const at::Tensor ss = at::stack({-sin, sin}, -1).flatten(-2).contiguous();
  const float* ccp = cc.data_ptr<float>();
  const float* ssp = ss.data_ptr<float>();
  const int64_t sb = pool.stride(0), sl = pool.stride(1), sh = pool.stride(2);
  // Flatten (range, token) into one index so work splits evenly whatever the range sizes.
  std::vector<int64_t> offsets(ranges.size() + 1, 0);
  for (size_t r = 0; r < ranges.size(); ++r)
    offsets[r + 1] = offsets[r] + (ranges[r].second - ranges[r].first);
  const int64_t total = offsets.back();
  if (total == 0) return;
  at::parallel_for(0, B * total, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / total, k = n % total;
      const int64_t r = std::upper_bound(offsets.begin(), offsets.end(), k) - offsets.begin() - 1;
      const int64_t i = ranges[r].first + (k - offsets[r]);
      const int64_t row = r * t_heads * c_t * 2;
      // Prefetch only inside the range: past its end the lines belong to no work.
      const int64_t ahead = i + kPrefetchTokens < ranges[r].second ? kPrefetchTokens * sl : 0;
      shift_token(pp + b * sb + i * sl, H, sh, ccp + row, ssp + row, t_heads > 1 ? c_t * 2 : 0,
                  c_t, ahead);
    }
  });
}

at::Tensor rope3d_cpu(const at::Tensor& x, int64_t frames, int64_t height, int64_t width,
                      double frame_offset, double theta, const std::optional<at::Tensor>& t_theta) {
  check_pool_like(x, "x");
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel");
  TORCH_CHECK(frames >= 0 && height > 0 && width > 0 && frames * height * width == x.size(1),
              "grid (F, h, w) = (", frames, ", ", height, ", ", width,
              ") must have F*h*w == L = ", x.size(1));
  check_t_theta(t_theta, x);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const Rope3dTables tab =
      rope3d_tables(frames, height, width, frame_offset, theta, t_theta, x.size(3), x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope3d_cpu", [&] {
    rope3d_cpu_kernel<scalar_t>(x, out, tab, height, width);
  });
  return out;
}

void rope3d_shift_cpu(at::Tensor& k_pool, const at::Tensor& ranges, const at::Tensor& delta_frames,
                      double theta, const std::optional<at::Tensor>& t_theta) {
  check_pool_like(k_pool, "k_pool");
  TORCH_CHECK(k_pool.device().is_cpu(), "k_pool must be a CPU tensor for the CPU kernel");
  check_writable(k_pool);
  check_t_theta(t_theta, k_pool);
  const auto host_ranges = checked_ranges(ranges, k_pool.size(1));
  const at::Tensor table = shift_table(delta_frames, static_cast<int64_t>(host_ranges.size()),
                                       theta, t_theta, k_pool.size(3), k_pool.device());
  if (k_pool.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_pool.scalar_type(),
                                  "rope3d_shift_cpu", [&] {
                                    rope3d_shift_cpu_kernel<scalar_t>(k_pool, host_ranges, table);
                                  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CPU, m) {
  m.impl("rope3d", &rope3d_cpu);
  m.impl("rope3d_shift_", &rope3d_shift_cpu);
}

}  // namespace vidstream
