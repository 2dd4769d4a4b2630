// Cross-entropy over rows of logits, for the fused linear cross-entropy (the logits of one chunk
// of rows at a time, made by the GEMM; see src/kernels/cross_entropy.rs).
//
//   ce_rows:  per row m with target t = targets[m] (t == ignore: loss 0, gradient 0)
//             lse_m = log sum_v exp(z[m,v]),  loss[m] = lse_m - z[m,t]
//             with `grad`, z is overwritten in place by dz[m,v] = (exp(z[m,v] - lse_m) - [v == t]) * inv_count
//   ce_sum:   out[0] = inv_count * sum_m loss[m], summed in a fixed order (one block), so the
//             loss is the same run to run.
//
// Shapes: z [M, V] row-major, targets [M] i32 (checked on the host: in [0, V) or ignore),
// loss [M] f32. Storage of z f32 or bf16, math f32.
//   argmax_rows: out[m] = the first v where z[m, v] is the row's largest number, NaNs skipped,
//             and 0 when z[m, 0] is NaN or the row holds none: the CPU's greedy sampler's
//             rule, so decoding reads one index a row instead of V logits.
// Launch: ce_rows and argmax_rows one block per row (grid.x = M, 256 threads); ce_sum one
// block of 256 threads.
#include "common.cuh"

template <typename T>
__device__ void ce_rows(T* z, const int* __restrict__ targets, float* __restrict__ loss, int V, int ignore,
                        float inv_count, int grad) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    T* zr = z + row * (long)V;
    const int t = targets[row];
    if (t == ignore) {
        if (threadIdx.x == 0) loss[row] = 0.0f;
        if (grad)
            for (int v = threadIdx.x; v < V; v += blockDim.x) Elem<T>::store(zr, v, 0.0f);
        return;
    }
    float mx = TUNA_NEG_INF;
    for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, Elem<T>::load(zr, v));
    mx = block_max(mx, scratch);
    float se = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) se += expf(Elem<T>::load(zr, v) - mx);
    const float lse = mx + logf(block_sum(se, scratch));
    if (threadIdx.x == 0) loss[row] = lse - Elem<T>::load(zr, t);
    // Every thread has read z[m, t] (thread 0) before any writes it: the block sums above end
    // with a barrier, and this one orders thread 0's read before the overwrite.
    __syncthreads();
    if (grad)
        for (int v = threadIdx.x; v < V; v += blockDim.x)
            Elem<T>::store(zr, v, (expf(Elem<T>::load(zr, v) - lse) - (v == t ? 1.0f : 0.0f)) * inv_count);
}

__device__ void ce_sum(const float* __restrict__ loss, int M, float inv_count, float* __restrict__ out) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int m = threadIdx.x; m < M; m += blockDim.x) s += loss[m];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = s * inv_count;
}

extern "C" __global__ void ce_rows_f32(float* z, const int* targets, float* loss, int V, int ignore, float inv_count, int grad) {
    ce_rows<float>(z, targets, loss, V, ignore, inv_count, grad);
}
extern "C" __global__ void ce_rows_bf16(bf16_bits* z, const int* targets, float* loss, int V, int ignore, float inv_count, int grad) {
    ce_rows<bf16_bits>(z, targets, loss, V, ignore, inv_count, grad);
}
__device__ __forceinline__ bool is_nan_bits(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

template <typename T>
__device__ void argmax_rows(const T* __restrict__ z, int* __restrict__ out, int V) {
    __shared__ float best_v[256];
    __shared__ int best_i[256];
    const int tid = threadIdx.x;
    const T* zr = z + (long)blockIdx.x * V;
    // Each thread's first largest number of its columns (it visits them in order); -1: none.
    float bv = 0.0f;
    int bi = -1;
    for (int v = tid; v < V; v += blockDim.x) {
        const float x = Elem<T>::load(zr, v);
        if (!is_nan_bits(x) && (bi < 0 || x > bv)) bv = x, bi = v;
    }
    best_v[tid] = bv;
    best_i[tid] = bi;
    __syncthreads();
    // A tree over the threads: the larger number wins, a tie goes to the lower column.
    for (int s = 128; s > 0; s >>= 1) {
        if (tid < s) {
            const float ov = best_v[tid + s];
            const int oi = best_i[tid + s];
            if (oi >= 0 && (best_i[tid] < 0 || ov > best_v[tid] || (ov == best_v[tid] && oi < best_i[tid]))) best_v[tid] = ov, best_i[tid] = oi;
        }
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = (best_i[0] < 0 || is_nan_bits(Elem<T>::load(zr, 0))) ? 0 : best_i[0];
}

extern "C" __global__ void __launch_bounds__(256) argmax_rows_f32(const float* z, int* out, int V) { argmax_rows<float>(z, out, V); }
extern "C" __global__ void __launch_bounds__(256) argmax_rows_bf16(const bf16_bits* z, int* out, int V) { argmax_rows<bf16_bits>(z, out, V); }
extern "C" __global__ void ce_sum_f32(const float* loss, int M, float inv_count, float* out) { ce_sum(loss, M, inv_count, out); }
