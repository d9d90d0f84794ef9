// Element-wise and per-pixel operations of the Wan VAE on the GPU (the convolutions go to cuDNN).
// Tensors are [N, C, S]: N = batch·frames, C channels, S = pixels of a frame (frame-major NCHW).
// Arithmetic in f32, each result rounded to the tensor dtype at the points where diffusers' bf16
// modules round (one rounding per PyTorch op), so f32 runs are exact and bf16 runs round alike:
//   rms_norm:      y = T(T(T(x / max(||x||_C, 1e-12)) · sqrt(C)) · gamma)       (WanRMS_norm)
//   rms_norm_silu: the same, then T(silu(y))                                     (+ nn.SiLU)
//   bias_add:      y = T(y + b[c]), then T(y + r) when a residual r is given      (conv bias, skip)
//   upsample2x:    nearest-exact ×2 of each frame (pixel duplication)
//   to_nhwc / from_nhwc: channels-last copies for cuDNN (from_nhwc adds bias and residual as bias_add)
//   to_nhwc_up2:   to_nhwc of upsample2x's output, written straight from its input (the ×2 frame
//                  is never materialised in NCHW)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

// Rounds through T (identity for f32).
template <typename T> __device__ __forceinline__ float round_t(const float v) { return load_f<T>(store_f<T>(v)); }

// A block is RMS_PIX adjacent pixels (threadIdx.x, coalesced loads) x RMS_SLICES channel slices
// (threadIdx.y): each thread sums the squares of every RMS_SLICES-th channel of its pixel, the
// slices meet in shared memory, and each thread then writes its channels. Splitting the channels
// keeps the GPU busy where frames are small and channels wide (Wan2.2: 1024 channels at 44x80 gave
// one-thread-per-pixel launches of 14 blocks).
constexpr int RMS_PIX = 32;
constexpr int RMS_SLICES = 8;

template <typename T, bool SILU>
__device__ void rms_norm(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ gamma,
                         float scale, int c, long long s) {
  __shared__ float partial[RMS_SLICES][RMS_PIX];
  const long long p = (long long)blockIdx.x * RMS_PIX + threadIdx.x;
  const bool live = p < s;
  const long long base = (long long)blockIdx.y * c * s + p;
  float sq = 0.f;
  if (live) {
    for (int i = threadIdx.y; i < c; i += RMS_SLICES) {
      const float v = load_f(x[base + i * s]);
      sq = fmaf(v, v, sq);
    }
  }
  partial[threadIdx.y][threadIdx.x] = sq;
  __syncthreads();
  if (!live) return;
  float total = 0.f;
  for (int j = 0; j < RMS_SLICES; ++j) total += partial[j][threadIdx.x];
  const float denom = fmaxf(sqrtf(total), 1e-12f);
  for (int i = threadIdx.y; i < c; i += RMS_SLICES) {
    float v = round_t<T>(load_f(x[base + i * s]) / denom);
    v = round_t<T>(v * scale);
    v = round_t<T>(v * gamma[i]);
    if (SILU) v = v / (1.f + expf(-v));
    y[base + i * s] = store_f<T>(v);
  }
}

// y = T(y + b[c]) in place, then T(y + r) when r is given. Index over the whole [N, C, S] tensor.
template <typename T>
__device__ void bias_add(T* __restrict__ y, const T* __restrict__ r, const float* __restrict__ b, int c,
                         long long s, long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    float v = load_f(y[i]);
    if (b) v = round_t<T>(v + b[(i / s) % c]);
    if (r) v = v + load_f(r[i]);
    y[i] = store_f<T>(v);
  }
}

// x [planes, h, w] -> y [planes, 2h, 2w]; one thread per input pixel writes its 2x2 block.
template <typename T>
__device__ void upsample2x(const T* __restrict__ x, T* __restrict__ y, long long planes, int h, int w) {
  const long long n = planes * h * w;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const long long plane = i / ((long long)h * w);
    const int rem = (int)(i - plane * h * w);
    const int yy = rem / w, xx = rem % w;
    const T v = x[i];
    T* out = y + plane * 4 * h * w + (long long)(2 * yy) * (2 * w) + 2 * xx;
    out[0] = v;
    out[1] = v;
    out[2 * w] = v;
    out[2 * w + 1] = v;
  }
}

