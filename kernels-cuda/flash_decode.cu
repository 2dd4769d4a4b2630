// Attention for a few query rows over a long key/value cache (decoding), split along the keys
// ("flash decoding"): the mma.sync forward gives one block to each (64 queries, head), so at
// one query row it runs B x H blocks, each streaming the whole cache of its key/value head,
// and each key/value head is read once per query head of its group. Here a block takes a
// chunk of FD_CHUNK keys of one key/value head and every query row of that head's group
// (the H / G heads times T rows: at most FD_MAX_ROWS), so K and V are read once, by
// B x G x ceil(S / FD_CHUNK) blocks. A second kernel merges the chunks.
//
// Layouts and mask as flash_attention.cu: q [B, T, H, D], k and v [B, S, G, D], o [B, T, H, D],
// lse [B, H, T]; query t sees key s when s < S, s <= t + (S - T) if causal, and
// s > t + (S - T) - window with a window. No packed rows (the launcher sends those to the
// tiled kernels). Row i of a block is query row t = i / (H / G) of head g * (H / G) + i % (H / G).
//
// flash_decode_part, per block (4 warps), in three passes over the chunk:
//   scores   a key per group of LPK lanes, 8 of its D elements per lane (one 16-byte load),
//            the dot with each row's q (f32 in shared memory, pre-scaled into the log2
//            domain) summed across the group by shuffles; masked scores to shared memory;
//   softmax  a warp per row: the chunk's max m, p = exp2(s - m) in place, l = sum p;
//   P.V      a thread per (dimension, key subset), every row's sum in registers, the subsets
//            added through shared memory.
// It writes the chunk's unnormalized O, m and l (f32). flash_decode_merge rescales the chunks
// to their common max: O = sum_c exp2(m_c - M) O_c / L, L = sum_c exp2(m_c - M) l_c, and
// lse = (M + log2 L) ln 2 (a row that sees no key gets O = 0, lse = -inf, as the tiled kernels).
#include "common.cuh"
#include "mma.cuh"
#include "attention.cuh"

#define FD_THREADS 128
#define FD_CHUNK 256
#define FD_MAX_ROWS 16

// acc[r] = sum over keys i = i0, i0 + step, ... < n of p[r][i] v_i, for each row r < rows, v_i
// the element d of the chunk's key i (row0 + i of v, its head at head_off).
template <typename T>
__device__ __forceinline__ void fd_pv(float* acc, const unsigned short* v, long row0, long kv_row, long head_off, int d, const float (*p)[FD_CHUNK], int rows, int i0, int step, int n) {
#pragma unroll
    for (int r = 0; r < FD_MAX_ROWS; ++r) acc[r] = 0.0f;
    for (int i = i0; i < n; i += step) {
        const float x = T::to_f32(v[(row0 + i) * kv_row + head_off + d]);
#pragma unroll
        for (int r = 0; r < FD_MAX_ROWS; ++r)
            if (r < rows) acc[r] += p[r][i] * x;
    }
}

