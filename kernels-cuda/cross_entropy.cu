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
// Launch: ce_rows one block per row (grid.x = M, 256 threads); ce_sum one block of 256 threads.
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
extern "C" __global__ void ce_sum_f32(const float* loss, int M, float inv_count, float* out) { ce_sum(loss, M, inv_count, out); }
