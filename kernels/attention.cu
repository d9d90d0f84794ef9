// Fused attention forward (FlashAttention-2 style) for head_dim 128, bf16, non-causal, no mask:
// O = softmax(Q·Kᵀ·scale)·V without materialising the score matrix. Q/K/V/O in the layout the
// projections produce, [B, L, H, 128] with a token stride (elements between consecutive tokens).
//
// One CTA = 4 warps = 64 queries of one (batch, head); each warp owns 16 query rows. Key/value
// tiles of 64 keys are double-buffered in shared memory with cp.async. Q·Kᵀ and P·V run on the
// tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate); the online softmax keeps the running
// max and sum in f32 registers, in the log2 domain (scale·log2(e) folded into one multiply).
// P goes from the score accumulators straight into the A operand of P·V (same register layout).
// Keys past Lk are masked to −inf; query rows past Lq are computed on zeros and not stored.

#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int HEAD_DIM = 128;
constexpr int BLOCK_M = 64;
constexpr int BLOCK_N = 64;
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
// Row pitch in shared memory: 128 values + 8 padding (16 B) so that the 8 rows read by one
// ldmatrix land in different banks.
constexpr int PITCH = HEAD_DIM + 8;
constexpr int TILE_ELEMS = BLOCK_M * PITCH;  // BLOCK_M == BLOCK_N

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

// Copies rows [row0, row0 + 64) of one head (token stride `stride`) into a shared tile; rows at
// or past `rows` are zero-filled.
__device__ __forceinline__ void load_tile(__nv_bfloat16* tile, const __nv_bfloat16* base, long long stride,
                                          int row0, int rows) {
  // 64 rows x 16 chunks of 16 B = 1024 chunks, 8 per thread.
#pragma unroll
  for (int i = 0; i < (BLOCK_N * HEAD_DIM / 8) / THREADS; ++i) {
    const int chunk = threadIdx.x + i * THREADS;
    const int r = chunk / (HEAD_DIM / 8);
    const int c = (chunk % (HEAD_DIM / 8)) * 8;
    const bool valid = row0 + r < rows;
    const __nv_bfloat16* src = valid ? base + (long long)(row0 + r) * stride + c : base;
    cp_async_16(smem_addr(tile + r * PITCH + c), src, valid);
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS, 2)
    flash_attention_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                         const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, int lq, int lk,
                         long long q_stride, long long k_stride, long long v_stride, long long o_stride,
                         long long q_batch, long long k_batch, long long v_batch, long long o_batch,
                         float scale_log2) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* sq = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* sk = sq + TILE_ELEMS;      // 2 stages
  __nv_bfloat16* sv = sk + 2 * TILE_ELEMS;  // 2 stages

  const int m0 = blockIdx.x * BLOCK_M;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;  // accumulator row within the warp's 8-row half
  const int t = lane % 4;  // accumulator column pair

  const __nv_bfloat16* qb = q + batch * q_batch + head * HEAD_DIM;
  const __nv_bfloat16* kb = k + batch * k_batch + head * HEAD_DIM;
  const __nv_bfloat16* vb = v + batch * v_batch + head * HEAD_DIM;

  load_tile(sq, qb, q_stride, m0, lq);
  cp_async_commit();
  load_tile(sk, kb, k_stride, 0, lk);
  load_tile(sv, vb, v_stride, 0, lk);
  cp_async_commit();

  // Q fragments (A operand) for the warp's 16 rows, all 8 k-steps of 16.
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qa[HEAD_DIM / 16][4];
#pragma unroll
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
    const int row = warp * 16 + (lane % 16);
    const int col = kk * 16 + (lane / 16) * 8;
    ldmatrix_x4(smem_addr(sq + row * PITCH + col), qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3]);
  }

  float acc[HEAD_DIM / 8][4];
