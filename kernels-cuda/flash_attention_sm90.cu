// arch: sm_90a
// Flash attention forward on Hopper's warpgroup MMA (wgmma): the algorithm, masks, arguments
// and outputs of flash_attention.cu's forward (see there), with its two products on wgmma:
//
//   S = Q.K^T    wgmma m64n64k16, A (Q) and B (K) from shared memory (K-major descriptors)
//   O += P.V     wgmma m64n{D}k16, A = P from registers (the S accumulators rounded to 16 bits
//                and re-packed: the accumulator layout of two adjacent 8-key tiles is the
//                A-fragment layout of a k16 slice), B = V from shared memory read through the
//                transposed (MN-major) descriptor, V being stored with D contiguous
//
// Block: one warpgroup (128 threads) and 64 queries of one (b, h), warp w owning rows
// 16w..16w+15 as in the mma.sync kernel, so the mask, the online softmax and the epilogue are
// the shared ones (attention.cuh). Keys stream in tiles of 64: K and V double-buffered in
// shared memory by cp.async (rows past S zero-filled), the next tile's loads overlapping this
// tile's math. Shared memory: Q, K[2], V[2], each 64 rows x D in the 128-byte swizzle of
// wgmma.cuh (D / 64 chunks of 64 rows x 128 bytes), 1024-byte aligned: 5 * 128 * D bytes + 1 KiB
// slack (41 KiB at D = 64, 81 KiB at D = 128).
//
// Launch: grid (ceil(T / 64), H, B), block 128, that dynamic shared memory. Instances:
// flash_attn_fwd_sm90_{bf16,f16}_d{64,128}. Built for sm_90a alone (`arch:` line above).
// Not yet run (no GPU so far); gpu-check checks it against the f64 reference before timing it.
#include "common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"
#include "attention.cuh"

#define FH_ROWS 64  // queries per block and keys per tile
static_assert(FH_ROWS == 64, "FaBlock and fa_softmax_step (attention.cuh) assume 64 queries and 64 keys a tile");

__device__ __forceinline__ void cp_async16_to(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// Rows row0..row0+63 of a [rows, row_stride] matrix (D contiguous) into the swizzled tile at
// `dst`; rows past `rows` are zero.
template <int D>
__device__ __forceinline__ void fh_load_tile(u32 dst, const unsigned short* src, int row0, int rows, long row_stride) {
    for (int i = threadIdx.x; i < FH_ROWS * (D / 8); i += 128) {
        const int r = i / (D / 8), c8 = i % (D / 8);
        const int row = row0 + r;
        const bool in = row < rows;
        cp_async16_to(dst + (c8 / 8) * (FH_ROWS * 128) + swizzled(r, c8 % 8), in ? src + (long)row * row_stride + c8 * 8 : src, in ? 16 : 0);
    }
}

// s += Q.K^T slice: m64n64k16, both operands from shared memory.
#define FH_WGMMA_SS(TYPE)                                                                                     \
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " WG_D32 ", %32, %33, 1, 1, 1, 0, 0;" \
                 : ACC32(0)                                                                                   \
                 : "l"(da), "l"(db))
__device__ __forceinline__ void fh_qk(Bf16, float* d, u64 da, u64 db) { FH_WGMMA_SS("bf16"); }
__device__ __forceinline__ void fh_qk(F16, float* d, u64 da, u64 db) { FH_WGMMA_SS("f16"); }

// o += P.V slice: m64n64k16 (D 64) or m64n128k16 (D 128), A (4 registers) from P, B from V
// through the transposed descriptor.
#define FH_WGMMA_RS64(TYPE)                                                                                              \
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " WG_D32 ", {%32, %33, %34, %35}, %36, 1, 1, 1, 1;" \
                 : ACC32(0)                                                                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db))
#define FH_WGMMA_RS128(TYPE)                                                                                              \
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " WG_D64 ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;" \
                 : ACC32(0), ACC32(32)                                                                                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db))
template <int D> __device__ __forceinline__ void fh_pv(Bf16, float* d, const u32* a, u64 db);
template <int D> __device__ __forceinline__ void fh_pv(F16, float* d, const u32* a, u64 db);
template <> __device__ __forceinline__ void fh_pv<64>(Bf16, float* d, const u32* a, u64 db) { FH_WGMMA_RS64("bf16"); }
template <> __device__ __forceinline__ void fh_pv<64>(F16, float* d, const u32* a, u64 db) { FH_WGMMA_RS64("f16"); }
template <> __device__ __forceinline__ void fh_pv<128>(Bf16, float* d, const u32* a, u64 db) { FH_WGMMA_RS128("bf16"); }
template <> __device__ __forceinline__ void fh_pv<128>(F16, float* d, const u32* a, u64 db) { FH_WGMMA_RS128("f16"); }

