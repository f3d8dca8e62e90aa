// C++ CPU kernel of rope3d_store_: one pass over the chunk's tokens that rotates each key by the
// 3D RoPE of its (frame position, row, column) and writes key and value into their pool slot.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "ranges.h"
#include "rope3d_common.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

template <typename T>
inline void rotate_into(const T* src, T* dst, const float* cs, int64_t n) {
  for (int64_t p = 0; p < n; ++p) {
    const float a = static_cast<float>(src[2 * p]);
    const float b = static_cast<float>(src[2 * p + 1]);
    const float c = cs[2 * p], s = cs[2 * p + 1];
    dst[2 * p] = static_cast<T>(a * c - b * s);
    dst[2 * p + 1] = static_cast<T>(a * s + b * c);
  }
}

template <typename T>
void rope3d_store_cpu_kernel(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k,
                             const at::Tensor& v, const std::vector<int64_t>& slots,
                             const at::Tensor& tab_t, const at::Tensor& tab_h,
                             const at::Tensor& tab_w, int64_t width) {
  const int64_t B = k.size(0), L = k.size(1), H = k.size(2), D = k.size(3), Dv = v.size(3);
  const RopeBands bands = rope_bands(D);
  const int64_t hw = static_cast<int64_t>(L / static_cast<int64_t>(slots.size()));
  const int64_t t_heads = tab_t.size(1);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* kpool = k_pool.data_ptr<T>();
  T* vpool = v_pool.data_ptr<T>();
  const float* tt = tab_t.data_ptr<float>();
  const float* th = tab_h.data_ptr<float>();
  const float* tw = tab_w.data_ptr<float>();
  const int64_t skb = k.stride(0), skl = k.stride(1), skh = k.stride(2);
  const int64_t svb = v.stride(0), svl = v.stride(1), svh = v.stride(2);
  const int64_t sKb = k_pool.stride(0), sKl = k_pool.stride(1), sKh = k_pool.stride(2);
  const int64_t sVb = v_pool.stride(0), sVl = v_pool.stride(1), sVh = v_pool.stride(2);
  const int64_t c_hw = bands.c_t + bands.c_h;
  const int64_t c_all = c_hw + bands.c_w;
  at::parallel_for(0, B * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / L, i = n % L;
      const int64_t f = i / hw, j = i % hw;
      const int64_t y = j / width, c = j % width;
      const int64_t dst = slots[f] + j;
      const float* cs_h = th + y * bands.c_h * 2;
      const float* cs_w = tw + c * bands.c_w * 2;
      for (int64_t h = 0; h < H; ++h) {
        const T* src = kp + b * skb + i * skl + h * skh;
        T* out = kpool + b * sKb + dst * sKl + h * sKh;
        const float* cs_t = tt + (f * t_heads + (t_heads > 1 ? h : 0)) * bands.c_t * 2;
        rotate_into(src, out, cs_t, bands.c_t);
        rotate_into(src + 2 * bands.c_t, out + 2 * bands.c_t, cs_h, bands.c_h);
        rotate_into(src + 2 * c_hw, out + 2 * c_hw, cs_w, bands.c_w);
        for (int64_t d = 2 * c_all; d < D; ++d) out[d] = src[d];
        const T* vs = vp + b * svb + i * svl + h * svh;
        T* vo = vpool + b * sVb + dst * sVl + h * sVh;
        for (int64_t d = 0; d < Dv; ++d) vo[d] = vs[d];
      }
    }
  });
}

void rope3d_store_cpu(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& frame_slots,
                      const at::Tensor& frame_pos, int64_t height, int64_t width, double theta,
                      const std::optional<at::Tensor>& t_theta) {
  const int64_t frames = slots_tensor(frame_slots, k_pool).size(0);
  check_rope3d_store_args(k_pool, v_pool, k, v, frames, frame_pos, height, width, t_theta,
                          at::kCPU);
  const auto slots = read_frame_slots(frame_slots, height * width, k_pool.size(1), k_pool);
  if (k.numel() == 0) return;
  const Rope3dTables tab =
      rope3d_store_tables(frame_pos, height, width, theta, t_theta, k.size(3), k.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "rope3d_store_cpu", [&] {
    rope3d_store_cpu_kernel<scalar_t>(k_pool, v_pool, k, v, slots, tab.temporal, tab.height,
                                      tab.width, width);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CPU, m) { m.impl("rope3d_store_", &rope3d_store_cpu); }

}  // namespace vidstream
