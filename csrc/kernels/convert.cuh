// float32 <-> element type conversions shared by the CUDA kernels (round to nearest even), one
// value at a time or as the 2-element vector types that move a rotation pair in one access.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace vidstream {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The 2-element vector type of T (float2, __half2, __nv_bfloat162).
template <typename T>
using PairOf = std::conditional_t<
    std::is_same_v<T, __half>, __half2,
    std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, float2>>;

__device__ __forceinline__ float2 to_float2(float2 x) { return x; }
__device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }

template <typename T>
__device__ __forceinline__ PairOf<T> from_float2(float2 x) {
  if constexpr (std::is_same_v<T, __half>) return __float22half2_rn(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float22bfloat162_rn(x);
  else return x;
}

}  // namespace vidstream
