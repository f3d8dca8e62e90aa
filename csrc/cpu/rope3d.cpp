// C++ CPU kernels of rope3d and rope3d_shift_: parallel over tokens, float32 arithmetic,
// rotation angles from the float64-built tables of rope3d_common.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "rope3d_common.h"

namespace vidstream {
namespace {

// Rotates n adjacent pairs (x[2p], x[2p+1]) by the (cos, sin) pairs of `cs`.
template <typename T>
inline void rotate_pairs(const T* src, T* dst, const float* cs, int64_t n) {
  for (int64_t p = 0; p < n; ++p) {
    const float a = static_cast<float>(src[2 * p]);
    const float b = static_cast<float>(src[2 * p + 1]);
    const float c = cs[2 * p], s = cs[2 * p + 1];
    dst[2 * p] = static_cast<T>(a * c - b * s);
    dst[2 * p + 1] = static_cast<T>(a * s + b * c);
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
      const float* cs_h = th + y * bands.c_h * 2;
      const float* cs_w = tw + c * bands.c_w * 2;
      for (int64_t h = 0; h < H; ++h) {
        const T* src = xp + b * sxb + i * sxl + h * sxh;
        T* dst = op + b * sob + i * sol + h * soh;
        const float* cs_t = tt + (f * t_heads + (t_heads > 1 ? h : 0)) * bands.c_t * 2;
        rotate_pairs(src, dst, cs_t, bands.c_t);
        rotate_pairs(src + 2 * bands.c_t, dst + 2 * bands.c_t, cs_h, bands.c_h);
        rotate_pairs(src + 2 * (bands.c_t + bands.c_h), dst + 2 * (bands.c_t + bands.c_h), cs_w,
                     bands.c_w);
        for (int64_t d = 2 * (bands.c_t + bands.c_h + bands.c_w); d < D; ++d) dst[d] = src[d];
      }
    }
  });
}

template <typename T>
void rope3d_shift_cpu_kernel(at::Tensor& pool, const std::vector<std::pair<int32_t, int32_t>>& ranges,
                             const at::Tensor& table) {
  const int64_t B = pool.size(0), H = pool.size(2);
  const int64_t c_t = rope_bands(pool.size(3)).c_t;
  const int64_t t_heads = table.size(1);
  T* pp = pool.data_ptr<T>();
  const float* tab = table.data_ptr<float>();
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
      for (int64_t h = 0; h < H; ++h) {
        T* x = pp + b * sb + i * sl + h * sh;
        rotate_pairs(x, x, tab + (r * t_heads + (t_heads > 1 ? h : 0)) * c_t * 2, c_t);
      }
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
