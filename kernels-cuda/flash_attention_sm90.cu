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
// The backward (flash_attn_bwd_sm90_*) follows the forward in this file.
#include "common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"
#include "attention.cuh"

#define FH_ROWS 64  // queries per block and keys per tile
static_assert(FH_ROWS == 64, "FaBlock and fa_softmax_step (attention.cuh) assume 64 queries and 64 keys a tile");

__device__ __forceinline__ void cp_async16_to(u32 dst, const void* src, int src_bytes) {
#ifdef TUNA_CUDA_EMU
    emu::cp_async(emu::shared_ptr(dst, 16), src, src_bytes);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#endif
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

#ifdef TUNA_CUDA_EMU  // compiled as host C++ (tools/cuda-emu): the wgmma forms below, emulated
template <typename T> __device__ __forceinline__ void fh_qk(T, float* d, u64 da, u64 db) { emu::wgmma(std::is_same<T, Bf16>::value, d, 64, da, nullptr, db, 0, 0); }
template <int D, typename T> __device__ __forceinline__ void fh_pv(T, float* d, const u32* a, u64 db) { emu::wgmma(std::is_same<T, Bf16>::value, d, D, 0, a, db, 0, 1); }
#else
// d += A.B^T slice: m64n64k16, both operands from shared memory; TRANS is "imm-trans-a,
// imm-trans-b" ("0, 0": both K-major, as S = Q.K^T reads them).
#define FH_WGMMA_SS(TYPE, TRANS)                                                                                   \
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " WG_D32 ", %32, %33, 1, 1, 1, " TRANS ";" \
                 : ACC32(0)                                                                                        \
                 : "l"(da), "l"(db))
__device__ __forceinline__ void fh_qk(Bf16, float* d, u64 da, u64 db) { FH_WGMMA_SS("bf16", "0, 0"); }
__device__ __forceinline__ void fh_qk(F16, float* d, u64 da, u64 db) { FH_WGMMA_SS("f16", "0, 0"); }

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
#endif

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
        fence_proxy_async();
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

// ---------------------------------------------------------------------------------------------
// Backward on wgmma: flash_attention.cu's backward (the same arguments, with its Dvec pass
// before and its dQ rounding pass after; the same masks and outputs), with a block of one
// warpgroup owning 64 keys of one (b, g) over every query head of the group and every tile of
// 64 queries that can see them. Warp w owns keys 16w..16w+15, so in the keys' orientation the
// wgmma accumulators are the scores' transposes:
//
//   S^T  = K.Q^T      SS m64n64k16, A = K and B = Q both K-major (over D)
//   dP^T = V.dO^T     SS m64n64k16
//   P^T  = exp2(S^T scale_log2 - lse), masked; dS^T = P^T (dP^T - Dvec), in registers
//   dV  += P^T.dO     RS m64n{D}k16: A = P^T re-packed from the accumulators (as the forward's
//                     P), B = dO through the transposed (MN-major) descriptor
//   dK  += dS^T.Q     RS m64n{D}k16, the same with dS^T and Q
//   dQ   = dS.K       SS m64n64k16 per 64 columns of D: A = dS^T, stored to shared memory, read
//                     through the transposed descriptor (imm-trans-a), B = K transposed;
//                     added into dq_acc (scaled by the softmax scale) by f32 atomics, two
//                     adjacent columns a time (red.global.add.v2.f32)
//
// The next tile's Q and dO (and its rows' lse, Dvec and segment starts) load by cp.async into
// the other buffer while this tile's math runs. Shared memory: K, V, Q[2], dO[2] (64 rows x D,
// swizzled as in the forward), dS^T (64 x 64, swizzled), 2 x 3 x 64 words of row values, and
// 1 KiB to align: 768 * D + 10752 bytes (58.5 KiB at D = 64, 106.5 KiB at D = 128: two blocks
// an SM).
//
// Launch: grid (ceil(S / 64), G, B), block 128, that dynamic shared memory. Instances:
// flash_attn_bwd_sm90_{bf16,f16}_d{64,128}. Not yet run (no GPU so far).

// fhb_dq: d += dS.K slice, m64n64k16 with both operands read transposed (MN-major) from shared
// memory. fhb_red2: p[0] += a, p[1] += b as one atomic (sm_90's vector reduction; p 8-byte
// aligned).
#ifdef TUNA_CUDA_EMU
template <typename T> __device__ __forceinline__ void fhb_dq(T, float* d, u64 da, u64 db) { emu::wgmma(std::is_same<T, Bf16>::value, d, 64, da, nullptr, db, 1, 1); }
__device__ __forceinline__ void fhb_red2(float* p, float a, float b) { emu::red_add_v2(p, a, b); }
#else
__device__ __forceinline__ void fhb_dq(Bf16, float* d, u64 da, u64 db) { FH_WGMMA_SS("bf16", "1, 1"); }
__device__ __forceinline__ void fhb_dq(F16, float* d, u64 da, u64 db) { FH_WGMMA_SS("f16", "1, 1"); }
__device__ __forceinline__ void fhb_red2(float* p, float a, float b) { asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory"); }
#endif

// The A fragments of the four k16 slices of a 64 x 64 accumulator (16-bit, see the forward).
template <typename T>
__device__ __forceinline__ void fhb_pack(const float* acc, u32 (*a)[4]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const float* s0 = acc + 8 * kk;
        a[kk][0] = (u32)T::from_f32(s0[0]) | ((u32)T::from_f32(s0[1]) << 16);
        a[kk][1] = (u32)T::from_f32(s0[2]) | ((u32)T::from_f32(s0[3]) << 16);
        a[kk][2] = (u32)T::from_f32(s0[4]) | ((u32)T::from_f32(s0[5]) << 16);
        a[kk][3] = (u32)T::from_f32(s0[6]) | ((u32)T::from_f32(s0[7]) << 16);
    }
}

template <typename T, int D>
__device__ __forceinline__ void flash_attn_bwd_sm90(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                                                    const unsigned short* __restrict__ v, const unsigned int* __restrict__ starts,
                                                    const unsigned short* __restrict__ dout, const float* __restrict__ lse,
                                                    const float* __restrict__ dvec, float* __restrict__ dq_acc,
                                                    unsigned short* __restrict__ dk, unsigned short* __restrict__ dv, FaParams p) {
    constexpr int TILE = FH_ROWS * D * 2;
    constexpr int NT = D / 8;
    extern __shared__ unsigned char smem_raw[];
    const u32 raw = smem_addr(smem_raw);
    const u32 base = (raw + 1023u) & ~1023u;  // the launcher adds 1 KiB of slack
    const u32 ks = base, vs = base + TILE, qs = base + 2 * TILE, dos = base + 4 * TILE, dss = base + 6 * TILE;
    // Row values of each buffer: lse (log2 domain) and Dvec as floats, then the segment starts.
    float* rowv = (float*)(smem_raw + (base - raw) + 6 * TILE + FH_ROWS * 128);  // [2][lse | Dvec | starts][64]
    unsigned int* rowu = (unsigned int*)rowv;

    const int T_ = p.q_len, S = p.kv_len, H = p.heads, G = p.kv_heads, hpg = H / G;
    const int b = blockIdx.z, g = blockIdx.y, k0 = blockIdx.x * FH_ROWS;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, c = lane & 3;
    const int off = S - T_;
    const long q_row = (long)H * D, kv_row = (long)G * D;
    const float log2e = 1.4426950408889634f;
    const float scale = p.scale_log2 / log2e;

    fh_load_tile<D>(ks, k + (long)b * S * kv_row + (long)g * D, k0, S, kv_row);
    fh_load_tile<D>(vs, v + (long)b * S * kv_row + (long)g * D, k0, S, kv_row);
    // Queries that can see some key of the tile: causal t >= k0 - off; window t < k0 + 63 - off + window.
    int t_begin = p.causal ? max(0, k0 - off) : 0;
    t_begin = (t_begin / FH_ROWS) * FH_ROWS;
    int t_end = T_;
    if (p.window > 0) t_end = min(T_, k0 + FH_ROWS - 1 - off + p.window);
    const int n_t = t_end > t_begin ? (t_end - t_begin + FH_ROWS - 1) / FH_ROWS : 0;
    const int iters = hpg * n_t;  // (query head, query tile) pairs, head-major

    // Iteration it's Q and dO tiles and row values into buffer bf.
    auto load = [&](int it, int bf) {
        const int h = g * hpg + it / n_t, t0 = t_begin + (it % n_t) * FH_ROWS;
        const long head = (long)b * T_ * q_row + (long)h * D;
        fh_load_tile<D>(qs + bf * TILE, q + head, t0, T_, q_row);
        fh_load_tile<D>(dos + bf * TILE, dout + head, t0, T_, q_row);
        if (tid < FH_ROWS) {
            const int t = t0 + tid;
            const long at = ((long)b * H + h) * T_ + t;
            float* rv = rowv + bf * 3 * FH_ROWS;
            rv[tid] = t < T_ ? lse[at] * log2e : 0.0f;
            rv[FH_ROWS + tid] = t < T_ ? dvec[at] : 0.0f;
            rowu[bf * 3 * FH_ROWS + 2 * FH_ROWS + tid] = starts && t < T_ ? starts[(long)b * T_ + t] : 0u;
        }
    };
    if (iters > 0) load(0, 0);
    cp_async_commit();

    float dka[D / 2], dva[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dka[i] = dva[i] = 0.0f;
    const int key0 = k0 + 16 * warp + gr;  // this lane's key rows: key0 and key0 + 8

    for (int it = 0; it < iters; ++it) {
        const int bf = it & 1;
        const int h = g * hpg + it / n_t, t0 = t_begin + (it % n_t) * FH_ROWS;
        // This tile landed (cp.async for the tiles, plain stores for the row values); every
        // thread is past the previous tile, so the other buffers and dS^T are free.
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (it + 1 < iters) load(it + 1, bf ^ 1);
        cp_async_commit();
        const u32 qt = qs + bf * TILE, dt = dos + bf * TILE;
        const float* rv = rowv + bf * 3 * FH_ROWS;
        const unsigned int* st = rowu + bf * 3 * FH_ROWS + 2 * FH_ROWS;

        // S^T = K.Q^T and dP^T = V.dO^T over D in k16 slices.
        float sacc[32], pacc[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) sacc[i] = pacc[i] = 0.0f;
        wgmma_operand_fence<32>(sacc);
        wgmma_operand_fence<32>(pacc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const u32 at = (kk / 4) * (FH_ROWS * 128) + (kk % 4) * 32;
            fh_qk(T{}, sacc, smem_desc(ks + at, 16, 1024), smem_desc(qt + at, 16, 1024));
            fh_qk(T{}, pacc, smem_desc(vs + at, 16, 1024), smem_desc(dt + at, 16, 1024));
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_operand_fence<32>(sacc);
        wgmma_operand_fence<32>(pacc);

        // P^T (0 where masked) and dS^T = P^T (dP^T - Dvec); key rows key0 (e < 2), key0 + 8.
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int s_ = e < 2 ? key0 : key0 + 8;
                const int qi = 8 * j + 2 * c + (e & 1);
                const int t = t0 + qi;
                bool ok = s_ < S && t < T_;
                if (p.causal) ok = ok && s_ <= t + off;
                if (p.window > 0) ok = ok && s_ > t + off - p.window;
                if (starts) ok = ok && (unsigned int)s_ >= st[qi];
                const float pv = ok ? exp2f(sacc[4 * j + e] * p.scale_log2 - rv[qi]) : 0.0f;
                sacc[4 * j + e] = pv;
                pacc[4 * j + e] = pv * (pacc[4 * j + e] - rv[FH_ROWS + qi]);
            }
        }
        u32 pa[4][4], dsa[4][4];
        fhb_pack<T>(sacc, pa);
        fhb_pack<T>(pacc, dsa);
        // dS^T to shared memory (keys as rows, queries contiguous: what the transposed A
        // descriptor reads as dS), before the wgmma below takes dsa as its A: an in-flight
        // wgmma's A registers may not be touched, even read, until its wait.
        const int r0 = 16 * warp + gr, r1 = r0 + 8;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            st_shared_u32(dss + swizzled(r0, 2 * kk) + 4 * c, dsa[kk][0]);
            st_shared_u32(dss + swizzled(r1, 2 * kk) + 4 * c, dsa[kk][1]);
            st_shared_u32(dss + swizzled(r0, 2 * kk + 1) + 4 * c, dsa[kk][2]);
            st_shared_u32(dss + swizzled(r1, 2 * kk + 1) + 4 * c, dsa[kk][3]);
        }

        // dV += P^T.dO and dK += dS^T.Q over the tile's 64 queries (k16 slice kk: queries 16kk..).
        wgmma_operand_fence<D / 2>(dva);
        wgmma_operand_fence<D / 2>(dka);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            asm volatile("" : "+r"(pa[kk][0]), "+r"(pa[kk][1]), "+r"(pa[kk][2]), "+r"(pa[kk][3])::"memory");
            asm volatile("" : "+r"(dsa[kk][0]), "+r"(dsa[kk][1]), "+r"(dsa[kk][2]), "+r"(dsa[kk][3])::"memory");
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) fh_pv<D>(T{}, dva, pa[kk], smem_desc(dt + kk * 2048, FH_ROWS * 128, 1024));
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) fh_pv<D>(T{}, dka, dsa[kk], smem_desc(qt + kk * 2048, FH_ROWS * 128, 1024));
        wgmma_commit();
        // dS^T (stored above) handed to the tensor cores (async proxy), from every warp.
        fence_proxy_async();
        __syncthreads();

        // dQ = dS.K, 64 columns of D at a time (k16 slice kk: keys 16kk.., 2048 bytes in), added
        // to dq_acc; this lane's rows are queries t0 + r0 and t0 + r1.
        float* dqb = dq_acc + (long)b * T_ * q_row + (long)h * D;
