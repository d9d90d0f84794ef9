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

// FP8 matmuls (activations quantised per row = per token, weights per output channel):
//   e4m3_quantize_rows_T: for each row r of x [rows, k]: s_r = amax_r / 448 (1 for an all-zero row),
//                         q = e4m3(clamp(x / s_r, ±448)) — Fp8Weight::quantize's per-channel
//                         arithmetic, so the bytes and scales equal the CPU's.
//   fp8_epilogue_T:       y = T(acc · s_row[r] · s_col[c] + b[c]), then with gelu: T(gelu_tanh(y)),
//                         where acc [rows, cols] is the e4m3 product accumulated in f32 and rounded
//                         to T by the matmul; s_col has one value per column, or one for all when
//                         per_col == 0. y may be acc.

__device__ __forceinline__ float block_max(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

template <typename T>
__device__ void quantize_rows(const T* __restrict__ x, __nv_fp8_storage_t* __restrict__ q, float* __restrict__ scale,
                              int k) {
  __shared__ float shared[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * k;
  __nv_fp8_storage_t* qr = q + row * k;
  float amax = 0.f;
  for (int i = threadIdx.x; i < k; i += blockDim.x) amax = fmaxf(amax, fabsf(load_f(xr[i])));
  amax = block_max(amax, shared);
  const float s = amax > 0.f ? amax / 448.f : 1.f;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const float v = fminf(fmaxf(load_f(xr[i]) / s, -448.f), 448.f);
    qr[i] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
  }
  if (threadIdx.x == 0) scale[row] = s;
}

template <typename T>
__device__ void fp8_epilogue(const T* acc, T* y, const float* __restrict__ s_row, const float* __restrict__ s_col,
                             int per_col, const float* __restrict__ b, int cols, int gelu) {
  const long long row = blockIdx.x;
  const T* ar = acc + row * cols;
  T* yr = y + row * cols;
  const float sr = s_row[row];
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    float v = load_f(ar[i]) * sr * s_col[per_col ? i : 0] + b[i];
    if (gelu) {
      v = load_f(store_f<T>(v));
      // 0.5·v·(1 + tanh(√(2/π)·(v + 0.044715·v³))), as bias_gelu in dit_fused.cu
      const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      v = 0.5f * v * (1.f + tanhf(inner));
    }
    yr[i] = store_f<T>(v);
  }
}

#define INSTANTIATE_MATMUL(T, NAME)                                                                            \
  extern "C" __global__ void e4m3_quantize_rows_##NAME(const T* x, __nv_fp8_storage_t* q, float* scale, int k) { \
    quantize_rows<T>(x, q, scale, k);                                                                            \
  }                                                                                                              \
  extern "C" __global__ void fp8_epilogue_##NAME(const T* acc, T* y, const float* s_row, const float* s_col,   \
                                                 int per_col, const float* b, int cols, int gelu) {             \
    fp8_epilogue<T>(acc, y, s_row, s_col, per_col, b, cols, gelu);                                              \
  }

INSTANTIATE_MATMUL(__nv_bfloat16, bf16)
INSTANTIATE_MATMUL(__half, f16)

// Per-tensor e4m3 inputs of cuDNN's FP8 attention (dit/cudnn_attention.rs). Each bf16 input is
// `rows` rows of `width` contiguous values (one token's heads), row r at
// x + (r / per_batch)·batch_stride + (r % per_batch)·row_stride, 16-byte aligned, width % 8 == 0;
// its e4m3 copy is contiguous [rows, width]. `slots` is the scales buffer, one f32 per 16 bytes
// (cuDNN's tensor alignment), in the order of `Slot` there.
//   attention_amax_bf16:     slots[amax] = max(slots[amax], max |x|), as float bits (starts at 0)
//   attention_scales:        from the three amaxes: each input's descale (amax / 448, 1 for an
//                            all-zero input), the probabilities' scale and descale, and the
//                            output's: o is a convex combination of v's rows, so |o| ≤ amax_v,
//                            and half of e4m3's range is left as headroom for rounding
//   attention_quantize_bf16: q = e4m3(x / descale), saturating
//   attention_output_bf16:   o = bf16(f32(o8) · descale_o + mean), mean null for none
// `mean` (null for none): per batch, `width` values subtracted from every row first, each input's
// mean over the tokens (attention_column_partials_bf16, then attention_column_mean; both add in a
// fixed order, so the result is deterministic).
// - k: softmax ignores a constant added to a query's logits, so softmax(q·(k - m)ᵀ) equals
//   softmax(q·kᵀ) for any m, and the e4m3 rounding of k is then relative to what varies between
//   keys, not to a component every key shares.
// - v: the probabilities of a row sum to 1, so P·v = P·(v - m) + m; the mean goes back in
//   attention_output_bf16. Without it a component every value row shares piles up in the e4m3
//   P·V product over tens of thousands of keys, and Hopper's FP8 tensor cores add into their
//   accumulator with only ~14 significant bits (DeepSeek-V3 report; SageAttention2 smooths v for
//   the same reason): measured 1.47e-1 relative error at Wan A14B's 32760 keys, against 2.8e-2 at
//   its 512 text keys.
#define SLOT(i) ((i) * 4)
enum { AMAX_Q, AMAX_K, AMAX_V, DESCALE_Q, DESCALE_K, DESCALE_V, SCALE_S, DESCALE_S, SCALE_O, DESCALE_O };

