// Gated linear units (the MLP of Llama and Gemma), fused, forward and backward (one kernel each):
//
//   y = act(g) * u, with act(g) = g * σ(a(g)) and
//     act 0, SiLU (SwiGLU):               a(g) = g
//     act 1, GELU, tanh form (GeGLU):     a(g) = 2 k (g + 0.044715 g^3), k = sqrt(2 / pi)
//   (0.5 (1 + tanh z) = σ(2z), so the tanh GELU x/2 (1 + tanh(k (x + 0.044715 x^3))) is x σ(2z).)
//   backward: dg = dy * u * σ(a) * (1 + g * (1 - σ(a)) * a'(g))
//             du = dy * act(g)
//
// Shapes: y, dy [M, F] dense. g and u address row m, column f as g[m * ld + f] and
// u[u_off + m * ld + f]: separate [M, F] buffers (u_off = 0, ld = F), or the two halves of
// each row of one [M, 2F] buffer (g = u = gu, u_off = F, ld = 2F). dg and du are written in
// the layouts of g and u; the packed backward writes both halves of one dgu [M, 2F].
// Storage f32 or bf16, math f32. σ(a) = 1/(1+e) or e/(1+e) with e = exp(-|a|): no overflow.
//
// Launch: grid (ceil(F / blockDim.x), min(M, 65535)), one thread per column, blocks stride
// over rows by gridDim.y.
#include "common.cuh"

__device__ __forceinline__ float sigmoid_f32(float g) {
    const float e = expf(-fabsf(g));
    const float r = 1.0f / (1.0f + e);
    return g >= 0.0f ? r : e * r;
}

// The gate's sigmoid argument a(g) and its derivative a'(g) (see the top of the file).
__device__ __forceinline__ float glu_arg(float g, int act, float* darg) {
    if (act == 1) {
        const float k2 = 1.5957691216057308f;  // 2 sqrt(2 / pi)
        *darg = k2 * (1.0f + 3.0f * 0.044715f * g * g);
        return k2 * (g + 0.044715f * g * g * g);
    }
    *darg = 1.0f;
    return g;
}

template <typename T>
__device__ void glu_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, int M, int F,
                        int u_off, int ld, int act) {
    const int f = blockIdx.x * blockDim.x + threadIdx.x;
    if (f >= F) return;
    for (long m = blockIdx.y; m < M; m += gridDim.y) {
        const float gv = Elem<T>::load(g, m * ld + f), uv = Elem<T>::load(u, u_off + m * ld + f);
        float darg;
        Elem<T>::store(y, m * F + f, gv * sigmoid_f32(glu_arg(gv, act, &darg)) * uv);
    }
}

// dg and du may be one buffer (the packed layout, disjoint halves), so they carry no __restrict__.
template <typename T>
__device__ void glu_bwd(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ dy, T* dg, T* du,
                        int M, int F, int u_off, int ld, int act) {
    const int f = blockIdx.x * blockDim.x + threadIdx.x;
    if (f >= F) return;
    for (long m = blockIdx.y; m < M; m += gridDim.y) {
        const long gi = m * ld + f, ui = u_off + m * ld + f;
        const float gv = Elem<T>::load(g, gi), uv = Elem<T>::load(u, ui), d = Elem<T>::load(dy, m * F + f);
        float darg;
        const float s = sigmoid_f32(glu_arg(gv, act, &darg));
        Elem<T>::store(dg, gi, d * uv * s * (1.0f + gv * (1.0f - s) * darg));
        Elem<T>::store(du, ui, d * gv * s);
    }
}

// ---- entry points -------------------------------------------------------------------------
extern "C" __global__ void glu_fwd_f32(const float* g, const float* u, float* y, int M, int F, int u_off, int ld, int act) {
    glu_fwd<float>(g, u, y, M, F, u_off, ld, act);
}
extern "C" __global__ void glu_fwd_bf16(const bf16_bits* g, const bf16_bits* u, bf16_bits* y, int M, int F, int u_off, int ld, int act) {
    glu_fwd<bf16_bits>(g, u, y, M, F, u_off, ld, act);
}
extern "C" __global__ void glu_bwd_f32(const float* g, const float* u, const float* dy, float* dg, float* du, int M, int F, int act) {
    glu_bwd<float>(g, u, dy, dg, du, M, F, 0, F, act);
}
extern "C" __global__ void glu_bwd_bf16(const bf16_bits* g, const bf16_bits* u, const bf16_bits* dy, bf16_bits* dg, bf16_bits* du, int M, int F, int act) {
    glu_bwd<bf16_bits>(g, u, dy, dg, du, M, F, 0, F, act);
}
extern "C" __global__ void glu_bwd_packed_f32(const float* gu, const float* dy, float* dgu, int M, int F, int act) {
    glu_bwd<float>(gu, gu, dy, dgu, dgu, M, F, F, 2 * F, act);
}
extern "C" __global__ void glu_bwd_packed_bf16(const bf16_bits* gu, const bf16_bits* dy, bf16_bits* dgu, int M, int F, int act) {
    glu_bwd<bf16_bits>(gu, gu, dy, dgu, dgu, M, F, F, 2 * F, act);
}