template <typename T, int D>
__device__ __forceinline__ void flash_attn_fwd_sm90(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                                                    const unsigned short* __restrict__ v, const unsigned int* __restrict__ starts,
                                                    unsigned short* __restrict__ o, float* __restrict__ lse, FaParams p) {
    constexpr int TILE = FH_ROWS * D * 2;  // bytes of one 64-row tile
    constexpr int NT = D / 8;              // 8-column tiles of O
    extern __shared__ unsigned char smem_raw[];
    const u32 base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // the launcher adds 1 KiB of slack
    const u32 qs = base, ks = base + TILE, vs = base + 3 * TILE;  // K[2], V[2]

    const FaBlock<D> blk(q, k, v, starts, p);
    const int T_ = p.q_len, S = p.kv_len, c = blk.c, r0 = blk.r0, r1 = blk.r1, s_end = blk.s_end;
    const long kv_row = blk.kv_row;
    const unsigned short *kb = blk.kb, *vb = blk.vb;

    fh_load_tile<D>(qs, blk.qb, blk.q0, T_, blk.q_row);
    if (blk.kv_first < s_end) {
        fh_load_tile<D>(ks, kb, blk.kv_first, S, kv_row);
        fh_load_tile<D>(vs, vb, blk.kv_first, S, kv_row);
    }
    cp_async_commit();

    float oacc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) oacc[i] = 0.0f;
    float m0 = FA_NEG_INF, m1 = FA_NEG_INF, l0 = 0.0f, l1 = 0.0f;
    int buf = 0;
    for (int kv0 = blk.kv_first; kv0 < s_end; kv0 += FH_ROWS, buf ^= 1) {
        // This tile (and Q) landed; every warp is past the previous tile, whose buffers take the
        // next tile's loads. The fence hands cp.async's writes to the tensor cores (async proxy).
        cp_async_wait<0>();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        if (kv0 + FH_ROWS < s_end) {
            fh_load_tile<D>(ks + (buf ^ 1) * TILE, kb, kv0 + FH_ROWS, S, kv_row);
            fh_load_tile<D>(vs + (buf ^ 1) * TILE, vb, kv0 + FH_ROWS, S, kv_row);
        }
        cp_async_commit();
        const u32 kt = ks + buf * TILE, vt = vs + buf * TILE;

        // S = Q.K^T over D in k16 slices (slice kk: chunk kk / 4, 32 * (kk % 4) bytes in).
        float sacc[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) sacc[i] = 0.0f;
        wgmma_operand_fence<32>(sacc);  // the zeros (and the O rescale below) stay above the fences
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const u32 at = (kk / 4) * (FH_ROWS * 128) + (kk % 4) * 32;
            fh_qk(T{}, sacc, smem_desc(qs + at, 16, 1024), smem_desc(kt + at, 16, 1024));
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_operand_fence<32>(sacc);

        fa_softmax_step<NT>(sacc, oacc, kv0, r0, r1, c, blk.off, blk.st0, blk.st1, starts != nullptr, p, m0, m1, l0, l1);

        // O += P.V over the tile's 64 keys in k16 slices (slice kk: keys 16kk.., 2048 bytes in;
        // V's 64-column chunks 8 KiB apart).
        u32 pa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const float* s0 = sacc + 8 * kk;  // 8-key tiles 2kk and 2kk + 1
            pa[kk][0] = (u32)T::from_f32(s0[0]) | ((u32)T::from_f32(s0[1]) << 16);
            pa[kk][1] = (u32)T::from_f32(s0[2]) | ((u32)T::from_f32(s0[3]) << 16);
            pa[kk][2] = (u32)T::from_f32(s0[4]) | ((u32)T::from_f32(s0[5]) << 16);
            pa[kk][3] = (u32)T::from_f32(s0[6]) | ((u32)T::from_f32(s0[7]) << 16);
        }
        wgmma_operand_fence<D / 2>(oacc);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) asm volatile("" : "+r"(pa[kk][0]), "+r"(pa[kk][1]), "+r"(pa[kk][2]), "+r"(pa[kk][3])::"memory");
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) fh_pv<D>(T{}, oacc, pa[kk], smem_desc(vt + kk * 2048, FH_ROWS * 128, 1024));
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_operand_fence<D / 2>(oacc);
    }
    cp_async_wait<0>();
    fa_store_out<T, D>(o, lse, oacc, p, blk.b, blk.h, r0, r1, c, m0, m1, l0, l1);
}

#define FH_INSTANCE(NAME, TY, D)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) NAME(const unsigned short* q, const unsigned short* k, const unsigned short* v, \
                                                           const unsigned int* starts, unsigned short* o, float* lse, FaParams p) {  \
        flash_attn_fwd_sm90<TY, D>(q, k, v, starts, o, lse, p);                                                                   \
    }
FH_INSTANCE(flash_attn_fwd_sm90_bf16_d64, Bf16, 64)
FH_INSTANCE(flash_attn_fwd_sm90_f16_d64, F16, 64)
FH_INSTANCE(flash_attn_fwd_sm90_bf16_d128, Bf16, 128)
FH_INSTANCE(flash_attn_fwd_sm90_f16_d128, F16, 128)
