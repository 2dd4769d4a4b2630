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
// (18 KB at D = 64, 34 KB at D = 128). Instances: flash_attn_fwd_{bf16,f16}_d{64,128}.
#include "common.cuh"
#include "mma.cuh"

#define FA_BR 64
#define FA_BC 64
#define FA_THREADS 128
// -inf without math headers (NVRTC compiles this source without an include path).
#define FA_NEG_INF (__int_as_float(0xff800000))

struct FaParams {
    int batch, q_len, kv_len, heads, kv_heads;
    int causal, window;  // window 0: none
    float scale_log2;    // softmax scale * log2(e): scores live in the log2 domain
};

__device__ __forceinline__ u32 pack2(unsigned short lo, unsigned short hi) { return (u32)lo | ((u32)hi << 16); }

template <typename T, int D>
__device__ __forceinline__ void flash_attn_fwd(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                                               const unsigned short* __restrict__ v, const unsigned int* __restrict__ starts,
                                               unsigned short* __restrict__ o, float* __restrict__ lse, FaParams p) {
    constexpr int LD = D + 8;     // padded smem row (elements)
    constexpr int KS = D / 16;    // mma k-steps of Q.K^T
    constexpr int NT = D / 8;     // n8 tiles of O
    __shared__ __align__(16) unsigned short ks[FA_BC * LD];
    __shared__ __align__(16) unsigned short vs[FA_BC * LD];

    const int T_ = p.q_len, S = p.kv_len, H = p.heads, G = p.kv_heads;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * FA_BR;
    const int kvh = h / (H / G);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int off = S - T_;
    const long q_row = (long)H * D, kv_row = (long)G * D;
    const unsigned short* qb = q + ((long)b * T_) * q_row + (long)h * D;
    const unsigned short* kb = k + ((long)b * S) * kv_row + (long)kvh * D;
    const unsigned short* vb = v + ((long)b * S) * kv_row + (long)kvh * D;

    // Prologue: this warp's Q rows as A fragments (rows past T are zero).
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    u32 qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        const int col = kk * 16 + 2 * c;
        qa[kk][0] = r0 < T_ ? *(const u32*)(qb + r0 * q_row + col) : 0u;
        qa[kk][1] = r1 < T_ ? *(const u32*)(qb + r1 * q_row + col) : 0u;
        qa[kk][2] = r0 < T_ ? *(const u32*)(qb + r0 * q_row + col + 8) : 0u;
        qa[kk][3] = r1 < T_ ? *(const u32*)(qb + r1 * q_row + col + 8) : 0u;
    }
    const unsigned int st0 = (starts && r0 < T_) ? starts[(long)b * T_ + r0] : 0u;
    const unsigned int st1 = (starts && r1 < T_) ? starts[(long)b * T_ + r1] : 0u;

    float oacc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) oacc[n][0] = oacc[n][1] = oacc[n][2] = oacc[n][3] = 0.0f;
    float m0 = FA_NEG_INF, m1 = FA_NEG_INF, l0 = 0.0f, l1 = 0.0f;

    // Key tiles this block can see.
    int s_end = S;
    if (p.causal) s_end = min(S, min(q0 + FA_BR, T_) - 1 + off + 1);
    int s_begin = 0;
    if (p.window > 0) s_begin = max(0, q0 + off - p.window + 1);
    for (int kv0 = (s_begin / FA_BC) * FA_BC; kv0 < s_end; kv0 += FA_BC) {
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

        // Scores: S = Q.K^T for this warp's 16 rows and the tile's 64 keys.
        float sacc[FA_BC / 8][4];
#pragma unroll
        for (int j = 0; j < FA_BC / 8; ++j) {
            sacc[j][0] = sacc[j][1] = sacc[j][2] = sacc[j][3] = 0.0f;
            const unsigned short* krow = ks + (j * 8 + g) * LD + 2 * c;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                u32 bf[2] = {*(const u32*)(krow + kk * 16), *(const u32*)(krow + kk * 16 + 8)};
                T::mma(sacc[j], qa[kk], bf);
            }
        }

        // Mask and the online softmax (log2 domain).
        float tmax0 = FA_NEG_INF, tmax1 = FA_NEG_INF;
