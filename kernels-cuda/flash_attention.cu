// Flash attention forward (the FlashAttention-2 algorithm) on tensor cores: bf16 or f16 in and
// out, f32 scores, softmax and accumulation.
//
//   q [B, T, H, D], k and v [B, S, G, D], o [B, T, H, D] (row-major, heads interleaved as the
//   model lays them out; H % G == 0, query head h reads key/value head h / (H / G));
//   lse [B, H, T] f32: each query row's log-sum-exp of its scaled scores (for the backward).
//   Query t of row b sees key s when s < S and
//     causal:  s <= t + (S - T)                   (S - T: the KV-cache offset)
//     window:  s >  t + (S - T) - window          (window > 0)
//     packed:  s >= starts[b*T + t]               (segment starts; T == S)
//   and its scores are scale * q.k.
//
// Tiles: a block of 4 warps takes 64 queries of one (b, h); warp w owns query rows 16w..16w+15.
// Each warp holds its Q rows as mma A fragments in registers for the whole kernel. Keys stream
// through shared memory in tiles of 64 (K and V, rows padded to D + 8 elements). Per key tile:
//   prologue   K and V tiles loaded (16-byte vectors; rows past S are zero)
//   scores     S = Q.K^T: 16 x 64 per warp, 8 n8-tiles, D/16 mma k-steps each
//   mask       per element (coordinates from the fragment layout), -inf where not visible
//   softmax    online: row max over the 4 lanes of a quad (shuffles), rescale O and l
//   P.V        P re-packed from the S accumulators as A fragments (the m16n8 C layout of two
//              adjacent n-tiles is the m16k16 A layout), O += P.V over D/8 n-tiles
// Key tiles past the causal limit (and before the window) are skipped; the epilogue divides
// by l (summed across the quad) and writes O and lse.
//
// Register tile (lane = 4*g + c): rows g and g + 8 of the warp's 16; of each n8 tile, columns
// 2c and 2c + 1. A fragments: a0 (row g, k 2c..2c+1), a1 (row g+8), a2 (row g, k + 8), a3
// (row g+8, k + 8); B fragments: b0 (k 2c..2c+1, column g), b1 (k + 8).
//
// Launch: grid (ceil(T / 64), H, B), block 128, static shared memory 2 * 64 * (D + 8) * 2 bytes
// (18 KB at D = 64, 34 KB at D = 128). Instances: flash_attn_fwd_{bf16,f16}_d{32,64,96,128},
// flash_attn_fwd_pipe_* with cp.async and ldmatrix (see PIPE below), and at D = 256
// flash_attn_fwd_{bf16,f16}_d256 on grid (ceil(T / 64), 2H, B), two blocks per query block, each
// taking half of O's columns (34 KB, see DO below).
#include "common.cuh"
#include "mma.cuh"
#include "attention.cuh"

#define FA_BR 64
#define FA_BC 64
static_assert(FA_BR == 64 && FA_BC == 64, "FaBlock and fa_softmax_step (attention.cuh) assume 64 queries and 64 keys a tile");
#define FA_THREADS 128

__device__ __forceinline__ u32 pack2(unsigned short lo, unsigned short hi) { return (u32)lo | ((u32)hi << 16); }

// One 64-row K or V tile (rows from s0) into shared memory by cp.async, 16 bytes per copy; rows
// past S are zero-filled (src-size 0 reads nothing).
template <int D>
__device__ __forceinline__ void fa_tile_async(unsigned short* dst, const unsigned short* src, int s0, int S, long row_stride) {
    constexpr int LD = D + 8;
    for (int i = threadIdx.x; i < FA_BC * (D / 8); i += FA_THREADS) {
        const int row = i / (D / 8), col = (i % (D / 8)) * 8;
        const int s = s0 + row;
        const bool in = s < S;
        cp_async16(dst + row * LD + col, in ? src + (long)s * row_stride + col : src, in ? 16 : 0);
    }
}