template <typename T, int D>
__device__ __forceinline__ void flash_decode_part(const unsigned short* q, const unsigned short* k, const unsigned short* v, float* part_o, float* part_ml, FaParams p) {
    constexpr int LPK = D <= 32 ? 4 : D <= 64 ? 8 : D <= 128 ? 16 : 32;  // lanes per key, 8 elements each
    constexpr int KPW = 32 / LPK;                        // keys per warp per step
    constexpr int SUBS = D <= 32 ? 4 : D <= 64 ? 2 : 1;  // key subsets of the P.V pass
    constexpr int DPT = D > FD_THREADS ? D / FD_THREADS : 1;  // dimensions per thread of the P.V pass
    __shared__ float qs[FD_MAX_ROWS][D];
    __shared__ float ss[FD_MAX_ROWS][FD_CHUNK];
    __shared__ float red[FD_MAX_ROWS * 128];  // the P.V subsets' sums ([SUBS][rows][D])

    const int chunk = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    const int T_ = p.q_len, S = p.kv_len, H = p.heads, G = p.kv_heads;
    const int hpg = H / G, rows = hpg * T_, off = S - T_;
    const int kv0 = chunk * FD_CHUNK, kv1 = min(S, kv0 + FD_CHUNK);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long kv_row = (long)G * D;

    for (int i = tid; i < rows * D; i += FD_THREADS) {
        const int r = i / D, d = i % D, t = r / hpg, h = g * hpg + r % hpg;
        qs[r][d] = T::to_f32(q[(((long)b * T_ + t) * H + h) * D + d]) * p.scale_log2;
    }
    __syncthreads();

    // Scores. The loop bound is the same for every lane of a warp (the shuffles need all 32).
    const int j = lane % LPK, e0 = 8 * j;
    for (int base = kv0 + warp * KPW; base < kv1; base += 4 * KPW) {
        const int key = base + lane / LPK;
        float kf[8];
        if (key < kv1 && e0 < D) {
            const uint4 w = *(const uint4*)(k + ((long)b * S + key) * kv_row + (long)g * D + e0);
            const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                kf[2 * e] = T::to_f32((unsigned short)(words[e] & 0xffffu));
                kf[2 * e + 1] = T::to_f32((unsigned short)(words[e] >> 16));
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) kf[e] = 0.0f;
        }
#pragma unroll 1
        for (int r = 0; r < rows; ++r) {
            float dot = 0.0f;
            if (e0 < D) {
#pragma unroll
                for (int e = 0; e < 8; ++e) dot += kf[e] * qs[r][e0 + e];
            }
#pragma unroll
            for (int sh = LPK / 2; sh > 0; sh >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, sh);
            if (j == 0 && key < kv1) {
                const int t = r / hpg;
                bool ok = true;
                if (p.causal) ok = key <= t + off;
                if (p.window > 0) ok = ok && key > t + off - p.window;
                ss[r][key - kv0] = ok ? dot : FA_NEG_INF;
            }
        }
    }
    __syncthreads();

    // Softmax over the chunk, a warp per row.
    const int n = kv1 - kv0;
    float* ml = part_ml + (((long)b * G + g) * gridDim.x + chunk) * FD_MAX_ROWS * 2;
    for (int r = warp; r < rows; r += 4) {
        float m = FA_NEG_INF;
        for (int i = lane; i < n; i += 32) m = fmaxf(m, ss[r][i]);
        m = warp_max(m);
        float l = 0.0f;
        for (int i = lane; i < n; i += 32) {
            const float pr = m == FA_NEG_INF ? 0.0f : exp2f(ss[r][i] - m);
            ss[r][i] = pr;
            l += pr;
        }
        l = warp_sum(l);
        if (lane == 0) {
            ml[2 * r] = m;
            ml[2 * r + 1] = l;
        }
    }
    __syncthreads();

    // P.V: thread (sub, d) sums keys kv0 + sub, + 2 sub, ... of dimension d for every row.
    // Past 128 dimensions (one subset), thread d takes d, d + 128, ... and writes the chunk's
    // O itself.
    if constexpr (DPT > 1) {
        float* po = part_o + (((long)b * G + g) * gridDim.x + chunk) * FD_MAX_ROWS * D;
        for (int d = tid; d < D; d += FD_THREADS) {
            float acc[FD_MAX_ROWS];
            fd_pv<T>(acc, v, (long)b * S + kv0, kv_row, (long)g * D, d, ss, rows, 0, 1, n);
#pragma unroll
            for (int r = 0; r < FD_MAX_ROWS; ++r)
                if (r < rows) po[r * D + d] = acc[r];
        }
        return;
    }
    const int d = tid % D, sub = tid / D;
    float acc[FD_MAX_ROWS];
    if (sub < SUBS) {
        fd_pv<T>(acc, v, (long)b * S + kv0, kv_row, (long)g * D, d, ss, rows, sub, SUBS, n);
#pragma unroll
        for (int r = 0; r < FD_MAX_ROWS; ++r)
            if (r < rows) red[(sub * FD_MAX_ROWS + r) * D + d] = acc[r];
    }
    __syncthreads();
    float* po = part_o + (((long)b * G + g) * gridDim.x + chunk) * FD_MAX_ROWS * D;
    for (int i = tid; i < rows * D; i += FD_THREADS) {
        const int r = i / D, dd = i % D;
        float sum = 0.0f;
#pragma unroll
        for (int s2 = 0; s2 < SUBS; ++s2) sum += red[(s2 * FD_MAX_ROWS + r) * D + dd];
        po[r * D + dd] = sum;
    }
}

