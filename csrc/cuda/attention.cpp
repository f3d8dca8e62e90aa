// CUDA binding of chunk_attention and cached_attention: checks inputs, fills the params struct
// and launches the torch-free tensor-core kernels of csrc/kernels/attention.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "attention_common.h"
#include "cuda/binding_common.h"
#include "kernels/attention.h"

namespace vidstream {
namespace {

// The kernel moves 8 elements per vector load: rows, heads and the base must be 16-byte aligned.
bool vector_aligned(const at::Tensor& t) {
  return t.stride(3) == 1 && rows_aligned(t, 16 / t.element_size());
}

// A fresh copy: contiguous() would hand back a contiguous tensor whose pointer is misaligned.
at::Tensor aligned(const at::Tensor& t) {
  return vector_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_cuda_serves(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernel");
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

AttentionParams fill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     at::Tensor& out, at::Tensor& lse, double scale) {
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dtype = q.scalar_type() == at::kHalf ? ElemType::kFloat16 : ElemType::kBFloat16;
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(2));
  p.kv_heads = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.q_len = q.size(1);
  p.kv_len = k.size(1);
  p.q_sb = q.stride(0), p.q_sl = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_sl = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_sl = v.stride(1), p.v_sh = v.stride(2);
  p.o_sb = out.stride(0), p.o_sl = out.stride(1), p.o_sh = out.stride(2);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.window_frames = -1;
  return p;
}

std::tuple<at::Tensor, at::Tensor> outputs(const at::Tensor& q) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  return {out, lse};
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::tuple<at::Tensor, at::Tensor> chunk_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, int64_t frame_tokens,
                                                        int64_t chunk_frames, int64_t sink_frames,
                                                        std::optional<int64_t> window_frames,
                                                        double scale) {
  check_attention_qkv(q_in, k_in, v_in, "k", "v");
  const ChunkMaskParams mp{frame_tokens, chunk_frames, sink_frames, window_frames};
  check_chunk_params(q_in, k_in, mp);
  check_cuda_serves(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  auto [out, lse] = outputs(q);
  AttentionParams p = fill(q, k, v, out, lse, scale);
  p.frame_tokens = frame_tokens;
  p.chunk_frames = chunk_frames;
  p.sink_frames = sink_frames;
  p.window_frames = window_frames ? *window_frames : -1;
  check_launch(launch_chunk_attention(p, c10::cuda::getCurrentCUDAStream().stream()),
               "chunk_attention");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> cached_attention_cuda(const at::Tensor& q_in,
                                                         const at::Tensor& k_in,
                                                         const at::Tensor& v_in,
                                                         const at::Tensor& kv_ranges, double scale) {
  check_attention_qkv(q_in, k_in, v_in, "k_pool", "v_pool");
  check_cuda_serves(q_in, k_in, v_in);
  const auto host = checked_kv_ranges(kv_ranges, k_in.size(1));
  const c10::cuda::CUDAGuard guard(q_in.device());
  std::vector<int32_t> flat;
  for (const auto& r : host) {
    flat.push_back(static_cast<int32_t>(r.first));
    flat.push_back(static_cast<int32_t>(r.second));
  }
  const at::Tensor dev_ranges =
      at::tensor(flat, at::TensorOptions().dtype(at::kInt)).to(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  auto [out, lse] = outputs(q);
  AttentionParams p = fill(q, k, v, out, lse, scale);
  p.ranges = dev_ranges.data_ptr<int32_t>();
  p.num_ranges = static_cast<int>(host.size());
  check_launch(launch_cached_attention(p, c10::cuda::getCurrentCUDAStream().stream()),
               "cached_attention");
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidstream, CUDA, m) {
  m.impl("chunk_attention", &chunk_attention_cuda);
  m.impl("cached_attention", &cached_attention_cuda);
}

}  // namespace vidstream