// PIPE = false: each key tile is loaded with plain 16-byte loads between barriers, fragments
// read with 32- and 16-bit shared loads (the first version). PIPE = true: K and V tiles arrive
// by cp.async, V's load overlapping Q.K^T and the softmax, the next K's overlapping P.V (same
// shared memory: one K and one V tile); K fragments by ldmatrix, V fragments by ldmatrix.trans.
//
// Head dims past 128 (DO < D, PIPE false only): a block computes its queries' scores over the
// whole head dim but O over DO of its columns only, the D / DO blocks of one (query block, b, h)
// side by side in grid.y (h = blockIdx.y / (D / DO)); each holds DO / 8 tiles of O in registers
// and streams the key tile through shared memory in chunks of 128 columns (KC), so the
// registers and shared memory are D = 128's. The scores are computed D / DO times over (1.5x
// the forward's work at D = 256).
template <typename T, int D, bool PIPE, int DO = D>
__device__ __forceinline__ void flash_attn_fwd(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                                               const unsigned short* __restrict__ v, const unsigned int* __restrict__ starts,
                                               unsigned short* __restrict__ o, float* __restrict__ lse, FaParams p) {
    constexpr int KC = D < 128 ? D : 128;  // key-tile columns in shared memory at a time
    constexpr int LD = KC + 8;    // padded smem row of the key tile (elements)
    constexpr int LDV = DO + 8;   // padded smem row of the value tile
    constexpr int KS = D / 16;    // mma k-steps of Q.K^T
    constexpr int NT = DO / 8;    // n8 tiles of O this block holds
    constexpr int SPLIT = D / DO; // blocks sharing one query block's O columns
    static_assert(!PIPE || (KC == D && DO == D), "the pipelined forward takes head dims up to 128");
    __shared__ __align__(16) unsigned short ks[FA_BC * LD];
    __shared__ __align__(16) unsigned short vs[FA_BC * LDV];

    const FaBlock<D> blk(q, k, v, starts, p, SPLIT);
    const int v_col = (blockIdx.y % SPLIT) * DO;  // this block's columns of O (and of V)
    const int T_ = p.q_len, S = p.kv_len, lane = threadIdx.x & 31, g = lane >> 2, c = blk.c;
    const int r0 = blk.r0, r1 = blk.r1, s_end = blk.s_end, kv_first = blk.kv_first;
    const long q_row = blk.q_row, kv_row = blk.kv_row;
    const unsigned short *qb = blk.qb, *kb = blk.kb, *vb = blk.vb;

    // Prologue: this warp's Q rows as A fragments (rows past T are zero).
    u32 qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        const int col = kk * 16 + 2 * c;
        qa[kk][0] = r0 < T_ ? *(const u32*)(qb + r0 * q_row + col) : 0u;
        qa[kk][1] = r1 < T_ ? *(const u32*)(qb + r1 * q_row + col) : 0u;
        qa[kk][2] = r0 < T_ ? *(const u32*)(qb + r0 * q_row + col + 8) : 0u;
        qa[kk][3] = r1 < T_ ? *(const u32*)(qb + r1 * q_row + col + 8) : 0u;
    }
    float oacc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) oacc[n][0] = oacc[n][1] = oacc[n][2] = oacc[n][3] = 0.0f;
    float m0 = FA_NEG_INF, m1 = FA_NEG_INF, l0 = 0.0f, l1 = 0.0f;

    if constexpr (PIPE) {
        // cp.async groups in issue order: K0, V0, K1, V1, ...
        if (kv_first < s_end) fa_tile_async<D>(ks, kb, kv_first, S, kv_row);
        cp_async_commit();
    }
    for (int kv0 = kv_first; kv0 < s_end; kv0 += FA_BC) {
        if constexpr (PIPE) {
            fa_tile_async<D>(vs, vb, kv0, S, kv_row);  // vs is free: the last P.V ended in a barrier
            cp_async_commit();
            cp_async_wait<1>();  // all but the newest group (this V): K is in
            __syncthreads();
        }

        // Scores: S = Q.K^T for this warp's 16 rows and the tile's 64 keys.
        float sacc[FA_BC / 8][4];
#pragma unroll
        for (int j = 0; j < FA_BC / 8; ++j) sacc[j][0] = sacc[j][1] = sacc[j][2] = sacc[j][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < D / KC; ++kc) {
            if constexpr (!PIPE && KC == D && DO == D) {
                // K and V tiles: 64 rows of D elements, 16-byte vectors.
                __syncthreads();  // the previous tile is no longer read
                for (int i = threadIdx.x; i < FA_BC * (D / 8); i += FA_THREADS) {
                    const int row = i / (D / 8), col = (i % (D / 8)) * 8;
                    const int s = kv0 + row;
                    uint4 kv4 = make_uint4(0u, 0u, 0u, 0u), vv4 = make_uint4(0u, 0u, 0u, 0u);
                    if (s < S) {
                        kv4 = *(const uint4*)(kb + (long)s * kv_row + col);
                        vv4 = *(const uint4*)(vb + (long)s * kv_row + col);
                    }
                    *(uint4*)(ks + row * LD + col) = kv4;
                    *(uint4*)(vs + row * LD + col) = vv4;
                }
                __syncthreads();
            } else if constexpr (!PIPE) {
                // K (columns kc*KC.., KC of them) and, with the first chunk, V (this block's DO
                // columns): 64 rows, 16-byte vectors.
                __syncthreads();  // the previous tile (chunk) is no longer read
                for (int i = threadIdx.x; i < FA_BC * (KC / 8); i += FA_THREADS) {
                    const int row = i / (KC / 8), col = (i % (KC / 8)) * 8;
                    const int s = kv0 + row;
                    uint4 kv4 = make_uint4(0u, 0u, 0u, 0u);
                    if (s < S) kv4 = *(const uint4*)(kb + (long)s * kv_row + kc * KC + col);
                    *(uint4*)(ks + row * LD + col) = kv4;
                }
                if (kc == 0) {
                    for (int i = threadIdx.x; i < FA_BC * (DO / 8); i += FA_THREADS) {
                        const int row = i / (DO / 8), col = (i % (DO / 8)) * 8;
                        const int s = kv0 + row;
                        uint4 vv4 = make_uint4(0u, 0u, 0u, 0u);
                        if (s < S) vv4 = *(const uint4*)(vb + (long)s * kv_row + v_col + col);
                        *(uint4*)(vs + row * LDV + col) = vv4;
                    }
                }
                __syncthreads();
            }
#pragma unroll
            for (int j = 0; j < FA_BC / 8; ++j) {
                if constexpr (PIPE) {
                    // ldmatrix.x4 over keys j*8..j*8+7: matrices at d = kk*16 + {0, 8, 16, 24} are
                    // b0, b1 of k-steps kk and kk + 1 (lane L addresses key L % 8, d block L / 8).
                    const unsigned short* kaddr = ks + (j * 8 + (lane & 7)) * LD + (lane >> 3) * 8;
#pragma unroll
                    for (int kk = 0; kk < KS; kk += 2) {
                        u32 r[4];
                        ldmatrix_x4(r, kaddr + kk * 16);
                        T::mma(sacc[j], qa[kk], r);
                        T::mma(sacc[j], qa[kk + 1], r + 2);
                    }
                } else {
                    const unsigned short* krow = ks + (j * 8 + g) * LD + 2 * c;
#pragma unroll
                    for (int kk = 0; kk < KC / 16; ++kk) {
                        u32 bf[2] = {*(const u32*)(krow + kk * 16), *(const u32*)(krow + kk * 16 + 8)};
                        T::mma(sacc[j], qa[kc * (KC / 16) + kk], bf);
                    }
                }
            }
        }

        // Mask and the online softmax (log2 domain); O rescaled.
        fa_softmax_step<NT>(&sacc[0][0], &oacc[0][0], kv0, r0, r1, c, blk.off, blk.st0, blk.st1, starts != nullptr, p, m0, m1, l0, l1);

        if constexpr (PIPE) {
            __syncthreads();  // every warp is done with this K tile
            if (kv0 + FA_BC < s_end) fa_tile_async<D>(ks, kb, kv0 + FA_BC, S, kv_row);
            cp_async_commit();   // (an empty group on the last tile keeps the count uniform)
            cp_async_wait<1>();  // all but the newest (the next K): V is in
            __syncthreads();
        }

        // O += P.V: P (16 x 64) as A fragments from the score registers; V (64 x D) as B.
#pragma unroll
        for (int kk = 0; kk < FA_BC / 16; ++kk) {
            u32 pa[4] = {
                pack2(T::from_f32(sacc[2 * kk][0]), T::from_f32(sacc[2 * kk][1])),
                pack2(T::from_f32(sacc[2 * kk][2]), T::from_f32(sacc[2 * kk][3])),
                pack2(T::from_f32(sacc[2 * kk + 1][0]), T::from_f32(sacc[2 * kk + 1][1])),
                pack2(T::from_f32(sacc[2 * kk + 1][2]), T::from_f32(sacc[2 * kk + 1][3])),
            };
            if constexpr (PIPE) {
                // ldmatrix.x4.trans over keys kk*16..+15 and d n*8..n*8+15: matrices (keys +0,
                // d +0), (keys +8, d +0), (keys +0, d +8), (keys +8, d +8) are b0, b1 of n-tiles
                // n and n + 1 (lane L addresses key (L / 8 % 2) * 8 + L % 8, d block L / 16).
                const unsigned short* vaddr = vs + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8;
#pragma unroll
                for (int n = 0; n < NT; n += 2) {
                    u32 r[4];
                    ldmatrix_x4_trans(r, vaddr + n * 8);
                    T::mma(oacc[n], pa, r);
                    T::mma(oacc[n + 1], pa, r + 2);
                }
            } else {
                const unsigned short* v0 = vs + (kk * 16 + 2 * c) * LDV + g;
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const unsigned short* vp = v0 + n * 8;
                    u32 bf[2] = {pack2(vp[0], vp[LDV]), pack2(vp[8 * LDV], vp[9 * LDV])};
                    T::mma(oacc[n], pa, bf);
                }
            }
        }
        if constexpr (PIPE) __syncthreads();  // V is read by every warp before the next V lands
    }
    if constexpr (PIPE) cp_async_wait<0>();

    fa_store_out<T, D, DO>(o, lse, &oacc[0][0], p, blk.b, blk.h, r0, r1, c, m0, m1, l0, l1, v_col);
}

