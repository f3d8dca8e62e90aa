// Shared by the CUDA bindings: the kernels' element type of a tensor, its strides as the params
// structs take them, and the alignment the kernels' vector accesses need.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "kernels/elem_type.h"

namespace vidstream {

inline ElemType elem_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kHalf: return ElemType::kFloat16;
    case at::kBFloat16: return ElemType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

// The element type and sizes of x [B, L, H, D], as the params structs name them.
template <typename Params>
void set_bthd(Params& p, const at::Tensor& x) {
  p.dtype = elem_type(x);
  p.batch = x.size(0);
  p.tokens = x.size(1);
  p.heads = x.size(2);
  p.head_dim = x.size(3);
}

// Strides of the first three dims (batch, token, head), in elements.
inline void strides3(const at::Tensor& t, int64_t& b, int64_t& l, int64_t& h) {
  b = t.stride(0);
  l = t.stride(1);
  h = t.stride(2);
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

// t itself when its head rows are contiguous and aligned to `elems` elements, else such a copy
// (clone, not contiguous(): a contiguous tensor may still start misaligned).
inline at::Tensor aligned_rows(const at::Tensor& t, int64_t elems) {
  return t.stride(3) == 1 && rows_aligned(t, elems) ? t : t.clone(at::MemoryFormat::Contiguous);
}

}  // namespace vidstream
