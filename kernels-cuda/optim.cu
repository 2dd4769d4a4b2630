// Optimizer steps: dense SM3, sparse SM3, AdamW, and the global gradient sum of squares that
// the clip factor comes from. The math is `src/kernels/optim.rs`'s module doc; in short, with
// g = s * grad (s the gradient scale, see `effective_scale`):
//
//   SM3:   v = min(r_old[i], c_old[j]) + g^2,  u = g / (sqrt(v) + eps),
//          u <- m <- b1*m + (1-b1)*u (momentum),  w <- w*decay - lr*u,
//          r_new[i] = max_j v,  c_new[j] = max_i v          (decay = 1 - lr*wd, from the host)
//   AdamW: w <- w*decay;  m <- m + (1-b1)*(g-m);  v <- b2*v + (1-b2)*g^2;
//          w <- w - step_size * m / (sqrt(v)/bc2_sqrt + eps) (step_size, bc2_sqrt from the host)
//
// Shapes: w, g, m [R, C] row-major (a vector is [L, 1]); r [R], c [C]; sparse: N sorted flat
// indices i*C + j with their deltas, gradients and momenta [N].
//
// Parameter storage is f32 or bf16 (u16 bits); arithmetic, moments and accumulators are f32.
// A bf16 step may carry an f32 master copy: then the master is read and written and the bf16
// parameter gets its rounded value; without it the bf16 parameter is read and rounded back.
//
// Accumulator max: v >= 0, and for non-negative floats the order of the bit patterns as
// unsigned integers is the order of the values, so the new accumulators are an integer
// atomicMax on the bit patterns. Dense SM3 writes them to r_new / c_new (zeroed by the
// launcher; the old ones are only read). Sparse SM3 stores bits(v) + 1 in zeroed scratch, so
// 0 means "no active entry" and `sm3_sparse_finish` keeps the old accumulator there.
//
// Clip factor in-kernel: when `sumsq` (a device f64 written by `sumsq_finish`) is non-null,
// s = scale * clip(norm = (float)sqrt(*sumsq)), clip = max_norm / (norm + 1e-6) when
// norm > max_norm > 0, else 1 -- exactly `optim::clip_scale`. With a null `sumsq`, s = scale.
//
// Launch geometry:
// - sm3_dense_*: block (32, 8); a block owns a tile of 128 columns x 64 rows (lane l of warp y
//   takes columns l, l+32, l+64, l+96 of rows y, y+8, ..., y+56). Row maxima: a warp max, then
//   one atomic per row per tile; column maxima: a shared-memory max over the 8 warps, then one
//   atomic per column per tile. grid = (ceil(C/128), min(ceil(R/64), 65535)); row tiles past
//   gridDim.y are taken by a grid-stride loop. Tiles are sized for matrices: a vector [L, 1]
//   keeps one lane in 128 busy, which is fine for the norm weights and biases it is used for
//   (a few thousand elements) and would want a one-dimensional kernel if long vectors appear.
// - sm3_sparse_f32: one thread per active entry (an index past the matrix is skipped);
//   sm3_sparse_finish one thread per max(R, C).
// - adamw_*: one thread per element, grid.x = ceil(n / blockDim.x); adamw_multi_* the same per
//   tensor, the tensors' grids one after another (see "many tensors per launch").
// - sumsq_partial_multi_*: per tensor a fixed number of blocks (chosen by the launcher from its
//   length only), grid-stride over it, one f64 partial per block; sumsq_finish: one block of 256 sums every partial in a fixed order, so
//   the result is deterministic run to run.
#include "common.cuh"

#define SM3_TILE_COLS 128
#define SM3_ROWS_PER_THREAD 8
#define SM3_WARPS 8

__device__ __forceinline__ float effective_scale(const double* sumsq, float max_norm, float scale) {
    if (sumsq != nullptr) {
        const float norm = (float)sqrt(*sumsq);
        if (max_norm > 0.0f && norm > max_norm) scale *= max_norm / (norm + 1e-6f);
    }
    return scale;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum over a block whose size is a multiple of 32; thread 0 gets the total.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0;
    return warp == 0 ? warp_sum_f64(v) : 0.0;
}

// One parameter element: reads the f32 value (the master when there is one), writes it back
// (and the bf16 copy).
template <typename T>
struct Param {
    static __device__ __forceinline__ float load(const T* w, const float* master, long e) {
        return master != nullptr ? master[e] : Elem<T>::load(w, e);
    }
    static __device__ __forceinline__ void store(T* w, float* master, long e, float v) {
        if (master != nullptr) master[e] = v;
        Elem<T>::store(w, e, v);
    }
};

