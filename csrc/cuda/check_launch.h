// The one check of a CUDA launch: the torch-free launchers return a cudaError_t as an int, and
// the bindings turn a failure into a RuntimeError naming the op.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

namespace vidstream {

inline void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, " launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// The stream the launchers take: torch's current one, so ops order with the caller's work.
inline void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace vidstream
