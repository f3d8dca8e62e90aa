// The element types the CUDA kernels serve, named without torch so that every kernel header
// stays torch-free; the bindings map at::ScalarType onto it (cuda/binding_common.h).
#pragma once

namespace vidstream {

enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace vidstream