// LB: the launch bounds. 64 and 128 (the dims the kernels were tuned at) leave ptxas its
// occupancy target; 32 and 96 add a minimum of one block per SM, without which ptxas spills a
// few registers at 168 (d96) and 128 (d32).
#define FA_LB_64 __launch_bounds__(FA_THREADS)
#define FA_LB_128 __launch_bounds__(FA_THREADS)
#define FA_LB_32 __launch_bounds__(FA_THREADS, 1)
#define FA_LB_96 __launch_bounds__(FA_THREADS, 1)
#define FA_LB_256 __launch_bounds__(FA_THREADS, 1)

#define FA_INSTANCE(NAME, TY, D, PIPE)                                                                                    \
    extern "C" __global__ void FA_LB_##D NAME(const unsigned short* q, const unsigned short* k, const unsigned short* v,  \
                                              const unsigned int* starts, unsigned short* o, float* lse, FaParams p) {    \
        flash_attn_fwd<TY, D, PIPE>(q, k, v, starts, o, lse, p);                                                          \
    }

// Head dims 32, 64, 96, 128: D a multiple of 32 (the pipelined path's ldmatrix.x4 covers two
// k-steps of 16, and the backward splits D/8 n-tiles between warp pairs).
#define FA_FWD_INSTANCES(D)                                      \
    FA_INSTANCE(flash_attn_fwd_bf16_d##D, Bf16, D, false)        \
    FA_INSTANCE(flash_attn_fwd_f16_d##D, F16, D, false)          \
    FA_INSTANCE(flash_attn_fwd_pipe_bf16_d##D, Bf16, D, true)    \
    FA_INSTANCE(flash_attn_fwd_pipe_f16_d##D, F16, D, true)
FA_FWD_INSTANCES(32)
FA_FWD_INSTANCES(64)
FA_FWD_INSTANCES(96)
FA_FWD_INSTANCES(128)

// Head dim 256 (Gemma): the first kernel only, each block taking half of O's columns.
#define FA_INSTANCE_HALVES(NAME, TY)                                                                                      \
    extern "C" __global__ void FA_LB_256 NAME(const unsigned short* q, const unsigned short* k, const unsigned short* v,  \
                                              const unsigned int* starts, unsigned short* o, float* lse, FaParams p) {    \
        flash_attn_fwd<TY, 256, false, 128>(q, k, v, starts, o, lse, p);                                                  \
    }
FA_INSTANCE_HALVES(flash_attn_fwd_bf16_d256, Bf16)
FA_INSTANCE_HALVES(flash_attn_fwd_f16_d256, F16)

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2's): with s = scale.q.k, P recomputed from lse, and
//   Dvec[t] = sum_d dO[t, d] O[t, d]           (flash_attn_bwd_dot_*, one warp per row; clears dq_acc)
//   dV[s]  += sum_t P[t, s] dO[t]
//   dP[t, s] = dO[t] . V[s]
//   dS[t, s] = P[t, s] (dP[t, s] - Dvec[t])
//   dK[s]  += scale sum_t dS[t, s] Q[t]        (summed over the H / G query heads of s's group)
//   dQ[t]  += scale sum_s dS[t, s] K[s]        (f32 atomics into dq_acc, then flash_attn_bwd_dq_*)
//
// flash_attn_bwd_*: a block of 4 warps owns 64 keys of one (b, g); warp w owns keys 16w..16w+15
// and accumulates their dK and dV in registers over every query head of the group and every
// query block of 32 that can see them. Per query block, in the keys' orientation (transposed
// tiles, keys as mma rows): S^T = K.Q^T and dP^T = V.dO^T (A from the K and V tiles in shared
// memory, B from the Q and dO tiles), P^T from lse, dV += P^T.dO and dK += dS^T.Q with P^T and
// dS^T re-packed as A fragments; dS^T goes through shared memory so that dQ = dS.K can be
// computed per query row (each warp: 16 queries x D/2 columns) and added atomically.
//
// Launch: grid (ceil(S / 64), G, B), block 128, dynamic shared memory
// (2 * 64 + 2 * 32) * (D + 8) * 2 + 64 * 40 * 2 + 2 * 32 * 4 bytes (20, 32, 44 and 56 KiB at
// D = 32, 64, 96 and 128; the launcher raises the limit for every instance). At D = 256, grid
// (ceil(S / 64), 2G, B) (see DC below) and 104 KiB: an A100 or H100 has the room, a GPU of
// compute capability 8.6 or 8.9 (99 KiB a block) does not, and the launch fails there.
#define FB_KEYS 64
#define FB_Q 32
#define FB_LDS (FB_Q + 8)

// D is a multiple of 8 (the backward's head dims), so a lane reads 8 elements of O and of dO
// in one 16-byte load each. The same pass clears the row of dq_acc that the backward adds into
// (dq_acc has O's layout), so the accumulator needs no memset of its own.
template <typename T>
__device__ __forceinline__ void flash_attn_bwd_dot(const unsigned short* o, const unsigned short* dout, float* dvec, float* dq_acc,
                                                   int rows_bth, int T_, int H, int D) {
    // Row r of [B, T, H] in (b, t, h) order; Dvec stored [B, H, T].
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= rows_bth) return;
    const long base = (long)warp * D;
    float acc = 0.0f;
    for (int d = lane * 8; d < D; d += 256) {
        const uint4 ov = *(const uint4*)(o + base + d), gv = *(const uint4*)(dout + base + d);
        const u32 ow[4] = {ov.x, ov.y, ov.z, ov.w}, gw[4] = {gv.x, gv.y, gv.z, gv.w};
#pragma unroll
        for (int j = 0; j < 4; ++j)
            acc += T::to_f32(ow[j] & 0xffffu) * T::to_f32(gw[j] & 0xffffu) + T::to_f32(ow[j] >> 16) * T::to_f32(gw[j] >> 16);
        *(uint4*)(dq_acc + base + d) = make_uint4(0, 0, 0, 0);
        *(uint4*)(dq_acc + base + d + 4) = make_uint4(0, 0, 0, 0);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        const int h = warp % H, bt = warp / H, t = bt % T_, b = bt / T_;
        dvec[((long)b * H + h) * T_ + t] = acc;
    }
}

// Head dims past 128 (DC < D): the D / DC blocks of one (key block, b, g) sit side by side in
// grid.y (g = blockIdx.y / (D / DC)); each computes S^T, dP^T and dS^T over the whole head dim
// (its tiles hold all D columns) but accumulates dK and dV, and adds dQ, for DC columns only,
// so its registers are D = 128's.
template <typename T, int D, int DC = D>
__device__ __forceinline__ void flash_attn_bwd(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                                               const unsigned short* __restrict__ v, const unsigned int* __restrict__ starts,
                                               const unsigned short* __restrict__ dout, const float* __restrict__ lse,
                                               const float* __restrict__ dvec, float* __restrict__ dq_acc,
                                               unsigned short* __restrict__ dk, unsigned short* __restrict__ dv, FaParams p) {
    constexpr int LD = D + 8;
    constexpr int KS = D / 16;
    constexpr int NT = DC / 8;  // n8 tiles of dK, dV (and dQ) this block accumulates
    constexpr int SPLIT = D / DC;
    extern __shared__ __align__(16) unsigned char fb_smem[];
    unsigned short* ks = (unsigned short*)fb_smem;
    unsigned short* vs = ks + FB_KEYS * LD;
    unsigned short* qs = vs + FB_KEYS * LD;
    unsigned short* dos = qs + FB_Q * LD;
    unsigned short* dss = dos + FB_Q * LD;              // dS^T [64 keys][FB_LDS]
    float* lse_s = (float*)(dss + FB_KEYS * FB_LDS);    // [FB_Q], log2 domain
    float* dvec_s = lse_s + FB_Q;                       // [FB_Q]

    const int T_ = p.q_len, S = p.kv_len, H = p.heads, G = p.kv_heads, hpg = H / G;
    const int b = blockIdx.z, g = blockIdx.y / SPLIT, k0 = blockIdx.x * FB_KEYS;
    const int c0 = (blockIdx.y % SPLIT) * DC;  // this block's first column of dK, dV, dQ
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, c = lane & 3;
    const int off = S - T_;
    const long q_row = (long)H * D, kv_row = (long)G * D;
    const float log2e = 1.4426950408889634f;
    const float scale = p.scale_log2 / log2e;

    // The key and value tiles, once.
    for (int i = threadIdx.x; i < FB_KEYS * (D / 8); i += FA_THREADS) {
        const int row = i / (D / 8), col = (i % (D / 8)) * 8, s = k0 + row;
        uint4 kv4 = make_uint4(0u, 0u, 0u, 0u), vv4 = make_uint4(0u, 0u, 0u, 0u);
        if (s < S) {
            const long at = ((long)b * S + s) * kv_row + (long)g * D + col;
            kv4 = *(const uint4*)(k + at);
            vv4 = *(const uint4*)(v + at);
        }
        *(uint4*)(ks + row * LD + col) = kv4;
        *(uint4*)(vs + row * LD + col) = vv4;
    }

    float dka[NT][4], dva[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[n][e] = dva[n][e] = 0.0f;

    const int key0 = 16 * warp + gr, key1 = key0 + 8;  // this lane's key rows (in the tile)
    // Queries that can see some key of the tile: causal t >= k0 - off; window t < k0 + 63 - off + window.
    int t_begin = p.causal ? max(0, k0 - off) : 0;
    t_begin = (t_begin / FB_Q) * FB_Q;
    int t_end = T_;
    if (p.window > 0) t_end = min(T_, k0 + FB_KEYS - 1 - off + p.window);

    for (int hi = 0; hi < hpg; ++hi) {
        const int h = g * hpg + hi;
        for (int t0 = t_begin; t0 < t_end; t0 += FB_Q) {
            __syncthreads();  // the previous block's tiles are no longer read
            for (int i = threadIdx.x; i < FB_Q * (D / 8); i += FA_THREADS) {
                const int row = i / (D / 8), col = (i % (D / 8)) * 8, t = t0 + row;
                uint4 q4 = make_uint4(0u, 0u, 0u, 0u), d4 = make_uint4(0u, 0u, 0u, 0u);
                if (t < T_) {
                    const long at = ((long)b * T_ + t) * q_row + (long)h * D + col;
                    q4 = *(const uint4*)(q + at);
                    d4 = *(const uint4*)(dout + at);
                }
                *(uint4*)(qs + row * LD + col) = q4;
                *(uint4*)(dos + row * LD + col) = d4;
            }
            if (threadIdx.x < FB_Q) {
                const int t = t0 + threadIdx.x;
                const long at = ((long)b * H + h) * T_ + t;
                lse_s[threadIdx.x] = t < T_ ? lse[at] * log2e : 0.0f;
                dvec_s[threadIdx.x] = t < T_ ? dvec[at] : 0.0f;
            }
            __syncthreads();

            // S^T = K.Q^T and dP^T = V.dO^T: 16 keys x 32 queries per warp, 4 n8 tiles.
            float sa[FB_Q / 8][4], dpa[FB_Q / 8][4];
#pragma unroll
            for (int j = 0; j < FB_Q / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) sa[j][e] = dpa[j][e] = 0.0f;
                const unsigned short* qrow = qs + (j * 8 + gr) * LD + 2 * c;
                const unsigned short* drow = dos + (j * 8 + gr) * LD + 2 * c;
#pragma unroll
                for (int kk = 0; kk < KS; ++kk) {
                    const int col = kk * 16 + 2 * c;
                    u32 ka[4] = {*(const u32*)(ks + key0 * LD + col), *(const u32*)(ks + key1 * LD + col),
                                 *(const u32*)(ks + key0 * LD + col + 8), *(const u32*)(ks + key1 * LD + col + 8)};
                    u32 va[4] = {*(const u32*)(vs + key0 * LD + col), *(const u32*)(vs + key1 * LD + col),
                                 *(const u32*)(vs + key0 * LD + col + 8), *(const u32*)(vs + key1 * LD + col + 8)};
                    u32 qb[2] = {*(const u32*)(qrow + kk * 16), *(const u32*)(qrow + kk * 16 + 8)};
                    u32 db[2] = {*(const u32*)(drow + kk * 16), *(const u32*)(drow + kk * 16 + 8)};
                    T::mma(sa[j], ka, qb);
                    T::mma(dpa[j], va, db);
                }
            }

            // P^T from lse (masked to 0), then dS^T = P^T (dP^T - Dvec); dS^T to shared memory.
#pragma unroll
            for (int j = 0; j < FB_Q / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int kr = e < 2 ? key0 : key1;
                    const int s = k0 + kr;
                    const int qi = j * 8 + 2 * c + (e & 1);
                    const int t = t0 + qi;
                    bool ok = s < S && t < T_;
                    if (p.causal) ok = ok && s <= t + off;
                    if (p.window > 0) ok = ok && s > t + off - p.window;
                    if (starts && t < T_) ok = ok && (unsigned int)s >= starts[(long)b * T_ + t];
                    const float pv = ok ? exp2f(sa[j][e] * p.scale_log2 - lse_s[qi]) : 0.0f;
                    sa[j][e] = pv;
                    dpa[j][e] = pv * (dpa[j][e] - dvec_s[qi]);
                    dss[kr * FB_LDS + qi] = T::from_f32(dpa[j][e]);
                }
            }

            // dV += P^T.dO and dK += dS^T.Q (k = the block's 32 queries, two k16 steps).
#pragma unroll
            for (int kk = 0; kk < FB_Q / 16; ++kk) {
                u32 pa[4] = {pack2(T::from_f32(sa[2 * kk][0]), T::from_f32(sa[2 * kk][1])),
                             pack2(T::from_f32(sa[2 * kk][2]), T::from_f32(sa[2 * kk][3])),
                             pack2(T::from_f32(sa[2 * kk + 1][0]), T::from_f32(sa[2 * kk + 1][1])),
                             pack2(T::from_f32(sa[2 * kk + 1][2]), T::from_f32(sa[2 * kk + 1][3]))};
                u32 dsa[4] = {pack2(T::from_f32(dpa[2 * kk][0]), T::from_f32(dpa[2 * kk][1])),
                              pack2(T::from_f32(dpa[2 * kk][2]), T::from_f32(dpa[2 * kk][3])),
                              pack2(T::from_f32(dpa[2 * kk + 1][0]), T::from_f32(dpa[2 * kk + 1][1])),
                              pack2(T::from_f32(dpa[2 * kk + 1][2]), T::from_f32(dpa[2 * kk + 1][3]))};
                const int qr = kk * 16 + 2 * c;
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const int col = c0 + n * 8 + gr;
                    u32 bdo[2] = {pack2(dos[qr * LD + col], dos[(qr + 1) * LD + col]), pack2(dos[(qr + 8) * LD + col], dos[(qr + 9) * LD + col])};
                    u32 bq[2] = {pack2(qs[qr * LD + col], qs[(qr + 1) * LD + col]), pack2(qs[(qr + 8) * LD + col], qs[(qr + 9) * LD + col])};
                    T::mma(dva[n], pa, bdo);
                    T::mma(dka[n], dsa, bq);
                }
            }
            __syncthreads();  // dS^T complete

            // dQ[t] += scale dS[t, :].K: warp w takes queries 16 (w % 2).. and columns c0 + (w / 2) DC/2..
            {
                const int qb0 = 16 * (warp & 1), nb0 = c0 / 8 + (warp >> 1) * (NT / 2);
                float dqa[NT / 2][4];
#pragma unroll
                for (int n = 0; n < NT / 2; ++n) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < FB_KEYS / 16; ++kk) {
                    const int kr = kk * 16 + 2 * c;  // key rows of this k-step (A's columns)
                    const int r0 = qb0 + gr, r1 = r0 + 8;
                    u32 a[4] = {pack2(dss[kr * FB_LDS + r0], dss[(kr + 1) * FB_LDS + r0]), pack2(dss[kr * FB_LDS + r1], dss[(kr + 1) * FB_LDS + r1]),
                                pack2(dss[(kr + 8) * FB_LDS + r0], dss[(kr + 9) * FB_LDS + r0]), pack2(dss[(kr + 8) * FB_LDS + r1], dss[(kr + 9) * FB_LDS + r1])};
#pragma unroll
                    for (int n = 0; n < NT / 2; ++n) {
                        const int col = (nb0 + n) * 8 + gr;
                        u32 bk[2] = {pack2(ks[kr * LD + col], ks[(kr + 1) * LD + col]), pack2(ks[(kr + 8) * LD + col], ks[(kr + 9) * LD + col])};
                        T::mma(dqa[n], a, bk);
                    }
                }
#pragma unroll
                for (int n = 0; n < NT / 2; ++n) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int t = t0 + qb0 + gr + (e < 2 ? 0 : 8);
                        const int col = (nb0 + n) * 8 + 2 * c + (e & 1);
                        if (t < T_) atomicAdd(dq_acc + ((long)b * T_ + t) * q_row + (long)h * D + col, scale * dqa[n][e]);
                    }
                }
            }
        }
    }

    // Epilogue: dK (times the softmax scale) and dV for the tile's keys.
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int col = c0 + n * 8 + 2 * c;
        const int s0 = k0 + key0, s1 = k0 + key1;
        if (s0 < S) {
            const long at = ((long)b * S + s0) * kv_row + (long)g * D + col;
            *(u32*)(dk + at) = pack2(T::from_f32(scale * dka[n][0]), T::from_f32(scale * dka[n][1]));
            *(u32*)(dv + at) = pack2(T::from_f32(dva[n][0]), T::from_f32(dva[n][1]));
        }
        if (s1 < S) {
            const long at = ((long)b * S + s1) * kv_row + (long)g * D + col;
            *(u32*)(dk + at) = pack2(T::from_f32(scale * dka[n][2]), T::from_f32(scale * dka[n][3]));
            *(u32*)(dv + at) = pack2(T::from_f32(dva[n][2]), T::from_f32(dva[n][3]));
        }
    }
}

