// CUDA binding of select_blocks: checks inputs, allocates the small workspaces and launches
// the torch-free kernels of csrc/kernels/select_blocks.cu. Nothing is copied between host and
// device: the heads travel in the params struct, the ranges stay on the device.
#include <c10/cuda/CUDAGuard.h>

#include "cuda/binding_common.h"
#include "cuda/check_launch.h"
#include "kernels/select_blocks.h"
#include "ranges.h"
#include "select_common.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

std::tuple<at::Tensor, at::Tensor> select_blocks_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& block_ranges, int64_t k,
    int64_t query_stride, at::IntArrayRef heads, c10::string_view score, double scale,
    const std::optional<at::Tensor>& block_key_sums, const std::optional<at::Tensor>& block_deltas,
    double theta, const std::optional<at::Tensor>& t_theta) {
  check_select_blocks_args(q_in, k_in, k, query_stride, heads, at::kCUDA);
  const at::Tensor ranges = ranges_tensor(block_ranges, k_in.size(1), "block_ranges", q_in);
  check_block_key_sums(block_key_sums, q_in, k_in, ranges.size(0));
  const SelectProblem p = select_problem(q_in, k_in, ranges.size(0), query_stride, score);
  TORCH_CHECK(p.head_dim <= kSelectMaxHeadDim, "head dim D must be <= ", kSelectMaxHeadDim,
              " for the CUDA kernel, got ", p.head_dim);
  TORCH_CHECK(p.blocks < (int64_t{1} << 31), "too many blocks: ", p.blocks);
  TORCH_CHECK(!heads.empty() && static_cast<int64_t>(heads.size()) <= kSelectMaxHeads,
              "the CUDA kernel scores 1 to ", kSelectMaxHeads, " heads, got ", heads.size());
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
  const int64_t hs = static_cast<int64_t>(heads.size());
  // Freed after the launch returns: safe, as the caching allocator reuses it only for work
  // queued later on this stream.
  const at::Tensor table = block_deltas
                               ? block_shift_table(*block_deltas, t_theta, p.blocks, kp, theta)
                               : at::Tensor();
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
  a.pool_tokens = p.pool_len;
  a.kv_group = p.heads / p.kv_heads;
  strides3(q, a.q_stride_b, a.q_stride_l, a.q_stride_h);
  strides3(kp, a.k_stride_b, a.k_stride_l, a.k_stride_h);
  for (int64_t i = 0; i < hs; ++i) a.heads[i] = static_cast<int32_t>(heads[i]);
  a.num_heads = static_cast<int>(hs);
  a.ranges = ranges.data_ptr<int32_t>();
  a.num_blocks = static_cast<int>(p.blocks);
  a.query_stride = query_stride;
  a.sampled = p.sampled;
  a.mean = p.mean;
  a.key_sums = sums.defined() ? sums.data_ptr<float>() : nullptr;
  if (sums.defined()) strides3(sums, a.s_stride_b, a.s_stride_m, a.s_stride_h);
  if (table.defined()) {
    a.rot = table.data_ptr<float>();
    a.rot_sm = table.stride(0);
    a.rot_sh = table.size(1) > 1 ? table.stride(1) : 0;
    a.rot_pairs = static_cast<int>(table.size(2));
  }
  a.scale = static_cast<float>(scale);
  a.norm = p.mean ? scale / static_cast<double>(p.batch * hs * p.sampled)
                  : 1.0 / static_cast<double>(p.batch * hs);
  a.qpart = qpart.data_ptr<double>();
  a.counter = reinterpret_cast<unsigned int*>(counter.data_ptr<int32_t>());
  a.scores = scores.data_ptr<float>();
  a.indices = indices.data_ptr<int64_t>();
  a.top_k = static_cast<int>(n);
  check_launch(launch_select_blocks(a, current_stream()), "select_blocks");
  return {scores, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CUDA, m) { m.impl("select_blocks", &select_blocks_cuda); }

}  // namespace vidstream