#pragma unroll
        for (int j = 0; j < FA_BC / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int t = e < 2 ? r0 : r1;
                const int s = kv0 + j * 8 + 2 * c + (e & 1);
                const unsigned int st = e < 2 ? st0 : st1;
                bool ok = s < S;
                if (p.causal) ok = ok && s <= t + off;
                if (p.window > 0) ok = ok && s > t + off - p.window;
                if (starts) ok = ok && (unsigned int)s >= st;
                const float x = ok ? sacc[j][e] * p.scale_log2 : FA_NEG_INF;
                sacc[j][e] = x;
                if (e < 2) tmax0 = fmaxf(tmax0, x); else tmax1 = fmaxf(tmax1, x);
            }
        }
#pragma unroll
        for (int sh = 1; sh < 4; sh <<= 1) {
            tmax0 = fmaxf(tmax0, __shfl_xor_sync(0xffffffffu, tmax0, sh));
            tmax1 = fmaxf(tmax1, __shfl_xor_sync(0xffffffffu, tmax1, sh));
        }
        const float mn0 = fmaxf(m0, tmax0), mn1 = fmaxf(m1, tmax1);
        // A row with nothing visible yet keeps m = -inf: its p are 0 and nothing rescales.
        const float a0 = mn0 == FA_NEG_INF ? 1.0f : exp2f(m0 - mn0);
        const float a1 = mn1 == FA_NEG_INF ? 1.0f : exp2f(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int j = 0; j < FA_BC / 8; ++j) {
            sacc[j][0] = mn0 == FA_NEG_INF ? 0.0f : exp2f(sacc[j][0] - mn0);
            sacc[j][1] = mn0 == FA_NEG_INF ? 0.0f : exp2f(sacc[j][1] - mn0);
            sacc[j][2] = mn1 == FA_NEG_INF ? 0.0f : exp2f(sacc[j][2] - mn1);
            sacc[j][3] = mn1 == FA_NEG_INF ? 0.0f : exp2f(sacc[j][3] - mn1);
            ps0 += sacc[j][0] + sacc[j][1];
            ps1 += sacc[j][2] + sacc[j][3];
        }
        l0 = l0 * a0 + ps0;  // this lane's columns only; summed across the quad at the end
        l1 = l1 * a1 + ps1;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            oacc[n][0] *= a0;
            oacc[n][1] *= a0;
            oacc[n][2] *= a1;
            oacc[n][3] *= a1;
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
            const unsigned short* v0 = vs + (kk * 16 + 2 * c) * LD + g;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const unsigned short* vp = v0 + n * 8;
                u32 bf[2] = {pack2(vp[0], vp[LD]), pack2(vp[8 * LD], vp[9 * LD])};
                T::mma(oacc[n], pa, bf);
            }
        }
    }

    // Epilogue: O / l and lse = (m + log2 l) * ln 2, rows past T skipped.
#pragma unroll
    for (int sh = 1; sh < 4; sh <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, sh);
        l1 += __shfl_xor_sync(0xffffffffu, l1, sh);
    }
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    unsigned short* ob = o + ((long)b * T_) * q_row + (long)h * D;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int col = n * 8 + 2 * c;
        if (r0 < T_) *(u32*)(ob + r0 * q_row + col) = pack2(T::from_f32(oacc[n][0] * inv0), T::from_f32(oacc[n][1] * inv0));
        if (r1 < T_) *(u32*)(ob + r1 * q_row + col) = pack2(T::from_f32(oacc[n][2] * inv1), T::from_f32(oacc[n][3] * inv1));
    }
    if (c == 0) {
        const float ln2 = 0.69314718055994531f;
        float* lb = lse + ((long)b * H + h) * T_;
        if (r0 < T_) lb[r0] = l0 > 0.0f ? (m0 + log2f(l0)) * ln2 : FA_NEG_INF;
        if (r1 < T_) lb[r1] = l1 > 0.0f ? (m1 + log2f(l1)) * ln2 : FA_NEG_INF;
    }
}

#define FA_INSTANCE(NAME, TY, D)                                                                                          \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) NAME(const unsigned short* q, const unsigned short* k,       \
                                                                  const unsigned short* v, const unsigned int* starts,     \
                                                                  unsigned short* o, float* lse, FaParams p) {             \
        flash_attn_fwd<TY, D>(q, k, v, starts, o, lse, p);                                                                \
    }

FA_INSTANCE(flash_attn_fwd_bf16_d64, Bf16, 64)
FA_INSTANCE(flash_attn_fwd_bf16_d128, Bf16, 128)
FA_INSTANCE(flash_attn_fwd_f16_d64, F16, 64)
FA_INSTANCE(flash_attn_fwd_f16_d128, F16, 128)
