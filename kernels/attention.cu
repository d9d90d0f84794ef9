// Fused attention forward (FlashAttention-2 style) for head_dim 128, bf16, non-causal, no mask:
// O = softmax(Q·Kᵀ·scale)·V without materialising the score matrix. Q/K/V/O in the layout the
// projections produce, [B, L, H, 128] with a token stride (elements between consecutive tokens).
//
// One CTA = 4 warps of one (batch, head); each warp owns 16·M_TILES query rows: 64 queries per
// CTA (`flash_attention_bf16`, Q fragments held in registers) or 128 (`flash_attention_bf16_m128`:
// Q re-read from shared memory, so each K/V fragment read from shared memory feeds two MMAs
// instead of one — shared-memory bandwidth, not the tensor cores, bounds the 64-query form on the
// H100). Key/value tiles of 64 keys are double-buffered in shared memory with cp.async. Q·Kᵀ and P·V run on the
// tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate); the online softmax keeps the running
// max and sum in f32 registers, in the log2 domain (scale·log2(e) folded into one multiply).
// P goes from the score accumulators straight into the A operand of P·V (same register layout).
// Keys past Lk are masked to −inf; query rows past Lq are computed on zeros and not stored.

#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int HEAD_DIM = 128;
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
// Row pitch in shared memory: 128 values + 8 padding (16 B) so that the 8 rows read by one
// ldmatrix land in different banks.
constexpr int PITCH = HEAD_DIM + 8;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// D = A·B + D, m16n8k16, bf16 operands, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Copies rows [row0, row0 + TILE_ROWS) of one head (token stride `stride`) into a shared tile;
// rows at or past `rows` are zero-filled.
template <int TILE_ROWS>
__device__ __forceinline__ void load_tile(__nv_bfloat16* tile, const __nv_bfloat16* base, long long stride,
                                          int row0, int rows) {
  // TILE_ROWS rows x 16 chunks of 16 B, TILE_ROWS / 8 per thread.
#pragma unroll
  for (int i = 0; i < (TILE_ROWS * HEAD_DIM / 8) / THREADS; ++i) {
    const int chunk = threadIdx.x + i * THREADS;
    const int r = chunk / (HEAD_DIM / 8);
    const int c = (chunk % (HEAD_DIM / 8)) * 8;
    const bool valid = row0 + r < rows;
    const __nv_bfloat16* src = valid ? base + (long long)(row0 + r) * stride + c : base;
    cp_async_16(smem_addr(tile + r * PITCH + c), src, valid);
  }
}

// The kernel body for M_TILES m16 row tiles per warp (see the file comment).
template <int M_TILES, int BLOCK_N>
__device__ __forceinline__ void flash_attention(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                                const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o,
                                                int lq, int lk, long long q_stride, long long k_stride,
                                                long long v_stride, long long o_stride, long long q_batch,
                                                long long k_batch, long long v_batch, long long o_batch,
                                                float scale_log2) {
  constexpr int WARP_ROWS = 16 * M_TILES;
  constexpr int BLOCK_M = WARPS * WARP_ROWS;
  // One row tile: the 8 k-steps of Q stay in registers; two: Q is re-read per k-step (registers
  // go to the second tile's accumulators).
  constexpr bool Q_IN_REGISTERS = M_TILES == 1;
  constexpr int KV_TILE_ELEMS = BLOCK_N * PITCH;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* sq = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* sk = sq + BLOCK_M * PITCH;  // 2 stages
  __nv_bfloat16* sv = sk + 2 * KV_TILE_ELEMS;  // 2 stages

  const int m0 = blockIdx.x * BLOCK_M;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;  // accumulator row within an 8-row half
  const int t = lane % 4;  // accumulator column pair

  const __nv_bfloat16* qb = q + batch * q_batch + head * HEAD_DIM;
  const __nv_bfloat16* kb = k + batch * k_batch + head * HEAD_DIM;
  const __nv_bfloat16* vb = v + batch * v_batch + head * HEAD_DIM;

  load_tile<BLOCK_M>(sq, qb, q_stride, m0, lq);
  cp_async_commit();
  load_tile<BLOCK_N>(sk, kb, k_stride, 0, lk);
  load_tile<BLOCK_N>(sv, vb, v_stride, 0, lk);
  cp_async_commit();

  // A fragment of Q for row tile mt, k-step kk, from shared memory.
  auto load_q = [&](int mt, int kk, uint32_t (&a)[4]) {
    const int row = warp * WARP_ROWS + mt * 16 + (lane % 16);
    const int col = kk * 16 + (lane / 16) * 8;
    ldmatrix_x4(smem_addr(sq + row * PITCH + col), a[0], a[1], a[2], a[3]);
  };
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qa[Q_IN_REGISTERS ? HEAD_DIM / 16 : 1][4];
  if constexpr (Q_IN_REGISTERS) {
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) load_q(0, kk, qa[kk]);
  }

  // Thread rows: per row tile mt, g (elements 0..1) and g + 8 (elements 2..3), i.e. r = 2mt + e/2.
  float acc[M_TILES][HEAD_DIM / 8][4];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 8; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;
  float row_max[2 * M_TILES];
  float row_sum[2 * M_TILES];
