// The sparse deltas of sparse fine-tuning (SpIEL) on the GPU: δ holds the values at sorted,
// distinct flat indices e = n·K + k of an [N, K] weight (see src/kernels/sparse.rs).
//
//   sparse_apply_T:  w[idx[i]] = round_T(f32(w[idx[i]]) + delta[i])   (in place, on a copy of W)
//   sparse_gather_T: out[i] = f32(g[idx[i]])                           (dδ from the dense dW)
//
// T is the weight's (or gradient's) storage: f32, bf16 or f16; δ and the gathered values are
// f32. The indices are distinct, so no two threads touch one element (16-bit stores are their
// own memory locations on the GPU). An index at or past `len` is skipped (the host checks
// them; this only keeps a bad one from writing out of bounds).
//
// Launch: a grid-stride loop over n indices, any grid.

#include "common.cuh"

// f16 and bf16 share a C type (unsigned short), so the loads are spelled out per type.
__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld_bf16(const bf16_bits* p, long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float ld_f16(const f16_bits* p, long i) { return f16_to_f32(p[i]); }
__device__ __forceinline__ float id(float v) { return v; }

#define SPARSE(name, T, LOAD, ROUND)                                                                        \
    extern "C" __global__ void sparse_apply_##name(T* w, const u32* idx, const float* delta, long n, long len) { \
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) { \
            const long e = idx[i];                                                                          \
            if (e < len) w[e] = ROUND(LOAD(w, e) + delta[i]);                                               \
        }                                                                                                   \
    }                                                                                                       \
    extern "C" __global__ void sparse_gather_##name(const T* g, const u32* idx, float* out, long n, long len) { \
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) { \
            const long e = idx[i];                                                                          \
            out[i] = e < len ? LOAD(g, e) : 0.0f;                                                           \
        }                                                                                                   \
    }

SPARSE(f32, float, ld, id)
SPARSE(bf16, bf16_bits, ld_bf16, f32_to_bf16)
SPARSE(f16, f16_bits, ld_f16, f32_to_f16)