#pragma unroll
  for (int j = 0; j < HEAD_DIM / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  const int tiles = (lk + BLOCK_N - 1) / BLOCK_N;
  for (int tile = 0; tile < tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < tiles) {
      load_tile(sk + (stage ^ 1) * TILE_ELEMS, kb, k_stride, (tile + 1) * BLOCK_N, lk);
      load_tile(sv + (stage ^ 1) * TILE_ELEMS, vb, v_stride, (tile + 1) * BLOCK_N, lk);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const __nv_bfloat16* ks = sk + stage * TILE_ELEMS;
    const __nv_bfloat16* vs = sv + stage * TILE_ELEMS;

    // S = Q·Kᵀ for 16 rows x 64 keys: 8 n-tiles of 8 keys.
    float s[BLOCK_N / 8][4];
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < BLOCK_N / 8; j += 2) {
        const int mi = lane / 8;
        const int key = j * 8 + (mi / 2) * 8 + (lane % 8);
        const int col = kk * 16 + (mi % 2) * 8;
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(smem_addr(ks + key * PITCH + col), b0, b1, b2, b3);
        mma_bf16(s[j], qa[kk], b0, b1);
        mma_bf16(s[j + 1], qa[kk], b2, b3);
      }
    }

    // Online softmax (log2 domain). Thread rows: g (s[.][0..1]) and g + 8 (s[.][2..3]).
    const int key0 = tile * BLOCK_N;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + j * 8 + 2 * t + (e & 1);
        const float x = key < lk ? s[j][e] * scale_log2 : -INFINITY;
        s[j][e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
    }
    float correction[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
      const float m_new = fmaxf(row_max[r], tile_max[r]);
      correction[r] = fast_exp2(row_max[r] - m_new);  // exp2(-inf) = 0 on the first tile
      row_max[r] = m_new;
      row_sum[r] *= correction[r];
    }
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 8; ++j) {
      acc[j][0] *= correction[0];
      acc[j][1] *= correction[0];
      acc[j][2] *= correction[1];
      acc[j][3] *= correction[1];
    }
    // P = exp2(S − max), packed to bf16 A fragments: k-step kk of P·V covers keys 16kk..16kk+15,
    // i.e. score n-tiles 2kk and 2kk+1.
    uint32_t pa[BLOCK_N / 16][4];
#pragma unroll
    for (int j = 0; j < BLOCK_N / 8; ++j) {
      const float p0 = fast_exp2(s[j][0] - row_max[0]);
      const float p1 = fast_exp2(s[j][1] - row_max[0]);
      const float p2 = fast_exp2(s[j][2] - row_max[1]);
      const float p3 = fast_exp2(s[j][3] - row_max[1]);
      row_sum[0] += p0 + p1;
      row_sum[1] += p2 + p3;
      pa[j / 2][(j % 2) * 2 + 0] = pack_bf16(p0, p1);
      pa[j / 2][(j % 2) * 2 + 1] = pack_bf16(p2, p3);
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
        mma_bf16(acc[j], pa[kk], b0, b1);
        mma_bf16(acc[j + 1], pa[kk], b2, b3);
      }
    }
    __syncthreads();  // the stage is overwritten by the load issued in the next iteration
  }

  // Normalise and store (rows past lq are dropped).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
  }
  const float inv0 = 1.f / row_sum[0];
  const float inv1 = 1.f / row_sum[1];
  const int row0 = m0 + warp * 16 + g;
  __nv_bfloat16* ob = o + batch * o_batch + head * HEAD_DIM;
#pragma unroll
  for (int j = 0; j < HEAD_DIM / 8; ++j) {
    const int col = j * 8 + 2 * t;
    if (row0 < lq) {
      *reinterpret_cast<uint32_t*>(ob + (long long)row0 * o_stride + col) =
          pack_bf16(acc[j][0] * inv0, acc[j][1] * inv0);
    }
    if (row0 + 8 < lq) {
      *reinterpret_cast<uint32_t*>(ob + (long long)(row0 + 8) * o_stride + col) =
          pack_bf16(acc[j][2] * inv1, acc[j][3] * inv1);
    }
  }
}
