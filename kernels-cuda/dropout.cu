// LoRA dropout with the counter-based generator of `rng::uniform_at`, bit for bit (the CUDA
// twin of kernels-wgsl/dropout.wgsl): element i is kept when uniform_at(seed, i) >= p and then
// scaled by keep = 1 / (1 - p) (computed on the host in f32), so the mask is the same on every
// device for a given seed.
//
//   dropout_*:      y[i] = x[i] * keep                   when kept, else 0
//   dropout_axpy_*: y[i] = base[i] + s * t[i] * keep     when kept, else base[i]
//                   (the dropped input's share of dX: dX = dY.W + s (dY.B.A) ∘ mask / (1 - p))
//
// f32 or bf16 storage (f32 math, each operation rounded as the CPU rounds it, one more rounding
// at a bf16 store). Launch: a grid-stride loop.

#include "common.cuh"

// splitmix64's finalizer over seed ^ i * 0x9e3779b97f4a7c15; the top 24 bits as [0, 1).
__device__ __forceinline__ float uniform_at(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed ^ (i * 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(unsigned int)(z >> 40) / 16777216.0f;
}

template <typename T>
__device__ __forceinline__ void dropout(const T* x, T* y, long n, unsigned long long seed, float p, float keep) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        Elem<T>::store(y, i, uniform_at(seed, i) >= p ? Elem<T>::load(x, i) * keep : 0.0f);
}

template <typename T>
__device__ __forceinline__ void dropout_axpy(const T* base, const T* t, T* y, long n, unsigned long long seed, float p, float keep,
                                             float s) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float b = Elem<T>::load(base, i);
        // Rounded as written (b + (s * t) * keep), never contracted to an FMA, as the CPU does.
        Elem<T>::store(y, i, uniform_at(seed, i) >= p ? __fadd_rn(b, __fmul_rn(__fmul_rn(s, Elem<T>::load(t, i)), keep)) : b);
    }
}

#define DROPOUT_INSTANCES(SUF, T)                                                                                     \
    extern "C" __global__ void dropout_##SUF(const T* x, T* y, long n, unsigned long long seed, float p, float keep) { \
        dropout<T>(x, y, n, seed, p, keep);                                                                           \
    }                                                                                                                 \
    extern "C" __global__ void dropout_axpy_##SUF(const T* base, const T* t, T* y, long n, unsigned long long seed,    \
                                                  float p, float keep, float s) {                                     \
        dropout_axpy<T>(base, t, y, n, seed, p, keep, s);                                                             \
    }

DROPOUT_INSTANCES(f32, float)
DROPOUT_INSTANCES(bf16, bf16_bits)
