// CUDA binding of chunk_attention and cached_attention: checks inputs, fills the params struct
// and launches the torch-free tensor-core kernels of csrc/kernels/attention.cu.
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include "attention_common.h"
#include "cuda/binding_common.h"
#include "cuda/check_launch.h"
#include "kernels/attention.h"
#include "ranges.h"
#include "tensor_checks.h"

namespace vidstream {
namespace {

// The kernel moves 8 elements per vector load: rows, heads and the base must be 16-byte aligned.
at::Tensor aligned(const at::Tensor& t) { return aligned_rows(t, 16 / t.element_size()); }

// What the tensor-core kernel serves, beyond what every kernel does.
void check_cuda_serves(const at::Tensor& q, const at::Tensor& v) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "the cuda backend takes float16 or bfloat16 q/k/v, got ", q.scalar_type(),
              " (float32 runs on the triton or reference backend)");
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128,
              "the cuda backend serves head dims 64 and 128, got q head dim ", q.size(3));
  TORCH_CHECK(v.size(3) == q.size(3), "the cuda backend needs v's head dim equal to q's (",
              q.size(3), "), got ", v.size(3));
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device());
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device());
  TORCH_CHECK(major >= 8, "the cuda attention kernel needs sm_80 or newer, got sm_", major, minor);
  TORCH_CHECK(q.size(0) * q.size(2) < 65536, "batch * heads must be < 65536, got ",
              q.size(0) * q.size(2));
}

// Both ops: aligned inputs, fresh outputs, the params struct (`finish` sets the op's own
// fields), one launch.
template <typename Finish>
std::tuple<at::Tensor, at::Tensor> attend(const at::Tensor& q_in, const at::Tensor& k_in,
                                          const at::Tensor& v_in, double scale,
                                          int (*launch)(const AttentionParams&, void*),
                                          const char* op, Finish&& finish) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  AttentionParams p{};
  set_attention_views(p, q, k, v, out, lse);
  p.dtype = elem_type(q);
  p.batch = static_cast<int>(q.size(0));
  p.q_len = q.size(1);
  p.kv_len = k.size(1);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.window_frames = -1;
  finish(p);
  check_launch(launch(p, current_stream()), op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> chunk_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t frame_tokens,
    int64_t chunk_frames, int64_t sink_frames, std::optional<int64_t> window_frames, double scale) {
  check_chunk_attention_args(q, k, v, frame_tokens, chunk_frames, at::kCUDA);
  check_cuda_serves(q, v);
  return attend(q, k, v, scale, &launch_chunk_attention, "chunk_attention",
                [&](AttentionParams& p) {
                  p.frame_tokens = frame_tokens;
                  p.chunk_frames = chunk_frames;
                  p.sink_frames = sink_frames;
                  p.window_frames = window_frames ? *window_frames : -1;
                });
}

std::tuple<at::Tensor, at::Tensor> cached_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_ranges,
    double scale, const std::optional<at::Tensor>& kv_deltas, double theta,
    const std::optional<at::Tensor>& t_theta) {
  check_attention_qkv(q, k, v, "k_pool", "v_pool", at::kCUDA);
  check_cuda_serves(q, v);
  const at::Tensor ranges = ranges_tensor(kv_ranges, k.size(1), "kv_ranges", q);
  TORCH_CHECK(ranges.size(0) <= INT32_MAX, "kv_ranges: too many ranges (", ranges.size(0), ")");
  // Built on the device before the launch; freed after it returns, which the caching allocator
  // makes safe (its memory is reused only by work queued later on this stream).
  const size_t num_ranges = static_cast<size_t>(ranges.size(0));
  const at::Tensor table =
      kv_deltas ? key_shift_table(*kv_deltas, t_theta, num_ranges, k, theta) : at::Tensor();
  return attend(q, k, v, scale, &launch_cached_attention, "cached_attention",
                [&](AttentionParams& p) {
                  p.ranges = ranges.data_ptr<int32_t>();
                  p.num_ranges = static_cast<int>(ranges.size(0));
                  if (table.defined()) {
                    p.k_rot = table.data_ptr<float>();
                    p.k_rot_sr = table.stride(0);
                    p.k_rot_sh = table.size(1) > 1 ? table.stride(1) : 0;
                    p.k_rot_pairs = static_cast<int>(table.size(2));
                  }
                });
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CUDA, m) {
  m.impl("chunk_attention", &chunk_attention_cuda);
  m.impl("cached_attention", &cached_attention_cuda);
}

}  // namespace vidstream