// ---- SM3, dense ---------------------------------------------------------------------------
template <typename T>
__device__ void sm3_dense(T* __restrict__ w, const T* __restrict__ grad, float* __restrict__ master,
                          const float* __restrict__ r_old, const float* __restrict__ c_old,
                          u32* __restrict__ r_new, u32* __restrict__ c_new, float* __restrict__ mom,
                          const double* __restrict__ sumsq, int R, int C, float lr, float eps, float beta1,
                          float decay, float scale, float max_norm) {
    __shared__ float col_part[SM3_WARPS][SM3_TILE_COLS];
    const float s = effective_scale(sumsq, max_norm, scale);
    const int lane = threadIdx.x, wy = threadIdx.y;
    const int col0 = blockIdx.x * SM3_TILE_COLS;
    const int tiles_r = (R + SM3_WARPS * SM3_ROWS_PER_THREAD - 1) / (SM3_WARPS * SM3_ROWS_PER_THREAD);
    float cmax[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float c_old_q[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int j = col0 + lane + 32 * q;
        c_old_q[q] = j < C ? c_old[j] : 0.0f;
    }
    // Main loop: a row tile per iteration; a warp's row index is uniform across the warp, so
    // the warp max below runs with every lane present.
    for (int tile = blockIdx.y; tile < tiles_r; tile += gridDim.y) {
#pragma unroll 2
        for (int k = 0; k < SM3_ROWS_PER_THREAD; ++k) {
            const int i = tile * (SM3_WARPS * SM3_ROWS_PER_THREAD) + k * SM3_WARPS + wy;
            if (i >= R) break;
            const float ri = r_old[i];
            float rmax = 0.0f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int j = col0 + lane + 32 * q;
                if (j < C) {
                    const long e = (long)i * C + j;
                    const float g = Elem<T>::load(grad, e) * s;
                    const float v = fminf(ri, c_old_q[q]) + g * g;
                    float u = g / (sqrtf(v) + eps);
                    if (mom != nullptr) {
                        u = beta1 * mom[e] + (1.0f - beta1) * u;
                        mom[e] = u;
                    }
                    Param<T>::store(w, master, e, Param<T>::load(w, master, e) * decay - lr * u);
                    rmax = fmaxf(rmax, v);
                    cmax[q] = fmaxf(cmax[q], v);
                }
            }
            rmax = warp_max(rmax);
            if (lane == 0 && rmax > 0.0f) atomicMax(&r_new[i], __float_as_uint(rmax));
        }
    }
    // Epilogue: column maxima of the tile over the 8 warps, one atomic per column.
#pragma unroll
    for (int q = 0; q < 4; ++q) col_part[wy][lane + 32 * q] = cmax[q];
    __syncthreads();
    const int t = wy * 32 + lane;
    if (t < SM3_TILE_COLS && col0 + t < C) {
        float m = 0.0f;
#pragma unroll
        for (int y = 0; y < SM3_WARPS; ++y) m = fmaxf(m, col_part[y][t]);
        if (m > 0.0f) atomicMax(&c_new[col0 + t], __float_as_uint(m));
    }
}

// ---- SM3, sparse --------------------------------------------------------------------------
__device__ void sm3_sparse(const u32* __restrict__ indices, float* __restrict__ delta, const float* __restrict__ grad,
                           const float* __restrict__ r, const float* __restrict__ c, u32* __restrict__ r_tmp,
                           u32* __restrict__ c_tmp, float* __restrict__ mom, const double* __restrict__ sumsq,
                           int N, int R, int C, float lr, float eps, float beta1, float decay, float scale,
                           float max_norm) {
    const long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= N) return;
    const float s = effective_scale(sumsq, max_norm, scale);
    const u32 flat = indices[e];
    const u32 i = flat / (u32)C, j = flat % (u32)C;
    if (i >= (u32)R) return;  // outside the matrix: skipped rather than written out of bounds
    const float g = grad[e] * s;
    const float v = fminf(r[i], c[j]) + g * g;
    float u = g / (sqrtf(v) + eps);
    if (mom != nullptr) {
        u = beta1 * mom[e] + (1.0f - beta1) * u;
        mom[e] = u;
    }
    delta[e] = delta[e] * decay - lr * u;
    // +1 so that a zeroed slot means "untouched"; bits(v) <= bits(inf) < 0xffffffff.
    atomicMax(&r_tmp[i], __float_as_uint(v) + 1u);
    atomicMax(&c_tmp[j], __float_as_uint(v) + 1u);
}

