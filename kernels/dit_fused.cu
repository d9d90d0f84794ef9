// Fused row-wise operations of the Wan DiT block (one pass over the token matrix instead of the
// 4-6 passes and f32 temporaries of the unfused candle ops). Each kernel takes one [rows, D] matrix,
// one CTA per row; statistics and arithmetic in f32, input/output in the model dtype, exactly the
// reference's order of operations:
//   ln_modulate:  y = T(((x - mean) * rstd * w + b) * (1 + scale) + shift)   (w, b, scale, shift optional)
//   rms_norm:     y = T(x * rsqrt(mean(x^2) + eps) * w)
//   gated_add:    y = T(x + y_in * gate)
//   rms_rope:     y = rope(T(x * rsqrt(mean(x^2) + eps) * w))  per head, pairs (2j, 2j+1) rotated by the
//                 token's angle j: (a·cos − b·sin, a·sin + b·cos) in f32, then T (diffusers' order)
//   bias_add:     y = T(x + b)                      (the bias of a linear layer, b f32 [D])
//   bias_gelu:    y = T(gelu_tanh(T(x + b)))        (the FFN's first layer: linear output rounded, as
//                                                    the reference's bf16 Linear, then GELU in f32)
// Modulation tensors (shift/scale/gate) are f32 rows of D contiguous values, one entry per run of
// `tokens` rows (one per sample, latent frame or token), consecutive entries a stride apart.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

// Sum over the CTA (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// One modulation chunk: an entry of D values per run of `tokens` rows (a batch, or a latent frame
// of TI2V's per-frame timesteps), consecutive entries `entry_stride` floats apart.
struct Modulation {
  const float* ptr;  // nullptr: none
  long long entry_stride;
};

__device__ __forceinline__ const float* mod_row(const Modulation& m, long long row, long long tokens) {
  return m.ptr + (row / tokens) * m.entry_stride;
}

template <typename T>
__device__ void ln_modulate(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                            const float* __restrict__ b, Modulation shift, Modulation scale, int d,
                            long long tokens, float eps) {
  __shared__ float shared[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * d;
  float s = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += load_f(xr[i]);
  const float mean = block_sum(s, shared) / d;
  float v = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float c = load_f(xr[i]) - mean;
    v += c * c;
  }
  const float rstd = rsqrtf(block_sum(v, shared) / d + eps);
  const float* sh = shift.ptr ? mod_row(shift, row, tokens) : nullptr;
  const float* sc = scale.ptr ? mod_row(scale, row, tokens) : nullptr;
  T* yr = y + row * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float n = (load_f(xr[i]) - mean) * rstd;
    if (w) n = n * w[i] + b[i];
    if (sc) n = n * (1.f + sc[i]) + sh[i];
    yr[i] = store_f<T>(n);
  }
}

template <typename T>
__device__ void rms_norm(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w, int d, float eps) {
  __shared__ float shared[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * d;
  float s = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float a = load_f(xr[i]);
    s += a * a;
  }
  const float r = rsqrtf(block_sum(s, shared) / d + eps);
  T* yr = y + row * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = store_f<T>(load_f(xr[i]) * r * w[i]);
}

template <typename T>
__device__ void gated_add(const T* __restrict__ x, const T* __restrict__ u, T* __restrict__ y, Modulation gate,
                          int d, long long tokens) {
  const long long row = blockIdx.x;
  const float* g = mod_row(gate, row, tokens);
  const T* xr = x + row * d;
  const T* ur = u + row * d;
  T* yr = y + row * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = store_f<T>(load_f(xr[i]) + load_f(ur[i]) * g[i]);
}

template <typename T>
__device__ void bias_act(const T* x, T* y, const float* __restrict__ b, int d, bool gelu) {  // x may be y
  const long long row = blockIdx.x;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = load_f(xr[i]) + b[i];
    if (gelu) {
      v = load_f(store_f<T>(v));
      // 0.5·v·(1 + tanh(√(2/π)·(v + 0.044715·v³))), PyTorch's approximate="tanh"
      const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      v = 0.5f * v * (1.f + tanhf(inner));
    }
    yr[i] = store_f<T>(v);
  }
}

template <typename T>
__device__ void rms_rope(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                         const float* __restrict__ cos_t, const float* __restrict__ sin_t, int d, int head_dim,
                         long long tokens, float eps) {
  __shared__ float shared[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * d;
  float s = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float a = load_f(xr[i]);
    s += a * a;
  }
  const float r = rsqrtf(block_sum(s, shared) / d + eps);
  const int half = head_dim / 2;
  const float* c = cos_t + (row % tokens) * half;
  const float* sn = sin_t + (row % tokens) * half;
  T* yr = y + row * d;
  for (int p = threadIdx.x; p < d / 2; p += blockDim.x) {
    const int j = p % half;
    const float a = load_f(store_f<T>(load_f(xr[2 * p]) * r * w[2 * p]));
    const float b = load_f(store_f<T>(load_f(xr[2 * p + 1]) * r * w[2 * p + 1]));
    yr[2 * p] = store_f<T>(a * c[j] - b * sn[j]);
    yr[2 * p + 1] = store_f<T>(a * sn[j] + b * c[j]);
  }
}

#define INSTANTIATE(T, NAME)                                                                               \
  extern "C" __global__ void ln_modulate_##NAME(const T* x, T* y, const float* w, const float* b,          \
                                                const float* shift, long long shift_stride,                   \
                                                const float* scale, long long scale_stride,                   \
                                                int d, long long tokens, float eps) {                        \
    ln_modulate<T>(x, y, w, b, Modulation{shift, shift_stride}, Modulation{scale, scale_stride}, \
                   d, tokens, eps);                                                                          \
  }                                                                                                          \
  extern "C" __global__ void rms_norm_##NAME(const T* x, T* y, const float* w, int d, float eps) {          \
    rms_norm<T>(x, y, w, d, eps);                                                                            \
  }                                                                                                          \
  extern "C" __global__ void gated_add_##NAME(const T* x, const T* u, T* y, const float* gate,              \
                                              long long gate_stride, int d, long long tokens) {           \
    gated_add<T>(x, u, y, Modulation{gate, gate_stride}, d, tokens);                                        \
  }                                                                                                          \
  extern "C" __global__ void rms_rope_##NAME(const T* x, T* y, const float* w, const float* cos_t,            \
                                             const float* sin_t, int d, int head_dim, long long tokens, float eps) { \
    rms_rope<T>(x, y, w, cos_t, sin_t, d, head_dim, tokens, eps);                                              \
  }                                                                                                          \
  extern "C" __global__ void bias_add_##NAME(const T* x, T* y, const float* b, int d) {                     \
    bias_act<T>(x, y, b, d, false);                                                                          \
  }                                                                                                          \
  extern "C" __global__ void bias_gelu_##NAME(const T* x, T* y, const float* b, int d) {                    \
    bias_act<T>(x, y, b, d, true);                                                                           \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
