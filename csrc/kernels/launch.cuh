// What every launcher in csrc/kernels/*.cu shares: the switch from ElemType to the CUDA element
// type, and the launch status in the int form the torch-free interfaces return.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "elem_type.h"

namespace vidstream {

template <typename T>
struct TypeTag {
  using type = T;
};

// launch(TypeTag<T>{}) for the CUDA element type T of `dtype`; its cudaError_t as an int.
template <typename F>
int dispatch_elem_type(ElemType dtype, F&& launch) {
  switch (dtype) {
    case ElemType::kFloat32: return static_cast<int>(launch(TypeTag<float>{}));
    case ElemType::kFloat16: return static_cast<int>(launch(TypeTag<__half>{}));
    case ElemType::kBFloat16: return static_cast<int>(launch(TypeTag<__nv_bfloat16>{}));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

// The error a launch just made left behind (launch errors are not reported by the <<<>>> call).
inline cudaError_t launch_status() { return cudaGetLastError(); }

// Blocks of a 1-D grid-stride launch: enough to cover `tiles`, never more than grid.x allows.
inline unsigned grid_stride_blocks(int64_t tiles) {
  constexpr int64_t kMaxGridX = 0x7fffffff;
  return static_cast<unsigned>(tiles < kMaxGridX ? tiles : kMaxGridX);
}

}  // namespace vidstream
