// CUDA binding of select_blocks: checks inputs, uploads heads and ranges, allocates the small
// workspaces and launches the torch-free kernels of csrc/kernels/select_blocks.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/select_blocks.h"
#include "select_common.h"
#include "cuda/binding_common.h"

namespace vidstream {
namespace {

std::tuple<at::Tensor, at::Tensor> select_blocks_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& block_ranges, int64_t k,
    int64_t query_stride, at::IntArrayRef heads, c10::string_view score, double scale,
    const std::optional<at::Tensor>& block_key_sums) {
  const SelectProblem p =
      check_select_inputs(q_in, k_in, block_ranges, k, query_stride, heads, score, block_key_sums);
  TORCH_CHECK(q_in.is_cuda(), "q must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK(p.head_dim <= kSelectMaxHeadDim, "head dim D must be <= ", kSelectMaxHeadDim,
              " for the CUDA kernel, got ", p.head_dim);
  TORCH_CHECK(p.blocks < (int64_t{1} << 31), "too many blocks: ", p.blocks);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor kp = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  auto f32 = q.options().dtype(at::kFloat);
  const int64_t n = std::min<int64_t>(k, p.blocks);
  at::Tensor scores = at::empty({p.blocks}, f32);
  at::Tensor indices = at::empty({n}, q.options().dtype(at::kLong));
  if (p.blocks == 0) return {scores, indices};
  const at::Tensor sums = (block_key_sums && p.mean)
                              ? block_key_sums->to(q.device(), at::kFloat).contiguous()
                              : at::Tensor();
  std::vector<int32_t> hv(heads.begin(), heads.end());
  const at::Tensor heads_dev =
      at::tensor(hv, at::TensorOptions().dtype(at::kInt)).to(q.device(), /*non_blocking=*/false);
  const at::Tensor ranges_dev = block_ranges.to(q.device(), at::kInt).contiguous();
  const int64_t hs = static_cast<int64_t>(hv.size());
  at::Tensor qpart =
      at::empty({p.batch * hs * kSelectQuerySplit * p.head_dim}, q.options().dtype(at::kDouble));
  at::Tensor counter = at::empty({1}, q.options().dtype(at::kInt));

  SelectBlocksParams a{};
  a.q = q.data_ptr();
  a.k = kp.data_ptr();
  a.dtype = elem_type(q);
  a.batch = p.batch;
  a.q_len = p.q_len;
  a.head_dim = p.head_dim;
  a.kv_group = p.heads / p.kv_heads;
  a.q_stride_b = q.stride(0);
  a.q_stride_l = q.stride(1);
  a.q_stride_h = q.stride(2);
  a.k_stride_b = kp.stride(0);
  a.k_stride_l = kp.stride(1);
  a.k_stride_h = kp.stride(2);
  a.heads = heads_dev.data_ptr<int32_t>();
  a.num_heads = static_cast<int>(hs);
  a.ranges = ranges_dev.data_ptr<int32_t>();
  a.num_blocks = static_cast<int>(p.blocks);
  a.query_stride = query_stride;
  a.sampled = p.sampled;
  a.mean = p.mean;
  a.key_sums = sums.defined() ? sums.data_ptr<float>() : nullptr;
  if (sums.defined()) {
    a.s_stride_b = sums.stride(0);
    a.s_stride_m = sums.stride(1);
    a.s_stride_h = sums.stride(2);
  }
  a.scale = static_cast<float>(scale);
  a.norm = p.mean ? scale / static_cast<double>(p.batch * hs * p.sampled)
                  : 1.0 / static_cast<double>(p.batch * hs);
  a.qpart = qpart.data_ptr<double>();
  a.counter = reinterpret_cast<unsigned int*>(counter.data_ptr<int32_t>());
  a.scores = scores.data_ptr<float>();
  a.indices = indices.data_ptr<int64_t>();
  a.top_k = static_cast<int>(n);
  const int err = launch_select_blocks(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "select_blocks launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CUDA, m) { m.impl("select_blocks", &select_blocks_cuda); }

}  // namespace vidstream