// Layout changes between frame-major NCHW and channels-last, 32x32 tiles through shared memory
// (blockDim 32x8). to_nhwc: x [B, C, S] -> y [B, S, C]. from_nhwc: x [B, S, C] -> y [B, C, S] with
// the conv bias and an optional residual added on the way, rounded as bias_add.
template <typename T>
__device__ void to_nhwc(const T* __restrict__ x, T* __restrict__ y, int c, int s) {
  __shared__ T tile[32][33];
  const long long b = blockIdx.z;
  const int s0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
  const T* xb = x + b * c * (long long)s;
  T* yb = y + b * c * (long long)s;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int ci = c0 + i, si = s0 + threadIdx.x;
    if (ci < c && si < s) tile[i][threadIdx.x] = xb[(long long)ci * s + si];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int si = s0 + i, ci = c0 + threadIdx.x;
    if (ci < c && si < s) yb[(long long)si * c + ci] = tile[threadIdx.x][i];
  }
}

// x [B, C, H, W] -> y [B, 2H·2W, C]: each input pixel's channel value written to its 2x2 block.
template <typename T>
__device__ void to_nhwc_up2(const T* __restrict__ x, T* __restrict__ y, int c, int h, int w) {
  __shared__ T tile[32][33];
  const long long b = blockIdx.z;
  const int s = h * w;
  const int s0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
  const T* xb = x + b * c * (long long)s;
  T* yb = y + b * 4LL * c * s;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int ci = c0 + i, si = s0 + threadIdx.x;
    if (ci < c && si < s) tile[i][threadIdx.x] = xb[(long long)ci * s + si];
  }
  __syncthreads();
  const long long row = 2LL * w * c;  // one output row of 2w pixels
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int si = s0 + i, ci = c0 + threadIdx.x;
    if (ci < c && si < s) {
      const T v = tile[threadIdx.x][i];
      const int yy = si / w, xx = si % w;
      const long long o = 2LL * yy * row + 2LL * xx * c + ci;
      yb[o] = v;
      yb[o + c] = v;
      yb[o + row] = v;
      yb[o + row + c] = v;
    }
  }
}

template <typename T>
__device__ void from_nhwc(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ bias,
                          const T* __restrict__ r, int c, int s) {
  __shared__ T tile[32][33];
  const long long b = blockIdx.z;
  const int s0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
  const T* xb = x + b * c * (long long)s;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int si = s0 + i, ci = c0 + threadIdx.x;
    if (ci < c && si < s) tile[threadIdx.x][i] = xb[(long long)si * c + ci];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int ci = c0 + i, si = s0 + threadIdx.x;
    if (ci < c && si < s) {
      const long long o = b * c * (long long)s + (long long)ci * s + si;
      float v = load_f(tile[i][threadIdx.x]);
      if (bias) v = round_t<T>(v + bias[ci]);
      if (r) v = v + load_f(r[o]);
      y[o] = store_f<T>(v);
    }
  }
}

#define VAE_OPS(SUF, T)                                                                                \
  extern "C" __global__ void vae_rms_norm_##SUF(const T* x, T* y, const float* gamma, float scale,     \
                                                int c, long long s) {                                  \
    rms_norm<T, false>(x, y, gamma, scale, c, s);                                                      \
  }                                                                                                    \
  extern "C" __global__ void vae_rms_norm_silu_##SUF(const T* x, T* y, const float* gamma,             \
                                                     float scale, int c, long long s) {                \
    rms_norm<T, true>(x, y, gamma, scale, c, s);                                                       \
  }                                                                                                    \
  extern "C" __global__ void vae_bias_add_##SUF(T* y, const T* r, const float* b, int c, long long s,  \
                                                long long n) {                                         \
    bias_add<T>(y, r, b, c, s, n);                                                                     \
  }                                                                                                    \
  extern "C" __global__ void vae_upsample2x_##SUF(const T* x, T* y, long long planes, int h, int w) {  \
    upsample2x<T>(x, y, planes, h, w);                                                                 \
  }                                                                                                    \
  extern "C" __global__ void vae_to_nhwc_##SUF(const T* x, T* y, int c, int s) {                       \
    to_nhwc<T>(x, y, c, s);                                                                            \
  }                                                                                                    \
  extern "C" __global__ void vae_to_nhwc_up2_##SUF(const T* x, T* y, int c, int h, int w) {            \
    to_nhwc_up2<T>(x, y, c, h, w);                                                                     \
  }                                                                                                    \
  extern "C" __global__ void vae_from_nhwc_##SUF(const T* x, T* y, const float* bias, const T* r,     \
                                                 int c, int s) {                                       \
    from_nhwc<T>(x, y, bias, r, c, s);                                                                 \
  }

VAE_OPS(f32, float)
VAE_OPS(bf16, __nv_bfloat16)
VAE_OPS(f16, __half)
