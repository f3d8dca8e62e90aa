// CUDA binding of lowrank_decompress: checks inputs, builds the token index of the ranges on the
// device, fills the params struct and launches the torch-free kernel of csrc/kernels/lowrank.cu.
// lowrank_cached_attention has no CUDA kernel of its own: on CUDA tensors the Python layer
// composes this decompression (or the absorbed products) with vidstream.cached_attention.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/lowrank.h"
#include "lowrank_common.h"
#include "cuda/binding_common.h"

namespace vidstream {
namespace {

std::tuple<at::Tensor, at::Tensor> lowrank_decompress_cuda(const at::Tensor& c_pool,
                                                           const at::Tensor& w_uk_in,
                                                           const at::Tensor& w_uv_in,
                                                           const at::Tensor& kv_ranges,
                                                           int64_t num_tokens,
                                                           const std::optional<at::Tensor>& k_r_pool) {
  const LowRankDims d = check_lowrank(c_pool, w_uk_in, w_uv_in, k_r_pool);
  TORCH_CHECK(c_pool.is_cuda(), "c_pool must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK(d.d_c <= kLowRankMaxLatent, "the CUDA kernel serves latent sizes d_c <= ",
              kLowRankMaxLatent, ", got c_pool with d_c = ", d.d_c);
  TORCH_CHECK(d.heads <= 65535 && d.batch <= 65535, "the CUDA kernel serves at most 65535 heads ",
              "and batch entries, got H = ", d.heads, ", B = ", d.batch);
  const c10::cuda::CUDAGuard guard(c_pool.device());
  const auto ranges = checked_kv_ranges(kv_ranges, d.pool);
  const std::vector<int32_t> idx = range_tokens(ranges);
  TORCH_CHECK(static_cast<int64_t>(idx.size()) == num_tokens, "num_tokens must equal the ",
              "number of tokens in kv_ranges (", idx.size(), "), got ", num_tokens);
  at::Tensor k = at::empty({d.batch, num_tokens, d.heads, d.d_nope + d.d_r}, c_pool.options());
  at::Tensor v = at::empty({d.batch, num_tokens, d.heads, d.d_v}, c_pool.options());
  if (k.numel() == 0 && v.numel() == 0) return {k, v};
  const at::Tensor w_uk = w_uk_in.contiguous(), w_uv = w_uv_in.contiguous();
  const at::Tensor dev_idx =
      at::from_blob(const_cast<int32_t*>(idx.data()), {num_tokens}, at::kInt).to(c_pool.device());
  LowRankDecompressParams p{};
  p.c_pool = c_pool.data_ptr();
  p.k_r_pool = d.d_r ? k_r_pool->data_ptr() : nullptr;
  p.w_uk = w_uk.data_ptr();
  p.w_uv = w_uv.data_ptr();
  p.token_idx = dev_idx.data_ptr<int32_t>();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dtype = elem_type(c_pool);
  p.batch = d.batch;
  p.tokens = num_tokens;
  p.heads = d.heads;
  p.d_c = d.d_c;
  p.d_nope = d.d_nope;
  p.d_r = d.d_r;
  p.d_v = d.d_v;
  p.c_stride_b = c_pool.stride(0);
  p.c_stride_l = c_pool.stride(1);
  p.c_stride_c = c_pool.stride(2);
  if (d.d_r) {
    p.r_stride_b = k_r_pool->stride(0);
    p.r_stride_l = k_r_pool->stride(1);
    p.r_stride_d = k_r_pool->stride(2);
  }
  const int err = launch_lowrank_decompress(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "lowrank_decompress launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {k, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CUDA, m) { m.impl("lowrank_decompress", &lowrank_decompress_cuda); }

}  // namespace vidstream
