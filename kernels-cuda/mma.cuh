// Tensor-core helpers shared by the mma.sync kernels (lora_gemm.cu, flash_attention.cu):
// the two 16-bit storage types with their m16n8k16 mma, cp.async and ldmatrix.
// sm_80 and newer.
#pragma once
#include "common.cuh"

// The two storage types: conversion and the mma instruction's type name.
struct Bf16 {
    static __device__ __forceinline__ float to_f32(unsigned short h) { return bf16_to_f32(h); }
    static __device__ __forceinline__ unsigned short from_f32(float f) { return f32_to_bf16(f); }
    static __device__ __forceinline__ void mma(float* d, const u32* a, const u32* b) {
#ifdef TUNA_CUDA_EMU
        emu::mma16816<true>(d, a, b);
#else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
};
struct F16 {
    static __device__ __forceinline__ float to_f32(unsigned short h) { return f16_to_f32(h); }
    static __device__ __forceinline__ unsigned short from_f32(float f) { return f32_to_f16(f); }
    static __device__ __forceinline__ void mma(float* d, const u32* a, const u32* b) {
#ifdef TUNA_CUDA_EMU
        emu::mma16816<false>(d, a, b);
#else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
};

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared, the bytes past `src_bytes` (0..16) zero-filled.
#ifdef TUNA_CUDA_EMU  // compiled as host C++ (tools/cuda-emu): the emulator's copies and warp instructions
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) { emu::cp_async(dst, src, src_bytes); }
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { emu::cp_async_wait(N); }
__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* p) { emu::ldmatrix_x4<false>(r, p); }
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const void* p) { emu::ldmatrix_x4<true>(r, p); }
#else
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes) : "memory");
}
// The "memory" clobbers keep the compiler from moving plain loads and stores of the tiles across
// the copies and the wait (a barrier after the wait does too, but not every use has one next).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
#endif
