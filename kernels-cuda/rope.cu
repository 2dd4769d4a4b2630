// Rotary position embedding (Hugging Face rotate_half: element i of a head pairs with i + D/2),
// forward and backward in one kernel.
//
//   f_i = p_t * inv_freq[i]  (an f32 product, as the CPU path and transformers compute it)
//   s   = +1 forward, -1 backward (the backward is the transposed rotation)
//   y[i]       = x[i] * cos f_i - x[i + D/2] * s * sin f_i
//   y[i + D/2] = x[i + D/2] * cos f_i + x[i] * s * sin f_i
//
// Shapes: x, y [T, H, D] row-major (T tokens, H heads, D head dim, even); positions [T] i32
// (packed sequences restart their positions); inv_freq [D/2] f32. Storage f32 or bf16, math f32.
//
// Launch: one block per token (grid.x = T), threads stride over the token's H * D/2 pairs.
// Each thread computes its own cos/sin with `rope_sincos` below (the same code as rope.wgsl),
// so the result does not depend on a vendor's sin/cos and matches across CUDA and WGSL.
#include "common.cuh"

// sin and cos of an f32 angle, within 1.3e-7 absolute for |a| <= 2^20 (checked against f64
// on a sweep; beyond that the quadrant estimate a * 2/pi may be off by one and accuracy fades).
// Method: k = rint(a * 2/pi); r = a - k * pi/2 with pi/2 split in three 8-bit pieces and an f32
// remainder (Cody-Waite), and k split into kh (k truncated to a multiple of 256) and kl = k - kh,
// so every product k_part * P_j is exact and every subtraction cancels exactly (Sterbenz) up to
// |k| < 2^24; then the cephes minimax polynomials for sin and cos on |r| <= pi/4, and the
// quadrant k mod 4 picks and signs them.
__device__ __forceinline__ void rope_sincos(float a, float* s_out, float* c_out) {
    const float P1 = 1.5703125f, P2 = 4.825592041015625e-4f, P3 = 1.2665987014770508e-6f,
                P4 = 9.920935184482005e-10f;
    const float k = rintf(a * 0.636619772367581343f);
    const float kh = truncf(k * (1.0f / 256.0f)) * 256.0f, kl = k - kh;
    float r = a;
    r = r - kh * P1; r = r - kl * P1;
    r = r - kh * P2; r = r - kl * P2;
    r = r - kh * P3; r = r - kl * P3;
    r = r - k * P4;
    const float z = r * r;
    const float s = r + r * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
    const float c = 1.0f - 0.5f * z + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
    const int q = ((int)k) & 3;
    *s_out = q == 0 ? s : q == 1 ? c : q == 2 ? -s : -c;
    *c_out = q == 0 ? c : q == 1 ? -s : q == 2 ? -c : s;
}

template <typename T>
__device__ void rope(const T* __restrict__ x, const int* __restrict__ positions, const float* __restrict__ inv_freq,
                     T* __restrict__ y, int tokens, int heads, int half, float sign) {
    const long t = blockIdx.x;
    if (t >= tokens) return;
    const float p = (float)positions[t];
    const long base = t * heads * 2L * half;
    for (int j = threadIdx.x; j < heads * half; j += blockDim.x) {
        const int h = j / half, i = j - h * half;
        float s, c;
        rope_sincos(p * inv_freq[i], &s, &c);
        s *= sign;
        const long o = base + (long)h * 2 * half + i;
        const float a = Elem<T>::load(x, o), b = Elem<T>::load(x, o + half);
        Elem<T>::store(y, o, a * c - b * s);
        Elem<T>::store(y, o + half, b * c + a * s);
    }
}