// One block per (row of the group, key/value head, batch row), a thread per dimension (past
// 128 dimensions, a thread per 128th).
template <typename T, int D>
__device__ __forceinline__ void flash_decode_merge(const float* part_o, const float* part_ml, unsigned short* o, float* lse, int chunks, FaParams p) {
    const int r = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    const int T_ = p.q_len, H = p.heads, G = p.kv_heads, hpg = H / G;
    const int t = r / hpg, h = g * hpg + r % hpg;
    const long base = ((long)b * G + g) * chunks;
    float m = FA_NEG_INF;
    for (int c = 0; c < chunks; ++c) m = fmaxf(m, part_ml[((base + c) * FD_MAX_ROWS + r) * 2]);
    float l = 0.0f, acc = 0.0f;
    const int d = threadIdx.x;
    if (m != FA_NEG_INF) {
        for (int c = 0; c < chunks; ++c) {
            const float* ml = part_ml + ((base + c) * FD_MAX_ROWS + r) * 2;
            const float w = exp2f(ml[0] - m);  // 0 for a chunk that saw nothing (m_c = -inf)
            l += w * ml[1];
            if (d < D) acc += w * part_o[((base + c) * FD_MAX_ROWS + r) * D + d];
        }
    }
    if (d < D) o[(((long)b * T_ + t) * H + h) * D + d] = T::from_f32(l > 0.0f ? acc / l : 0.0f);
    if constexpr (D > FD_THREADS) {
        // Dimensions past the block's threads, a further pass each.
        for (int d2 = d + FD_THREADS; d2 < D; d2 += FD_THREADS) {
            float acc2 = 0.0f;
            if (m != FA_NEG_INF) {
                for (int c = 0; c < chunks; ++c) {
                    const float* ml = part_ml + ((base + c) * FD_MAX_ROWS + r) * 2;
                    acc2 += exp2f(ml[0] - m) * part_o[((base + c) * FD_MAX_ROWS + r) * D + d2];
                }
            }
            o[(((long)b * T_ + t) * H + h) * D + d2] = T::from_f32(l > 0.0f ? acc2 / l : 0.0f);
        }
    }
    if (d == 0) lse[((long)b * H + h) * T_ + t] = l > 0.0f ? (m + log2f(l)) * 0.69314718055994531f : FA_NEG_INF;
}

#define FD_INSTANCES(SUF, TY, D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(FD_THREADS) flash_decode_part_##SUF##_d##D(                             \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, float* part_o, float* part_ml, FaParams p) { \
        flash_decode_part<TY, D>(q, k, v, part_o, part_ml, p);                                                           \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FD_THREADS) flash_decode_merge_##SUF##_d##D(                            \
        const float* part_o, const float* part_ml, unsigned short* o, float* lse, int chunks, FaParams p) {              \
        flash_decode_merge<TY, D>(part_o, part_ml, o, lse, chunks, p);                                                   \
    }

#define FD_ALL_D(SUF, TY) FD_INSTANCES(SUF, TY, 32) FD_INSTANCES(SUF, TY, 64) FD_INSTANCES(SUF, TY, 96) FD_INSTANCES(SUF, TY, 128) FD_INSTANCES(SUF, TY, 256)

FD_ALL_D(bf16, Bf16)
FD_ALL_D(f16, F16)
