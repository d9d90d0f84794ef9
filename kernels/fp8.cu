// FP8 e4m3fn weight storage on the GPU (candle 0.11 has no CUDA cast to F8E4M3, and its cast from
// it is not in every dtype). Same arithmetic as the CPU path, so the bytes and the dequantised
// values are bit-identical to it:
//   f32_to_e4m3:      q = e4m3(x), round to nearest even, saturating to ±448 (x already divided by
//                     its scale and clamped, as torch's `(w / s).clamp(-448, 448).to(float8_e4m3fn)`)
//   e4m3_dequant_T:   y = T(f32(q) * scale[row])     (one scale per row of `cols` values, or one for
//                     all when per_row == 0); the product in f32, one rounding to T.
// e4m3 -> f16 is exact (every e4m3 value is an f16 value), so f32(q) goes through the half.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common.cuh"

__device__ __forceinline__ float e4m3_to_f(const __nv_fp8_storage_t q) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(q, __NV_E4M3)));
}

extern "C" __global__ void f32_to_e4m3(const float* x, __nv_fp8_storage_t* q, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    q[i] = __nv_cvt_float_to_fp8(x[i], __NV_SATFINITE, __NV_E4M3);
  }
}

// Four values per thread (one 32-bit load); `cols` must be a multiple of 4 so the four share a row.
template <typename T>
__device__ void dequant4(const unsigned int* q4, const float* scale, long long cols, int per_row, T* y,
                         long long n4) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4;
       i += (long long)gridDim.x * blockDim.x) {
    const unsigned int packed = q4[i];
    const float s = scale[per_row ? (4 * i) / cols : 0];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const __nv_fp8_storage_t b = (packed >> (8 * k)) & 0xff;
      y[4 * i + k] = store_f<T>(e4m3_to_f(b) * s);
    }
  }
}

template <typename T>
__device__ void dequant1(const __nv_fp8_storage_t* q, const float* scale, long long cols, int per_row, T* y,
                         long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float s = scale[per_row ? i / cols : 0];
    y[i] = store_f<T>(e4m3_to_f(q[i]) * s);
  }
}

#define INSTANTIATE(T, NAME)                                                                               \
  extern "C" __global__ void e4m3_dequant4_##NAME(const unsigned int* q4, const float* scale, long long cols, \
                                                  int per_row, T* y, long long n4) {                        \
    dequant4<T>(q4, scale, cols, per_row, y, n4);                                                           \
  }                                                                                                          \
  extern "C" __global__ void e4m3_dequant1_##NAME(const __nv_fp8_storage_t* q, const float* scale,           \
                                                  long long cols, int per_row, T* y, long long n) {         \
    dequant1<T>(q, scale, cols, per_row, y, n);                                                             \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