// ---- per-head RMSNorm then RoPE, fused (Qwen3's q/k norms) ---------------------------------
//
//   forward:  r = 1 / sqrt(mean_i(x_i^2) + eps) over the head's D elements,
//             n_i = round(w_i * x_i * r) (stored in the element type, as RMSNorm's output is),
//             y = rope(n); rstd[row] = r
//   backward: g = round(rope^T(dy)) (as RoPE's backward stores it), then RMSNorm's backward of
//             g: dx_i = r * (g_i * w_i - x_i * r^2 * c), c = (1/D) sum_i g_i * w_i * x_i;
//             dw_i = sum over rows of g_i * x_i * r
//
// in one pass over [T, H, D] each way where the two ops take two launches and a stored n (or g)
// between them. A row is one head of one token; one warp per row, so a row's sums are warp
// shuffles and no block barrier. Lane l holds elements l + 32j of the first half and their RoPE
// partners l + 32j + D/2 (j < D/64), so each pair is rotated in registers: D a multiple of 64,
// at most 256 (D/64 <= NR_MAX). The products are those of the two kernels in the same order, so
// the results differ from rmsnorm then rope only by the order of the row sums.
//
// Launch: forward grid.x = ceil(rows / warps per block); backward grid.x = ceil(rows / chunk),
// each block taking `chunk` consecutive rows (warp w: rows w, w + warps, ...). With `part`
// non-null the backward also writes each block's dw sums, part[blockIdx.x * D + i], which
// rmsnorm_bwd_dw_sum adds in order (deterministic). Blocks of up to 8 warps.
#define NR_MAX 4
#define NR_WARPS 8

template <typename T>
__device__ void norm_rope_fwd(const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ positions,
                              const float* __restrict__ inv_freq, T* __restrict__ y, float* __restrict__ rstd,
                              int tokens, int heads, int half, float eps) {
    const int lane = threadIdx.x & 31, per = half >> 5;
    const long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (long)tokens * heads) return;  // whole warps: a row is never split
    const long base = row * 2 * half;
    float a[NR_MAX], b[NR_MAX];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < NR_MAX; ++j) {
        if (j < per) {
            a[j] = Elem<T>::load(x, base + lane + 32 * j);
            b[j] = Elem<T>::load(x, base + half + lane + 32 * j);
            ss += a[j] * a[j] + b[j] * b[j];
        }
    }
    const float r = rsqrtf(warp_sum(ss) / (float)(2 * half) + eps);
    if (lane == 0) rstd[row] = r;
    const float p = (float)positions[row / heads];
#pragma unroll
    for (int j = 0; j < NR_MAX; ++j) {
        if (j < per) {
            const int i = lane + 32 * j;
            const float na = Elem<T>::round(Elem<T>::load(w, i) * a[j] * r);
            const float nb = Elem<T>::round(Elem<T>::load(w, i + half) * b[j] * r);
            float s, c;
            rope_sincos(p * inv_freq[i], &s, &c);
            Elem<T>::store(y, base + i, na * c - nb * s);
            Elem<T>::store(y, base + half + i, nb * c + na * s);
        }
    }
}

