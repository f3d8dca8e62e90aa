// NaN-propagating helpers of the CUDA kernels for the NaN/Inf rule of docs/spec.md (Conventions,
// "NaN and Inf"): IEEE propagation as in eager PyTorch, where fmaxf / fmax return the number
// when one operand is NaN and so would drop a NaN from a row maximum.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace vidstream {

// max(a, b), NaN when either is.
__device__ __forceinline__ float max_nan(float a, float b) { return a > b || isnan(a) ? a : b; }
__device__ __forceinline__ double max_nan(double a, double b) { return a > b || isnan(a) ? a : b; }

// Whether a 16-bit float holds a finite value (exponent field not all ones), from its bits.
template <typename T>
__device__ __forceinline__ bool is_finite16(T x) {
  static_assert(sizeof(T) == 2, "16-bit element types only");
  constexpr uint16_t kExp = std::is_same_v<T, __half> ? 0x7c00 : 0x7f80;
  return (*reinterpret_cast<const uint16_t*>(&x) & kExp) != kExp;
}

}  // namespace vidstream