#pragma unroll
  for (int r = 0; r < 2 * M_TILES; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }

  const int tiles = (lk + BLOCK_N - 1) / BLOCK_N;
  for (int tile = 0; tile < tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < tiles) {
      load_tile<BLOCK_N>(sk + (stage ^ 1) * KV_TILE_ELEMS, kb, k_stride, (tile + 1) * BLOCK_N, lk);
      load_tile<BLOCK_N>(sv + (stage ^ 1) * KV_TILE_ELEMS, vb, v_stride, (tile + 1) * BLOCK_N, lk);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const __nv_bfloat16* ks = sk + stage * KV_TILE_ELEMS;
    const __nv_bfloat16* vs = sv + stage * KV_TILE_ELEMS;

    // S = Q·Kᵀ for WARP_ROWS rows x 64 keys: 8 n-tiles of 8 keys per row tile.
    float s[M_TILES][BLOCK_N / 8][4];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
      uint32_t a[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) {
        if constexpr (Q_IN_REGISTERS) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mt][e] = qa[kk][e];
        } else {
          load_q(mt, kk, a[mt]);
        }
      }
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; j += 2) {
        const int mi = lane / 8;
        const int key = j * 8 + (mi / 2) * 8 + (lane % 8);
        const int col = kk * 16 + (mi % 2) * 8;
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(smem_addr(ks + key * PITCH + col), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_bf16(s[mt][j], a[mt], b0, b1);
          mma_bf16(s[mt][j + 1], a[mt], b2, b3);
        }
      }
    }

    // Online softmax (log2 domain).
    const int key0 = tile * BLOCK_N;
    float tile_max[2 * M_TILES];
#pragma unroll
    for (int r = 0; r < 2 * M_TILES; ++r) tile_max[r] = -INFINITY;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + j * 8 + 2 * t + (e & 1);
          const float x = key < lk ? s[mt][j][e] * scale_log2 : -INFINITY;
          s[mt][j][e] = x;
          tile_max[2 * mt + e / 2] = fmaxf(tile_max[2 * mt + e / 2], x);
        }
      }
    }
    float correction[2 * M_TILES];
