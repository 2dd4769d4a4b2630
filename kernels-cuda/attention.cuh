// Flash attention forward pieces shared by the mma.sync kernels (flash_attention.cu) and the
// Hopper one (flash_attention_sm90.cu): the parameters, the mask with one step of the online
// softmax, and the epilogue. Both kernels hold a warp's 16 query rows x 64 keys of scores, and
// its 16 rows x D of O, in the m16n8 accumulator layout: lane 4g + c has rows g and g + 8 of
// the warp's 16 (r0, r1 in the sequence) and, of each 8-column tile j, columns 2c and 2c + 1
// (x[4j + 0, 1] on row g, x[4j + 2, 3] on row g + 8).
#pragma once
#include "common.cuh"

// -inf without math headers (NVRTC compiles this source without an include path).
#define FA_NEG_INF (__int_as_float(0xff800000))

struct FaParams {
    int batch, q_len, kv_len, heads, kv_heads;
    int causal, window;  // window 0: none
    float scale_log2;    // softmax scale * log2(e): scores live in the log2 domain
};

// One forward block's share, for both forward kernels: 64 queries q0.. of (b, h) in a block of
// 4 warps, warp w owning rows 16w..16w+15 (this lane's r0 = q0 + 16w + g and r1 = r0 + 8, with
// their packed-segment starts), the base pointers of its q rows and k, v (key/value head h /
// (H / G)), and the key tiles (of 64) it can see: [kv_first, s_end). `split` blocks of one
// query block sit side by side in grid.y (each takes part of O's columns): h = blockIdx.y / split.
template <int D>
struct FaBlock {
    const unsigned short *qb, *kb, *vb;
    long q_row, kv_row;
    int b, h, q0, r0, r1, c, off, kv_first, s_end;
    unsigned int st0, st1;
    __device__ __forceinline__ FaBlock(const unsigned short* q, const unsigned short* k, const unsigned short* v, const unsigned int* starts, const FaParams& p, int split = 1) {
        const int T_ = p.q_len, S = p.kv_len;
        b = blockIdx.z;
        h = blockIdx.y / split;
        q0 = blockIdx.x * 64;
        const int kvh = h / (p.heads / p.kv_heads);
        const int lane = threadIdx.x & 31;
        c = lane & 3;
        off = S - T_;
        q_row = (long)p.heads * D;
        kv_row = (long)p.kv_heads * D;
        qb = q + ((long)b * T_) * q_row + (long)h * D;
        kb = k + ((long)b * S) * kv_row + (long)kvh * D;
        vb = v + ((long)b * S) * kv_row + (long)kvh * D;
        r0 = q0 + (threadIdx.x >> 5) * 16 + (lane >> 2);
        r1 = r0 + 8;
        st0 = (starts && r0 < T_) ? starts[(long)b * T_ + r0] : 0u;
        st1 = (starts && r1 < T_) ? starts[(long)b * T_ + r1] : 0u;
        s_end = S;
        if (p.causal) s_end = min(S, min(q0 + 64, T_) - 1 + off + 1);
        const int s_begin = p.window > 0 ? max(0, q0 + off - p.window + 1) : 0;
        kv_first = (s_begin / 64) * 64;
    }
};

// Masks the scores s[32] of keys kv0..kv0+63 (query t sees key s when s < S, s <= t + off if
// causal, s > t + off - window with a window, s >= its segment start when packed), scales them
// into the log2 domain, updates the running max m and sum l (this lane's columns; summed across
// the quad at the end), turns s into P = exp2(s - m) and rescales O's NT 8-column tiles o[4 NT].
template <int NT>
__device__ __forceinline__ void fa_softmax_step(float* s, float* o, int kv0, int r0, int r1, int c, int off, unsigned int st0, unsigned int st1, bool packed, const FaParams& p, float& m0, float& m1, float& l0, float& l1) {
    float tmax0 = FA_NEG_INF, tmax1 = FA_NEG_INF;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int t = e < 2 ? r0 : r1;
            const int key = kv0 + j * 8 + 2 * c + (e & 1);
            const unsigned int st = e < 2 ? st0 : st1;
            bool ok = key < p.kv_len;
            if (p.causal) ok = ok && key <= t + off;
            if (p.window > 0) ok = ok && key > t + off - p.window;
            if (packed) ok = ok && (unsigned int)key >= st;
            const float x = ok ? s[4 * j + e] * p.scale_log2 : FA_NEG_INF;
            s[4 * j + e] = x;
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
    for (int j = 0; j < 8; ++j) {
        s[4 * j + 0] = mn0 == FA_NEG_INF ? 0.0f : exp2f(s[4 * j + 0] - mn0);
        s[4 * j + 1] = mn0 == FA_NEG_INF ? 0.0f : exp2f(s[4 * j + 1] - mn0);
        s[4 * j + 2] = mn1 == FA_NEG_INF ? 0.0f : exp2f(s[4 * j + 2] - mn1);
        s[4 * j + 3] = mn1 == FA_NEG_INF ? 0.0f : exp2f(s[4 * j + 3] - mn1);
        ps0 += s[4 * j + 0] + s[4 * j + 1];
        ps1 += s[4 * j + 2] + s[4 * j + 3];
    }
    l0 = l0 * a0 + ps0;
    l1 = l1 * a1 + ps1;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        o[4 * n + 0] *= a0;
        o[4 * n + 1] *= a0;
        o[4 * n + 2] *= a1;
        o[4 * n + 3] *= a1;
    }
}

// Epilogue: O / l (l summed across the quad) written to o [B, T, H, D] and lse = (m + log2 l)
// * ln 2 to lse [B, H, T], rows past T skipped. `acc` holds DO of O's columns from `col0` (all D
// from 0 but where the head dim is split between blocks; the block with column 0 writes lse).
template <typename T, int D, int DO = D>
__device__ __forceinline__ void fa_store_out(unsigned short* o, float* lse, const float* acc, const FaParams& p, int b, int h, int r0, int r1, int c, float m0, float m1, float l0, float l1, int col0 = 0) {
#pragma unroll
    for (int sh = 1; sh < 4; sh <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, sh);
        l1 += __shfl_xor_sync(0xffffffffu, l1, sh);
    }
    const int T_ = p.q_len;
    const long q_row = (long)p.heads * D;
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    unsigned short* ob = o + ((long)b * T_) * q_row + (long)h * D + col0;
#pragma unroll
    for (int n = 0; n < DO / 8; ++n) {
        const int col = n * 8 + 2 * c;
        if (r0 < T_) *(u32*)(ob + r0 * q_row + col) = (u32)T::from_f32(acc[4 * n + 0] * inv0) | ((u32)T::from_f32(acc[4 * n + 1] * inv0) << 16);
        if (r1 < T_) *(u32*)(ob + r1 * q_row + col) = (u32)T::from_f32(acc[4 * n + 2] * inv1) | ((u32)T::from_f32(acc[4 * n + 3] * inv1) << 16);
    }
    if (c == 0 && col0 == 0) {
        const float ln2 = 0.69314718055994531f;
        float* lb = lse + ((long)b * p.heads + h) * T_;
        if (r0 < T_) lb[r0] = l0 > 0.0f ? (m0 + log2f(l0)) * ln2 : FA_NEG_INF;
        if (r1 < T_) lb[r1] = l1 > 0.0f ? (m1 + log2f(l1)) * ln2 : FA_NEG_INF;
    }
}
