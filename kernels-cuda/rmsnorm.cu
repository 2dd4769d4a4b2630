// RMSNorm, forward and backward.
//
//   forward:  r_m = 1 / sqrt(mean_n(x[m,n]^2) + eps),   y[m,n] = w[n] * x[m,n] * r_m
//   backward: c_m = (1/N) * sum_n dy[m,n] * w[n] * x[m,n]
//             dx[m,n] = r_m * (dy[m,n] * w[n] - x[m,n] * r_m^2 * c_m)
//             dw[n]   = sum_m dy[m,n] * x[m,n] * r_m
//
// Shapes: x, y, dy, dx [M, N] row-major (row stride N); w, dw [N]; rstd [M] in f32 (saved by
// the forward for the backward). Storage f32 or bf16, arithmetic in f32.
//
// The `_add` forms fold in the residual add before a pre-norm, saving a launch and passes over
// [M, N] each way: the forward normalizes h = x + d (rounded to the storage type, as a separate
// add would store it) and writes h beside y; the backward adds dres (h's gradient from its other
// consumers) to dx rounded to the storage type, as a separate add would: the fused and the
// separate kernels give the same bits (checkpointed layers, which keep the add between layers
// separate, give the same gradients as plain ones).
//
// Launch: fwd and bwd_dx one block per row (grid.x = M, any block size that is a multiple of 32
// up to 1024; 256 is used), threads stride over the row. bwd_dw in two passes, deterministic:
// bwd_dw_part one thread per column (grid.x = ceil(N / blockDim.x)) and one block row per
// chunk of `chunk` rows (grid.y), writing the chunk's f32 sum to part[y * N + n]; bwd_dw_sum
// adds the chunks' sums in order per column and stores dw (a column summed over all 8192 rows
// by one thread, as before, left 8-16 blocks busy on a 132-multiprocessor GPU).
#include "common.cuh"

// d and h null: plain RMSNorm of x. Otherwise h = x + d is stored and normalized; each thread
// reads back the h elements it stored itself, so no barrier is needed between the passes.
template <typename T>
__device__ void rmsnorm_fwd(const T* __restrict__ x, const T* __restrict__ d, const T* __restrict__ w,
                            T* __restrict__ h, T* __restrict__ y, float* __restrict__ rstd, int M, int N, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    if (row >= M) return;
    const T* xr = x + row * N;
    if (d != nullptr) {
        const T* dr = d + row * N;
        T* hr = h + row * N;
        for (int n = threadIdx.x; n < N; n += blockDim.x)
            Elem<T>::store(hr, n, Elem<T>::load(xr, n) + Elem<T>::load(dr, n));
        xr = hr;
    }
    float ss = 0.0f;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        float v = Elem<T>::load(xr, n);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)N + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int n = threadIdx.x; n < N; n += blockDim.x)
        Elem<T>::store(y, row * N + n, Elem<T>::load(w, n) * Elem<T>::load(xr, n) * r);
}

// dres null: plain backward. Otherwise dres is added to dx rounded (see the top).
template <typename T>
__device__ void rmsnorm_bwd_dx(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy,
                               const float* __restrict__ rstd, const T* __restrict__ dres, T* __restrict__ dx, int M, int N) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    if (row >= M) return;
    const long base = row * N;
    float dot = 0.0f;
    for (int n = threadIdx.x; n < N; n += blockDim.x)
        dot += Elem<T>::load(dy, base + n) * Elem<T>::load(w, n) * Elem<T>::load(x, base + n);
    const float c = block_sum(dot, scratch) / (float)N;
    const float r = rstd[row];
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        float g = Elem<T>::load(dy, base + n) * Elem<T>::load(w, n);
        float v = r * (g - Elem<T>::load(x, base + n) * r * r * c);
        if (dres != nullptr) v = Elem<T>::round(v) + Elem<T>::load(dres, base + n);
        Elem<T>::store(dx, base + n, v);
    }
}