#pragma unroll
        for (int hn = 0; hn < D / 64; ++hn) {
            float qacc[32];
#pragma unroll
            for (int i = 0; i < 32; ++i) qacc[i] = 0.0f;
            wgmma_operand_fence<32>(qacc);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) fhb_dq(T{}, qacc, smem_desc(dss + kk * 2048, FH_ROWS * 128, 1024), smem_desc(ks + hn * (FH_ROWS * 128) + kk * 2048, FH_ROWS * 128, 1024));
            wgmma_commit();
            wgmma_wait<0>();  // also the dV, dK group above
            wgmma_operand_fence<32>(qacc);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int col = hn * 64 + 8 * j + 2 * c;
                if (t0 + r0 < T_) fhb_red2(dqb + (long)(t0 + r0) * q_row + col, scale * qacc[4 * j + 0], scale * qacc[4 * j + 1]);
                if (t0 + r1 < T_) fhb_red2(dqb + (long)(t0 + r1) * q_row + col, scale * qacc[4 * j + 2], scale * qacc[4 * j + 3]);
            }
        }
        wgmma_operand_fence<D / 2>(dva);
        wgmma_operand_fence<D / 2>(dka);
    }
    cp_async_wait<0>();

    // Epilogue: dK (times the softmax scale) and dV for the tile's keys.
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int col = n * 8 + 2 * c;
        if (key0 < S) {
            const long at = ((long)b * S + key0) * kv_row + (long)g * D + col;
            *(u32*)(dk + at) = (u32)T::from_f32(scale * dka[4 * n + 0]) | ((u32)T::from_f32(scale * dka[4 * n + 1]) << 16);
            *(u32*)(dv + at) = (u32)T::from_f32(dva[4 * n + 0]) | ((u32)T::from_f32(dva[4 * n + 1]) << 16);
        }
        if (key0 + 8 < S) {
            const long at = ((long)b * S + key0 + 8) * kv_row + (long)g * D + col;
            *(u32*)(dk + at) = (u32)T::from_f32(scale * dka[4 * n + 2]) | ((u32)T::from_f32(scale * dka[4 * n + 3]) << 16);
            *(u32*)(dv + at) = (u32)T::from_f32(dva[4 * n + 2]) | ((u32)T::from_f32(dva[4 * n + 3]) << 16);
        }
    }
}

#define FHB_INSTANCE(NAME, TY, D)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) NAME(const unsigned short* q, const unsigned short* k, const unsigned short* v,   \
                                                           const unsigned int* starts, const unsigned short* dout, const float* lse,   \
                                                           const float* dvec, float* dq_acc, unsigned short* dk, unsigned short* dv, \
                                                           FaParams p) {                                                            \
        flash_attn_bwd_sm90<TY, D>(q, k, v, starts, dout, lse, dvec, dq_acc, dk, dv, p);                                            \
    }
FHB_INSTANCE(flash_attn_bwd_sm90_bf16_d64, Bf16, 64)
FHB_INSTANCE(flash_attn_bwd_sm90_f16_d64, F16, 64)
FHB_INSTANCE(flash_attn_bwd_sm90_bf16_d128, Bf16, 128)
FHB_INSTANCE(flash_attn_bwd_sm90_f16_d128, F16, 128)
