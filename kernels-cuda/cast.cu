// Casts between f32, f16 and bf16 storage, round to nearest even (bit-exact with the `half`
// crate; NaN stays a quiet NaN). 16-bit values travel as their bit patterns; the conversions
// are common.cuh's (f16 by PTX `cvt`, bf16 in integer arithmetic).
//
// Launch: a grid-stride loop over n elements, any grid.

#include "common.cuh"

__device__ __forceinline__ float load_f32(const float* x, long i) { return x[i]; }
__device__ __forceinline__ float load_f16(const f16_bits* x, long i) { return f16_to_f32(x[i]); }
__device__ __forceinline__ float load_bf16(const bf16_bits* x, long i) { return bf16_to_f32(x[i]); }
__device__ __forceinline__ float to_f32(float v) { return v; }

#define CAST(from, to, TIN, TOUT, CONVERT)                                                       \
    extern "C" __global__ void cast_##from##_##to(const TIN* x, TOUT* y, long n) {                 \
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) \
            y[i] = CONVERT(load_##from(x, i));                                                     \
    }

CAST(f32, f16, float, unsigned short, f32_to_f16)
CAST(f32, bf16, float, unsigned short, f32_to_bf16)
CAST(f16, f32, unsigned short, float, to_f32)
CAST(bf16, f32, unsigned short, float, to_f32)
CAST(f16, bf16, unsigned short, unsigned short, f32_to_bf16)
CAST(bf16, f16, unsigned short, unsigned short, f32_to_f16)
