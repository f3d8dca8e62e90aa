// The kernels' element type of a tensor, shared by the CUDA bindings.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels/rope3d.h"  // ElemType

namespace vidstream {

inline ElemType elem_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kHalf: return ElemType::kFloat16;
    case at::kBFloat16: return ElemType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

}  // namespace vidstream
