// Shared helpers for tuna's CUDA kernels. Header-only and free of CUDA headers, so NVRTC can
// compile the inlined source without an include path.
#pragma once

typedef unsigned short bf16_bits;  // bfloat16 as its bit pattern
typedef unsigned int u32;

// bf16 -> f32 is exact: the bf16 bits are the high half of the f32.
__device__ __forceinline__ float bf16_to_f32(bf16_bits h) {
    return __uint_as_float(((u32)h) << 16);
}

// f32 -> bf16, round to nearest even; NaN stays NaN (quiet).
__device__ __forceinline__ bf16_bits f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_bits)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_bits)(u >> 16);
}

typedef unsigned short f16_bits;  // IEEE half as its bit pattern (the same C type as bf16_bits)

// f16 <-> f32 by PTX cvt: widening is exact, narrowing rounds to nearest even.
__device__ __forceinline__ float f16_to_f32(f16_bits h) {
#ifdef TUNA_CUDA_EMU  // compiled as host C++ (tools/cuda-emu)
    return emu::f16_to_f32(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}
__device__ __forceinline__ f16_bits f32_to_f16(float f) {
#ifdef TUNA_CUDA_EMU
    return emu::f32_to_f16(f);
#else
    f16_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

// Load/store an element of storage type T as f32.
template <typename T> struct Elem;
// (`round`: v as a store and a load would give it back.)
template <> struct Elem<float> {
    static __device__ __forceinline__ float load(const float* p, long i) { return p[i]; }
    static __device__ __forceinline__ void store(float* p, long i, float v) { p[i] = v; }
    static __device__ __forceinline__ float round(float v) { return v; }
};
template <> struct Elem<bf16_bits> {
    static __device__ __forceinline__ float load(const bf16_bits* p, long i) { return bf16_to_f32(p[i]); }
    static __device__ __forceinline__ void store(bf16_bits* p, long i, float v) { p[i] = f32_to_bf16(v); }
    static __device__ __forceinline__ float round(float v) { return bf16_to_f32(f32_to_bf16(v)); }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum over the block; every thread gets the total. blockDim.x must be a multiple of 32, at most
// 1024. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// -inf without math.h (NVRTC compiles with no headers).
#define TUNA_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Max over the block, as `block_sum`.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : TUNA_NEG_INF;
    return warp_max(v);
}
