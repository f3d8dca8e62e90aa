// CUDA binding of lowrank_decompress: checks inputs, fills the params struct and launches the
// torch-free kernel of csrc/kernels/lowrank.cu, which reads kv_ranges on the device.
// lowrank_cached_attention has no CUDA kernel of its own: on CUDA tensors the Python layer
// composes this decompression (or the absorbed products) with vidstream.cached_attention.
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

#include "cuda/binding_common.h"
#include "cuda/check_launch.h"
#include "kernels/lowrank.h"
#include "lowrank_common.h"
#include "ranges.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

std::tuple<at::Tensor, at::Tensor> lowrank_decompress_cuda(
    const at::Tensor& c_pool, const at::Tensor& w_uk_in, const at::Tensor& w_uv_in,
    const at::Tensor& kv_ranges, int64_t num_tokens, const std::optional<at::Tensor>& k_r_pool) {
  check_lowrank_args(c_pool, w_uk_in, w_uv_in, k_r_pool, at::kCUDA);
  const at::Tensor ranges = ranges_tensor(kv_ranges, c_pool.size(1), "kv_ranges", c_pool);
  const LowRankDims d = lowrank_dims(c_pool, w_uk_in, w_uv_in, k_r_pool);
  TORCH_CHECK(d.d_c <= kLowRankMaxLatent, "the CUDA kernel serves latent sizes d_c <= ",
              kLowRankMaxLatent, ", got c_pool with d_c = ", d.d_c);
  TORCH_CHECK(d.heads <= 65535 && d.batch <= 65535, "the CUDA kernel serves at most 65535 heads ",
              "and batch entries, got H = ", d.heads, ", B = ", d.batch);
  // The host cannot count the ranges' tokens without reading them: K and V get num_tokens rows,
  // and the kernel fills rows past the ranges' last token with zeros.
  const c10::cuda::CUDAGuard guard(c_pool.device());
  at::Tensor k, v;
  std::tie(k, v) = decompressed_kv(c_pool, d, num_tokens);
  if (k.numel() == 0 && v.numel() == 0) return {k, v};
  const at::Tensor w_uk = w_uk_in.contiguous(), w_uv = w_uv_in.contiguous();
  LowRankDecompressParams p{};
  p.c_pool = c_pool.data_ptr();
  p.k_r_pool = d.d_r ? k_r_pool->data_ptr() : nullptr;
  p.w_uk = w_uk.data_ptr();
  p.w_uv = w_uv.data_ptr();
  p.ranges = ranges.data_ptr<int32_t>();
  p.num_ranges = static_cast<int>(ranges.size(0));
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dtype = elem_type(c_pool);
  p.batch = d.batch;
  p.tokens = num_tokens;
  p.pool_tokens = d.pool;
  p.heads = d.heads;
  p.d_c = d.d_c;
  p.d_nope = d.d_nope;
  p.d_r = d.d_r;
  p.d_v = d.d_v;
  strides3(c_pool, p.c_stride_b, p.c_stride_l, p.c_stride_c);
  if (d.d_r) strides3(*k_r_pool, p.r_stride_b, p.r_stride_l, p.r_stride_d);
  check_launch(launch_lowrank_decompress(p, current_stream()), "lowrank_decompress");
  return {k, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CUDA, m) { m.impl("lowrank_decompress", &lowrank_decompress_cuda); }

}  // namespace vidstream