template <typename T>
__device__ void rmsnorm_bwd_dw_part(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ rstd,
                                    float* __restrict__ part, int M, int N, int chunk) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const long m0 = (long)blockIdx.y * chunk, m1 = min((long)M, m0 + chunk);
    float acc = 0.0f;
    for (long m = m0; m < m1; ++m) acc += Elem<T>::load(dy, m * N + n) * Elem<T>::load(x, m * N + n) * rstd[m];
    part[(long)blockIdx.y * N + n] = acc;
}

template <typename T>
__device__ void rmsnorm_bwd_dw_sum(const float* __restrict__ part, T* __restrict__ dw, int N, int chunks) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float acc = 0.0f;
    for (int c = 0; c < chunks; ++c) acc += part[(long)c * N + n];
    Elem<T>::store(dw, n, acc);
}

// ---- entry points -------------------------------------------------------------------------
extern "C" __global__ void rmsnorm_fwd_f32(const float* x, const float* w, float* y, float* rstd, int M, int N, float eps) {
    rmsnorm_fwd<float>(x, nullptr, w, nullptr, y, rstd, M, N, eps);
}
extern "C" __global__ void rmsnorm_fwd_bf16(const bf16_bits* x, const bf16_bits* w, bf16_bits* y, float* rstd, int M, int N, float eps) {
    rmsnorm_fwd<bf16_bits>(x, nullptr, w, nullptr, y, rstd, M, N, eps);
}
extern "C" __global__ void rmsnorm_fwd_add_f32(const float* x, const float* d, const float* w, float* h, float* y, float* rstd, int M, int N, float eps) {
    rmsnorm_fwd<float>(x, d, w, h, y, rstd, M, N, eps);
}
extern "C" __global__ void rmsnorm_fwd_add_bf16(const bf16_bits* x, const bf16_bits* d, const bf16_bits* w, bf16_bits* h, bf16_bits* y, float* rstd, int M, int N, float eps) {
    rmsnorm_fwd<bf16_bits>(x, d, w, h, y, rstd, M, N, eps);
}
extern "C" __global__ void rmsnorm_bwd_dx_f32(const float* x, const float* w, const float* dy, const float* rstd, float* dx, int M, int N) {
    rmsnorm_bwd_dx<float>(x, w, dy, rstd, nullptr, dx, M, N);
}
extern "C" __global__ void rmsnorm_bwd_dx_bf16(const bf16_bits* x, const bf16_bits* w, const bf16_bits* dy, const float* rstd, bf16_bits* dx, int M, int N) {
    rmsnorm_bwd_dx<bf16_bits>(x, w, dy, rstd, nullptr, dx, M, N);
}
extern "C" __global__ void rmsnorm_bwd_dx_add_f32(const float* x, const float* w, const float* dy, const float* rstd, const float* dres, float* dx, int M, int N) {
    rmsnorm_bwd_dx<float>(x, w, dy, rstd, dres, dx, M, N);
}
extern "C" __global__ void rmsnorm_bwd_dx_add_bf16(const bf16_bits* x, const bf16_bits* w, const bf16_bits* dy, const float* rstd, const bf16_bits* dres, bf16_bits* dx, int M, int N) {
    rmsnorm_bwd_dx<bf16_bits>(x, w, dy, rstd, dres, dx, M, N);
}
extern "C" __global__ void rmsnorm_bwd_dw_part_f32(const float* x, const float* dy, const float* rstd, float* part, int M, int N, int chunk) {
    rmsnorm_bwd_dw_part<float>(x, dy, rstd, part, M, N, chunk);
}
extern "C" __global__ void rmsnorm_bwd_dw_part_bf16(const bf16_bits* x, const bf16_bits* dy, const float* rstd, float* part, int M, int N, int chunk) {
    rmsnorm_bwd_dw_part<bf16_bits>(x, dy, rstd, part, M, N, chunk);
}
extern "C" __global__ void rmsnorm_bwd_dw_sum_f32(const float* part, float* dw, int N, int chunks) {
    rmsnorm_bwd_dw_sum<float>(part, dw, N, chunks);
}
extern "C" __global__ void rmsnorm_bwd_dw_sum_bf16(const float* part, bf16_bits* dw, int N, int chunks) {
    rmsnorm_bwd_dw_sum<bf16_bits>(part, dw, N, chunks);
}
