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