// ---- AdamW --------------------------------------------------------------------------------
// Element e of one tensor (`s`: the gradient scale with the clip factor); returns the new value
// (before any rounding to T).
template <typename T>
__device__ __forceinline__ float adamw_element(T* __restrict__ w, const T* __restrict__ grad, float* __restrict__ master,
                                              float* __restrict__ m, float* __restrict__ v, long e, float s, float beta1,
                                              float beta2, float eps, float decay, float step_size, float bc2_sqrt) {
    const float g = Elem<T>::load(grad, e) * s;
    const float wv = Param<T>::load(w, master, e) * decay;
    float me = m[e], ve = v[e];
    me += (1.0f - beta1) * (g - me);
    ve = beta2 * ve + (1.0f - beta2) * g * g;
    m[e] = me;
    v[e] = ve;
    const float next = wv - step_size * me / (sqrtf(ve) / bc2_sqrt + eps);
    Param<T>::store(w, master, e, next);
    return next;
}

template <typename T>
__device__ void adamw(T* __restrict__ w, const T* __restrict__ grad, float* __restrict__ master, float* __restrict__ m,
                      float* __restrict__ v, const double* __restrict__ sumsq, long n, float beta1, float beta2,
                      float eps, float decay, float step_size, float bc2_sqrt, float scale, float max_norm) {
    const long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) return;
    adamw_element<T>(w, grad, master, m, v, e, effective_scale(sumsq, max_norm, scale), beta1, beta2, eps, decay, step_size, bc2_sqrt);
}

// ---- many tensors per launch ----------------------------------------------------------------
// A training step updates one small tensor after another (two LoRA factors per adapted linear:
// 224 of them in a 16-layer Llama), so one launch each costs more in launches than in work.
// The `_multi` kernels take up to MULTI_TENSORS tensors in one launch, their pointers in a
// struct passed by value (kernel parameters: 4 KiB at most). Block b works on the tensor t with
// first[t] <= b < first[t + 1], as the one-tensor kernel's block b - first[t] would, with the
// same arithmetic per element, so the results are the same bits.
#define MULTI_TENSORS 40

template <typename T>
struct AdamWList {
    int count, pad;
    int first[MULTI_TENSORS + 1];  // each tensor's first block; first[count] = the grid
    long n[MULTI_TENSORS];
    T* w[MULTI_TENSORS];           // the parameter written (a new buffer where a master is read)
    const T* g[MULTI_TENSORS];
    float* master[MULTI_TENSORS];  // f32 masters, or null: w is read and written in place
    float* m[MULTI_TENSORS];
    float* v[MULTI_TENSORS];
    bf16_bits* half[MULTI_TENSORS];  // f32 parameters only: null, or a bf16 copy of the new value
};

template <typename T>
struct SumsqList {
    int count, pad;
    int first[MULTI_TENSORS + 1];  // each tensor's first block (and partial)
    long n[MULTI_TENSORS];
    const T* g[MULTI_TENSORS];
};

// The launcher's #[repr(C)] mirrors (src/kernels/optim/cuda.rs) assert the same sizes.
static_assert(sizeof(AdamWList<float>) == 2416 && sizeof(SumsqList<float>) == 816, "kernel parameter layout");

// The tensor block `b` belongs to: the last t with first[t] <= b (first is increasing).
__device__ __forceinline__ int multi_tensor_of(const int* first, int count, int b) {
    int t = 0;
    while (t + 1 < count && first[t + 1] <= b) t++;
    return t;
}

template <typename T>
__device__ void adamw_multi(const AdamWList<T>& l, const double* __restrict__ sumsq, float beta1, float beta2, float eps,
                            float decay, float step_size, float bc2_sqrt, float scale, float max_norm) {
    const int t = multi_tensor_of(l.first, l.count, blockIdx.x);
    const long e = (long)(blockIdx.x - l.first[t]) * blockDim.x + threadIdx.x;
    if (e >= l.n[t]) return;
    const float next = adamw_element<T>(l.w[t], l.g[t], l.master[t], l.m[t], l.v[t], e, effective_scale(sumsq, max_norm, scale), beta1,
                                        beta2, eps, decay, step_size, bc2_sqrt);
    // The bf16 copy a bf16 model reads (the LoRA factors): `cast_f32_bf16` of the new value,
    // written here instead of by a launch per factor in the next forward.
    if (l.half[t] != nullptr) l.half[t][e] = f32_to_bf16(next);
}

