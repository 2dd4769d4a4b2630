// NF4 weights in bitsandbytes' layout (`src/kernels/nf4.rs`), as the GEMM kernels read them
// (lora_gemm.cu, gemm_sm90.cu): the code of flat element e in byte e/2 (high nibble first),
// a_b = map[q_b]*absmax2[b/256] + offset per block b = e/64, w = NF4[code]*a_b, computed with
// __fmul_rn / __fadd_rn (no contraction) so that every kernel's weights equal
// `nf4::cpu::dequantize` exactly.
#pragma once
#include "common.cuh"

// The NF4 tables: the 16 code values are passed in `tables[256..272]` with the dynamic map in
// `tables[0..256]`, both uploaded from the crate's own f32 tables.
struct Nf4 {
    const unsigned char* packed;
    const unsigned char* absmax;
    const float* absmax2;
    const float* tables;
    float offset;
};

__device__ __forceinline__ float nf4_at(const Nf4& q, const float* map, const float* code, long e) {
    const unsigned char byte = q.packed[e >> 1];
    const int c = (e & 1) ? (byte & 0xf) : (byte >> 4);
    const long b = e >> 6;
    const float a = __fadd_rn(__fmul_rn(map[q.absmax[b]], q.absmax2[b >> 8]), q.offset);
    return __fmul_rn(code[c], a);
}

// The NF4 arguments every kernel that reads NF4 takes last (`Nf4Device::push_args`).
#define NF4_PARAMS const unsigned char *packed, const unsigned char *absmax, const float *absmax2, const float *tables, float offset
#define NF4_ARGS Nf4{packed, absmax, absmax2, tables, offset}