#pragma unroll
    for (int r = 0; r < 2 * M_TILES; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
      const float m_new = fmaxf(row_max[r], tile_max[r]);
      correction[r] = fast_exp2(row_max[r] - m_new);  // exp2(-inf) = 0 on the first tile
      row_max[r] = m_new;
      row_sum[r] *= correction[r];
    }
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
      for (int j = 0; j < HEAD_DIM / 8; ++j) {
        acc[mt][j][0] *= correction[2 * mt];
        acc[mt][j][1] *= correction[2 * mt];
        acc[mt][j][2] *= correction[2 * mt + 1];
        acc[mt][j][3] *= correction[2 * mt + 1];
      }
    }
    // P = exp2(S − max), packed to bf16 A fragments: k-step kk of P·V covers keys 16kk..16kk+15,
    // i.e. score n-tiles 2kk and 2kk+1.
    uint32_t pa[M_TILES][BLOCK_N / 16][4];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; ++j) {
        const float p0 = fast_exp2(s[mt][j][0] - row_max[2 * mt]);
        const float p1 = fast_exp2(s[mt][j][1] - row_max[2 * mt]);
        const float p2 = fast_exp2(s[mt][j][2] - row_max[2 * mt + 1]);
        const float p3 = fast_exp2(s[mt][j][3] - row_max[2 * mt + 1]);
        row_sum[2 * mt] += p0 + p1;
        row_sum[2 * mt + 1] += p2 + p3;
        pa[mt][j / 2][(j % 2) * 2 + 0] = pack_bf16(p0, p1);
        pa[mt][j / 2][(j % 2) * 2 + 1] = pack_bf16(p2, p3);
      }
    }

    // O += P·V: 16 n-tiles of 8 head dims, 4 k-steps of 16 keys.
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < HEAD_DIM / 8; j += 2) {
        const int mi = lane / 8;
        const int key = kk * 16 + (mi % 2) * 8 + (lane % 8);
        const int col = j * 8 + (mi / 2) * 8;
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4_trans(smem_addr(vs + key * PITCH + col), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_bf16(acc[mt][j], pa[mt][kk], b0, b1);
          mma_bf16(acc[mt][j + 1], pa[mt][kk], b2, b3);
        }
      }
    }
    __syncthreads();  // the stage is overwritten by the load issued in the next iteration
  }

  // Normalise and store (rows past lq are dropped).
  __nv_bfloat16* ob = o + batch * o_batch + head * HEAD_DIM;
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[2 * mt + h];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      inv[h] = 1.f / sum;
    }
    const int row0 = m0 + warp * WARP_ROWS + mt * 16 + g;
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 8; ++j) {
      const int col = j * 8 + 2 * t;
      if (row0 < lq) {
        *reinterpret_cast<uint32_t*>(ob + (long long)row0 * o_stride + col) =
            pack_bf16(acc[mt][j][0] * inv[0], acc[mt][j][1] * inv[0]);
      }
      if (row0 + 8 < lq) {
        *reinterpret_cast<uint32_t*>(ob + (long long)(row0 + 8) * o_stride + col) =
            pack_bf16(acc[mt][j][2] * inv[1], acc[mt][j][3] * inv[1]);
      }
    }
  }
}

}  // namespace

#define FLASH_ATTENTION_ENTRY(NAME, M_TILES, BLOCK_N)                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS, 2)                                                     \
      NAME(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,                            \
           const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int lq, int lk, long long q_stride, \
           long long k_stride, long long v_stride, long long o_stride, long long q_batch, long long k_batch,     \
           long long v_batch, long long o_batch, float scale_log2) {                                             \
    flash_attention<M_TILES, BLOCK_N>(q, k, v, o, lq, lk, q_stride, k_stride, v_stride, o_stride, q_batch, k_batch,      \
                             v_batch, o_batch, scale_log2);                                                      \
  }

// 64 queries per CTA; shared memory 5 * 64 * PITCH bf16 (Q, 2 K stages, 2 V stages).
FLASH_ATTENTION_ENTRY(flash_attention_bf16, 1, 64)
// 128 queries per CTA; shared memory (128 + 4 * 64) * PITCH bf16.
FLASH_ATTENTION_ENTRY(flash_attention_bf16_m128, 2, 64)
FLASH_ATTENTION_ENTRY(flash_attention_bf16_m128_n32, 2, 32)