template <typename T>
__device__ __forceinline__ void flash_attn_bwd_dq(const float* acc, unsigned short* dq, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) dq[i] = T::from_f32(acc[i]);
}

#define FA_BWD_INSTANCES(SUF, TY)                                                                                           \
    extern "C" __global__ void flash_attn_bwd_dot_##SUF(const unsigned short* o, const unsigned short* dout, float* dvec,    \
                                                        float* dq_acc, int rows, int t, int h, int d) {                      \
        flash_attn_bwd_dot<TY>(o, dout, dvec, dq_acc, rows, t, h, d);                                                       \
    }                                                                                                                        \
    extern "C" __global__ void flash_attn_bwd_dq_##SUF(const float* acc, unsigned short* dq, long n) { flash_attn_bwd_dq<TY>(acc, dq, n); } \
    FA_BWD_D(SUF, TY, 32)                                                                                                    \
    FA_BWD_D(SUF, TY, 64)                                                                                                    \
    FA_BWD_D(SUF, TY, 96)                                                                                                    \
    FA_BWD_D(SUF, TY, 128)                                                                                                   \
    extern "C" __global__ void FA_LB_256 flash_attn_bwd_##SUF##_d256(                                                        \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, const unsigned int* starts,               \
        const unsigned short* dout, const float* lse, const float* dvec, float* dq_acc, unsigned short* dk,                  \
        unsigned short* dv, FaParams p) {                                                                                    \
        flash_attn_bwd<TY, 256, 128>(q, k, v, starts, dout, lse, dvec, dq_acc, dk, dv, p);                                   \
    }

#define FA_BWD_D(SUF, TY, D)                                                                                                 \
    extern "C" __global__ void FA_LB_##D flash_attn_bwd_##SUF##_d##D(                                   \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, const unsigned int* starts,               \
        const unsigned short* dout, const float* lse, const float* dvec, float* dq_acc, unsigned short* dk,                  \
        unsigned short* dv, FaParams p) {                                                                                    \
        flash_attn_bwd<TY, D>(q, k, v, starts, dout, lse, dvec, dq_acc, dk, dv, p);                                          \
    }

FA_BWD_INSTANCES(bf16, Bf16)
FA_BWD_INSTANCES(f16, F16)