template <typename T>
__device__ void norm_rope_bwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy,
                              const int* __restrict__ positions, const float* __restrict__ inv_freq,
                              const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ part,
                              int tokens, int heads, int half, int chunk) {
    __shared__ float sums[NR_WARPS][2 * 32 * NR_MAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5, per = half >> 5;
    const long rows = (long)tokens * heads, r0 = (long)blockIdx.x * chunk, r1 = min(rows, r0 + chunk);
    float dwa[NR_MAX], dwb[NR_MAX];
#pragma unroll
    for (int j = 0; j < NR_MAX; ++j) dwa[j] = dwb[j] = 0.0f;
    for (long row = r0 + warp; row < r1; row += warps) {
        const long base = row * 2 * half;
        const float p = (float)positions[row / heads], r = rstd[row];
        float ga[NR_MAX], gb[NR_MAX], xa[NR_MAX], xb[NR_MAX];
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < NR_MAX; ++j) {
            if (j < per) {
                const int i = lane + 32 * j;
                float s, c;
                rope_sincos(p * inv_freq[i], &s, &c);
                s = -s;  // the transposed rotation, as rope's backward
                const float da = Elem<T>::load(dy, base + i), db = Elem<T>::load(dy, base + half + i);
                ga[j] = Elem<T>::round(da * c - db * s);
                gb[j] = Elem<T>::round(db * c + da * s);
                xa[j] = Elem<T>::load(x, base + i);
                xb[j] = Elem<T>::load(x, base + half + i);
                dot += ga[j] * Elem<T>::load(w, i) * xa[j] + gb[j] * Elem<T>::load(w, i + half) * xb[j];
            }
        }
        const float cm = warp_sum(dot) / (float)(2 * half);
#pragma unroll
        for (int j = 0; j < NR_MAX; ++j) {
            if (j < per) {
                const int i = lane + 32 * j;
                Elem<T>::store(dx, base + i, r * (ga[j] * Elem<T>::load(w, i) - xa[j] * r * r * cm));
                Elem<T>::store(dx, base + half + i, r * (gb[j] * Elem<T>::load(w, i + half) - xb[j] * r * r * cm));
                dwa[j] += ga[j] * xa[j] * r;
                dwb[j] += gb[j] * xb[j] * r;
            }
        }
    }
    if (part == nullptr) return;  // uniform over the block
#pragma unroll
    for (int j = 0; j < NR_MAX; ++j) {
        if (j < per) {
            sums[warp][lane + 32 * j] = dwa[j];
            sums[warp][half + lane + 32 * j] = dwb[j];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * half; i += blockDim.x) {
        float acc = 0.0f;
        for (int v = 0; v < warps; ++v) acc += sums[v][i];
        part[(long)blockIdx.x * 2 * half + i] = acc;
    }
}

// ---- entry points -------------------------------------------------------------------------
// sign: +1 forward, -1 backward (x is then dy and y is dx).
extern "C" __global__ void rope_f32(const float* x, const int* positions, const float* inv_freq, float* y,
                                    int tokens, int heads, int half, float sign) {
    rope<float>(x, positions, inv_freq, y, tokens, heads, half, sign);
}
extern "C" __global__ void rope_bf16(const bf16_bits* x, const int* positions, const float* inv_freq, bf16_bits* y,
                                     int tokens, int heads, int half, float sign) {
    rope<bf16_bits>(x, positions, inv_freq, y, tokens, heads, half, sign);
}
extern "C" __global__ void norm_rope_fwd_f32(const float* x, const float* w, const int* positions, const float* inv_freq,
                                             float* y, float* rstd, int tokens, int heads, int half, float eps) {
    norm_rope_fwd<float>(x, w, positions, inv_freq, y, rstd, tokens, heads, half, eps);
}
extern "C" __global__ void norm_rope_fwd_bf16(const bf16_bits* x, const bf16_bits* w, const int* positions, const float* inv_freq,
                                              bf16_bits* y, float* rstd, int tokens, int heads, int half, float eps) {
    norm_rope_fwd<bf16_bits>(x, w, positions, inv_freq, y, rstd, tokens, heads, half, eps);
}
// part null: no dw.
extern "C" __global__ void norm_rope_bwd_f32(const float* x, const float* w, const float* dy, const int* positions,
                                             const float* inv_freq, const float* rstd, float* dx, float* part,
                                             int tokens, int heads, int half, int chunk) {
    norm_rope_bwd<float>(x, w, dy, positions, inv_freq, rstd, dx, part, tokens, heads, half, chunk);
}
extern "C" __global__ void norm_rope_bwd_bf16(const bf16_bits* x, const bf16_bits* w, const bf16_bits* dy, const int* positions,
                                              const float* inv_freq, const float* rstd, bf16_bits* dx, float* part,
                                              int tokens, int heads, int half, int chunk) {
    norm_rope_bwd<bf16_bits>(x, w, dy, positions, inv_freq, rstd, dx, part, tokens, heads, half, chunk);
}
