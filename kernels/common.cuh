// Shared device helpers of the kernels in this folder: loads and stores between the model dtypes
// (f32, bf16, f16) and f32 arithmetic.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T> __device__ __forceinline__ float load_f(const T v);
template <> __device__ __forceinline__ float load_f<float>(const float v) { return v; }
template <> __device__ __forceinline__ float load_f<__nv_bfloat16>(const __nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float load_f<__half>(const __half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T store_f(const float v);
template <> __device__ __forceinline__ float store_f<float>(const float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 store_f<__nv_bfloat16>(const float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half store_f<__half>(const float v) { return __float2half(v); }
