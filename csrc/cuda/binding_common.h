// Shared by the CUDA bindings: the kernels' element type of a tensor, and the alignment the
// kernels' vector accesses need.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

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

// Whether every head row of t starts at a multiple of `elems` elements, so a kernel can access
// `elems` elements at a time.
inline bool rows_aligned(const at::Tensor& t, int64_t elems) {
  const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
  return addr % (elems * t.element_size()) == 0 && t.stride(0) % elems == 0 &&
         t.stride(1) % elems == 0 && t.stride(2) % elems == 0;
}

// Rotation pairs moved as one 2-element vector.
inline bool pair_aligned(const at::Tensor& t) { return rows_aligned(t, 2); }

}  // namespace vidstream