// The value of row r's element at [i, i + 8) minus the mean (if any), as floats.
__device__ __forceinline__ void attention_load8(const uint4* xr, const float* mean, long long r, long long per_batch,
                                                int width, int i, float f[8]) {
  const uint4 v = xr[i];
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 g = __bfloat1622float2(p[j]);
    f[2 * j] = g.x;
    f[2 * j + 1] = g.y;
  }
  if (mean != nullptr) {
    const float* m = mean + (r / per_batch) * width + 8 * i;
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] -= m[j];
  }
}

__device__ __forceinline__ const uint4* attention_row(const __nv_bfloat16* x, long long per_batch,
                                                      long long batch_stride, long long row_stride) {
  const long long r = blockIdx.x;
  return reinterpret_cast<const uint4*>(x + (r / per_batch) * batch_stride + (r % per_batch) * row_stride);
}

extern "C" __global__ void attention_amax_bf16(const __nv_bfloat16* x, long long per_batch, long long batch_stride,
                                               long long row_stride, int width, const float* mean, float* slots,
                                               int slot) {
  __shared__ float shared[32];
  const uint4* xr = attention_row(x, per_batch, batch_stride, row_stride);
  float m = 0.f;
  for (int i = threadIdx.x; i < width / 8; i += blockDim.x) {
    float f[8];
    attention_load8(xr, mean, blockIdx.x, per_batch, width, i, f);
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(f[j]));
  }
  m = block_max(m, shared);
  // Non-negative floats order as their bit patterns.
  if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned int*>(slots + SLOT(slot)), __float_as_uint(m));
}

// partials[(b · chunks + blockIdx.x) · width + c] = Σ of x[row][c] over the `rows_per_chunk` rows of
// chunk blockIdx.x of batch b = blockIdx.y (grid: chunks × batches); threads stride the channels.
extern "C" __global__ void attention_column_partials_bf16(const __nv_bfloat16* x, long long per_batch,
                                                          long long batch_stride, long long row_stride, int width,
                                                          int rows_per_chunk, float* partials) {
  const long long r0 = (long long)blockIdx.x * rows_per_chunk;
  const long long r1 = min(per_batch, r0 + rows_per_chunk);
  const __nv_bfloat16* base = x + blockIdx.y * batch_stride;
  float* out = partials + ((long long)blockIdx.y * gridDim.x + blockIdx.x) * width;
  for (int c = 2 * threadIdx.x; c < width; c += 2 * blockDim.x) {
    float sx = 0.f, sy = 0.f;
    for (long long r = r0; r < r1; ++r) {
      const float2 g = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(base + r * row_stride + c));
      sx += g.x;
      sy += g.y;
    }
    out[c] = sx;
    out[c + 1] = sy;
  }
}

// mean[b · width + c] = Σ over the chunks of partials / per_batch; one thread per (batch, channel).
extern "C" __global__ void attention_column_mean(const float* partials, int chunks, int width, int batches,
                                                 long long per_batch, float* mean) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= (long long)batches * width) return;
  const long long b = i / width, c = i % width;
  float s = 0.f;
  for (int k = 0; k < chunks; ++k) s += partials[(b * chunks + k) * width + c];
  mean[i] = s / (float)per_batch;
}

extern "C" __global__ void attention_scales(float* slots, float scale_s) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  for (int i = 0; i < 3; ++i) {
    const float amax = slots[SLOT(AMAX_Q + i)];
    slots[SLOT(DESCALE_Q + i)] = amax == 0.f ? 1.f : amax / 448.f;
  }
  slots[SLOT(SCALE_S)] = scale_s;
  slots[SLOT(DESCALE_S)] = 1.f / scale_s;
  const float amax_v = slots[SLOT(AMAX_V)];
  const float scale_o = amax_v == 0.f ? 1.f : 224.f / amax_v;
  slots[SLOT(SCALE_O)] = scale_o;
  slots[SLOT(DESCALE_O)] = 1.f / scale_o;
}

extern "C" __global__ void attention_quantize_bf16(const __nv_bfloat16* x, long long per_batch,
                                                   long long batch_stride, long long row_stride, int width,
                                                   const float* mean, const float* slots, int slot,
                                                   __nv_fp8_storage_t* q) {
  const uint4* xr = attention_row(x, per_batch, batch_stride, row_stride);
  uint2* qr = reinterpret_cast<uint2*>(q + (long long)blockIdx.x * width);
  const float descale = slots[SLOT(slot)];
  for (int i = threadIdx.x; i < width / 8; i += blockDim.x) {
    float f[8];
    attention_load8(xr, mean, blockIdx.x, per_batch, width, i, f);
    unsigned short pairs[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      pairs[j] = __nv_cvt_float2_to_fp8x2(make_float2(f[2 * j] / descale, f[2 * j + 1] / descale), __NV_SATFINITE,
                                          __NV_E4M3);
    }
    qr[i] = make_uint2(pairs[0] | (unsigned int)pairs[1] << 16, pairs[2] | (unsigned int)pairs[3] << 16);
  }
}

// Four e4m3 output values per thread; `width` (H · 128) is a multiple of 4, so the four share a row.
extern "C" __global__ void attention_output_bf16(const unsigned int* o8, const float* slots, const float* mean,
                                                 long long per_batch, int width, __nv_bfloat16* out, long long n4) {
  const float descale = slots[SLOT(DESCALE_O)];
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4;
       i += (long long)gridDim.x * blockDim.x) {
    const unsigned int packed = o8[i];
    const long long e = 4 * i, row = e / width;
    const int c = (int)(e % width);
    const float* m = mean == nullptr ? nullptr : mean + (row / per_batch) * width + c;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float x = e4m3_to_f((packed >> (8 * k)) & 0xff) * descale;
      out[e + k] = __float2bfloat16(m == nullptr ? x : x + m[k]);
    }
  }
}