// ---- add, scale ---------------------------------------------------------------------------
// add:      y[i] = a[i] + b[i % nb]   (b broadcast over a's leading dims; nb divides n)
// scale:    y[i] = s * a[i]
// scale_by: y[i] = s[0] * a[i]        (s a device scalar in f32: the loss gradient)
// Storage f32 or bf16, math f32. Launch: a grid-stride loop over n elements, any grid.
template <typename T>
__device__ void add_body(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, long n, long nb) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        Elem<T>::store(y, i, Elem<T>::load(a, i) + Elem<T>::load(b, nb == n ? i : i % nb));
}

template <typename T>
__device__ void scale_body(const T* __restrict__ a, T* __restrict__ y, long n, float s) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        Elem<T>::store(y, i, s * Elem<T>::load(a, i));
}

extern "C" __global__ void add_f32(const float* a, const float* b, float* y, long n, long nb) { add_body<float>(a, b, y, n, nb); }
extern "C" __global__ void add_bf16(const bf16_bits* a, const bf16_bits* b, bf16_bits* y, long n, long nb) {
    add_body<bf16_bits>(a, b, y, n, nb);
}
extern "C" __global__ void scale_f32(const float* a, float* y, long n, float s) { scale_body<float>(a, y, n, s); }
extern "C" __global__ void scale_bf16(const bf16_bits* a, bf16_bits* y, long n, float s) { scale_body<bf16_bits>(a, y, n, s); }
extern "C" __global__ void scale_by_f32(const float* a, const float* s, float* y, long n) { scale_body<float>(a, y, n, s[0]); }
extern "C" __global__ void scale_by_bf16(const bf16_bits* a, const float* s, bf16_bits* y, long n) {
    scale_body<bf16_bits>(a, y, n, s[0]);
}

// ---- transpose ----------------------------------------------------------------------------
// y[c * rows + r] = x[r * cols + c]: a row-major [rows, cols] x into [cols, rows] y, moving
// bits (2- or 4-byte elements). 32x32 tiles through shared memory (rows padded to 33 so the
// column reads are conflict-free), reads and writes coalesced. The GEMMs read A along its rows
// only, so a product with A transposed (dW = dY^T.X) transposes A first.
// Launch: block (32, 8), grid (ceil(cols/32), min(ceil(rows/32), 65535)); tile rows stride by
// gridDim.y.
template <typename T>
__device__ void transpose_body(const T* __restrict__ x, T* __restrict__ y, int rows, int cols) {
    __shared__ T tile[32][33];
    const int c0 = blockIdx.x * 32;
    for (int r0 = blockIdx.y * 32; r0 < rows; r0 += gridDim.y * 32) {
        for (int i = threadIdx.y; i < 32; i += 8) {
            const int r = r0 + i, c = c0 + threadIdx.x;
            if (r < rows && c < cols) tile[i][threadIdx.x] = x[(long)r * cols + c];
        }
        __syncthreads();
        for (int i = threadIdx.y; i < 32; i += 8) {
            const int c = c0 + i, r = r0 + threadIdx.x;
            if (c < cols && r < rows) y[(long)c * rows + r] = tile[threadIdx.x][i];
        }
        __syncthreads();
    }
}

extern "C" __global__ void transpose_b16(const unsigned short* x, unsigned short* y, int rows, int cols) {
    transpose_body<unsigned short>(x, y, rows, cols);
}
extern "C" __global__ void transpose_b32(const unsigned int* x, unsigned int* y, int rows, int cols) {
    transpose_body<unsigned int>(x, y, rows, cols);
}