// The sum of squares, first pass: tensor t's blocks (first[t + 1] - first[t] of them, fixed by
// the launcher from its length alone) stride over it, and block b writes its f64 partial to
// partials[b]; `sumsq_finish` then sums them.
template <typename T>
__device__ void sumsq_partial_multi(const SumsqList<T>& l, double* __restrict__ partials) {
    __shared__ double scratch[32];
    const int t = multi_tensor_of(l.first, l.count, blockIdx.x);
    const int b = blockIdx.x - l.first[t], blocks = l.first[t + 1] - l.first[t];
    const T* g = l.g[t];
    double acc = 0.0;
    for (long e = (long)b * blockDim.x + threadIdx.x; e < l.n[t]; e += (long)blocks * blockDim.x) {
        const double x = (double)Elem<T>::load(g, e);
        acc += x * x;
    }
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// ---- entry points -------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256) sm3_dense_f32(
    float* w, const float* g, const float* r_old, const float* c_old, u32* r_new, u32* c_new, float* mom,
    const double* sumsq, int R, int C, float lr, float eps, float beta1, float decay, float scale, float max_norm) {
    sm3_dense<float>(w, g, nullptr, r_old, c_old, r_new, c_new, mom, sumsq, R, C, lr, eps, beta1, decay, scale, max_norm);
}
extern "C" __global__ void __launch_bounds__(256) sm3_dense_bf16(
    bf16_bits* w, const bf16_bits* g, float* master, const float* r_old, const float* c_old, u32* r_new, u32* c_new,
    float* mom, const double* sumsq, int R, int C, float lr, float eps, float beta1, float decay, float scale,
    float max_norm) {
    sm3_dense<bf16_bits>(w, g, master, r_old, c_old, r_new, c_new, mom, sumsq, R, C, lr, eps, beta1, decay, scale, max_norm);
}
extern "C" __global__ void sm3_sparse_f32(const u32* indices, float* delta, const float* g, const float* r,
                                          const float* c, u32* r_tmp, u32* c_tmp, float* mom, const double* sumsq,
                                          int N, int R, int C, float lr, float eps, float beta1, float decay,
                                          float scale, float max_norm) {
    sm3_sparse(indices, delta, g, r, c, r_tmp, c_tmp, mom, sumsq, N, R, C, lr, eps, beta1, decay, scale, max_norm);
}
// r[i] (c[j]) takes the new maximum where some active entry touched it and keeps its value
// elsewhere. Runs after sm3_sparse_f32 on the same stream, so every old value has been read.
extern "C" __global__ void sm3_sparse_finish(float* r, float* c, const u32* r_tmp, const u32* c_tmp, int R, int C) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < R && r_tmp[t] != 0u) r[t] = __uint_as_float(r_tmp[t] - 1u);
    if (t < C && c_tmp[t] != 0u) c[t] = __uint_as_float(c_tmp[t] - 1u);
}
extern "C" __global__ void adamw_f32(float* w, const float* g, float* m, float* v, const double* sumsq, long n,
                                     float beta1, float beta2, float eps, float decay, float step_size, float bc2_sqrt,
                                     float scale, float max_norm) {
    adamw<float>(w, g, nullptr, m, v, sumsq, n, beta1, beta2, eps, decay, step_size, bc2_sqrt, scale, max_norm);
}
extern "C" __global__ void adamw_bf16(bf16_bits* w, const bf16_bits* g, float* master, float* m, float* v,
                                      const double* sumsq, long n, float beta1, float beta2, float eps, float decay,
                                      float step_size, float bc2_sqrt, float scale, float max_norm) {
    adamw<bf16_bits>(w, g, master, m, v, sumsq, n, beta1, beta2, eps, decay, step_size, bc2_sqrt, scale, max_norm);
}
extern "C" __global__ void adamw_multi_f32(const AdamWList<float> list, const double* sumsq, float beta1, float beta2, float eps,
                                           float decay, float step_size, float bc2_sqrt, float scale, float max_norm) {
    adamw_multi<float>(list, sumsq, beta1, beta2, eps, decay, step_size, bc2_sqrt, scale, max_norm);
}
extern "C" __global__ void adamw_multi_bf16(const AdamWList<bf16_bits> list, const double* sumsq, float beta1, float beta2,
                                            float eps, float decay, float step_size, float bc2_sqrt, float scale, float max_norm) {
    adamw_multi<bf16_bits>(list, sumsq, beta1, beta2, eps, decay, step_size, bc2_sqrt, scale, max_norm);
}
extern "C" __global__ void sumsq_partial_multi_f32(const SumsqList<float> list, double* partials) {
    sumsq_partial_multi<float>(list, partials);
}
extern "C" __global__ void sumsq_partial_multi_bf16(const SumsqList<bf16_bits> list, double* partials) {
    sumsq_partial_multi<bf16_bits>(list, partials);
}
// *out = the sum of partials[0..count), in a fixed order (one block of 256).
extern "C" __global__ void sumsq_finish(const double* partials, int count, double* out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int k = threadIdx.x; k < count; k += blockDim.x) acc += partials[k];
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) *out = acc;
}
